"""A data set as a folder of PNG and JPEG images, decoded by Pillow.

Layout (hidden files and folders, whose names start with '.', are skipped; so
are files that are not *.png, *.jpg or *.jpeg):

    folder/train/<class>/*.png   folder/test/<class>/*.png    train/ and test/ are the splits
    folder/<class>/*.png                                       split at random (below)
    folder/*.png, folder/train/*.png, ...                      the same without labels

Class folders name the labels: label i is the i-th name of the sorted union of
both splits' class folders; files below a class folder belong to it at any
depth. Without train/ and test/, the images are split by a random permutation
from numpy's Generator seeded with `split_seed` (its own seed, so the training
seed does not move images between the splits): the first round(test_fraction * N)
images of the permutation (at least 1) are the test set, the rest the training
set, each in the permutation's order. With train/ and test/ each split is in
a random order from `split_seed` too (sorted by path, a split would come class
by class, and its first images would not be a fair sample).

Every image must end up the same size and kind: greyscale (1 channel) or RGB (3).
Pillow's modes map onto them as: L and 1 (bilevel) are grey; RGB, CMYK and
YCbCr are RGB; P (palette) is grey when every palette colour is grey, else RGB.
Refused: transparency (RGBA, LA, PA, or a `transparency` entry), 16-bit and
float modes (I;16, I, F), and anything Pillow cannot decode.

Decoded images are cached in $XDG_CACHE_HOME/vaelab/folders (see `_cache_path`).
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError, VaelabError, one_line
from ..fileio import atomic_write_bytes
from . import Dataset
from .fetch import cache_root
from .idx import FILES

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_FORMATS = ("PNG", "JPEG")  # a file is decoded as one of these whatever its suffix says

# LANCZOS: Pillow's resize widens the filter by the scale factor, so it is
# antialiased when it shrinks and sharp when it enlarges. reducing_gap=3 first
# shrinks by an integer factor with a box filter (much faster for photos) and,
# at a gap of 3, gives results Pillow documents as indistinguishable from the
# direct resize.
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0

# Below this mean file size images are decoded in one thread (see `_workers`).
SMALL_FILE_BYTES = 2048

# Bump when what is cached or how images are decoded changes: old entries then miss.
CACHE_VERSION = 3

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_CONVERT = {"L": "L", "1": "L", "RGB": "RGB", "CMYK": "RGB", "YCbCr": "RGB"}
_KIND = {1: "greyscale", 3: "RGB"}


@dataclass(frozen=True)
class ImageFile:
    """One image file found in the folder."""

    rel: tuple[str, ...]  # its path relative to the folder, as parts
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Layout:
    """Where each file goes: the files in path order and each one's row.

    The image array holds the training images in rows [0, n_train) and the
    test images after them; files[i] goes to row rows[i].
    """

    files: list[ImageFile]
    rows: np.ndarray  # (N,) int64
    n_train: int
    labels: np.ndarray | None  # (N,) int64, by row
    label_names: tuple[str, ...] | None


def check_folder_options(image_size: int | None, test_fraction: float, split_seed: int) -> None:
    """Refuse nonsensical folder options, one line each: the rules of their declarations (config.py)."""
    from ..config import RunConfig, check_option

    try:
        for name, value in (("image_size", image_size), ("test_fraction", test_fraction),
                            ("split_seed", split_seed)):
            check_option(RunConfig, name, value)
    except VaelabError as e:
        raise DataError(str(e)) from None


def load_folder(directory: Path, *, image_size: int | None = None, test_fraction: float = 0.1,
                split_seed: int = 0, progress: bool = True) -> Dataset:
    """Read a folder of images (see the module's docstring) into a Dataset.

    image_size S resizes every image to S x S; without it all images must have
    one size. The decoded images come from the cache when nothing in the folder
    changed since they were cached; nothing is written unless the read succeeds.
    """
    check_folder_options(image_size, test_fraction, split_seed)
    layout = _layout(directory, _scan(directory), test_fraction, split_seed)
    # The cache holds the files in path order: the split only orders rows, so every split shares it.
    # A plain Python number: a numpy int must key the same cache entry as an int.
    params = (None if image_size is None else int(image_size),)
    cache_path = _cache_path(directory, params)
    fingerprint = _fingerprint(directory, layout.files, params)

    decoded = _read_cache(cache_path, fingerprint, len(layout.files))
    if decoded is None:
        decoded = _decode_all(directory, layout.files, image_size, progress)
        _write_cache(cache_path, fingerprint, decoded)
    images = np.empty_like(decoded)
    images[layout.rows] = decoded  # file i goes to row rows[i]: training rows first

    n = layout.n_train
    all_images = torch.from_numpy(images)  # (N, C, H, W); train and test are views of it

    def labels(rows: slice) -> torch.Tensor | None:
        return None if layout.labels is None else torch.from_numpy(layout.labels[rows].copy())

    return Dataset(all_images[:n], labels(slice(0, n)), all_images[n:], labels(slice(n, None)),
                   directory, verified=False, label_names=layout.label_names, source="folder")


# --- finding the files and laying them out ---------------------------------------------

def _scan(directory: Path) -> list[ImageFile]:
    """Every image file below directory, sorted by relative path, hidden ones skipped."""
    found: list[ImageFile] = []

    def walk(folder: Path, rel: tuple[str, ...]) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            raise DataError(f"{folder}: cannot be listed ({e.strerror or e})") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                # Folders are followed only when real (a link could loop); linked files are read.
                if entry.is_dir(follow_symlinks=False):
                    walk(Path(entry.path), (*rel, entry.name))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
                    st = entry.stat()
                    found.append(ImageFile((*rel, entry.name), st.st_size, st.st_mtime_ns))
            except OSError as e:
                raise DataError(f"{entry.path}: cannot be read ({e.strerror or e})") from None

    walk(directory, ())
    found.sort(key=lambda f: f.rel)
    return found


def _layout(directory: Path, files: list[ImageFile], test_fraction: float, split_seed: int) -> Layout:
    """Split the files into training and test rows and label them by class folder."""
    if not files:
        raise DataError(f"{directory}: no PNG or JPEG images, and not the four IDX files "
                        f"(missing {FILES['train_images']} and the rest); pass a folder of images "
                        "(class folders and train/, test/ optional) or of MNIST's four IDX files")
    has_train, has_test = (directory / "train").is_dir(), (directory / "test").is_dir()
    if has_train != has_test:
        there, missing = ("train", "test") if has_train else ("test", "train")
        raise DataError(f"{directory} has {there}/ but no {missing}/; give both (the two splits) "
                        f"or neither (to split at random by --test-fraction)")

    if not has_train:
        names = _class_names(directory, directory, files)
        n = len(files)
        n_test = max(1, round(test_fraction * n))
        if n_test >= n:
            raise DataError(f"{directory}: {n} image(s) split with test fraction {test_fraction} leave "
                            f"{n - n_test} for training; add images or lower --test-fraction")
        order = np.random.default_rng(split_seed).permutation(n)  # order[j]: the file in row j, test first
        rows = np.empty(n, dtype=np.int64)
        rows[order[n_test:]] = np.arange(n - n_test)  # training rows come first in the array
        rows[order[:n_test]] = np.arange(n - n_test, n)
        labels = _labels(names, [f.rel[:1] for f in files], rows)
        return Layout(files, rows, n - n_test, *labels)

    splits: dict[str, list[int]] = {"train": [], "test": []}
    for i, f in enumerate(files):
        if len(f.rel) < 2 or f.rel[0] not in splits:
            raise DataError(f"{directory / Path(*f.rel)} is outside train/ and test/; "
                            f"move it into one of them or out of {directory}")
        splits[f.rel[0]].append(i)
    for name, members in splits.items():
        if not members:
            raise DataError(f"{directory / name}: no PNG or JPEG images; put the {name} images in it "
                            "(or remove train/ and test/ to split at random by --test-fraction)")

    names = {s: _class_names(directory / s, directory, [files[i] for i in members])
             for s, members in splits.items()}
    if (names["train"] is None) != (names["test"] is None):
        bare, labelled = ("train", "test") if names["train"] is None else ("test", "train")
        loose = directory / Path(*files[splits[bare][0]].rel)
        raise DataError(f"{loose} sits directly in {directory / bare} but {directory / labelled} has class "
                        f"folders; put the {bare} images in class folders too (or neither split)")
    # Each split in a seeded random order: files sorted by path come class by class, and the
    # first N test images (--test-size N, the figures) must be a fair sample, not one class.
    shuffle = np.random.default_rng(split_seed).permutation
    order = [m[i] for m in (splits["train"], splits["test"]) for i in shuffle(len(m))]
    rows = np.empty(len(files), dtype=np.int64)
    rows[order] = np.arange(len(files))
    union = None if names["train"] is None else sorted(set(names["train"]) | set(names["test"]))
    labels = _labels(union, [f.rel[1:2] for f in files], rows)
    return Layout(files, rows, len(splits["train"]), *labels)


def _class_names(split_dir: Path, directory: Path, files: list[ImageFile]) -> list[str] | None:
    """The class folders' names in split_dir, or None when all its images sit in it directly.

    files: those of split_dir, their paths relative to directory.
    """
    depth = len(split_dir.relative_to(directory).parts)  # 0 for the folder itself, 1 for train/, test/
    loose = [f for f in files if len(f.rel) == depth + 1]
    if not loose:
        return sorted({f.rel[depth] for f in files})
    if len(loose) == len(files):
        return None
    in_class = next(f for f in files if len(f.rel) > depth + 1)
    raise DataError(f"{directory / Path(*loose[0].rel)} sits directly in {split_dir} while other images are "
                    f"in class folders ({in_class.rel[depth]}/ ...); move it into a class folder "
                    f"(or all images out of them, for no labels)")


def _labels(names: list[str] | None, classes: list[tuple[str, ...]],
            rows: np.ndarray) -> tuple[np.ndarray | None, tuple[str, ...] | None]:
    """Labels by row and the label names; classes[i]: file i's class folder name (1-tuple)."""
    if names is None:
        return None, None
    index = {name: i for i, name in enumerate(names)}
    labels = np.empty(len(rows), dtype=np.int64)
    labels[rows] = [index[c[0]] for c in classes]
    return labels, tuple(names)


# --- decoding ----------------------------------------------------------------------------

def decode_image(path: Path, image_size: int | None = None) -> np.ndarray:
    """One image as uint8 (H, W) for grey or (H, W, 3) for RGB, resized to S x S if image_size."""
    try:
        with Image.open(path, formats=_FORMATS) as im:
            if image_size is not None:
                im.draft(None, (image_size, image_size))  # JPEG only: decode at 1/2..1/8 scale, still >= S
            im.load()  # the pixels are in memory now; leaving `with` closes only the file
            if im.format == "JPEG":  # a camera's JPEG may be stored sideways, with an EXIF note to turn it
                im = ImageOps.exif_transpose(im)
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, ... for damaged files
        raise DataError(f"{path}: cannot be read as an image ({_reason(e)})") from None
    return np.asarray(_resize(_to_grey_or_rgb(im, path), image_size))


def _to_grey_or_rgb(im: Image.Image, path: Path) -> Image.Image:
    """im as mode L or RGB, or a DataError for what has no faithful 8-bit grey or RGB form."""
    mode = im.mode
    if mode in _ALPHA_MODES or "transparency" in im.info or (mode == "P" and im.palette.mode == "RGBA"):
        raise DataError(f"{path}: has transparency (mode {mode}); vaelab reads opaque greyscale or RGB "
                        "images, so flatten it onto a background or save it without alpha")
    if mode.startswith(("I", "F")):
        raise DataError(f"{path}: has 16- or 32-bit pixels (mode {mode}); "
                        "vaelab reads 8-bit images, so convert it to 8 bits per channel")
    if mode == "P":
        palette = np.asarray(im.getpalette("RGB"), dtype=np.uint8).reshape(-1, 3)
        grey = bool((palette == palette[:, :1]).all())
        return im.convert("L" if grey else "RGB")
    if mode not in _CONVERT:
        raise DataError(f"{path}: has the unsupported mode {mode}; save it as 8-bit greyscale or RGB")
    return im if mode == _CONVERT[mode] else im.convert(_CONVERT[mode])


def _resize(im: Image.Image, image_size: int | None) -> Image.Image:
    if image_size is None or im.size == (image_size, image_size):
        return im
    return im.resize((image_size, image_size), RESAMPLE, reducing_gap=REDUCING_GAP)


def _reason(e: Exception) -> str:
    """Why Pillow failed, on one line."""
    if isinstance(e, UnidentifiedImageError):
        return "not a PNG or JPEG file"
    return one_line(e)


def _decode_all(directory: Path, files: list[ImageFile], image_size: int | None, progress: bool) -> np.ndarray:
    """Every file decoded, in order, into one (N, C, H, W) uint8 array.

    The first file sets the shape every other must have. Decoding runs in a
    thread pool (Pillow releases the GIL while it decodes and resizes), except
    for small files, where threads only slow it down (see `_workers`).
    """
    from tqdm.auto import tqdm

    paths = [directory / Path(*f.rel) for f in files]
    first = decode_image(paths[0], image_size)
    c = 1 if first.ndim == 2 else first.shape[2]
    out = np.empty((len(paths), c, *first.shape[:2]), dtype=np.uint8)

    def fit(i: int, image: np.ndarray) -> None:
        """Put image i in its row, unless its kind or size differ from the first one's."""
        ci = 1 if image.ndim == 2 else image.shape[2]
        if ci != c:
            raise DataError(f"{paths[i]} is {_KIND[ci]} but {paths[0]} is {_KIND[c]}; convert them to one kind")
        if image.shape[:2] != first.shape[:2]:
            (h, w), (h0, w0) = image.shape[:2], first.shape[:2]
            raise DataError(f"{paths[i]} is {w}x{h} but {paths[0]} is {w0}x{h0}; "
                            "pass --image-size S to resize all to SxS")
        out[i] = image[None] if ci == 1 else image.transpose(2, 0, 1)

    def decode_range(start: int, stop: int) -> tuple[int, DataError | None]:
        """Decode files [start, stop); the number done and the error that stopped it, if any."""
        for i in range(start, stop):
            try:
                fit(i, decode_image(paths[i], image_size))
            except DataError as e:
                return i - start, e
        return stop - start, None

    fit(0, first)
    # Chunks amortise the per-task cost over many tiny images yet keep the bar moving.
    workers = _workers(files)
    chunk = max(1, min(256, len(paths) // (4 * workers)))
    starts = range(1, len(paths), chunk)
    errors: list[tuple[int, DataError]] = []
    with tqdm(total=len(paths), initial=1, desc="reading images", unit="img",
              disable=not progress, leave=False) as bar:
        if workers == 1:
            for start in starts:
                count, error = decode_range(start, min(start + chunk, len(paths)))
                bar.update(count)
                if error is not None:
                    raise error
            return out
        with ThreadPoolExecutor(workers) as pool:
            pending: dict[Future, int] = {pool.submit(decode_range, s, min(s + chunk, len(paths))): s
                                          for s in starts}
            try:
                while pending and not errors:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        start = pending.pop(future)
                        count, error = future.result()
                        bar.update(count)
                        if error is not None:
                            errors.append((start, error))
            finally:  # on an error (or Ctrl-C) drop the chunks not yet started
                for future in pending:
                    future.cancel()
    if errors:
        raise min(errors, key=lambda e: e[0])[1]  # the earliest failing chunk's error among those seen
    return out


def _workers(files: list[ImageFile]) -> int:
    """How many threads decode: one per CPU, or just the caller's for small files.

    A small PNG (MNIST's are about 300 bytes) costs far more Python time in
    Pillow than decoding time with the GIL released, so threads only contend
    for the GIL: measured on 2 CPUs, 60,000 28x28 PNGs took 2.2 s in one
    thread and 3.0-4.5 s in 2-8. Threads break even at about 2 KB a file
    (64x64 grey) and pay off above (2 threads: 1.8x for 64x64 RGB PNGs of
    5 KB, 1.9-2x for 96x96 to 256x256 PNGs and JPEGs).
    """
    if sum(f.size for f in files) < SMALL_FILE_BYTES * len(files):
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may use, not the machine's
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


# --- the cache ----------------------------------------------------------------------------

def _cache_path(directory: Path, params: tuple) -> Path:
    """The cache file for this folder read with these options (params: (image_size,)).

    One file per folder and options, so a folder that changes overwrites its
    entry instead of piling up new ones; the fingerprint inside says whether
    the entry still matches the folder's files.
    """
    key = hashlib.sha256(f"vaelab folders v{CACHE_VERSION}\0{directory.resolve()}\0{params!r}".encode())
    return cache_root() / "folders" / f"{key.hexdigest()}.npz"


def _fingerprint(directory: Path, files: list[ImageFile], params: tuple) -> str:
    """SHA-256 over the format version, the folder, every file's relative path,
    size and mtime_ns, and the options (image_size; the split does not change what is cached)."""
    h = hashlib.sha256(f"vaelab folders v{CACHE_VERSION}\0{directory.resolve()}\0{params!r}\0".encode())
    for f in files:
        h.update(f"{'/'.join(f.rel)}\0{f.size}\0{f.mtime_ns}\0".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _read_cache(path: Path, fingerprint: str, n: int) -> np.ndarray | None:
    """The cached (n, C, H, W) images, or None when there is no usable entry."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["fingerprint"]) != fingerprint:
                return None
            images = npz["images"]
    except Exception:  # a damaged entry is a miss: it is read again and rewritten
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != n:
        return None
    return images


def _write_cache(path: Path, fingerprint: str, images: np.ndarray) -> None:
    """Store the images atomically; a cache that cannot be written is skipped, not an error."""
    buffer = io.BytesIO()
    np.savez(buffer, images=images, fingerprint=np.array(fingerprint))  # uncompressed: loads fast
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
    except OSError:
        pass
