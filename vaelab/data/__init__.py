"""Image data sets: MNIST's IDX files, folders of images, .npz arrays.

`load_data` finds the data and hands it to the reader for its kind:

    a file ending .npz                   -> arrays.load_npz
    a folder with any of the IDX files   -> idx.load_idx (MNIST or the same format)
    any other folder                     -> folders.load_folder (PNG and JPEG images)

Images are uint8 tensors of shape (N, C, H, W), in memory or (a folder's cache) memory-mapped
read-only; what the model sees of them (binarized pixels, grey levels) is the likelihood's
business.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError


from .arrays import load_npz
from .dataset import Dataset
from .fetch import (MIRRORS, WHEEL_MEMBER, WHEEL_REQUIREMENT, WHEEL_SHA256,
                    cache_dir, cache_root, fetch_mnist, load_numpy_pickle, mnist_from_pickle_splits)
from .folders import check_folder_options, load_folder
from .idx import (FILES, MNIST_LABEL_NAMES, MNIST_SHA256, encode_idx, find_file,
                  has_idx_files, load_idx, parse_idx, read_file_bytes, sha256)
__all__ = [
    "Dataset", "load_data", "resolve_data_dir",
    "FILES", "MNIST_SHA256", "MNIST_LABEL_NAMES", "parse_idx", "encode_idx", "read_file_bytes",
    "find_file", "sha256", "load_idx",
    "MIRRORS", "WHEEL_REQUIREMENT", "WHEEL_SHA256", "WHEEL_MEMBER", "cache_root", "cache_dir",
    "fetch_mnist", "load_numpy_pickle", "mnist_from_pickle_splits",
    "load_folder", "load_npz",
]


def resolve_data_dir(data_dir: str | Path | None = None) -> tuple[Path, bool]:
    """The folder (or .npz file) to read, and whether the user named it.

    Order: the argument (`--data-dir`), then $VAELAB_DATA_DIR, then the cache.
    """
    chosen = data_dir or os.environ.get("VAELAB_DATA_DIR")
    if chosen:
        return Path(chosen).expanduser(), True
    return cache_dir(), False


def load_data(data_dir: str | Path | None = None, *, fetch: bool = True, progress: bool = True,
              image_size: int | None = None, test_fraction: float = 0.1,
              split_seed: int = 0, channels: str | None = None, background: str | None = None,
              skip_bad: bool = False) -> Dataset:
    """Read the data set at data_dir (see `resolve_data_dir`) into memory.

    The cache is MNIST, fetched first if `fetch`. A path the user names may be
    an .npz file, a folder with the four IDX files, or a folder of images.
    image_size (S: resize every image to S x S) applies to image folders only;
    channels, background and skip_bad too, and are ignored for the other sources;
    test_fraction and split_seed only to image folders without train/ and
    test/ (see `folders.load_folder`), but are checked whatever the source.
    progress: show a bar while a folder is decoded, and the report of skipped files.
    """
    check_folder_options(image_size, test_fraction, split_seed, channels, background, skip_bad)
    path, named = resolve_data_dir(data_dir)

    def refuse_image_size(what: str) -> None:
        if image_size is not None:
            raise DataError(f"--image-size resizes image folders only; {path} is {what}")

    if not named:  # the cache only ever holds MNIST's IDX files
        refuse_image_size("the MNIST cache (IDX files)")
        if fetch:
            fetch_mnist(path, progress=progress)
        return load_idx(path, named=False)
    if path.suffix.lower() == ".npz" and not path.is_dir():
        if not path.exists():
            raise DataError(f"data file {path} does not exist; pass --data-dir to an existing .npz file or folder")
        refuse_image_size("an .npz file")
        return load_npz(path)
    if not path.is_dir():
        if path.exists():
            raise DataError(f"{path} is a file, not a folder or an .npz file; pass --data-dir a folder "
                            "(the four IDX files, or PNG/JPEG images) or an .npz file")
        raise DataError(f"data directory {path} does not exist; "
                        "pass --data-dir DIR (or set VAELAB_DATA_DIR) to a folder with the four IDX files, "
                        "a folder of images or an .npz file")
    if has_idx_files(path):
        refuse_image_size("a folder of IDX files")
        return load_idx(path, named=True)
    return load_folder(path, image_size=image_size, test_fraction=test_fraction,
                       split_seed=split_seed, progress=progress, channels=channels,
                       background=background, skip_bad=skip_bad)
