"""The VAE: a Gaussian recognition model q(z|x), a standard normal prior p(z) and a
decoder whose output a likelihood object (likelihoods.py) turns into p(x|z).

    encoder: x (N, C, H, W), flattened -> hidden layers -> one linear head -> mu, logvar (N, z_dim)
    decoder: z (..., z_dim) -> hidden layers -> output (..., C * channels, H, W)

`VAE.forward(x, eps)` returns the per-example terms every objective needs
(objectives.Terms), so whatever wraps the module (DDP, graph capture) wraps the loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import likelihoods
from .errors import VaelabError
from .nets import ACTIVATIONS, MLP, Workspace
from .objectives import Terms, kl_normal, log_normal_from_eps, log_standard_normal, reparametrize

# Architecture presets by name: hidden sizes, activation and latent size.
PRESETS = {
    # The tutorial's network: 784-256-128 encoder, z-128-256-784 decoder.
    "tutorial": dict(encoder_hidden=(256, 128), decoder_hidden=(128, 256), activation="relu", z_dim=2),
    # Burda, Grosse & Salakhutdinov (2015), one stochastic layer.
    "burda1": dict(encoder_hidden=(200, 200), decoder_hidden=(200, 200), activation="tanh", z_dim=50),
}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model from its weights."""

    z_dim: int = 2
    encoder_hidden: tuple[int, ...] = (256, 128)
    decoder_hidden: tuple[int, ...] = (128, 256)
    activation: str = "relu"
    likelihood: str = "bernoulli"
    # Standard deviation of the Gaussian likelihood, fixed (not learned):
    # x ~ N(sigmoid(out), sigma^2 I) on grey levels in [0, 1].
    sigma: float = 0.1
    image_shape: tuple[int, int, int] = field(default=(1, 28, 28))  # (C, H, W)

    def __post_init__(self) -> None:
        self.encoder_hidden = tuple(int(h) for h in self.encoder_hidden)
        self.decoder_hidden = tuple(int(h) for h in self.decoder_hidden)
        shape = tuple(int(s) for s in self.image_shape)
        self.image_shape = (1, *shape) if len(shape) == 2 else shape  # runs saved (H, W)

    @property
    def x_dim(self) -> int:
        """Values per image, C * H * W."""
        c, h, w = self.image_shape
        return c * h * w

    def validate(self) -> None:
        """Raise VaelabError naming the first option that makes no sense."""
        if not isinstance(self.z_dim, int) or self.z_dim < 1:
            raise VaelabError(f"--z-dim must be a positive integer, got {self.z_dim}")
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise VaelabError(f"image_shape must be three positive sizes (C, H, W), got {self.image_shape}")
        if any(h < 1 for h in (*self.encoder_hidden, *self.decoder_hidden)):
            raise VaelabError("hidden layer sizes must be positive integers")
        if self.activation not in ACTIVATIONS:
            raise VaelabError(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        likelihoods.check(self.likelihood, self.sigma)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The inverse of to_dict; runs saved before (C, H, W) also stored x_dim, which follows
        from image_shape."""
        d = {k: v for k, v in d.items() if k != "x_dim"}
        return cls(**d)


def preset(name: str, **overrides) -> ModelConfig:
    """A ModelConfig from a named preset, with some fields replaced."""
    if name not in PRESETS:
        raise VaelabError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig(**values)


class VAE(nn.Module):
    """A Gaussian-latent VAE with MLP encoder and decoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.likelihood = likelihoods.make(config.likelihood, config.sigma)
        c, h, w = config.image_shape
        self.out_shape = (c * self.likelihood.channels, h, w)
        enc = [config.x_dim, *config.encoder_hidden]
        self.encoder = MLP(enc, config.activation, final_activation=True)
        # mu and logvar come from one linear layer: one GEMM instead of two.
        self.head = nn.Linear(enc[-1], 2 * config.z_dim)
        self.decoder = MLP([config.z_dim, *config.decoder_hidden, c * h * w * self.likelihood.channels],
                           config.activation)

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.head.weight.device

    def observe(self, images: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Stored images (N, C, H, W) uint8 -> what the model sees, float32 (see likelihoods)."""
        return self.likelihood.observe(images, keys)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W) or flat (N, D), float -> mu, logvar: (N, z_dim) each."""
        mu, logvar = self.head(self.encoder(x.reshape(len(x), -1))).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        """z: (..., z_dim) -> decoder output (..., C * channels, H, W), float32 (logits for a
        Bernoulli). The decoder may hold lower-precision weights (evaluation's bf16);
        z is cast to them and the output back to float32."""
        dtype = self.decoder[0].weight.dtype
        out = self.decoder(z.to(dtype), workspace)
        if dtype != torch.float32:
            out = out.float() if workspace is None else workspace.get("out32", out.shape, z).copy_(out)
        return out.view(*z.shape[:-1], *self.out_shape)

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., z_dim) -> E[x|z]: (..., C, H, W) in [0, 1]."""
        return self.likelihood.mean(self.decode(z))

    def forward(self, x: torch.Tensor, eps: torch.Tensor, workspace: Workspace | None = None) -> Terms:
        """x: (N, C, H, W) observed images; eps: (S, N, z_dim) standard normal noise.

        Returns the per-example terms for z_s = mu + sigma * eps_s (objectives.Terms).
        """
        mu, logvar = self.encode(x)
        z = reparametrize(mu, logvar, eps)
        return Terms(log_px_z=self.likelihood.log_prob(self.decode(z, workspace), x, workspace),
                     log_pz=log_standard_normal(z),
                     log_qz=log_normal_from_eps(eps, logvar),
                     kl=kl_normal(mu, logvar))


def build_model(config: ModelConfig, seed: int | None = None) -> VAE:
    """A freshly initialised VAE; with a seed, the same weights every time."""
    if seed is None:
        return VAE(config)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        return VAE(config)
