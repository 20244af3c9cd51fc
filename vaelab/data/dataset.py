"""The Dataset type: images and labels of a data set's two splits, and where they came from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch


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
