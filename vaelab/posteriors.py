"""Posteriors q(z|x) beyond the diagonal Gaussian: the inverse autoregressive flow.

The diagonal Gaussian N(mu, diag(exp(logvar))) is the model's own head (models.VAE). An IAF
(Kingma et al. 2016) starts from a draw of it, z_0 = mu + sigma * eps, and applies T steps

    (m, s) = MADE_t(z, h),   sigma_t = sigmoid(s),   z <- sigma_t * z + (1 - sigma_t) * m,

each autoregressive in z (output d sees z_<d only) and conditioned on a context vector h that
the encoder's head gives beside mu and logvar. Each step's Jacobian is triangular with diagonal
sigma_t, so log q(z_T|x) = log N(z_0; mu, sigma^2) - sum_t sum_d log sigma_t,d. The order of
the variables is reversed between steps, so that every variable conditions on every other.

Choices: the context has CONTEXT_PER_LATENT * z_dim numbers; each MADE has one hidden layer of
max(MIN_WIDTH, WIDTH_PER_LATENT * z_dim) ELUs, the context entering it unmasked; s starts near
SIGMOID_BIAS (its output layer's bias), so that each step starts close to the identity.

Shapes: z (S, N, z_dim); h (N, context).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONTEXT_PER_LATENT = 1
WIDTH_PER_LATENT = 4
MIN_WIDTH = 64
SIGMOID_BIAS = 2.0  # sigmoid(2) = 0.88: a step starts by keeping most of z


def context_size(z_dim: int) -> int:
    return CONTEXT_PER_LATENT * z_dim


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (out, in)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.float(), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """(z (..., D), h (..., C)) -> m, s (..., D), output d a function of the z_e that come
    before d in `order` (a permutation of range(D)) and of h."""

    def __init__(self, z_dim: int, context: int, width: int, order: torch.Tensor):
        super().__init__()
        rank = torch.empty_like(order)
        rank[order] = torch.arange(z_dim)  # position of each variable in the order
        # A hidden unit of degree k sees the variables of rank <= k; degree -1 sees the context
        # alone, which is how the first variable's step depends on x.
        hidden = torch.arange(width) % z_dim - 1
        self.inner = MaskedLinear(hidden[:, None] >= rank[None, :])
        self.context = nn.Linear(context, width)
        outer = rank[:, None] > hidden[None, :]  # the output of rank r: hidden units below r
        self.m = MaskedLinear(outer)
        self.s = MaskedLinear(outer)
        with torch.no_grad():
            self.s.bias.fill_(SIGMOID_BIAS)

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = F.elu(self.inner(z) + self.context(h))
        return self.m(a), self.s(a)


class IAF(nn.Module):
    """T autoregressive steps from a diagonal-Gaussian draw (see the module's docstring)."""

    def __init__(self, z_dim: int, steps: int):
        super().__init__()
        width = max(MIN_WIDTH, WIDTH_PER_LATENT * z_dim)
        forward_order, reverse_order = torch.arange(z_dim), torch.arange(z_dim).flip(0)
        self.steps = nn.ModuleList(
            MADE(z_dim, context_size(z_dim), width, reverse_order if t % 2 else forward_order)
            for t in range(steps)
        )

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_0: (S, N, z_dim), h: (N, context) -> z_T (S, N, z_dim), sum of log sigma (S, N)."""
        log_det = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for made in self.steps:
            m, s = made(z, h)
            sigma = torch.sigmoid(s)
            z = sigma * z + (1 - sigma) * m
            log_det = log_det + F.logsigmoid(s).sum(-1)
        return z, log_det


POSTERIORS = ("gaussian", "iaf")
