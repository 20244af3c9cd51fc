"""The maths of the VAE, once. Every quantity is in nats, per example.

The model computes the terms (VAE.forward -> Terms); the objectives below are
pure functions of them, used alike by training, the test loss and evaluation.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

LOG_2PI = math.log(2 * math.pi)


class Terms(NamedTuple):
    """Per-example terms for S draws z_s = mu + sigma * eps_s ~ q(z|x) of N examples.

    log p(z_s) and log q(z_s|x) are computed when asked: the ELBO with its analytic
    KL never asks, so training on it launches none of their kernels.
    """

    log_px_z: torch.Tensor  # (S, N) log p(x | z_s)
    kl: torch.Tensor        # (N,) KL(q(z|x) || p(z)): analytic, or the draws' mean of log q - log p
    z: torch.Tensor         # (S, N, z_dim) the draws
    eps: torch.Tensor       # (S, N, z_dim) their standard normal noise
    logvar: torch.Tensor    # (N, z_dim) of q(z|x)
    prior: Any = None       # a priors.Prior; None: N(0, I)
    components: Any = None  # what the prior computed for this call (priors.Prior.components)
    log_det: Any = None     # (S, N) a flow's log-determinant, log q(z_T) = log q(z_0) - log_det

    @property
    def log_pz(self) -> torch.Tensor:
        """(S, N) log p(z_s)."""
        return log_standard_normal(self.z) if self.prior is None else self.prior.log_prob(self.z, self.components)

    @property
    def log_qz(self) -> torch.Tensor:
        """(S, N) log q(z_s | x)."""
        base = log_normal_from_eps(self.eps, self.logvar)
        return base if self.log_det is None else base - self.log_det


def reparametrize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with sigma = exp(logvar / 2).

    mu, logvar: (N, z_dim); eps: (..., N, z_dim) standard normal noise.
    The randomness is in eps alone, so gradients flow to mu and logvar.
    """
    return mu + torch.exp(0.5 * logvar) * eps


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mu, diag(exp(logvar))) || N(0, I) ), analytically. (N, z_dim) -> (N,) nats."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I). z: (..., z_dim) -> (...,) nats."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def log_normal_from_eps(eps: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) at z = mu + sigma * eps, written in eps.

    eps: (..., N, z_dim); logvar: (N, z_dim) -> (..., N) nats.
    """
    return -0.5 * (eps.pow(2) + LOG_2PI + logvar).sum(-1)


def log_weights(terms: Terms) -> torch.Tensor:
    """Importance weights log w_s = log p(x|z_s) + log p(z_s) - log q(z_s|x): (S, N) nats."""
    return terms.log_px_z + terms.log_pz - terms.log_qz


def negative_elbo(terms: Terms, kl_weight: float | torch.Tensor | None = None) -> torch.Tensor:
    """-ELBO = -(1/S) sum_s log p(x|z_s) + KL(q(z|x) || p(z)): (N,) nats, the KL as the terms
    hold it (analytic where the prior allows).

    kl_weight (beta, a float or a 0-d tensor) weights the KL term, giving the beta-VAE
    objective, which is not a bound on log p(x) unless beta is 1; None is the ELBO itself.
    """
    kl = terms.kl if kl_weight is None else kl_weight * terms.kl
    return kl - terms.log_px_z.mean(0)


def negative_iwae(terms: Terms) -> torch.Tensor:
    """Negative importance-weighted bound of Burda et al. (2015) with k = S samples:
    -log (1/k) sum_s w_s, (N,) nats. With k = 1 it is the ELBO with a sampled KL."""
    k = terms.log_px_z.shape[0]
    return math.log(k) - torch.logsumexp(log_weights(terms), dim=0)


OBJECTIVES = {"elbo": negative_elbo, "iwae": negative_iwae}
