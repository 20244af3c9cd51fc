"""MNIST's four IDX files: the format, finding and reading them, and assembling a Dataset.

The four files (raw or gzipped) are the standard ones:

    train-images-idx3-ubyte  train-labels-idx1-ubyte
    t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte

Any data set in the same format is read too; it is MNIST (`verified`) only when
all four files match MNIST's SHA-256s.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import Dataset

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# SHA-256 of each file's decompressed bytes: the archive bytes differ between
# mirrors (recompression), the content must not.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# MNIST's labels are the digits; label i is named "i".
MNIST_LABEL_NAMES = tuple(str(d) for d in range(10))

_IDX_UBYTE = 0x08


# --- IDX format ---------------------------------------------------------------

def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode one IDX file of unsigned bytes into an array of its declared shape."""
    if len(data) < 4:
        raise DataError(f"{name}: too short to be an IDX file ({len(data)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _IDX_UBYTE or ndim == 0:
        raise DataError(
            f"{name}: wrong IDX magic number 0x{data[:4].hex()} "
            "(expected 0x00000801 for labels or 0x00000803 for images)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(shape)  # Python ints: a product of huge dimensions must not wrap
    if len(data) != expected:
        raise DataError(
            f"{name}: IDX header declares shape {shape} ({expected} bytes) "
            f"but the file has {len(data)} bytes; it is truncated or corrupt"
        )
    try:
        return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    except ValueError:  # an empty array whose other dimensions numpy cannot represent
        raise DataError(f"{name}: IDX header declares an impossible shape {shape}") from None


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes of a uint8 array (inverse of `parse_idx`)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, _IDX_UBYTE, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def read_file_bytes(path: Path) -> bytes:
    """The decompressed bytes of a raw or gzipped file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({e}); it is truncated or corrupt") from None


def find_file(directory: Path, name: str) -> Path | None:
    """`name` or `name.gz` in directory, the raw file first (faster to read)."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def has_idx_files(directory: Path) -> bool:
    """Whether directory holds any of the four IDX files (then it is read as IDX)."""
    return any(find_file(directory, name) is not None for name in FILES.values())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- reading the four files -------------------------------------------------------

def load_idx(directory: Path, named: bool) -> Dataset:
    """Read the four IDX files in directory.

    A directory the user names (`named`) may hold MNIST or any data set in the
    same format: if its files all match MNIST's SHA-256s it counts as verified
    MNIST, if none does it is read as another data set, and a partial match
    (MNIST with a damaged file) is refused. The cache must hold exact MNIST.
    """
    paths = {}
    for key, name in FILES.items():
        path = find_file(directory, name)
        if path is None:
            raise DataError(f"{directory}: missing {name} (or {name}.gz); "
                            "it needs the four IDX files of MNIST or a data set in the same format")
        paths[key] = path

    arrays, mismatched = {}, []
    for key, path in paths.items():
        data = read_file_bytes(path)
        arrays[key] = parse_idx(data, str(path))
        if sha256(data) != MNIST_SHA256[FILES[key]]:
            mismatched.append(path)
    verified = not mismatched
    if mismatched and (not named or len(mismatched) < len(paths)):
        names = ", ".join(str(p) for p in mismatched)
        fix = ("replace it with a good copy" if named else
               "delete it and run `vaelab data` to fetch a good copy")  # only the cache is fetched into
        raise DataError(f"SHA-256 mismatch, not the MNIST file it is named after: {names}; {fix}")
    return _assemble(arrays, directory, verified)


def _assemble(arrays: dict[str, np.ndarray], directory: Path, verified: bool) -> Dataset:
    """Check the arrays fit together and turn them into tensors.

    arrays: FILES' keys to (N, H, W) images and (N,) labels.
    """
    shape = None
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        name = FILES[f"{split}_images"]
        if images.ndim != 3:
            raise DataError(f"{directory / name}: images must have 3 dimensions (N, H, W), got {images.shape}")
        if labels.ndim != 1:
            raise DataError(f"{directory / FILES[f'{split}_labels']}: labels must have 1 dimension, got {labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"{directory}: {split} set has {len(images)} images but {len(labels)} labels")
        if shape is not None and images.shape[1:] != shape:
            raise DataError(f"{directory}: train images are {shape} but test images are {images.shape[1:]}")
        shape = images.shape[1:]

    def images(key: str) -> torch.Tensor:  # (N, 1, H, W): IDX images are single-channel
        a = arrays[key]
        return torch.from_numpy(a[:, None].copy())

    def labels(key: str) -> torch.Tensor:
        return torch.from_numpy(arrays[key].astype(np.int64))

    # Another data set's labels are just numbers: they are their own names.
    names = MNIST_LABEL_NAMES if verified else None
    return Dataset(images("train_images"), labels("train_labels"),
                   images("test_images"), labels("test_labels"), directory, verified,
                   label_names=names, source="idx")
