"""The VAE: a Gaussian recognition model q(z|x), a standard normal prior p(z) and a
decoder whose output a likelihood object (likelihoods.py) turns into p(x|z).

    encoder: x (N, C, H, W) -> network -> one linear head -> mu, logvar (N, z_dim)
    decoder: z (..., z_dim) -> network -> output (..., C * channels, H, W)

The networks are MLPs on the flattened image (architecture "mlp") or convolutional
(architecture "conv"; nets.ConvEncoder and nets.ConvDecoder).

`VAE.forward(x, eps)` returns the per-example terms every objective needs
(objectives.Terms), so whatever wraps the module (DDP, graph capture) wraps the loss.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import likelihoods
from .errors import VaelabError
from .nets import ACTIVATIONS, MLP, ConvDecoder, ConvEncoder, Workspace, conv_check
from .objectives import Terms, kl_normal, reparametrize

# Architecture presets by name: hidden sizes, activation and latent size.
PRESETS = {
    # The tutorial's network: 784-256-128 encoder, z-128-256-784 decoder.
    "tutorial": dict(encoder_hidden=(256, 128), decoder_hidden=(128, 256), activation="relu", z_dim=2),
    # Burda, Grosse & Salakhutdinov (2015), one stochastic layer.
    "burda1": dict(encoder_hidden=(200, 200), decoder_hidden=(200, 200), activation="tanh", z_dim=50),
    # Two stride-2 4x4 convolutions (32 and 64 channels) and a dense layer of 256 each way, for
    # images whose sides are multiples of 4 (28x28, 32x32), 1 or 3 channels.
    "conv": dict(architecture="conv", conv_channels=(32, 64), encoder_hidden=(256,), decoder_hidden=(256,),
                 activation="relu", z_dim=16),
}
ARCHITECTURES = ("mlp", "conv")


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
    # "mlp": encoder_hidden and decoder_hidden are the layers on the flattened image. "conv": the
    # convolutions' channels (each halves H and W), then encoder_hidden / decoder_hidden dense layers.
    architecture: str = "mlp"
    conv_channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.conv_channels = tuple(int(c) for c in self.conv_channels)
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
        if self.architecture not in ARCHITECTURES:
            raise VaelabError(f"unknown architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.architecture == "conv" and (not self.conv_channels or min(self.conv_channels) < 1):
            raise VaelabError(f"--conv-channels must be positive integers, got {self.conv_channels}")
        if self.architecture != "conv" and self.conv_channels:
            raise VaelabError("--conv-channels sets the convolutions of --preset conv; an MLP has none")
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
    """A Gaussian-latent VAE with MLP or conv encoder and decoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        # The image shape is known once the data is (a config is validated before that).
        problem = conv_check(config.image_shape, config.conv_channels) if config.architecture == "conv" else None
        if problem:
            raise VaelabError(problem)
        self.config = config
        self.likelihood = likelihoods.make(config.likelihood, config.sigma)
        c, h, w = config.image_shape
        self.out_shape = (c * self.likelihood.channels, h, w)
        # Registered in this order (encoder, head, decoder): optimizer checkpoints list parameters by position.
        conv = config.architecture == "conv"
        self.encoder = (ConvEncoder(config.image_shape, config.conv_channels, config.encoder_hidden, config.activation)
                        if conv else MLP([config.x_dim, *config.encoder_hidden], config.activation,
                                         final_activation=True))
        # mu and logvar come from one linear layer: one GEMM instead of two.
        self.head = nn.Linear(config.encoder_hidden[-1], 2 * config.z_dim)
        self.decoder = (ConvDecoder(config.z_dim, config.image_shape, config.conv_channels, config.decoder_hidden,
                                    config.activation, self.out_shape[0])
                        if conv else MLP([config.z_dim, *config.decoder_hidden, math.prod(self.out_shape)],
                                         config.activation))

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.head.weight.device

    def observe(self, images: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Stored images (N, C, H, W) uint8 -> what the model sees, float32 (see likelihoods)."""
        return self.likelihood.observe(images, keys)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W) or flat (N, D), float -> mu, logvar: (N, z_dim) each."""
        mu, logvar = self.head(self.encoder(x.reshape(len(x), -1))).chunk(2, dim=-1)  # conv: reshaped back
        return mu, logvar

    def decode(self, z: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        """z: (..., z_dim) -> decoder output (..., C * channels, H, W), float32 (logits for a
        Bernoulli). The decoder may hold lower-precision weights (evaluation's bf16);
        z is cast to them and the output back to float32."""
        dtype = next(self.decoder.parameters()).dtype
        out = self.decoder(z.to(dtype), workspace)
        if dtype != torch.float32:
            out = out.float() if workspace is None else workspace.get("out32", out.shape, z).copy_(out)
        return out.view(*z.shape[:-1], *self.out_shape)

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., z_dim) -> E[x|z]: (..., C, H, W) in [0, 1]."""
        return self.likelihood.mean(self.decode(z))

    def forward(self, x: torch.Tensor, eps: torch.Tensor, workspace: Workspace | None = None,
                posterior: tuple[torch.Tensor, torch.Tensor] | None = None) -> Terms:
        """x: (N, C, H, W) observed images; eps: (S, N, z_dim) standard normal noise.

        Returns the per-example terms for z_s = mu + sigma * eps_s (objectives.Terms).
        posterior: encode(x)'s (mu, logvar), when the caller has them already (evaluation
        decodes one tile's samples in several calls).
        """
        mu, logvar = self.encode(x) if posterior is None else posterior
        z = reparametrize(mu, logvar, eps)
        return Terms(log_px_z=self.likelihood.log_prob(self.decode(z, workspace), x, workspace),
                     kl=kl_normal(mu, logvar), z=z, eps=eps, logvar=logvar)


def build_model(config: ModelConfig, seed: int | None = None) -> VAE:
    """A freshly initialised VAE; with a seed, the same weights every time."""
    if seed is None:
        return VAE(config)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        return VAE(config)
