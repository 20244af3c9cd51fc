"""Stochastic layers above z_1 (Burda et al. 2015): z_1, ..., z_L with sizes d_1, ..., d_L.

    inference, bottom-up:  q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1})
    generation, top-down:  p(z_L) p(z_{L-1} | z_L) ... p(z_1 | z_2) p(x | z_1)

q(z_1 | x) is the model's own head, p(z_L) its prior and p(x | z_1) its decoder; this module holds
the conditionals between the layers, each a diagonal Gaussian whose mean and log-variance an MLP
of its own gives (`GaussianLayer`). A draw of all layers needs d_1 + ... + d_L standard normals,
layer by layer: the model's noise layout.

The draws of every layer are concatenated into one tensor z (S, N, d_1 + ... + d_L), and every
density is computed from its slices: a gradient estimator that reweights the gradient at z (DReG)
then weights each layer's once, and the chain from z_1 to z_2 inside the sampling stays as it is.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from .nets import MLP
from .objectives import log_normal, log_normal_from_eps


class GaussianLayer(nn.Module):
    """z_in (..., d_in) -> mu, logvar (..., d_out) of a diagonal Gaussian: an MLP, then a linear
    head (one GEMM for both)."""

    def __init__(self, d_in: int, hidden: tuple[int, ...], d_out: int, activation: str):
        super().__init__()
        self.net = MLP([d_in, *hidden], activation, final_activation=True)
        self.head = nn.Linear(hidden[-1], 2 * d_out)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(self.head(self.net(z)).chunk(2, dim=-1))

    def fixed(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward with this layer's parameters held fixed: the gradient reaches z only."""
        params = {name: p.detach() for name, p in self.named_parameters()}
        return functional_call(self, params, (z,))


class Hierarchy(nn.Module):
    """The layers z_2 ... z_L above z_1: `up[l]` is q(z_{l+2} | z_{l+1}), `down[l]` is
    p(z_{l+1} | z_{l+2}) (0-based l), both with `hidden` units and `activation`."""

    def __init__(self, sizes: tuple[int, ...], hidden: tuple[int, ...], activation: str):
        super().__init__()
        self.sizes = tuple(sizes)  # d_1, ..., d_L
        pairs = list(zip(self.sizes[:-1], self.sizes[1:]))
        self.up = nn.ModuleList(GaussianLayer(lo, hidden, hi, activation) for lo, hi in pairs)
        self.down = nn.ModuleList(GaussianLayer(hi, hidden, lo, activation) for lo, hi in pairs)

    @property
    def noise_dim(self) -> int:
        return sum(self.sizes)

    def split(self, z: torch.Tensor) -> list[torch.Tensor]:
        """(..., d_1 + ... + d_L) -> each layer's (..., d_l)."""
        return list(z.split(self.sizes, dim=-1))

    def sample_up(self, z1: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, "Upper"]:
        """z_1 (S, N, d_1) and the upper layers' noise (S, N, d_2 + ... + d_L) -> all layers'
        draws z (S, N, d_1 + ... + d_L), and what their densities need (`Upper`)."""
        layers, logvars = [z1], []
        for layer, noise in zip(self.up, eps.split(self.sizes[1:], dim=-1)):
            mu, logvar = layer(layers[-1])
            layers.append(mu + torch.exp(0.5 * logvar) * noise)
            logvars.append(logvar)
        return torch.cat(layers, dim=-1), Upper(self, eps, logvars)

    def log_q(self, z: torch.Tensor) -> torch.Tensor:
        """(S, N) sum over the upper layers of log q(z_{l+1} | z_l) at z's slices, with q's
        parameters held fixed (a functional call with detached weights)."""
        layers = self.split(z)
        total = 0
        for layer, lower, upper in zip(self.up, layers[:-1], layers[1:]):
            total = total + log_normal(upper, *layer.fixed(lower))
        return total

    def log_p(self, z: torch.Tensor) -> torch.Tensor:
        """(S, N) sum over the layers below the top of log p(z_l | z_{l+1})."""
        layers = self.split(z)
        total = 0
        for layer, lower, upper in zip(self.down, layers[:-1], layers[1:]):
            mu, logvar = layer(upper)
            total = total + log_normal(lower, mu, logvar)
        return total

    @torch.no_grad()
    def sample_down(self, top: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """z_L (n, d_L) from the prior -> z_1 (n, d_1), each layer drawn from p(z_l|z_{l+1})."""
        z = top
        for layer in reversed(self.down):
            mu, logvar = layer(z)
            noise = torch.randn(mu.shape, generator=generator, device=mu.device)
            z = mu + torch.exp(0.5 * logvar) * noise
        return z


class Upper(NamedTuple):
    """The upper layers of one forward call: their module, noise (S, N, d_2 + ... + d_L) and
    q log-variances (S, N, d_l) each. Terms asks it for the densities."""

    hierarchy: Hierarchy
    eps: torch.Tensor
    logvars: list

    def bottom(self, z: torch.Tensor) -> torch.Tensor:
        return z[..., : self.hierarchy.sizes[0]]

    def top(self, z: torch.Tensor) -> torch.Tensor:
        return z[..., -self.hierarchy.sizes[-1] :]

    def log_q(self, z: torch.Tensor, fixed: bool) -> torch.Tensor:
        """(S, N) the upper layers' log q: written in their noise, or with fixed parameters."""
        if fixed:
            return self.hierarchy.log_q(z)
        noise = self.eps.split(self.hierarchy.sizes[1:], dim=-1)
        return sum(log_normal_from_eps(e, logvar) for e, logvar in zip(noise, self.logvars))

    def log_p(self, z: torch.Tensor) -> torch.Tensor:
        return self.hierarchy.log_p(z)
