"""The maths of the VAE, once: sampling, KL, likelihoods and the negative ELBO.

Every quantity is in nats, per example. Evaluation calls `negative_elbo`, and
so does training under autograd; the hand-derived training step (manual.py) is
checked against it in float64 (tests/test_manual.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .models import VAE


def reparametrize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with sigma = exp(logvar / 2).

    mu, logvar: (N, z_dim); eps: (..., N, z_dim) standard normal noise.
    The randomness is in eps alone, so gradients flow to mu and logvar.
    """
    return mu + torch.exp(0.5 * logvar) * eps


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mu, diag(exp(logvar))) || N(0, I) ), analytically.

    mu, logvar: (N, z_dim) -> (N,) nats.
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def _tracked(t: torch.Tensor) -> bool:
    """Whether autograd is recording operations on t."""
    return torch.is_grad_enabled() and t.requires_grad


def softplus_sum(logits: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """sum_d softplus(l_d) = sum_d log(1 + exp(l_d)) over the last dimension.

    logits: (..., D) -> (...). Without autograd it uses
    softplus(l) = max(l, 0) - log sigmoid(|l|) and takes one log per group of
    16 pixels, of the product of their sigmoid(|l|) (each in [1/2, 1], so the
    product cannot underflow). On the CPU that is 5 times faster than
    F.softplus, whose log1p is not vectorised, and as exact in float32.
    Under autograd F.softplus is as fast and its backward simpler.
    scratch: an optional contiguous tensor shaped like logits to work in (not
    under autograd), so that a hot loop allocates nothing large.
    """
    if _tracked(logits):
        return F.softplus(logits).sum(-1)
    work = torch.clamp_min(logits, 0, out=scratch) if scratch is not None else logits.clamp_min(0)
    positive_part = work.sum(-1)
    return positive_part - _sum_log_half_to_one(torch.abs(logits, out=work).sigmoid_())


def softplus_total(logits: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    """sum of softplus(l) over all of logits, given sig = sigmoid(logits): (...) -> 0-d.

    For a caller that needs sigmoid(logits) anyway (the Bernoulli gradient):
    sigmoid(|l|) is the larger of sigmoid(l) and 1 - sigmoid(l), so no second
    sigmoid is taken. Not for autograd.
    """
    sig_abs = torch.maximum(sig, torch.rsub(sig, 1.0))
    return logits.clamp_min(0).sum() - _sum_log_half_to_one(sig_abs).sum()


def _sum_log_half_to_one(p: torch.Tensor) -> torch.Tensor:
    """sum_d log p_d over the last dimension for p in [1/2, 1]: (..., D) -> (...).

    One log per group of 16: their product is at least 2^-16, so it cannot underflow.
    """
    group = math.gcd(p.shape[-1], 16)
    return p.view(*p.shape[:-1], -1, group).prod(-1).log_().sum(-1)


def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor,
                             scratch: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x | logits) for x in {0, 1} (or [0, 1]), computed from logits.

    x: (N, D); logits: (..., N, D) (any shapes that broadcast) -> (..., N) nats. Uses the stable form
    x * l - softplus(l); never sigmoid followed by log. scratch: see softplus_sum.
    """
    if _tracked(logits):
        scratch = None
    xl = torch.mul(x, logits, out=scratch) if scratch is not None else x * logits
    return xl.sum(-1) - softplus_sum(logits, scratch)


def gaussian_log_likelihood(x: torch.Tensor, logits: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(x; sigmoid(logits), sigma^2 I), a density on grey levels.

    x: (N, D); logits: (..., N, D) -> (..., N) nats (a density: not comparable
    with Bernoulli nats).
    """
    mean = torch.sigmoid(logits)
    d = x.shape[-1]
    return -0.5 * ((x - mean) / sigma).pow(2).sum(-1) - d * (math.log(sigma) + 0.5 * math.log(2 * math.pi))


def log_likelihood(model: VAE, x: torch.Tensor, logits: torch.Tensor,
                   scratch: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x|z) under the model's observation model. (..., N) nats."""
    if model.config.likelihood == "gaussian":
        return gaussian_log_likelihood(x, logits, model.config.sigma)
    return bernoulli_log_likelihood(x, logits, scratch)


def negative_elbo(model: VAE, x: torch.Tensor, samples: int = 1,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """-ELBO(x) = -(1/L) sum_l log p(x | z_l) + KL(q(z|x) || p(z)), z_l ~ q(z|x).

    x: (N, D) -> (N,) nats per example, L = `samples` Monte-Carlo samples.
    """
    mu, logvar = model.encode(x)
    eps = torch.randn((samples, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    z = reparametrize(mu, logvar, eps)                    # (L, N, z_dim)
    expected_ll = log_likelihood(model, x, model.decode(z)).mean(0)   # (N,)
    return kl_normal(mu, logvar) - expected_ll


LOG_2PI = math.log(2 * math.pi)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I). z: (..., z_dim) -> (...,) nats."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def log_normal_from_eps(eps: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) at z = mu + sigma * eps, written in eps.

    eps: (..., N, z_dim); logvar: (N, z_dim) -> (..., N) nats.
    """
    return -0.5 * (eps.pow(2) + LOG_2PI + logvar).sum(-1)


def log_importance_weights(model: VAE, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                           eps: torch.Tensor, decode=None, scratch: torch.Tensor | None = None,
                           likelihood=None) -> torch.Tensor:
    """log w = log p(x|z) + log p(z) - log q(z|x) for z = mu + sigma * eps.

    x: (N, D); mu, logvar: (N, z_dim) from model.encode(x); eps: (K, N, z_dim)
    -> (K, N) nats. The recognition model q(z|x) is the proposal. `decode`
    replaces model.decode (evaluation passes one that reuses its buffers);
    scratch: see softplus_sum; `likelihood`, logits -> log p(x|z), replaces
    log_likelihood (evaluation passes the C kernel's).
    """
    z = reparametrize(mu, logvar, eps)
    logits = (decode or model.decode)(z)
    log_px_z = likelihood(logits) if likelihood else log_likelihood(model, x, logits, scratch)
    return log_px_z + log_standard_normal(z) - log_normal_from_eps(eps, logvar)


def negative_iwae(model: VAE, x: torch.Tensor, k: int = 5,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Negative importance-weighted bound (Burda et al. 2015), per example.

    -log (1/k) sum_j w_j with z_j ~ q(z|x). x: (N, D) -> (N,) nats. With k=1
    it is the single-sample ELBO with the KL estimated by the same sample.
    """
    mu, logvar = model.encode(x)
    eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    log_w = log_importance_weights(model, x, mu, logvar, eps)
    return math.log(k) - torch.logsumexp(log_w, dim=0)
