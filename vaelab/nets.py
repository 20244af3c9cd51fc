"""Encoder and decoder networks, and the one table of activations.

An MLP is a list of linear layers with an activation between them. Its forward
can write every layer's output into buffers kept by a `Workspace`: evaluation
decodes thousands of same-shaped tiles, and fresh multi-megabyte tensors for
each made the allocator return memory to the OS and fault it back in. (The conv
decoder passes the workspace to its dense layers only; its convolutions allocate,
and evaluation keeps them small by decoding a tile's samples in several calls.)

The conv networks halve (encoder) or double (decoder) the image's height and width
at every layer with 4x4 kernels, stride 2 and padding 1, so H and W must be
multiples of 2^layers (28 and 32 with two layers):

    ConvEncoder: (N, C, H, W) -> conv c1 -> ... -> conv cL -> flatten -> dense hidden -> (N, hidden[-1])
    ConvDecoder: (M, z_dim) -> dense hidden -> dense cL * (H/2^L) * (W/2^L) -> reshape
                 -> transposed conv c(L-1) -> ... -> transposed conv out_channels -> (M, out_channels, H, W)

with the activation after every layer but the decoder's last.

A conditional model's networks (`labels` = K classes) read y, labels (N,) int64, as one-hot
columns beside their first dense layer's input: the flattened image (MLP encoder), the
convolutions' features (conv encoder), z (both decoders), as in Sohn et al. (2015).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry

# name -> (module, in-place function); registered in the order --help lists them
ACTIVATIONS = Registry("activation")
ACTIVATIONS.register("elu", (nn.ELU, F.elu_))
ACTIVATIONS.register("gelu", (nn.GELU, lambda h: h.copy_(F.gelu(h))))
ACTIVATIONS.register("relu", (nn.ReLU, torch.relu_))
ACTIVATIONS.register("softplus", (nn.Softplus, lambda h: h.copy_(F.softplus(h))))
ACTIVATIONS.register("tanh", (nn.Tanh, torch.tanh_))


class Workspace:
    """Buffers reused across calls, one per (name, shape, dtype, device). Not for autograd."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        k = (name, tuple(shape), like.dtype, like.device)
        if k not in self._buffers:
            self._buffers[k] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._buffers[k]


def with_labels(h: torch.Tensor, y: torch.Tensor | None, classes: int) -> torch.Tensor:
    """h: (M, F) [, y: (M,) int64 labels below classes] -> (M, F + classes): h with y's one-hot
    columns after it (in h's dtype), or h itself where classes is 0."""
    if not classes:
        return h
    if y is None:
        raise ValueError("this network reads labels: give y")
    return torch.cat([h, nn.functional.one_hot(y, classes).to(h.dtype)], dim=-1)


class MLP(nn.Sequential):
    """Linear layers through `sizes`, with `activation` after each but the last (after the last
    too with final_activation). (..., sizes[0]) [, y] -> (..., sizes[-1]); with labels = K, the
    first layer also reads y's one-hot K columns (with_labels)."""

    def __init__(self, sizes: list[int], activation: str, final_activation: bool = False,
                 labels: int = 0):
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(n_in + (labels if i == 0 else 0), n_out))
            if final_activation or i < len(sizes) - 2:
                layers.append(ACTIVATIONS[activation][0]())
        super().__init__(*layers)
        self.activation, self.labels = activation, labels

    @property
    def row_floats(self) -> int:
        """Values one row creates across the layers (to size evaluation's launches)."""
        return sum(m.out_features for m in self if isinstance(m, nn.Linear))

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None,
                workspace: Workspace | None = None) -> torch.Tensor:
        if self.labels:
            lead = h.shape[:-1]
            h = with_labels(h.reshape(-1, h.shape[-1]), y.reshape(-1), self.labels)
            h = h.view(*lead, -1)
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


class ImageMLP(MLP):
    """An MLP on flattened images: (N, C, H, W) or (N, D) [, y] -> (N, sizes[-1])."""

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                workspace: Workspace | None = None) -> torch.Tensor:
        return super().forward(x.reshape(len(x), -1), y, workspace)


def conv_check(image_shape: tuple[int, int, int], channels: tuple[int, ...]) -> str | None:
    """Why the conv networks cannot take images of image_shape (C, H, W), or None if they can."""
    _, h, w = image_shape
    scale = 2 ** len(channels)
    if h % scale or w % scale:
        near = max(scale, round(max(h, w) / scale) * scale)
        return (f"--preset conv halves the images {len(channels)} times, so their width and height must be "
                f"multiples of {scale}, but they are {w}x{h}; resize an image folder with --image-size "
                f"(e.g. {near}) or choose fewer --conv-channels")
    return None


def _conv_out(channels: tuple[int, ...], h: int, w: int) -> tuple[int, int, int]:
    """(channels, height, width) after the encoder's convolutions."""
    scale = 2 ** len(channels)
    return channels[-1], h // scale, w // scale


def down_convs(in_channels: int, channels: tuple[int, ...], activation: str) -> list[nn.Module]:
    """The encoders' stride-2 4x4 convolutions from in_channels through `channels`, each followed
    by the activation: each halves height and width."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip((in_channels, *channels[:-1]), channels):
        layers += [nn.Conv2d(n_in, n_out, 4, stride=2, padding=1), ACTIVATIONS[activation][0]()]
    return layers


def up_convs(channels: tuple[int, ...], out_channels: int, activation: str) -> list[nn.Module]:
    """The decoders' stride-2 4x4 transposed convolutions, `channels` in reverse and then to
    out_channels, with the activation after each but the last: each doubles height and width."""
    widths = (*channels[::-1][1:], out_channels)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(channels[::-1], widths)):
        layers.append(nn.ConvTranspose2d(n_in, n_out, 4, stride=2, padding=1))
        if i < len(widths) - 1:
            layers.append(ACTIVATIONS[activation][0]())
    return layers


class ConvEncoder(nn.Module):
    """(N, C, H, W) or flat (N, C*H*W) images [, y] -> (N, hidden[-1]) features."""

    def __init__(self, image_shape: tuple[int, int, int], channels: tuple[int, ...], hidden: tuple[int, ...],
                 activation: str, labels: int = 0):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.convs = nn.Sequential(*down_convs(image_shape[0], channels, activation))
        self.dense = MLP([math.prod(_conv_out(channels, *image_shape[1:])), *hidden], activation,
                         final_activation=True, labels=labels)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.dense(self.convs(x.reshape(len(x), *self.image_shape)).flatten(1), y)


class ConvDecoder(nn.Module):
    """(..., z_dim) [, y] -> (M, out_channels, H, W), M the product of the leading dimensions."""

    def __init__(self, z_dim: int, image_shape: tuple[int, int, int], channels: tuple[int, ...],
                 hidden: tuple[int, ...], activation: str, out_channels: int, labels: int = 0):
        super().__init__()
        self.start = _conv_out(channels, *image_shape[1:])
        self.dense = MLP([z_dim, *hidden, math.prod(self.start)], activation, final_activation=True,
                         labels=labels)
        self.convs = nn.Sequential(*up_convs(channels, out_channels, activation))
        widths = (*channels[::-1][1:], out_channels)
        side = lambda i: (image_shape[1] * 2 ** i // 2 ** len(channels)) * (image_shape[2] * 2 ** i // 2 ** len(channels))
        self.row_floats = self.dense.row_floats + sum(n * side(i + 1) for i, n in enumerate(widths))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None,
                workspace: Workspace | None = None) -> torch.Tensor:
        h = self.dense(z.reshape(-1, z.shape[-1]), None if y is None else y.reshape(-1), workspace)
        return self.convs(h.view(len(h), *self.start))


class GridEncoder(nn.Module):
    """The conv encoder without its dense part, for a grid of latents (a VQ-VAE's): the stride-2
    convolutions, then a 3x3 convolution to `out` channels with no activation.
    (N, C, H, W) -> (N, out, H / 2^L, W / 2^L)."""

    def __init__(self, image_shape: tuple[int, int, int], channels: tuple[int, ...], out: int,
                 activation: str):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.convs = nn.Sequential(*down_convs(image_shape[0], channels, activation),
                                   nn.Conv2d(channels[-1], out, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x.reshape(len(x), *self.image_shape))


class GridDecoder(nn.Module):
    """GridEncoder's mirror: a 3x3 convolution from `latent` channels, then the stride-2
    transposed convolutions, the last to out_channels with no activation.
    (M, latent, H / 2^L, W / 2^L) -> (M, out_channels, H, W)."""

    def __init__(self, latent: int, channels: tuple[int, ...], activation: str,
                 out_channels: int):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(latent, channels[-1], 3, padding=1),
                                   ACTIVATIONS[activation][0](),
                                   *up_convs(channels, out_channels, activation))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.convs(z)


# Layers whose weights an initialisation scheme sets, and which may be a decoder's output layer.
LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


def glorot_(net: nn.Module, generator: torch.Generator) -> None:
    """Glorot & Bengio's uniform weights, U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), and
    zero biases, for every linear and convolutional layer of net, in place, in module order."""
    for layer in net.modules():
        if isinstance(layer, LAYERS):
            nn.init.xavier_uniform_(layer.weight, generator=generator)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def output_layer(net: nn.Module) -> nn.Module | None:
    """The last module of net (in registration order) that holds parameters of its own: its
    output layer, for vaelab's networks and for most of your own."""
    holders = [m for m in net.modules() if next(m.parameters(recurse=False), None) is not None]
    return holders[-1] if holders else None


def decoder_layers(decoder: nn.Module) -> dict | None:
    """One of vaelab's own decoders as plain data, for a program that runs it elsewhere (the
    report's JavaScript decoder): its activation (after every layer but the last), for a conv
    decoder the shape (C, H, W) its dense part's output takes, and its layers in order, each
    {"type": "dense" | "deconv", "in", "out", "weight", "bias"}: dense weights (out, in), 4x4
    stride-2 transposed convolutions' (in, out, 4, 4). None for any other module."""
    dense = decoder.dense if isinstance(decoder, ConvDecoder) else decoder
    if not isinstance(dense, MLP):
        return None
    layers = [{"type": "dense", "in": m.in_features, "out": m.out_features, "weight": m.weight,
               "bias": m.bias} for m in dense if isinstance(m, nn.Linear)]
    if isinstance(decoder, ConvDecoder):
        layers += [{"type": "deconv", "in": m.in_channels, "out": m.out_channels,
                    "weight": m.weight, "bias": m.bias}
                   for m in decoder.convs if isinstance(m, nn.ConvTranspose2d)]
    return {"start": list(decoder.start) if isinstance(decoder, ConvDecoder) else None,
            "activation": dense.activation, "layers": layers}
