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

Forgiving on request, strict by default:
- `channels` ("grey" or "rgb") converts every image to that kind (grey by ITU-R 601 luma);
- `background` ("white" or "black") flattens transparent images onto it;
- `skip_bad` leaves out every file that cannot be read or does not fit (another size or kind
  than the first readable file, in path order) and lists them all in `Dataset.skipped`; the
  others are split and laid out as a folder without those files would be. The list is kept
  beside the cache, so a second read decodes nothing again.

Decoded images are cached in $XDG_CACHE_HOME/vaelab/folders as a .npy file that
is memory-mapped, not read into memory: the returned tensors are views of the map,
so a folder larger than memory can be read (see `_cache_path` and `_build`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import sys
import uuid
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .. import progress as show
from ..errors import DataError, VaelabError, one_line
from .dataset import Dataset
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
CACHE_VERSION = 4
# The last version that cached a folder as one .npz file (read whole into memory).
NPZ_CACHE_VERSION = 3

# Rows copied at a time when a cached entry is laid out for another split.
COPY_BYTES = 64 << 20

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


def check_folder_options(image_size: int | None, test_fraction: float, split_seed: int,
                         channels: str | None = None, background: str | None = None,
                         skip_bad: bool = False) -> None:
    """Refuse nonsensical folder options, one line each: the rules of their declarations (config.py)."""
    from ..config import RunConfig, check_option

    try:
        for name, value in (("image_size", image_size), ("test_fraction", test_fraction),
                            ("split_seed", split_seed), ("channels", channels),
                            ("background", background), ("skip_bad", skip_bad)):
            check_option(RunConfig, name, value)
    except VaelabError as e:
        raise DataError(str(e)) from None


class _Unfit(Exception):
    """Files that skip_bad leaves out, found while decoding: {relative path: why}."""

    def __init__(self, files: dict[str, str]):
        super().__init__(f"{len(files)} files do not fit")
        self.files = files


def load_folder(directory: Path, *, image_size: int | None = None, test_fraction: float = 0.1,
                split_seed: int = 0, progress: bool = True, channels: str | None = None,
                background: str | None = None, skip_bad: bool = False) -> Dataset:
    """Read a folder of images (see the module's docstring) into a Dataset.

    image_size S resizes every image to S x S; without it all images must have
    one size. channels, background and skip_bad: see the module's docstring. The
    decoded images come from the cache when nothing in the folder changed since
    they were cached; nothing is kept unless the read succeeds. The images are a
    read-only memory map of the cache (in memory only when the cache cannot be
    written): training images (N_train, C, H, W) and test images (N_test, C, H, W)
    are two contiguous slices of it, not copies. progress: a bar while decoding,
    and the report of the files skipped (on stderr).
    """
    check_folder_options(image_size, test_fraction, split_seed, channels, background, skip_bad)
    files = _scan(directory)
    # A plain Python number: a numpy int must key the same cache entry as an int. The options
    # that convert join the key only when given, so the entries of strict reads keep their names.
    params = (None if image_size is None else int(image_size),)
    if channels or background:
        params += (channels, background)
    skipped = _read_skipped(directory, files, params) if skip_bad else {}
    while True:
        kept = [f for f in files if "/".join(f.rel) not in skipped]
        if files and not kept:
            raise DataError(f"{directory}: none of its {len(files)} image files can be read as one "
                            f"kind and size; the first: {min(skipped.items())}")
        layout = _layout(directory, kept, test_fraction, split_seed)
        fingerprint = _fingerprint(directory, layout.files, params)
        path = _cache_path(directory, params, fingerprint, layout.rows)
        images = _read_cache(path, len(layout.files))
        if images is not None:
            break
        try:
            images = _build(directory, layout, params, fingerprint, path, progress, skip_bad)
            break
        except _Unfit as e:  # laid out again without them: as a folder without those files
            skipped.update(e.files)
            _write_skipped(directory, files, params, skipped)

    n = layout.n_train
    all_images = _as_tensor(images)  # (N, C, H, W); train and test are views of it
    names: list[str] = [""] * len(layout.files)
    for f, row in zip(layout.files, layout.rows):
        names[row] = "/".join(f.rel)

    def labels(rows: slice) -> torch.Tensor | None:
        return None if layout.labels is None else torch.from_numpy(layout.labels[rows].copy())

    data = Dataset(all_images[:n], labels(slice(0, n)), all_images[n:], labels(slice(n, None)),
                   directory, verified=False, label_names=layout.label_names, source="folder",
                   train_files=tuple(names[:n]), test_files=tuple(names[n:]),
                   skipped=tuple(sorted(skipped.items())))
    if progress and data.skipped:
        print(data.skipped_report(), file=sys.stderr, flush=True)
    return data


def _as_tensor(images: np.ndarray) -> torch.Tensor:
    """images (N, C, H, W) uint8 as a tensor sharing its memory.

    A read-only map ("r") rather than copy-on-write ("c"): Linux charges a
    private writable map's whole size against the memory it may commit, so a
    cache larger than memory and swap could not be mapped at all. Torch warns
    that such a tensor is not writable: vaelab only reads images, and a caller
    that changes them must clone them first (a write to the map would fault).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.from_numpy(images)


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

def decode_image(path: Path, image_size: int | None = None, channels: str | None = None,
                 background: str | None = None) -> np.ndarray:
    """One image as uint8 (H, W) for grey or (H, W, 3) for RGB, resized to S x S if image_size;
    converted to channels ("grey" or "rgb") if given, and with transparency flattened onto
    background ("white" or "black") if given."""
    try:
        with Image.open(path, formats=_FORMATS) as im:
            if image_size is not None:
                im.draft(None, (image_size, image_size))  # JPEG only: decode at 1/2..1/8 scale, still >= S
            im.load()  # the pixels are in memory now; leaving `with` closes only the file
            if im.format == "JPEG":  # a camera's JPEG may be stored sideways, with an EXIF note to turn it
                im = ImageOps.exif_transpose(im)
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, ... for damaged files
        raise DataError(f"{path}: cannot be read as an image ({_reason(e)})") from None
    im = _to_grey_or_rgb(im, path, background)
    if channels is not None:
        im = im.convert(_CHANNEL_MODES[channels])
    return np.asarray(_resize(im, image_size))


_CHANNEL_MODES = {"grey": "L", "rgb": "RGB"}
_BACKGROUNDS = {"white": 255, "black": 0}


def _to_grey_or_rgb(im: Image.Image, path: Path, background: str | None = None) -> Image.Image:
    """im as mode L or RGB, or a DataError for what has no faithful 8-bit grey or RGB form;
    a transparent image flattened onto background ("white" or "black") when one is given."""
    mode = im.mode
    if mode in _ALPHA_MODES or "transparency" in im.info or (mode == "P" and im.palette.mode == "RGBA"):
        if background is None:
            raise DataError(f"{path}: has transparency (mode {mode}); vaelab reads opaque greyscale"
                            " or RGB images, so flatten it onto a background (--background white or"
                            " black) or save it without alpha")
        return _flatten(im, _BACKGROUNDS[background])
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


def _flatten(im: Image.Image, level: int) -> Image.Image:
    """A transparent image composited over an opaque background of grey level `level`: mode L
    when every colour in it is grey, else RGB."""
    rgba = im.convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", im.size, (level, level, level, 255)), rgba)
    rgb = flat.convert("RGB")
    r, g, b = (np.asarray(band) for band in rgb.split())
    return rgb.convert("L") if (r == g).all() and (g == b).all() else rgb


def _resize(im: Image.Image, image_size: int | None) -> Image.Image:
    if image_size is None or im.size == (image_size, image_size):
        return im
    return im.resize((image_size, image_size), RESAMPLE, reducing_gap=REDUCING_GAP)


def _reason(e: Exception) -> str:
    """Why Pillow failed, on one line."""
    if isinstance(e, UnidentifiedImageError):
        return "not a PNG or JPEG file"
    return one_line(e)


def _decode_all(directory: Path, files: list[ImageFile], rows: np.ndarray, params: tuple,
                progress: bool, allocate: Callable[[tuple[int, ...]], np.ndarray],
                skip_bad: bool = False) -> np.ndarray:
    """Every file decoded into one (N, C, H, W) uint8 array, file i into row rows[i].

    allocate(shape) gives the array, written one image at a time (the cache's
    memory map). The first file sets the shape every other must have. With skip_bad,
    the first readable file sets it, and the files that cannot be read or do not fit
    are all found and raised together as _Unfit.
    Decoding runs in a thread pool (Pillow releases the GIL while it decodes and resizes), except
    for small files, where threads only slow it down (see `_workers`).
    params: (image_size,) or (image_size, channels, background).
    """
    paths = [directory / Path(*f.rel) for f in files]
    unfit: dict[str, str] = {}

    def decode(i: int) -> np.ndarray:
        return decode_image(paths[i], *params)

    def note(i: int, e: DataError) -> None:
        unfit["/".join(files[i].rel)] = str(e).removeprefix(str(paths[i])).lstrip(": ")

    reference = 0
    while True:
        try:
            first = decode(reference)
            break
        except DataError as e:
            if not skip_bad or reference == len(paths) - 1:
                raise
            note(reference, e)
            reference += 1
    c = 1 if first.ndim == 2 else first.shape[2]
    out = allocate((len(paths), c, *first.shape[:2]))

    def fit(i: int, image: np.ndarray) -> None:
        """Put image i in its row, unless its kind or size differ from the first one's."""
        ci = 1 if image.ndim == 2 else image.shape[2]
        first_path = paths[reference]
        if ci != c:
            raise DataError(f"{paths[i]} is {_KIND[ci]} but {first_path} is {_KIND[c]};"
                            " convert them to one kind (--channels grey or rgb)")
        if image.shape[:2] != first.shape[:2]:
            (h, w), (h0, w0) = image.shape[:2], first.shape[:2]
            raise DataError(f"{paths[i]} is {w}x{h} but {first_path} is {w0}x{h0}; "
                            "pass --image-size S to resize all to SxS")
        out[rows[i]] = image[None] if ci == 1 else image.transpose(2, 0, 1)

    def decode_range(start: int, stop: int) -> tuple[int, DataError | None]:
        """Decode files [start, stop); the number done and the error that stopped it, if any
        (with skip_bad, each error is noted and the range goes on)."""
        for i in range(start, stop):
            try:
                fit(i, decode(i))
            except DataError as e:
                if not skip_bad:
                    return i - start, e
                note(i, e)
        return stop - start, None

    fit(reference, first)
    # Chunks amortise the per-task cost over many tiny images yet keep the bar moving.
    workers = _workers(files)
    chunk = max(1, min(256, len(paths) // (4 * workers)))
    starts = range(reference + 1, len(paths), chunk)
    errors: list[tuple[int, DataError]] = []
    bar = show.bar(len(paths), "reading images", progress, unit="img", leave=False,
                   initial=reference + 1)
    try:
        if workers == 1:
            for start in starts:
                count, error = decode_range(start, min(start + chunk, len(paths)))
                bar.update(count)
                if error is not None:
                    raise error
            if unfit:
                raise _Unfit(unfit)
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
    finally:
        bar.close()
    if errors:
        raise min(errors, key=lambda e: e[0])[1]  # the earliest failing chunk's error among those seen
    if unfit:
        raise _Unfit(unfit)
    return out


def _workers(files: list[ImageFile]) -> int:
    """How many threads decode: one per CPU, or just the caller's for small files.

    A small PNG (MNIST's are about 300 bytes) costs far more Python time in Pillow than
    decoding time with the GIL released, so threads would only contend for the GIL; above
    SMALL_FILE_BYTES a file (about 64x64 grey) the decoding dominates and threads pay off
    (benchmarks/perf/image_folder.py).
    """
    if sum(f.size for f in files) < SMALL_FILE_BYTES * len(files):
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may use, not the machine's
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


# --- the cache ----------------------------------------------------------------------------
#
# An entry is <slot>.<digest>.npy, the images (N, C, H, W) uint8 in row order (training rows
# first, then test rows, each in the split's order), with <slot>.<digest>.rows.npy beside it,
# rows (N,) int64: file i's row. The slot names the folder and options; the digest covers the
# fingerprint and the rows, so the name alone says whether an entry fits a read. Files are
# written under a temporary name (.<name>.<host>-<pid>-<random>.tmp) and renamed when complete.

# Identifies this machine in temporary names, so that a cache folder shared between machines
# (a network home) never has one machine remove another's build in progress.
_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _slot(directory: Path, params: tuple, version: int | None = None) -> str:
    """The name shared by every entry of this folder read with these options.

    Without a version in it (the digest has one), so an entry of another
    version or split is found and replaced instead of piling up beside it.
    """
    prefix = "vaelab folders" if version is None else f"vaelab folders v{version}"
    return hashlib.sha256(f"{prefix}\0{directory.resolve()}\0{params!r}".encode()).hexdigest()


def _cache_path(directory: Path, params: tuple, fingerprint: str, rows: np.ndarray) -> Path:
    """The entry that holds these files' images in this row order (params: (image_size,))."""
    return cache_root() / "folders" / _entry_name(_slot(directory, params), fingerprint, rows)


def _entry_name(slot: str, fingerprint: str, rows: np.ndarray) -> str:
    """slot.digest.npy, the digest over the fingerprint and rows (N,) int64."""
    h = hashlib.sha256(f"{fingerprint}\0".encode())
    h.update(np.ascontiguousarray(rows, dtype="<i8").tobytes())
    return f"{slot}.{h.hexdigest()[:32]}.npy"


def _rows_path(path: Path) -> Path:
    """The rows file beside the entry's images."""
    return path.with_suffix(".rows.npy")


def _npz_cache_path(directory: Path, params: tuple) -> Path:
    """Where the .npz cache (up to NPZ_CACHE_VERSION) kept this folder read with these options."""
    return cache_root() / "folders" / f"{_slot(directory, params, NPZ_CACHE_VERSION)}.npz"


def _skipped_path(directory: Path, params: tuple) -> Path:
    """Where the files that skip_bad left out of this folder, read with these options, are
    listed."""
    slot = hashlib.sha256(f"vaelab skipped\0{directory.resolve()}\0{params!r}".encode()).hexdigest()
    return cache_root() / "folders" / f"{slot}.skipped.json"


def _read_skipped(directory: Path, files: list[ImageFile], params: tuple) -> dict[str, str]:
    """The files found unfit when these same files were read before ({} when not known)."""
    try:
        record = json.loads(_skipped_path(directory, params).read_text())
        if record["fingerprint"] == _fingerprint(directory, files, params):
            return {str(k): str(v) for k, v in record["files"].items()}
    except Exception:  # missing or damaged: found again by decoding
        pass
    return {}


def _write_skipped(directory: Path, files: list[ImageFile], params: tuple,
                   skipped: dict[str, str]) -> None:
    """Keep the list of unfit files for the next read of the same files (when the cache can)."""
    path = _skipped_path(directory, params)
    record = {"fingerprint": _fingerprint(directory, files, params), "files": skipped}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(path)
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError:
        pass


def _fingerprint(directory: Path, files: list[ImageFile], params: tuple) -> str:
    """SHA-256 over the format version, the folder, every file's relative path,
    size and mtime_ns, and the options (image_size; the split's row order is in `_entry_name`)."""
    h = hashlib.sha256(
        f"vaelab folders v{CACHE_VERSION}\0{directory.resolve()}\0{params!r}\0".encode())
    for f in files:
        h.update(f"{'/'.join(f.rel)}\0{f.size}\0{f.mtime_ns}\0".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _read_cache(path: Path, n: int) -> np.ndarray | None:
    """The entry's images (n, C, H, W) uint8, memory-mapped read-only, or None when it is unusable.

    Its name vouches for its contents; a file cut short fails to map and is a miss.
    """
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:  # missing, damaged or not an .npy: a miss, decoded again and rewritten
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != n:
        return None
    return images


def _build(directory: Path, layout: Layout, params: tuple, fingerprint: str, path: Path,
           progress: bool, skip_bad: bool = False) -> np.ndarray:
    """Write the entry at path and return its images (N, C, H, W), memory-mapped read-only.

    An entry of the same files in another split's order is copied row by row
    (no decoding); otherwise every file is decoded. The .npz cache of earlier
    versions is removed (rebuilt here as this entry), as are temporary files
    that builds killed on this machine left. When the cache cannot be written
    the images are decoded into memory instead.
    """
    folder, slot = path.parent, path.name.split(".")[0]
    _remove(_npz_cache_path(directory, params))
    _remove_leftovers(folder, slot)
    earlier = _earlier_entry(path, fingerprint, len(layout.files))
    writer = _EntryWriter(path)
    try:
        if earlier is None:
            images = _decode_all(directory, layout.files, layout.rows, params, progress,
                                 writer.allocate, skip_bad)
        else:
            images = _reorder(*earlier, layout.rows, writer.allocate, progress)
        images = writer.finish(images, layout.rows)
    except BaseException:
        writer.discard()
        raise
    if writer.stored:
        for other in folder.glob(f"{slot}.*"):  # the slot keeps one entry: the newest
            if other not in (path, _rows_path(path)):
                _remove(other)
    return images


def _earlier_entry(path: Path, fingerprint: str, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Another entry of path's slot holding these same files, as (images, rows), or None.

    Its name must be the digest of this fingerprint and its rows: an entry of
    changed files, or a rows file of another entry, does not match.
    """
    slot = path.name.split(".")[0]
    for rows_path in sorted(path.parent.glob(f"{slot}.*.rows.npy")):
        images_path = rows_path.with_name(rows_path.name.removesuffix(".rows.npy") + ".npy")
        if images_path == path:
            continue
        try:
            rows = np.load(rows_path, allow_pickle=False)
        except Exception:  # damaged: not a source
            continue
        if rows.dtype != np.int64 or rows.shape != (n,):
            continue
        if images_path.name != _entry_name(slot, fingerprint, rows):
            continue
        images = _read_cache(images_path, n)
        if images is not None:
            return images, rows
    return None


def _reorder(images: np.ndarray, rows: np.ndarray, new_rows: np.ndarray,
             allocate: Callable[[tuple[int, ...]], np.ndarray], progress: bool) -> np.ndarray:
    """images (N, C, H, W), file i in row rows[i], copied so that file i is in row new_rows[i].

    A chunk of rows at a time, so that memory holds a chunk, not the array.
    """
    source = np.empty(len(rows), dtype=np.int64)
    source[new_rows] = rows  # new row j takes old row source[j]
    out = allocate(images.shape)
    chunk = max(1, COPY_BYTES // max(1, images[0].nbytes))
    bar = show.bar(len(rows), "arranging cached images", progress, unit="img", leave=False)
    for start in range(0, len(rows), chunk):
        stop = min(start + chunk, len(rows))
        wanted = source[start:stop]
        order = np.argsort(wanted)
        out[start + order] = images[wanted[order]]  # read in ascending rows: front to back
        bar.update(stop - start)
    bar.close()
    return out


class _EntryWriter:
    """One entry written under a temporary name and renamed into place once complete.

    A build that is killed leaves only the temporary file, which no read
    trusts (and a later build removes); `discard` removes it on an error.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp: Path | None = None
        self.stored = False
        self.made: list[Path] = []  # folders allocate created, deepest first

    def allocate(self, shape: tuple[int, ...]) -> np.ndarray:
        """A writable uint8 array of shape: the temporary file mapped, else memory."""
        try:
            self.made = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = _temporary(self.path)
            images = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.uint8, shape=shape)
            _reserve(self.tmp)
            return images
        except OSError:
            self.discard()
            return np.empty(shape, dtype=np.uint8)

    def finish(self, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Store the written images under the entry's name; return them read-only.

        The read-only map is opened before the rename: it stays valid whatever
        later happens to the names (another process replacing the entry).
        """
        if self.tmp is None:
            return images
        try:
            images.flush()
            mapped = np.load(self.tmp, mmap_mode="r", allow_pickle=False)
        except OSError:  # the file went away: the writable map still holds the images
            self.discard()
            return images
        try:
            _write_rows(_rows_path(self.path), rows)  # first: every entry has its rows
            os.replace(self.tmp, self.path)
            self.tmp, self.stored = None, True
        except OSError:  # not stored; the map outlives the file
            self.discard()
        return mapped

    def discard(self) -> None:
        """Remove the temporary file, and the folders made for it while they are empty: a
        failed read leaves nothing behind."""
        if self.tmp is not None:
            _remove(self.tmp)
            self.tmp = None
        for folder in self.made:
            try:
                folder.rmdir()
            except OSError:  # not empty: another build's, or this one's other files
                break
        self.made = []


def _temporary(path: Path) -> Path:
    """A new temporary name for path in its folder, naming this machine and process."""
    return path.parent / f".{path.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def _reserve(path: Path) -> None:
    """Allocate the file's blocks now: writing to a map of a sparse file on a full disk
    would kill the process (SIGBUS) instead of raising an error."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            # a file system that cannot allocate ahead: write without a reservation


def _write_rows(path: Path, rows: np.ndarray) -> None:
    """rows (N,) int64 as an .npy file, atomically."""
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(rows, dtype=np.int64))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove_leftovers(folder: Path, slot: str) -> None:
    """Remove the slot's temporary files whose process, on this machine, has ended."""
    for tmp in folder.glob(f".{slot}.*.tmp"):
        host, _, rest = tmp.name.rsplit(".", 2)[1].partition("-")
        pid = rest.partition("-")[0]
        if host == _HOST and pid.isdigit() and not _running(int(pid)):
            _remove(tmp)


def _running(pid: int) -> bool:
    """Whether process pid runs on this machine (True when that cannot be told)."""
    if os.name != "posix":  # elsewhere os.kill(pid, 0) ends the process instead of probing it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    """Remove a cache file if it is there; one that cannot be removed stays."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
