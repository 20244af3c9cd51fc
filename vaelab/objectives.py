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
    mu: Any = None          # (N, z_dim) of q(z|x)
    q_fixed: bool = False   # log q(z|x) with q's parameters held fixed (see `estimated`)
    # Stochastic layers above z_1 (hierarchy.Upper): z then holds every layer's draws,
    # (S, N, d_1 + ... + d_L), and eps, mu and logvar are z_1's.
    upper: Any = None

    @property
    def z1(self) -> torch.Tensor:
        """(S, N, z_dim) the draws of the layer the decoder reads."""
        return self.z if self.upper is None else self.upper.bottom(self.z)

    @property
    def log_pz(self) -> torch.Tensor:
        """(S, N) log p(z_s): the prior's at the top layer, and the conditionals below it."""
        top = self.z if self.upper is None else self.upper.top(self.z)
        prior = self.prior
        base = log_standard_normal(top) if prior is None else prior.log_prob(top, self.components)
        return base if self.upper is None else base + self.upper.log_p(self.z)

    @property
    def log_qz(self) -> torch.Tensor:
        """(S, N) log q(z_s | x); with q_fixed, the gradient reaches q's parameters via z only."""
        if self.q_fixed:
            if self.log_det is not None:
                raise ValueError("log q(z|x) with fixed parameters needs a flow's inverse")
            base = log_normal(self.z1, self.mu.detach(), self.logvar.detach())
        else:
            base = log_normal_from_eps(self.eps, self.logvar)
            base = base if self.log_det is None else base - self.log_det
        return base if self.upper is None else base + self.upper.log_q(self.z, self.q_fixed)


def reparametrize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with sigma = exp(logvar / 2).

    mu, logvar: (N, z_dim); eps: (..., N, z_dim) standard normal noise.
    The randomness is in eps alone, so gradients flow to mu and logvar.
    """
    return mu + torch.exp(0.5 * logvar) * eps


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mu, diag(exp(logvar))) || N(0, I) ), analytically. (N, z_dim) -> (N,) nats."""
    return kl_normal_per_dim(mu, logvar).sum(-1)  # halving first is exact: the same bits


def kl_normal_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL of each dimension: (N, z_dim) -> (N, z_dim) nats."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I). z: (..., z_dim) -> (...,) nats."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def log_normal_from_eps(eps: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) at z = mu + sigma * eps, written in eps.

    eps: (..., N, z_dim); logvar: (N, z_dim) -> (..., N) nats.
    """
    return -0.5 * (eps.pow(2) + LOG_2PI + logvar).sum(-1)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))). z: (..., N, z_dim); mu, logvar: (N, z_dim) -> (..., N)."""
    return -0.5 * ((z - mu).square() * torch.exp(-logvar) + LOG_2PI + logvar).sum(-1)


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


def kl_per_dim(terms: Terms) -> torch.Tensor | None:
    """Each latent dimension's KL term, (N, z_dim) nats, where q(z|x) and p(z) factorize over
    dimensions (a Gaussian posterior with its own parameters, N(0, I), one layer): in closed
    form where the terms hold the analytic KL, else the draws' mean of log q - log p per
    dimension. None elsewhere."""
    if terms.prior is None:  # the analytic KL: forward computed no log-densities
        return kl_normal_per_dim(terms.mu, terms.logvar)
    factorized = terms.log_det is None and terms.upper is None and not terms.q_fixed
    if terms.prior.analytic_kl and factorized:
        return (0.5 * (terms.z.square() - terms.eps.square() - terms.logvar)).mean(0)
    return None


def free_bits_negative_elbo(terms: Terms, free_bits: float,
                            kl_weight: float | torch.Tensor | None = None) -> torch.Tensor:
    """The batch's mean negative ELBO with free bits (Kingma et al. 2016): each dimension's KL,
    averaged over the batch, counts as at least free_bits nats, so that a KL below it earns
    nothing. Where the KL does not factorize (kl_per_dim is None), the whole KL counts as at
    least free_bits x its dimensions. Not a bound on log p(x): a 0-d training objective only.
    kl_weight: as in negative_elbo."""
    per_dim = kl_per_dim(terms)
    if per_dim is None:
        kl = terms.kl.mean().clamp(min=free_bits * terms.z.shape[-1])
    else:
        kl = per_dim.mean(0).clamp(min=free_bits).sum()
    kl = kl if kl_weight is None else kl_weight * kl
    return kl - terms.log_px_z.mean(0).mean()


def negative_iwae(terms: Terms) -> torch.Tensor:
    """Negative importance-weighted bound of Burda et al. (2015) with k = S samples:
    -log (1/k) sum_s w_s, (N,) nats. With k = 1 it is the ELBO with a sampled KL."""
    k = terms.log_px_z.shape[0]
    return math.log(k) - torch.logsumexp(log_weights(terms), dim=0)


OBJECTIVES = {"elbo": negative_elbo, "iwae": negative_iwae}

# Gradient estimators of the inference network's gradient. reparam: the plain reparameterized
# gradient of the objective. stl, "sticking the landing" (Roeder et al. 2017): log q(z|x) with q's
# parameters held fixed, so the score term, zero in expectation, drops out; unbiased for the ELBO
# (whose KL is then taken from the draws), biased for the IWAE bound. dreg, the doubly
# reparameterized gradient of the IWAE bound (Tucker et al. 2018): the same, with the gradient
# reaching q through each draw z_s weighted once more by its normalized weight, which makes it
# unbiased. The generative network's gradient is the objective's own under all three.
ESTIMATORS = ("reparam", "stl", "dreg")


def estimated(terms: Terms, estimator: str) -> Terms:
    """The terms whose gradient, through the objective, is the estimator's (ESTIMATORS). The
    IWAE bound's value is unchanged (up to rounding); stl's ELBO takes its KL from the draws, a
    Monte-Carlo estimate of the analytic one where the model has it.

    dreg's reweighting is a hook on z: one backward pass. What does not flow through z keeps
    its ordinary gradient: the decoder's and a learned prior's parameters, and a VampPrior's
    dependence on the encoder through its pseudo-inputs' posteriors.
    """
    if estimator == "reparam":
        return terms
    terms = terms._replace(q_fixed=True)
    if estimator == "stl":
        return terms._replace(kl=(terms.log_qz - terms.log_pz).mean(0))
    weights = torch.softmax(log_weights(terms).detach(), dim=0).unsqueeze(-1)  # (S, N, 1)
    if terms.z.requires_grad:
        terms.z.register_hook(lambda grad: grad * weights)
    return terms
