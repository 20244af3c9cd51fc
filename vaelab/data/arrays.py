"""A data set as one .npz file of numpy arrays.

    x_train, x_test   uint8, (N, H, W) or (N, H, W, C) with C 1 or 3
    y_train, y_test   optional (both or neither): integer labels >= 0, (N,)

Read with allow_pickle=False: an .npz can hold pickled objects, and unpickling
a file from elsewhere would run its code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, one_line
from .dataset import Dataset

_LAYOUT = ("an .npz for vaelab holds uint8 x_train and x_test of shape (N, H, W) or (N, H, W, C) "
           "with C 1 or 3, and optionally integer y_train and y_test")


def load_npz(path: Path) -> Dataset:
    """Read the arrays in an .npz file into a Dataset (label_names None, not verified)."""
    arrays = _read_arrays(path)
    for key in ("x_train", "x_test"):
        if key not in arrays:
            raise DataError(f"{path}: no array named {key}; {_LAYOUT}")
    images = {key: _images(path, key, arrays[key]) for key in ("x_train", "x_test")}
    if images["x_train"].shape[1:] != images["x_test"].shape[1:]:
        raise DataError(f"{path}: x_train images are {_shape_text(images['x_train'])} but x_test images "
                        f"are {_shape_text(images['x_test'])} (C, H, W); they must be the same")

    has = [key for key in ("y_train", "y_test") if key in arrays]
    if len(has) == 1:
        other = "y_test" if has[0] == "y_train" else "y_train"
        raise DataError(f"{path}: has {has[0]} but no {other}; give labels for both splits or neither")
    labels = {key: _labels(path, key, arrays[key], len(images[key.replace("y_", "x_")])) for key in has}

    return Dataset(
        torch.from_numpy(images["x_train"]), labels.get("y_train"),
        torch.from_numpy(images["x_test"]), labels.get("y_test"),
        path, verified=False, label_names=None, source="npz",
    )


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array in the file, by name."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    if magic == b"\x93NUMPY":
        raise DataError(f"{path}: holds a single .npy array, not an .npz archive; "
                        "save the arrays with numpy.savez(path, x_train=..., x_test=...)")
    if not magic.startswith(b"PK"):  # an .npz is a zip archive; numpy would try it as a pickle
        raise DataError(f"{path}: not an .npz file (not a zip archive of arrays); {_LAYOUT}")
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                try:
                    streamed = _colour_images(npz.zip, key) if key in ("x_train", "x_test") else None
                    arrays[key] = npz[key] if streamed is None else streamed
                except ValueError as e:
                    if "allow_pickle" not in str(e):
                        raise
                    raise DataError(f"{path}: {key} holds Python objects, which vaelab does not unpickle "
                                    "(that could run code); save numeric arrays") from None
    except DataError:
        raise
    except Exception as e:  # zipfile, zlib and numpy each raise their own kinds for a damaged file
        raise DataError(f"{path}: cannot be read as an .npz file ({one_line(e)}); {_LAYOUT}") from None
    return arrays


class _ChannelsFirst(np.ndarray):
    """An (N, C, H, W) array that _colour_images read from an (N, H, W, C) member."""


def _colour_images(archive: zipfile.ZipFile, key: str) -> np.ndarray | None:
    """Member key, when it is a C-ordered (N, H, W, 3) uint8 array, read straight into
    (N, C, H, W) a block of images at a time, so that the file's layout is never held whole
    beside the result; None for any other array (numpy reads it, and _images checks it)."""
    header = {(1, 0): np.lib.format.read_array_header_1_0,
              (2, 0): np.lib.format.read_array_header_2_0}
    with archive.open(f"{key}.npy") as f:
        read = header.get(np.lib.format.read_magic(f))
        if read is None:
            return None
        shape, fortran, dtype = read(f)
        if fortran or dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or 0 in shape:
            return None
        n, h, w, c = shape
        out = np.empty((n, c, h, w), dtype=np.uint8).view(_ChannelsFirst)
        block = max(1, (16 << 20) // (h * w * c))  # images per read: 16 MiB
        for start in range(0, n, block):
            rows = min(block, n - start)
            data = f.read(rows * h * w * c)
            if len(data) != rows * h * w * c:
                raise ValueError(f"{key} ends early")
            images = np.frombuffer(data, np.uint8).reshape(rows, h, w, c)
            out[start:start + rows] = images.transpose(0, 3, 1, 2)
    return out


def _images(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """x as (N, C, H, W) uint8, contiguous."""
    if isinstance(x, _ChannelsFirst):
        return x.view(np.ndarray)
    if x.dtype != np.uint8:
        raise DataError(f"{path}: {key} is {x.dtype}; vaelab needs uint8 grey levels 0-255")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim == 4:
        raise DataError(f"{path}: {key} has {x.shape[3]} channels (shape {x.shape}); "
                        "vaelab reads 1 (grey) or 3 (RGB) channels last, (N, H, W, C)")
    else:
        raise DataError(f"{path}: {key} has shape {x.shape}; it must be (N, H, W) or (N, H, W, C)")
    if 0 in x.shape:
        raise DataError(f"{path}: {key} holds no pixels (shape {x.shape}); it needs at least one image")
    return np.ascontiguousarray(x)


def _labels(path: Path, key: str, y: np.ndarray, n: int) -> torch.Tensor:
    """y as (n,) int64, checked to be one non-negative integer per image."""
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key} is {y.dtype}; labels must be integers 0, 1, 2, ...")
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{path}: {key} has shape {y.shape} but there are {n} images; "
                        "it needs one label per image, shape (N,)")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: {key} holds the negative label {y.min()}; labels must be 0, 1, 2, ...")
    if len(y) and y.max() > np.iinfo(np.int64).max:  # uint64 beyond int64
        raise DataError(f"{path}: {key} holds the label {y.max()}, too large for int64")
    return torch.from_numpy(y.astype(np.int64))


def _shape_text(x: np.ndarray) -> str:
    return "x".join(str(d) for d in x.shape[1:])
