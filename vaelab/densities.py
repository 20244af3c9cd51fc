"""Densities and draws of diagonal Gaussians, in nats: the maths every component shares.

Shapes: mu, logvar (N, d); z, eps (..., N, d); results (..., N) or (N, d) per dimension.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)


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


def kl_normals_per_dim(mu: torch.Tensor, logvar: torch.Tensor, mu_p: torch.Tensor,
                       logvar_p: torch.Tensor) -> torch.Tensor:
    """KL( N(mu, diag(exp(logvar))) || N(mu_p, diag(exp(logvar_p))) ) of each dimension:
    (N, z_dim) each -> (N, z_dim) nats."""
    return 0.5 * (logvar_p - logvar + (logvar.exp() + (mu - mu_p).pow(2)) * torch.exp(-logvar_p)
                  - 1.0)


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
