"""The recognition model q(z|x) and the generative model p(x|z), as MLPs.

    encoder: x (N, D) -> hidden layers -> one linear head -> mu, logvar (N, z_dim) each
    decoder: z (N, z_dim) -> hidden layers -> logits (N, D)

The decoder always returns logits: the observation model (objectives.py) turns
them into a Bernoulli distribution, or a Gaussian whose mean is sigmoid(logits).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import VaelabError

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "softplus": nn.Softplus}
LIKELIHOODS = ("bernoulli", "gaussian")

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

    x_dim: int = 784
    z_dim: int = 2
    encoder_hidden: tuple[int, ...] = (256, 128)
    decoder_hidden: tuple[int, ...] = (128, 256)
    activation: str = "relu"
    likelihood: str = "bernoulli"
    # Standard deviation of the Gaussian observation model, fixed (not learned):
    # x ~ N(sigmoid(logits), sigma^2 I) on grey levels in [0, 1].
    sigma: float = 0.1
    image_shape: tuple[int, int] = field(default=(28, 28))

    def __post_init__(self) -> None:
        self.encoder_hidden = tuple(int(h) for h in self.encoder_hidden)
        self.decoder_hidden = tuple(int(h) for h in self.decoder_hidden)
        self.image_shape = tuple(int(s) for s in self.image_shape)

    def validate(self) -> None:
        """Raise VaelabError naming the first option that makes no sense."""
        if self.z_dim < 1:
            raise VaelabError(f"--z-dim must be a positive integer, got {self.z_dim}")
        if self.x_dim < 1:
            raise VaelabError(f"x_dim must be positive, got {self.x_dim}")
        if any(h < 1 for h in (*self.encoder_hidden, *self.decoder_hidden)):
            raise VaelabError("hidden layer sizes must be positive integers")
        if self.activation not in ACTIVATIONS:
            raise VaelabError(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.likelihood not in LIKELIHOODS:
            raise VaelabError(f"unknown likelihood {self.likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise VaelabError(f"--sigma must be a positive number, got {self.sigma}")

    def to_dict(self) -> dict:
        return asdict(self)


def preset(name: str, **overrides) -> ModelConfig:
    """A ModelConfig from a named preset, with some fields replaced."""
    if name not in PRESETS:
        raise VaelabError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig(**values)


def mlp(sizes: list[int], activation: str, final_activation: bool) -> nn.Sequential:
    """Linear layers through `sizes`, an activation after each (the last optional)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if final_activation or i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """A Gaussian-latent VAE with MLP encoder and decoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        enc = [config.x_dim, *config.encoder_hidden]
        self.encoder = mlp(enc, config.activation, final_activation=True)
        # mu and logvar come from one linear layer: one GEMM instead of two.
        self.head = nn.Linear(enc[-1], 2 * config.z_dim)
        self.decoder = mlp([config.z_dim, *config.decoder_hidden, config.x_dim],
                           config.activation, final_activation=False)

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.head.weight.device

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, D) in [0, 1] -> mu, logvar: (N, z_dim) each."""
        mu, logvar = self.head(self.encoder(x)).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., z_dim) -> logits: (..., D)."""
        return self.decoder(z)

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., z_dim) -> the mean image E[x|z]: (..., D) in [0, 1]."""
        return torch.sigmoid(self.decode(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(x)


def build_model(config: ModelConfig, seed: int | None = None) -> VAE:
    """A freshly initialised VAE; with a seed, the same weights every time."""
    if seed is None:
        return VAE(config)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        return VAE(config)
