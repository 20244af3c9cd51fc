"""Encoder and decoder networks, and the one table of activations.

An MLP is a list of linear layers with an activation between them. Its forward
can write every layer's output into buffers kept by a `Workspace`: evaluation
decodes thousands of same-shaped tiles, and fresh multi-megabyte tensors for
each made the allocator return memory to the OS and fault it back in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# name -> (module, in-place function)
ACTIVATIONS = {
    "relu": (nn.ReLU, torch.relu_),
    "tanh": (nn.Tanh, torch.tanh_),
    "elu": (nn.ELU, F.elu_),
    "softplus": (nn.Softplus, lambda h: h.copy_(F.softplus(h))),
}


class Workspace:
    """Buffers reused across calls, one per (name, shape, dtype, device). Not for autograd."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        k = (name, tuple(shape), like.dtype, like.device)
        if k not in self._buffers:
            self._buffers[k] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._buffers[k]


class MLP(nn.Sequential):
    """Linear layers through `sizes`, with `activation` after each but the last (after the last
    too with final_activation). (..., sizes[0]) -> (..., sizes[-1])."""

    def __init__(self, sizes: list[int], activation: str, final_activation: bool = False):
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if final_activation or i < len(sizes) - 2:
                layers.append(ACTIVATIONS[activation][0]())
        super().__init__(*layers)
        self.activation = activation

    def forward(self, h: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        if workspace is None:
            return super().forward(h)
        lead, h = h.shape[:-1], h.reshape(-1, h.shape[-1])
        for i, layer in enumerate(self):
            if isinstance(layer, nn.Linear):
                out = workspace.get((id(self), i), (h.shape[0], layer.out_features), h)
                h = torch.addmm(layer.bias, h, layer.weight.t(), out=out)
            else:
                ACTIVATIONS[self.activation][1](h)
        return h.view(*lead, -1)
