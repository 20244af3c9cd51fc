"""The negative ELBO's gradient, derived by hand for the MLP VAE.

Same objective as `objectives.negative_elbo` (mean over the batch, L samples,
same random numbers in the same order), but without an autograd graph: the
backward pass is a handful of GEMMs and in-place elementwise ops. For plain
SGD the update is fused into the weight-gradient GEMM (W += -lr * dY^T A), so
no gradient tensor is ever written. tests/test_manual.py checks the gradients
against autograd.

Supports the activations in ACTIVATION_GRADS and both likelihoods; `supports`
says whether a model qualifies, otherwise the trainer uses autograd.

x may also be a `native.BinaryBatch` (binary images as their on-pixels): then
the first layer and the Bernoulli term run in the C kernels of native.py, and
the first layer's weight is kept input-major ((D, H) in memory) for them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import native
from .models import VAE
from .native import BinaryBatch
from .objectives import kl_normal, softplus_total

# Backward through an activation, in place where possible: (d loss / d output,
# the activation's output a) -> d loss / d input.
ACTIVATION_GRADS = {
    # aten's own ReLU backward: one pass, no mask tensor to convert
    "relu": lambda g, a: torch.ops.aten.threshold_backward(g, a, 0),
    "tanh": lambda g, a: g.mul_(1 - a * a),
}
_ACTIVATIONS_INPLACE = {"relu": torch.relu_, "tanh": torch.tanh_}


def supports(model: VAE) -> bool:
    return model.config.activation in ACTIVATION_GRADS


def _linears(seq: nn.Sequential) -> list[nn.Linear]:
    return [m for m in seq if isinstance(m, nn.Linear)]


def input_major_weight_t(lin: nn.Linear) -> torch.Tensor:
    """Lays lin's weight out input-major, in place (same values, same shape,
    transposed strides: a pixel's weights become one contiguous row), and
    returns W^T, a contiguous (in, out) view of it. contiguous_weights undoes it."""
    if not lin.weight.t().is_contiguous():
        lin.weight.data = lin.weight.data.t().contiguous().t()
    return lin.weight.detach().t()


def contiguous_weights(model: VAE) -> None:
    """Lays every weight out in the usual row-major way again (undoing input_major_weight_t),
    so that evaluation and saved runs compute with the layout a loaded model has."""
    for lin in _linears(model.encoder) + [model.head]:  # the head is the first layer without hidden ones
        if not lin.weight.is_contiguous():
            lin.weight.data = lin.weight.data.contiguous()


@torch.no_grad()
def negative_elbo_backward(model: VAE, x: torch.Tensor | BinaryBatch, samples: int = 1,
                           generator: torch.Generator | None = None,
                           sgd_lr: float | None = None) -> torch.Tensor:
    """Mean negative ELBO of the batch x: (N, D) (or its on-pixels); returns it as a 0-d tensor.

    Without sgd_lr, writes d loss / d p into every parameter's .grad (for any
    optimizer to step). With sgd_lr, applies p -= sgd_lr * grad directly.
    """
    cfg = model.config
    act = _ACTIVATIONS_INPLACE[cfg.activation]
    act_grad = ACTIVATION_GRADS[cfg.activation]
    encoder = _linears(model.encoder) + [model.head]
    decoder = _linears(model.decoder)
    n, L = x.shape[0], samples

    def forward(layers: list[nn.Linear], h: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Through layers (activation between them, none after the last),
        keeping each layer's input for the weight gradients."""
        inputs = []
        for i, lin in enumerate(layers):
            inputs.append(h)
            if isinstance(h, BinaryBatch):
                h = native.binary_linear(h, input_major_weight_t(lin), lin.bias.detach())
            else:
                h = torch.addmm(lin.bias, h, lin.weight.t())
            if i < len(layers) - 1:
                h = act(h)
        return inputs, h

    binary = isinstance(x, BinaryBatch)  # then the C kernels throughout
    enc_inputs, head = forward(encoder, x)
    mu, logvar = head.chunk(2, dim=1)                                # (N, z) each
    eps = torch.randn((L, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    if binary:
        z, std, kl = native.gaussian_latent(head, eps)
    else:
        std = torch.exp(0.5 * logvar)
        z = torch.addcmul(mu, std, eps)                              # (L, N, z)
        kl = kl_normal(mu, logvar).sum()
    dec_inputs, h = forward(decoder, z.view(L * n, -1))
    logits = h.view(L, n, -1)                                        # (L, N, D)

    # Loss and d loss / d logits (the mean over L and N folded into `scale`).
    scale = 1.0 / (L * n)
    if binary:
        if cfg.likelihood != "bernoulli":
            raise ValueError("binary batches are for the Bernoulli likelihood")
        nll = native.bernoulli_loss_grad_(logits, x, scale)  # logits become d loss / d logits
        dlogits = logits
    elif cfg.likelihood == "gaussian":
        mean = torch.sigmoid(logits)
        resid = (mean - x) / cfg.sigma                               # (L, N, D)
        nll = 0.5 * resid.square().sum() + L * n * x.shape[1] * (
            math.log(cfg.sigma) + 0.5 * math.log(2 * math.pi))
        dlogits = resid.mul_(mean * (1 - mean)).mul_(scale / cfg.sigma)
    else:
        sig = torch.sigmoid(logits)
        # sum of x * l as one matrix-vector product: no (L, N, D) temporary
        nll = softplus_total(logits, sig) - torch.mv(logits.view(L, -1), x.reshape(-1)).sum()
        dlogits = sig.sub_(x).mul_(scale)
    loss = nll * scale + kl / n

    def backward(layers: list[nn.Linear], inputs: list[torch.Tensor], dy: torch.Tensor,
                 need_input_grad: bool) -> torch.Tensor | None:
        """Back through layers; dy is d loss / d (last layer's output)."""
        for i in range(len(layers) - 1, -1, -1):
            lin, a = layers[i], inputs[i]
            if isinstance(a, BinaryBatch):  # the first layer, on binary input: no input gradient
                weight_t = input_major_weight_t(lin)
                if sgd_lr is None:
                    grad_t = torch.zeros_like(weight_t)
                    native.binary_linear_accumulate_(grad_t, a, dy, 1.0)
                    lin.weight.grad, lin.bias.grad = grad_t.t(), dy.sum(0)
                else:
                    native.binary_linear_accumulate_(weight_t, a, dy, -sgd_lr)
                    lin.bias.add_(dy.sum(0), alpha=-sgd_lr)
                return None
            dinput = dy @ lin.weight if (i > 0 or need_input_grad) else None  # before the update
            if sgd_lr is None:
                lin.weight.grad = torch.mm(dy.t(), a)
                lin.bias.grad = dy.sum(0)
            else:
                lin.weight.addmm_(dy.t(), a, alpha=-sgd_lr)
                lin.bias.add_(dy.sum(0), alpha=-sgd_lr)
            if i > 0:
                dy = act_grad(dinput, a)
            else:
                return dinput
        return None

    dz = backward(decoder, dec_inputs, dlogits.view(L * n, -1), need_input_grad=True).view(L, n, -1)
    if binary:
        dhead = native.gaussian_latent_backward(dz, head, eps, std, 1.0 / n)
    else:
        dmu = dz.sum(0) + mu / n
        dlogvar = (dz * eps).sum(0).mul_(0.5 * std).add_((std.square() - 1.0) / (2 * n))
        dhead = torch.cat([dmu, dlogvar], dim=1)
    backward(encoder, enc_inputs, dhead, need_input_grad=False)
    return torch.as_tensor(loss)
