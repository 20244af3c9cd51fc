"""Four components from outside vaelab: a prior, a posterior, a likelihood and an objective, each
one class registered by name, with no edit under vaelab/. docs/components.md walks through this
file; tests/test_my_components.py trains, evaluates, resumes and reloads a run with each.

From Python, importing this module registers them; on the command line,
`vaelab train --plugin my_components --prior scaled ...` does (and the run records the plugin, so
`vaelab evaluate RUN` and `--resume` import it again).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vaelab import kl
from vaelab.densities import log_normal, log_normal_from_eps, reparametrize
from vaelab.errors import VaelabError
from vaelab.likelihoods import LIKELIHOODS, Likelihood
from vaelab.objectives import OBJECTIVES, Objective, log_weights
from vaelab.posteriors import POSTERIORS, Gaussian, Posterior
from vaelab.priors import PRIORS, Prior


# --8<-- [start:prior]
@PRIORS.register("scaled")
class ScaledNormal(Prior):
    """p(z) = N(0, s^2 I) with one learned scale s (log s starts at 0). z: (..., z_dim)."""

    def __init__(self, z_dim: int):
        super().__init__(z_dim)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def log_prob(self, z, components=None, y=None):
        logvar = 2 * self.log_scale.expand(z.shape[-1])
        return log_normal(z, torch.zeros_like(logvar), logvar)

    @torch.no_grad()
    def sample(self, n, generator, encode=None, y=None):
        eps = torch.randn(n, self.z_dim, generator=generator, device=generator.device)
        return eps * self.log_scale.exp()
# --8<-- [end:prior]


# --8<-- [start:kl]
@kl.register_kl(Gaussian, ScaledNormal)
def _gaussian_scaled(posterior, prior, params, components=None, y=None):
    """KL(N(mu, sigma^2) || N(0, s^2)) per dimension, in closed form."""
    mu, logvar = params[:2]
    log_s2 = 2 * prior.log_scale
    return 0.5 * ((logvar.exp() + mu.square()) * torch.exp(-log_s2) - 1 + log_s2 - logvar)
# --8<-- [end:kl]


# --8<-- [start:posterior]
@POSTERIORS.register("shared-variance")
class SharedVariance(Posterior):
    """q(z|x) = N(mu(x), diag(exp(logvar))) with one learned log-variance per dimension for
    every image: the head gives mu alone, (N, z_dim)."""

    def __init__(self, z_dim: int):
        super().__init__(z_dim)
        self.logvar = nn.Parameter(torch.zeros(z_dim))

    @staticmethod
    def head_size(z_dim: int) -> int:
        return z_dim

    def params(self, h):
        return h, self.logvar.expand_as(h)

    def rsample(self, params, eps):
        mu, logvar = params
        return reparametrize(mu, logvar, eps), log_normal_from_eps(eps, logvar)

    def log_prob(self, z, params, fixed=False):
        mu, logvar = (p.detach() for p in params) if fixed else params
        return log_normal(z, mu, logvar)

    @property
    def mean_columns(self) -> int:
        return self.z_dim

    def mean(self, params):
        return params[0]
# --8<-- [end:posterior]


# --8<-- [start:likelihood]
@LIKELIHOODS.register("laplace")
class Laplace(Likelihood):
    """Grey levels in [0, 1] ~ Laplace(sigmoid(out), b) with a fixed scale b = --sigma: a density,
    like the Gaussian's. Decoder output (..., C, H, W)."""

    def __init__(self, scale: float):
        self.scale = scale

    @classmethod
    def from_options(cls, sigma: float) -> "Laplace":
        if not sigma > 0:
            raise VaelabError(f"--sigma must be a positive number, got {sigma!r}")
        return cls(sigma)

    def observe(self, images, keys=None):
        return images.to(torch.float32).div_(255.0)

    def log_prob(self, out, x, workspace=None):
        distance = (x - torch.sigmoid(out)).abs() / self.scale
        return (-distance - math.log(2 * self.scale)).flatten(-3).sum(-1)

    def mean(self, out):
        return torch.sigmoid(out)

    def output_bias(self, mean, std):
        return torch.logit(mean.clamp(1e-3, 1 - 1e-3))
# --8<-- [end:likelihood]


# --8<-- [start:objective]
@OBJECTIVES.register("renyi")
class Renyi(Objective):
    """The negative Renyi bound of Li & Turner (2016) with alpha = 1/2 and k = --k draws:
    -1/(1 - alpha) log (1/k) sum_s w_s^(1 - alpha), between the IWAE bound and the ELBO."""

    ALPHA = 0.5

    def __init__(self, config):
        super().__init__(config)
        self.samples = config.k

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        cls.refuse_kl_weighting(config, "renyi")

    def loss(self, terms, kl_weight=None):
        scaled = (1 - self.ALPHA) * log_weights(terms)
        bound = (torch.logsumexp(scaled, 0) - math.log(len(scaled))) / (1 - self.ALPHA)
        return -bound.mean()
# --8<-- [end:objective]
