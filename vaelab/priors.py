"""Priors p(z [| y]): the only module that names one.

Each prior knows
- `from_config(z_dim, config)`: how a model makes it (config: a ModelConfig, read by field);
- `log_prob(z, components, y=None)`: log p(z) in nats, z: (..., z_dim) -> (...);
- `components(encode, y=None)`: what one forward call needs of it, computed once and shared by
  every draw of the call (a mixture's means, log-variances and log-weights; None for N(0, I));
- `sample(n, generator, encode=None, y=None)`: n draws z (n, z_dim), for samples and figures;
- `refuses(config)`: why it cannot serve the model config describes (None where it can).
y, a conditioning tensor (N, ...) where the model has one (a conditional model's labels), is
passed to every method; only `per-class` reads it. Whether KL(q || p) has a closed form is the KL
registry's to say (kl.py).

A learned prior is an nn.Module whose parameters register after the encoder, head and decoder,
so optimizer checkpoints, which list parameters by position, keep their order.

Shapes: z (..., z_dim); a mixture of K components has mu, logvar (K, z_dim) and log_w (K,).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .densities import LOG_2PI, log_normal, log_standard_normal
from .errors import VaelabError
from .registry import Registry

PRIORS = Registry("prior")

Mixture = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor
]  # mu (K, z_dim), logvar (K, z_dim), log_w (K,)


def log_mixture(
    z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, log_w: torch.Tensor
) -> torch.Tensor:
    """log sum_k w_k N(z; mu_k, diag(exp(logvar_k))): z (..., z_dim) -> (...) nats.

    The quadratic form sum_d (z_d - mu_kd)^2 / var_kd is expanded into two matrix products,
    (..., z_dim) x (z_dim, K), rather than made of (..., K, z_dim) temporaries: K = 500 times
    less memory and a GEMM's speed. In float64, where the expansion's cancellation (z near mu,
    a small variance) costs nothing that float32 would show.
    """
    z64, mu64, logvar64 = z.double(), mu.double(), logvar.double()
    inverse = torch.exp(-logvar64)                                              # (K, z_dim)
    quadratic = (z64.square() @ inverse.T - 2 * (z64 @ (mu64 * inverse).T)
                 + (mu64.square() * inverse).sum(-1))                           # (..., K)
    log_n = -0.5 * (quadratic + logvar64.sum(-1) + z.shape[-1] * LOG_2PI)
    return torch.logsumexp(log_n + log_w.double(), dim=-1).to(z.dtype)


def sample_mixture(
    n: int, generator: torch.Generator, mu: torch.Tensor, logvar: torch.Tensor, log_w: torch.Tensor
) -> torch.Tensor:
    """n draws of the mixture: a component by its weight, then its Gaussian. -> (n, z_dim)."""
    k = torch.multinomial(log_w.softmax(-1), n, replacement=True, generator=generator)
    eps = torch.randn(n, mu.shape[-1], generator=generator, device=mu.device)
    return mu[k] + torch.exp(0.5 * logvar[k]) * eps


class Prior(nn.Module):
    def __init__(self, z_dim: int, k: int = 0):
        super().__init__()
        self.z_dim, self.k = z_dim, k

    @classmethod
    def from_config(cls, z_dim: int, config) -> "Prior":
        """The prior over z_dim latents that config (a ModelConfig) asks for."""
        return cls(z_dim)

    @classmethod
    def refuses(cls, config) -> str | None:
        """Why this prior cannot serve the model config (a ModelConfig) describes, completing
        "--prior NAME ...", or None."""
        return None

    @property
    def row_bytes(self) -> int:
        """Bytes log_prob makes per draw of z (a mixture's float64 (..., K) temporaries): what
        evaluation sizes its calls by, beside the decoder's."""
        return 3 * 8 * self.k

    def components(self, encode=None, y=None) -> Mixture | None:
        """encode: x (K, C, H, W) -> (mu, logvar), the model's posterior (the VampPrior's)."""
        return None

    def log_prob(self, z: torch.Tensor, components: Mixture | None = None,
                 y=None) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, encode=None, y=None) -> torch.Tensor:
        raise NotImplementedError


@PRIORS.register("standard")
class StandardNormal(Prior):
    """N(0, I): the classic VAE's prior, with the analytic KL."""

    def log_prob(self, z: torch.Tensor, components: Mixture | None = None,
                 y=None) -> torch.Tensor:
        return log_standard_normal(z)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, encode=None, y=None) -> torch.Tensor:
        return torch.randn(n, self.z_dim, generator=generator, device=generator.device)


@PRIORS.register("mog")
class MixtureOfGaussians(Prior):
    """A mixture of K diagonal Gaussians with learned means, variances and weights.

    The weights start equal, the means as draws of N(0, s^2 I) with s = START_SPREAD (fixed by
    the model's seed) and every variance at 1 - s^2, so that the mixture's mean and covariance
    are N(0, I)'s: it starts close to N(0, I) (KL(N(0, I) || mixture) about 0.1 nats at K=500,
    z_dim=50; tests/test_priors.py), with K distinct modes to move apart.
    """

    START_SPREAD = 0.1

    def __init__(self, z_dim: int, k: int):
        super().__init__(z_dim, k)
        s = self.START_SPREAD
        self.mu = nn.Parameter(s * torch.randn(k, z_dim))
        self.logvar = nn.Parameter(torch.full((k, z_dim), math.log(1 - s**2)))
        self.logits = nn.Parameter(torch.zeros(k))

    @classmethod
    def from_config(cls, z_dim: int, config) -> "MixtureOfGaussians":
        return cls(z_dim, config.prior_components)

    def components(self, encode=None, y=None) -> Mixture:
        return self.mu, self.logvar, self.logits.log_softmax(-1)

    def log_prob(self, z: torch.Tensor, components: Mixture | None = None,
                 y=None) -> torch.Tensor:
        return log_mixture(z, *(components or self.components()))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, encode=None, y=None) -> torch.Tensor:
        return sample_mixture(n, generator, *self.components())


@PRIORS.register("vamp")
class VampPrior(Prior):
    """The VampPrior (Tomczak & Welling 2018): p(z) = (1/K) sum_k q(z | u_k), the posterior at K
    learned pseudo-inputs u_k.

    As in the paper's code (github.com/jmtomczak/vae_vampprior, models/Model.py: a bias-free
    linear layer fed by the identity), the pseudo-inputs are plain parameters, clipped to the
    pixel range [0, 1] by a hardtanh, that start as draws of N(0.05, 0.01^2): the MNIST
    setting, which utils/load_data.py puts over experiment.py's default of -0.05 (below 0 the
    hardtanh would pass no gradient). Under an IAF posterior the components are the
    pseudo-inputs' base Gaussians, so the prior is a mixture of those: a proper density, but
    not the paper's mixture of flowed posteriors, whose density would need the flow inverted.
    """

    def __init__(self, z_dim: int, k: int, image_shape: tuple[int, int, int]):
        super().__init__(z_dim, k)
        self.image_shape = tuple(image_shape)
        self.pseudo_inputs = nn.Parameter(torch.empty(k, math.prod(image_shape)).normal_(0.05, 0.01))

    @classmethod
    def from_config(cls, z_dim: int, config) -> "VampPrior":
        return cls(z_dim, config.prior_components, config.image_shape)

    @classmethod
    def refuses(cls, config) -> str | None:
        if config.conditional:
            return ("does not go with --conditional: its pseudo-inputs have no label for the"
                    " encoder q(z|x, y) to read")
        return None

    def inputs(self) -> torch.Tensor:
        """The K pseudo-inputs u_k: (K, C, H, W) in [0, 1]."""
        return nn.functional.hardtanh(self.pseudo_inputs, 0.0, 1.0).view(-1, *self.image_shape)

    def components(self, encode=None, y=None) -> Mixture:
        mu, logvar = encode(self.inputs())
        return (
            mu,
            logvar,
            torch.full((len(mu),), -math.log(len(mu)), device=mu.device, dtype=mu.dtype),
        )

    def log_prob(self, z: torch.Tensor, components: Mixture | None = None,
                 y=None) -> torch.Tensor:
        if components is None:
            raise ValueError(
                "the VampPrior's log p(z) needs its components (the posterior at the pseudo-inputs)"
            )
        return log_mixture(z, *components)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, encode=None, y=None) -> torch.Tensor:
        return sample_mixture(n, generator, *self.components(encode))


@PRIORS.register("per-class")
class ClassGaussian(Prior):
    """p(z|y) = N(mu_y, diag(exp(logvar_y))): a learned diagonal Gaussian per class y, for a
    conditional model (Sohn et al. 2015 learn p(z|x_given) with a network; a label needs no
    more than a table). Every class starts at N(0, I), so a fresh model's prior is the
    unconditional one.

    components(y) are each image's class Gaussian, mu and logvar (N, z_dim), so log p(z|y) of
    draws z (..., N, z_dim) is a diagonal Gaussian's; KL(q || p) has a closed form (kl.py)."""

    def __init__(self, z_dim: int, classes: int):
        super().__init__(z_dim)
        self.mu = nn.Parameter(torch.zeros(classes, z_dim))
        self.logvar = nn.Parameter(torch.zeros(classes, z_dim))

    @classmethod
    def from_config(cls, z_dim: int, config) -> "ClassGaussian":
        if not config.classes:
            raise VaelabError("the per-class prior needs the model's classes (config.classes,"
                              " known from the data)")
        return cls(z_dim, len(config.classes))

    @classmethod
    def refuses(cls, config) -> str | None:
        return None if config.conditional else "is p(z|y), for a --conditional model"

    def components(self, encode=None, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        """y: (N,) labels -> mu, logvar: (N, z_dim) each, the images' class Gaussians."""
        if y is None:
            raise ValueError("the class prior p(z|y) needs the labels y")
        return self.mu[y], self.logvar[y]

    def log_prob(self, z: torch.Tensor, components=None, y=None) -> torch.Tensor:
        mu, logvar = components if components is not None else self.components(None, y)
        return log_normal(z, mu, logvar)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, encode=None, y=None) -> torch.Tensor:
        mu, logvar = self.components(None, y)
        eps = torch.randn(n, self.z_dim, generator=generator, device=generator.device)
        return mu + torch.exp(0.5 * logvar) * eps


class Hierarchical(Prior):
    """p(z_L) p(z_{L-1} | z_L) ... p(z_1 | z_2) (Burda et al. 2015) over every layer's draws
    z (..., d_1 + ... + d_L): a prior `top` over z_L, and the conditionals below it from the
    posterior's posteriors.Layers, which that posterior registers (held here unregistered, so
    each parameter is the model's once). Not registered by name: see posteriors.Hierarchical."""

    def __init__(self, top: Prior, layers: nn.Module):
        super().__init__(top.z_dim, top.k)
        self.top = top
        self._layers = (layers,)  # a tuple: not a submodule

    @property
    def row_bytes(self) -> int:
        return self.top.row_bytes

    def components(self, encode=None, y=None):
        return self.top.components(encode, y)

    def log_prob(self, z: torch.Tensor, components=None, y=None) -> torch.Tensor:
        layers = self._layers[0]
        base = self.top.log_prob(z[..., -layers.sizes[-1]:], components, y)
        return base + layers.log_p(z)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, encode=None, y=None) -> torch.Tensor:
        return self._layers[0].sample_down(self.top.sample(n, generator, encode, y), generator)


def make(name: str, z_dim: int, config) -> Prior:
    """The prior registered as `name` over z_dim latents, as config (a ModelConfig) sets it."""
    return PRIORS[name].from_config(z_dim, config)
