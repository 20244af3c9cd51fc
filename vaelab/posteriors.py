"""Posteriors q(z|x): the only module that names one.

A posterior reads its parameters from the numbers the model's linear head gives (the head maps
the encoder's features (N, F) to `head_size` numbers per example) and draws z from standard
normal noise:

- `noise_dim`: standard normals one draw needs; `head_size(z_dim)`: the head's width;
- `params(h)`: the head's output h (N, head_size) -> q's parameters, a tuple of (N, ...) tensors
  whose first two are a diagonal Gaussian's mu and logvar (N, z_dim);
- `rsample(params, eps)`: eps (S, N, noise_dim) -> z (S, N, D), log q(z|x) (S, N) nats;
  `sample(params, eps)`: z alone (the analytic KL needs no density);
- `log_prob(z, params, fixed)`: log q(z|x) at given z, with fixed=True its parameters held
  fixed (the gradient reaches z only: what STL and DReG need); raises where undefined (a flow);
- `mean(params)`: E_q[z] in closed form, (N, m) for the first m <= D columns, or None where it
  has none (the caller then averages draws); `point(params)`: one code per image (N, D), the
  mean where there is one, else the draw at eps = 0;
- `decoded(z)`: the part of z the decoder reads (z_1 of a hierarchy); `sizes`: each stochastic
  layer's size, the decoder's first.

A posterior is an nn.Module whose own parameters (a flow's, a hierarchy's) register after the
prior's, so optimizer checkpoints, which list parameters by position, keep their order.

Shapes: z (S, N, D); params (N, ...); the head's h (N, head_size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .nets import MLP
from .densities import log_normal, log_normal_from_eps, reparametrize
from .registry import Registry

POSTERIORS = Registry("posterior")

Params = tuple[torch.Tensor, ...]


class Posterior(nn.Module):
    """Base of the posteriors: a diagonal Gaussian's parameters from the head, and the defaults
    of the protocol in the module's docstring."""

    has_log_prob = True  # log_prob is defined: STL and DReG can hold q's parameters fixed

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim

    @classmethod
    def from_config(cls, config) -> "Posterior":
        """The posterior over config.z_dim latents that config (a ModelConfig) asks for."""
        return cls(config.z_dim)

    @property
    def noise_dim(self) -> int:
        return self.z_dim

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.z_dim,)

    @property
    def mean_columns(self) -> int:
        """How many of z's first columns `mean` gives in closed form (0: none)."""
        return 0

    @staticmethod
    def head_size(z_dim: int) -> int:
        return 2 * z_dim

    def params(self, h: torch.Tensor) -> Params:
        return tuple(h.chunk(2, dim=-1))

    def sample(self, params: Params, eps: torch.Tensor) -> torch.Tensor:
        return self.rsample(params, eps)[0]

    def rsample(self, params: Params, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor, params: Params, fixed: bool = False) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no log q(z|x) at a given z")

    def mean(self, params: Params) -> torch.Tensor | None:
        return None

    def point(self, params: Params) -> torch.Tensor:
        if self.mean_columns == self.noise_dim:
            return self.mean(params)
        zero = torch.zeros((1, len(params[0]), self.noise_dim), device=params[0].device)
        return self.sample(params, zero)[0]

    def decoded(self, z: torch.Tensor) -> torch.Tensor:
        return z


def _held(params: Params, fixed: bool) -> Params:
    return tuple(p.detach() for p in params) if fixed else params


@POSTERIORS.register("gaussian")
class Gaussian(Posterior):
    """N(mu, diag(exp(logvar))), z = mu + sigma * eps."""

    def sample(self, params: Params, eps: torch.Tensor) -> torch.Tensor:
        mu, logvar = params
        return reparametrize(mu, logvar, eps)

    def rsample(self, params: Params, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = params
        return reparametrize(mu, logvar, eps), log_normal_from_eps(eps, logvar)

    def log_prob(self, z: torch.Tensor, params: Params, fixed: bool = False) -> torch.Tensor:
        return log_normal(z, *_held(params, fixed))

    def mean(self, params: Params) -> torch.Tensor:
        return params[0]

    @property
    def mean_columns(self) -> int:
        return self.z_dim


# --- the inverse autoregressive flow -------------------------------------------------------

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


@POSTERIORS.register("iaf")
class IAF(Posterior):
    """An inverse autoregressive flow (Kingma et al. 2016): from a diagonal-Gaussian draw
    z_0 = mu + sigma * eps, T steps

        (m, s) = MADE_t(z, h),   sigma_t = sigmoid(s),   z <- sigma_t * z + (1 - sigma_t) * m,

    each autoregressive in z (output d sees z_<d only) and conditioned on a context h that the
    head gives beside mu and logvar. Each step's Jacobian is triangular with diagonal sigma_t, so
    log q(z_T|x) = log N(z_0; mu, sigma^2) - sum_t sum_d log sigma_t,d. The order of the
    variables is reversed between steps, so that every variable conditions on every other.

    The context has CONTEXT_PER_LATENT * z_dim numbers; each MADE has one hidden layer of
    max(MIN_WIDTH, WIDTH_PER_LATENT * z_dim) ELUs, the context entering it unmasked; s starts
    near SIGMOID_BIAS, so that each step starts close to the identity. Its density at a given z
    would need the flow inverted: log_prob is undefined (STL and DReG refuse it).
    """

    has_log_prob = False

    def __init__(self, z_dim: int, steps: int):
        super().__init__(z_dim)
        width = max(MIN_WIDTH, WIDTH_PER_LATENT * z_dim)
        forward_order, reverse_order = torch.arange(z_dim), torch.arange(z_dim).flip(0)
        self.steps = nn.ModuleList(
            MADE(z_dim, context_size(z_dim), width, reverse_order if t % 2 else forward_order)
            for t in range(steps)
        )

    @classmethod
    def from_config(cls, config) -> "IAF":
        return cls(config.z_dim, config.flow_steps)

    @staticmethod
    def head_size(z_dim: int) -> int:
        return 2 * z_dim + context_size(z_dim)

    def params(self, h: torch.Tensor) -> Params:
        return tuple(h.split([self.z_dim, self.z_dim, context_size(self.z_dim)], dim=-1))

    def flow(self, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_0: (S, N, z_dim), h: (N, context) -> z_T (S, N, z_dim), sum of log sigma (S, N)."""
        log_det = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for made in self.steps:
            m, s = made(z, h)
            sigma = torch.sigmoid(s)
            z = sigma * z + (1 - sigma) * m
            log_det = log_det + F.logsigmoid(s).sum(-1)
        return z, log_det

    forward = flow

    def rsample(self, params: Params, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar, h = params
        z, log_det = self.flow(reparametrize(mu, logvar, eps), h)
        return z, log_normal_from_eps(eps, logvar) - log_det

    def log_prob(self, z: torch.Tensor, params: Params, fixed: bool = False) -> torch.Tensor:
        raise ValueError("log q(z|x) at a given z needs the IAF's inverse: with an IAF "
                         "posterior train with --estimator reparam")


# --- stochastic layers above z_1 (Burda et al. 2015) -----------------------------------------

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


class Layers(nn.Module):
    """The conditionals between stochastic layers z_1, ..., z_L of sizes d_1, ..., d_L:
    `up[l]` is q(z_{l+2} | z_{l+1}), `down[l]` is p(z_{l+1} | z_{l+2}) (0-based l), each a
    GaussianLayer with `hidden` units and `activation`. Both directions live in this one module,
    which the posterior registers (the prior holds it too, unregistered): the parameters keep
    the order of the checkpoints made before the layers were a posterior/prior pair."""

    def __init__(self, sizes: tuple[int, ...], hidden: tuple[int, ...], activation: str):
        super().__init__()
        self.sizes = tuple(sizes)
        pairs = list(zip(self.sizes[:-1], self.sizes[1:]))
        self.up = nn.ModuleList(GaussianLayer(lo, hidden, hi, activation) for lo, hi in pairs)
        self.down = nn.ModuleList(GaussianLayer(hi, hidden, lo, activation) for lo, hi in pairs)

    def split(self, z: torch.Tensor) -> list[torch.Tensor]:
        """(..., d_1 + ... + d_L) -> each layer's (..., d_l)."""
        return list(z.split(self.sizes, dim=-1))

    def log_p(self, z: torch.Tensor) -> torch.Tensor:
        """(S, N) sum over the layers below the top of log p(z_l | z_{l+1})."""
        layers = self.split(z)
        total = 0
        for layer, lower, upper in zip(self.down, layers[:-1], layers[1:]):
            total = total + log_normal(lower, *layer(upper))
        return total

    @torch.no_grad()
    def sample_down(self, top: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """z_L (n, d_L) -> every layer's draws (n, d_1 + ... + d_L), each from p(z_l|z_{l+1})."""
        layers = [top]
        for layer in reversed(self.down):
            mu, logvar = layer(layers[0])
            noise = torch.randn(mu.shape, generator=generator, device=mu.device)
            layers.insert(0, mu + torch.exp(0.5 * logvar) * noise)
        return torch.cat(layers, dim=-1)


class Hierarchical(Posterior):
    """q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1}) (Burda et al. 2015): a diagonal Gaussian
    from the head for z_1, then a GaussianLayer per layer above. z holds every layer's draws,
    (S, N, d_1 + ... + d_L), and the decoder reads z_1. Not registered by name: a model with
    upper layers (ModelConfig.upper_z_dims) wraps its Gaussian posterior in one, and its prior
    in a priors.Hierarchical over the same Layers."""

    def __init__(self, sizes: tuple[int, ...], hidden: tuple[int, ...], activation: str):
        super().__init__(sizes[0])
        self.layers = Layers(sizes, hidden, activation)

    @property
    def noise_dim(self) -> int:
        return sum(self.layers.sizes)

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.layers.sizes

    def rsample(self, params: Params, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = params
        d1 = self.z_dim
        eps, upper_eps = eps.split([d1, eps.shape[-1] - d1], dim=-1)
        draws, log_q = [reparametrize(mu, logvar, eps)], log_normal_from_eps(eps, logvar)
        upper_logq = 0
        for layer, noise in zip(self.layers.up, upper_eps.split(self.sizes[1:], dim=-1)):
            mu_l, logvar_l = layer(draws[-1])
            draws.append(mu_l + torch.exp(0.5 * logvar_l) * noise)
            upper_logq = upper_logq + log_normal_from_eps(noise, logvar_l)
        return torch.cat(draws, dim=-1), log_q + upper_logq

    def log_prob(self, z: torch.Tensor, params: Params, fixed: bool = False) -> torch.Tensor:
        layers = self.layers.split(z)
        total = 0
        for layer, lower, upper in zip(self.layers.up, layers[:-1], layers[1:]):
            total = total + log_normal(upper, *(layer.fixed(lower) if fixed else layer(lower)))
        return log_normal(layers[0], *_held(params, fixed)) + total

    def mean(self, params: Params) -> torch.Tensor:
        return params[0]  # z_1's; the layers above have no closed form

    @property
    def mean_columns(self) -> int:
        return self.z_dim

    def decoded(self, z: torch.Tensor) -> torch.Tensor:
        return z[..., :self.z_dim]
