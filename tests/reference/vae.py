"""A frozen reference copy of vaelab's default model and training step, for tests/test_reference.py.

FROZEN ON PURPOSE. Copied from vaelab at commit 03ebbda24ccb93a18e4c0027b85906b43ef4c4be
(vaelab/models.py, nets.py, objectives.py, likelihoods.py, step.py and train.make_optimizer), so
that a refactor of those modules can show that the default path still computes the same bits.
Do not update it to follow the package: a test that compares the package with it and fails says
that the default path changed. If that change is wanted, retire or re-pin the comparison on
purpose, in its own commit, and say so.

What it holds, the default path only:

- the MLP VAE on the flattened image: an encoder MLP with a ReLU after every layer, one linear
  head giving mu and logvar, a decoder MLP with a ReLU between its layers, registered in the
  package's order (encoder, head, decoder) so that the same torch seed gives the same weights;
- the Bernoulli likelihood: dynamic binarization with the package's keyed draws, logits out,
  log p(x|z) = sum x * l - softplus(l) (softplus as autograd computes it while training);
- reparametrization, the analytic KL against N(0, I), the negative ELBO (with an optional KL
  weight: beta, reached linearly over a warm-up), the negative IWAE bound;
- eager training: per epoch the keyed order, binarization and noise drawn in bulk, then per
  batch forward, objective, zero_grad, backward and a fused SGD or Adam update.

It leans on one vaelab module, vaelab.rng (key, row_keys, uniform16, normal, permutation), for
the keyed random numbers: they are not what the refactor changes, and tests/test_rng.py pins
them. It imports nothing from vaelab's models, nets, objectives, likelihoods, step, train or
config, and takes plain numbers, not a config.

Every expression keeps the package's operations, shapes, strides and order: an equal formula
computed otherwise (another summation order, a fused kernel, a contiguous copy where the
package has a transposed view) may change the last bit of a float32 value, and from then on
every later step. Shapes: N images, S draws of z per image, D = C * H * W values per image.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vaelab import rng

LOG_2PI = math.log(2 * math.pi)

# The package's defaults (its "tutorial" preset) at the commit above.
Z_DIM = 2
ENCODER_HIDDEN = (256, 128)
DECODER_HIDDEN = (128, 256)
LR = 5e-3

# Rows of the epoch's draws made at a time (step.TrainStep.DRAW_ROWS).
DRAW_ROWS = 4096


# --- the model --------------------------------------------------------------------------------


def mlp(sizes: list[int], final_activation: bool = False) -> nn.Sequential:
    """Linear layers through `sizes` with a ReLU after each but the last (after the last too with
    final_activation): (..., sizes[0]) -> (..., sizes[-1]). Linear i is module 2 i, as in the
    package's nets.MLP."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if final_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Terms(NamedTuple):
    """Per-example terms for S draws z_s = mu + sigma * eps_s of N examples."""

    log_px_z: torch.Tensor  # (S, N) log p(x | z_s)
    kl: torch.Tensor        # (N,) KL(q(z|x) || p(z)), analytic
    z: torch.Tensor         # (S, N, z_dim)
    eps: torch.Tensor       # (S, N, z_dim)
    logvar: torch.Tensor    # (N, z_dim)


class ReferenceVAE(nn.Module):
    """The default VAE: MLP encoder, linear head (mu, logvar), MLP decoder giving logits.

    image_shape: (C, H, W). Parameter names are the package's (encoder.0.weight, ..., head.bias,
    decoder.4.bias for the default sizes).
    """

    def __init__(self, image_shape: tuple[int, int, int], z_dim: int = Z_DIM,
                 encoder_hidden: tuple[int, ...] = ENCODER_HIDDEN,
                 decoder_hidden: tuple[int, ...] = DECODER_HIDDEN):
        super().__init__()
        self.image_shape, self.z_dim = tuple(image_shape), z_dim
        x_dim = math.prod(self.image_shape)
        # Registered in this order: it fixes the order of the initial weights' draws.
        self.encoder = mlp([x_dim, *encoder_hidden], final_activation=True)
        self.head = nn.Linear(encoder_hidden[-1], 2 * z_dim)
        self.decoder = mlp([z_dim, *decoder_hidden, x_dim])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W) float32 -> mu, logvar: (N, z_dim) each (views of the head's output)."""
        mu, logvar = self.head(self.encoder(x.reshape(len(x), -1))).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., z_dim) -> logits (..., C, H, W)."""
        return self.decoder(z).view(*z.shape[:-1], *self.image_shape)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> Terms:
        """x: (N, C, H, W) observed 0/1 pixels; eps: (S, N, z_dim) standard normal noise."""
        mu, logvar = self.encode(x)
        z = reparametrize(mu, logvar, eps)
        return Terms(log_px_z=bernoulli_log_prob(self.decode(z), x), kl=kl_normal(mu, logvar),
                     z=z, eps=eps, logvar=logvar)


def build_model(image_shape: tuple[int, int, int], seed: int, **sizes) -> ReferenceVAE:
    """Freshly initialised weights from torch seed `seed`; the caller's RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ReferenceVAE(image_shape, **sizes)


# --- the Bernoulli likelihood -----------------------------------------------------------------


def observe(images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Dynamic binarization: (N, C, H, W) uint8, keys (N,) int64 -> (N, C, H, W) float32 0/1.

    Pixel on when a keyed uniform 16-bit r has 255 r < 65536 k, k its grey level.
    """
    r = rng.uniform16(keys, images[0].numel()).view(images.shape)
    return r.mul_(255).lt_(images.to(torch.int32).mul_(65536)).to(torch.float32)


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x|z) from logits l: sum_d x_d l_d - softplus(l_d). (S, N, C, H, W), (N, C, H, W)
    -> (S, N) nats."""
    logits = logits.flatten(-3)
    xl = torch.mul(logits, x.flatten(-3)).sum(-1)
    return xl - F.softplus(logits).sum(-1)


# --- the objectives ---------------------------------------------------------------------------


def reparametrize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps.

    mu, logvar: (N, z_dim); eps: (S, N, z_dim) -> (S, N, z_dim).
    """
    return mu + torch.exp(0.5 * logvar) * eps


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)): (N, z_dim) -> (N,) nats."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def negative_elbo(terms: Terms, kl_weight: torch.Tensor | None = None) -> torch.Tensor:
    """kl_weight * KL - (1/S) sum_s log p(x|z_s): (N,) nats; None: weight 1, no multiply."""
    kl = terms.kl if kl_weight is None else kl_weight * terms.kl
    return kl - terms.log_px_z.mean(0)


def negative_iwae(terms: Terms) -> torch.Tensor:
    """-log (1/k) sum_s w_s with k = S and log w_s = log p(x|z_s) + log p(z_s) - log q(z_s|x):
    (N,) nats."""
    log_pz = -0.5 * (terms.z.pow(2) + LOG_2PI).sum(-1)
    log_qz = -0.5 * (terms.eps.pow(2) + LOG_2PI + terms.logvar).sum(-1)
    log_w = terms.log_px_z + log_pz - log_qz
    return math.log(len(log_w)) - torch.logsumexp(log_w, dim=0)


# --- training ---------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, name: str, lr: torch.Tensor) -> torch.optim.Optimizer:
    """Plain SGD (no momentum) or Adam, fused, with a 0-d float32 tensor learning rate."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=False)
    return torch.optim.SGD(model.parameters(), lr=lr, fused=True)


def draw_epoch(images: torch.Tensor, seed: int, epoch: int, rows: int,
               noise_values: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What epoch `epoch` trains on, keyed by (seed, epoch): row p is the image at position p of
    the epoch's order, binarized, and its noise.

    images: (N, C, H, W) uint8; rows: the epoch's whole batches times the batch size;
    noise_values: S * z_dim. -> x (rows, C, H, W) float32, eps (rows, S * z_dim) float32.
    """
    order = rng.permutation(rng.key(seed, "order", epoch), len(images))
    observe_key, noise_key = rng.key(seed, "observe", epoch), rng.key(seed, "noise", epoch)
    x = torch.empty((rows, *images.shape[1:]), dtype=torch.float32)
    eps = torch.empty((rows, noise_values), dtype=torch.float32)
    for start in range(0, rows, DRAW_ROWS):
        part = slice(start, min(start + DRAW_ROWS, rows))
        positions = torch.arange(part.start, part.stop)
        x[part] = observe(images.index_select(0, order[part]), rng.row_keys(observe_key, positions))
        eps[part] = rng.normal(rng.row_keys(noise_key, positions), noise_values)
    return x, eps


def train(images: torch.Tensor, *, epochs: int, batch_size: int, seed: int = 0, lr: float = LR,
          optimizer: str = "sgd", objective: str = "elbo", samples: int = 1, k: int = 5,
          beta: float = 1.0, kl_warmup: int = 0,
          **sizes) -> tuple[ReferenceVAE, list[torch.Tensor]]:
    """Train a fresh model as vaelab's default path did, eagerly on the CPU, at a constant lr.

    images: (N, C, H, W) uint8, the training images. samples: draws of z per image for the ELBO;
    k: for objective "iwae". beta, kl_warmup (epochs): the ELBO's KL weight and its linear ramp.
    sizes: z_dim, encoder_hidden, decoder_hidden (default: the package's defaults).
    Returns the model and, per epoch, its batches' losses (steps,) float32; the last partial
    batch of an epoch is dropped.
    """
    model = build_model(tuple(images.shape[1:]), seed, **sizes)
    lr_tensor = torch.tensor(lr, dtype=torch.float32)
    opt = make_optimizer(model, optimizer, lr_tensor)
    draws = k if objective == "iwae" else samples
    steps = len(images) // batch_size
    weighted = beta != 1.0 or kl_warmup > 0
    warmup_steps = kl_warmup * steps
    kl_weight = torch.full((), beta, dtype=torch.float32)
    steps_done = torch.zeros((), dtype=torch.int64)
    batch_losses = []
    for epoch in range(1, epochs + 1):
        lr_tensor.fill_(lr)
        x_epoch, eps_epoch = draw_epoch(images, seed, epoch, rows=steps * batch_size,
                                        noise_values=draws * model.z_dim)
        steps_done.fill_((epoch - 1) * steps)
        positions = torch.arange(batch_size)
        losses = torch.empty(steps)
        for i in range(steps):
            # (B, C, H, W) and (S, B, z_dim), the latter a transposed view as in TrainStep.draw
            eps = eps_epoch.index_select(0, positions).view(-1, draws, model.z_dim)
            eps = eps.transpose(0, 1)
            x = x_epoch.index_select(0, positions)
            terms = model(x, eps)
            if objective == "iwae":
                loss = negative_iwae(terms).mean()
            else:
                if warmup_steps:
                    ramp = steps_done.to(torch.float32).div_(warmup_steps).clamp_(max=1.0)
                    kl_weight.copy_(ramp.mul_(beta))
                    steps_done.add_(1)
                loss = negative_elbo(terms, kl_weight if weighted else None).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            positions.add_(batch_size)
            losses[i] = loss.detach()
        batch_losses.append(losses)
    return model, batch_losses
