"""The one convention for images handed to vaelab's public functions.

Images are (N, C, H, W), or flat (N, C * H * W), in either of two forms with one meaning:

- uint8, grey levels 0 .. 255: the stored form, as every data source gives them;
- floats in [0, 1]: grey level / 255, read as the stored level round(255 x).

`stored` brings both to the stored form, so the same images as uint8 and as floats give the
same codes and scores, bit for bit; any other type, and floats outside [0, 1], are refused in
one line. What the model then sees of an image (binarized pixels, grey levels) is its
likelihood's business (`VAE.observe`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import VaelabError

CONVENTION = "uint8 grey levels 0..255 (the stored form) or floats in [0, 1]"


def stored(images: torch.Tensor | np.ndarray,
           shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """images: (N, C, H, W) or flat (N, C * H * W), uint8 or floats in [0, 1] -> (N, C, H, W)
    uint8, the stored form (a uint8 tensor comes back as it is, reshaped where flat).

    shape: the (C, H, W) the images must have (a model's image_shape). A float image costs one
    pass to check its range; uint8 images cost nothing.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise VaelabError(f"images must be a tensor of {CONVENTION}, got {type(images).__name__}")
    if images.dtype.is_floating_point:
        images = _levels(images)
    elif images.dtype != torch.uint8:
        dtype = str(images.dtype).removeprefix("torch.")
        raise VaelabError(f"images must be {CONVENTION}; got {dtype} (convert with"
                          " .to(torch.uint8) or .float() / 255)")
    if shape is None:
        return images
    if images.dim() == 2 and images.shape[1] == math.prod(shape):
        return images.view(len(images), *shape)
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(shape):
        c, h, w = shape
        raise VaelabError(f"images of shape {tuple(images.shape)} do not fit the model, which"
                          f" takes (N, {c}, {h}, {w}) or flat (N, {c * h * w})")
    return images


def _levels(images: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] -> uint8 levels round(255 x); anything else refused in one line."""
    if images.numel():
        low, high = torch.aminmax(images.detach().float())
        low, high = low.item(), high.item()
        if not (math.isfinite(low) and math.isfinite(high)):
            raise VaelabError("images given as floats must be finite values in [0, 1]; these hold"
                              " NaN or infinity")
        if low < 0 or high > 1:
            raise VaelabError(f"images given as floats must lie in [0, 1] (grey level / 255);"
                              f" these range from {low:g} to {high:g}: divide uint8 levels by 255,"
                              " or pass them as uint8")
    return images.detach().mul(255).round_().to(torch.uint8)
