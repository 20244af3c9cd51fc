"""A small digit classifier, trained on MNIST where it is needed (the tests of samples by class,
benchmarks.decisions.class_prior): it judges whether a model's samples of a class look like
that class."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from vaelab.data import Dataset


@functools.lru_cache(maxsize=1)
def _trained(images: torch.Tensor, labels: torch.Tensor) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = images.float().div(255).view(-1, 784)
    for _ in range(2):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 200):
            rows = order[start:start + 200]
            loss = nn.functional.cross_entropy(net(x[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def digit_classifier(mnist: Dataset) -> nn.Module:
    """An MLP 784-256-10 trained for two epochs on MNIST's grey levels in [0, 1] (about 97% of
    the test images right), the same one for every caller of a session."""
    return _trained(mnist.train_images, mnist.train_labels)


@torch.no_grad()
def classify(net: nn.Module, images: np.ndarray) -> torch.Tensor:
    """images: (N, 28, 28) in [0, 1] -> (N,) the classifier's digits."""
    return net(torch.as_tensor(images, dtype=torch.float32).reshape(len(images), 784)).argmax(-1)


def grid_tiles(path, n: int, side: int = 28, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """The n images of a PNG grid that plots.save_image_grid wrote (grey, pad pixels apart):
    -> (n, side, side) in [0, 1]."""
    from matplotlib.image import imread

    from vaelab.plots import square_nrow

    grid = imread(path)[..., 0]  # grey: the colour channels agree
    nrow = nrow or square_nrow(n)
    tiles = []
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = pad + r * (side + pad), pad + c * (side + pad)
        tiles.append(grid[top:top + side, left:left + side])
    return np.stack(tiles)
