"""KL(q(z|x) || p(z)) in closed form, by (posterior, prior) pair, as in torch.distributions.kl:
a fast path where a pair has one, never an assumption. Where none is registered, the model takes
the KL from its draws, E_q[log q - log p].

    @register_kl(posteriors.Gaussian, priors.StandardNormal)
    def _(posterior, prior, params, components, y): return kl_normal_per_dim(*params)

An entry gives each dimension's KL, (N, z_dim) nats, so the KL is its sum over dimensions, and
free bits and the diagnostics read the dimensions. A pair is found through the classes' MROs,
the closest match first (a subclass of a registered posterior uses its parent's entry unless it
registers its own).
"""

from __future__ import annotations

from typing import Callable

import torch

from .densities import kl_normal_per_dim, kl_normals_per_dim
from .posteriors import Gaussian, Posterior
from .priors import ClassGaussian, Prior, StandardNormal

KL = Callable[..., torch.Tensor]
_REGISTRY: dict[tuple[type, type], KL] = {}


def register_kl(posterior: type, prior: type) -> Callable[[KL], KL]:
    """Decorator: fn(posterior, prior, params, components, y) -> (N, z_dim) each dimension's KL
    between a posterior of this class (with its params) and a prior of this class."""
    def add(fn: KL) -> KL:
        _REGISTRY[posterior, prior] = fn
        return fn

    return add


def closed_form(posterior: Posterior, prior: Prior) -> KL | None:
    """The registered KL of this pair, or None."""
    for q in type(posterior).__mro__:
        for p in type(prior).__mro__:
            if (q, p) in _REGISTRY:
                return _REGISTRY[q, p]
    return None


@register_kl(Gaussian, StandardNormal)
def _gaussian_standard(posterior, prior, params, components=None, y=None) -> torch.Tensor:
    return kl_normal_per_dim(*params)


@register_kl(Gaussian, ClassGaussian)
def _gaussian_class(posterior, prior, params, components=None, y=None) -> torch.Tensor:
    mu_p, logvar_p = prior.components(None, y) if components is None else components
    return kl_normals_per_dim(params[0], params[1], mu_p, logvar_p)
