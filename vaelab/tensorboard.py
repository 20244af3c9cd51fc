"""TensorBoard event files of a training run (`--tensorboard DIR`): per epoch, the metrics
record's numbers and the learning rate as scalars, and two images, test images above their
reconstructions and samples from the prior.

`TensorBoard(DIR)` is the callback that `fit` runs (vaelab.callbacks); `Board` writes the events.
Needs the optional extra `pip install 'vaelab[tensorboard]'`; the package is imported only
when one of them is made, so vaelab imports without it. A Board writes once per epoch, outside
the training step, so it adds no host synchronisation to the steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .callbacks import Callback
from .errors import VaelabError
from .models import VAE
from .plots import image_grid, reconstruction_images, sample_images, square_nrow
from .runs import finished_epochs

MISSING = "--tensorboard needs TensorBoard: pip install 'vaelab[tensorboard]'"

# A record's keys -> TensorBoard tags (grouped by the part before the slash); any other
# numeric key is written under its own name.
TAGS = {
    "train_loss": "loss/train",
    "test_loss": "loss/test",
    "test_iwae": "loss/test_iwae",
    "train_kl": "kl/train",
    "test_kl": "kl/test",
    "kl_weight": "kl_weight",
    "active_units": "kl/active_units",
    "grad_norm_median": "grad_norm/median",
    "grad_norm_max": "grad_norm/max",
    "skipped": "grad_norm/skipped_updates",
}
NOT_SCALARS = ("epoch", "seconds")  # the step itself, and a wall time, not the model's

RECONSTRUCTIONS = 16  # test images shown, as reconstruction_figure shows them
SAMPLES = 64  # draws from the prior, as samples_figure shows them


def summary_writer() -> type:
    """TensorBoard's SummaryWriter class; VaelabError in one line when the extra is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's module imports the tensorboard package, the extra
        raise VaelabError(MISSING) from e
    return SummaryWriter


class Board:
    """TensorBoard event files of a run, one write per epoch (rank 0 only: the caller makes
    it there). Usable as a context manager, which closes it.
    """

    def __init__(self, log_dir: str | Path, first_epoch: int = 1):
        """first_epoch: the epoch training starts at; a resumed run's events from it on, written
        before its last checkpoint, are dropped (TensorBoard's purge_step)."""
        SummaryWriter = summary_writer()
        self.log_dir = Path(log_dir)
        try:
            purge = first_epoch if first_epoch > 1 else None
            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        except OSError as e:  # a file in the way, or a folder that cannot be made
            raise VaelabError(f"cannot write {self.log_dir} ({e.strerror or e})") from None

    def write_epoch(self, epoch: int, record: dict, *, lr: float, model: VAE, images: torch.Tensor,
                    seed: int = 0, labels: torch.Tensor | None = None) -> None:
        """Write epoch's scalars and images at step=epoch, then flush them to disk.

        record: the epoch's metrics record (train.fit's): each number in it but the epoch and the
        seconds becomes a scalar (TAGS names them). lr: the epoch's learning rate, scalar "lr".
        model: the VAE itself (not a DDP or compiled wrapper), in eval mode.
        images: (N, C, H, W) uint8 test images, as stored; the first RECONSTRUCTIONS are shown.
        seed: the same seed draws the same binarized pixels and the same z every epoch, so the
        images change only as the model does. labels: the images' labels, for a conditional
        model.
        """
        for key, value in record.items():
            if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(TAGS.get(key, key), float(value), global_step=epoch)
        self.writer.add_scalar("lr", float(lr), global_step=epoch)
        if len(images):  # a data set without test images has nothing to reconstruct
            first = None if labels is None else labels[:RECONSTRUCTIONS]
            grid = reconstruction_grid(model, images[:RECONSTRUCTIONS], seed, first)
            self._add_image("reconstructions", grid, epoch)
        if model.can_sample:  # (perplexity and dead_codes: a VQ-VAE's codebook, as scalars)
            samples = sample_images(model, SAMPLES, seed)
            self._add_image("samples", image_grid(samples, nrow=square_nrow(SAMPLES)), epoch)
        self.writer.flush()  # an epoch's events on disk now, for a TensorBoard watching the run

    def _add_image(self, tag: str, grid: np.ndarray, epoch: int) -> None:
        """grid: (H, W) grey or (H, W, 3) RGB in [0, 1]."""
        self.writer.add_image(tag, grid.clip(0, 1), global_step=epoch,
                              dataformats="HW" if grid.ndim == 2 else "HWC")

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()

    def __enter__(self) -> "Board":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoard(Callback):
    """The callback that writes a run's TensorBoard events into log_dir (a folder, made if need
    be): a Board opened at the start of fit, written after each epoch, closed at the end.

    A resumed run starts at the epoch after those its checkpoint holds (run_dir's
    checkpoint.safetensors, which fit has just restored): the events that followed that epoch,
    written before the run stopped, are dropped, so each epoch is in the log once.
    """

    def __init__(self, log_dir: str | Path):
        summary_writer()  # a missing extra is said now, before fit makes the run folder
        self.log_dir = Path(log_dir)
        self.board: Board | None = None

    def on_fit_start(self, training, run_dir: Path | None) -> None:
        done = finished_epochs(run_dir) if run_dir is not None else 0
        self.board = Board(self.log_dir, first_epoch=done + 1)

    def on_epoch_end(self, record: dict, training) -> None:
        """Writes the record, the epoch's learning rate and images of training.model, as fit
        leaves it after the epoch's test (eval mode)."""
        config, epoch = training.config, record["epoch"]
        self.board.write_epoch(epoch, record, lr=config.lr_at(epoch), model=training.model,
                               images=training.test_set.images, seed=config.eval_seed,
                               labels=training.test_set.labels)

    def on_fit_end(self, result) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None


def reconstruction_grid(model: VAE, images: torch.Tensor, seed: int = 0,
                        labels: torch.Tensor | None = None) -> np.ndarray:
    """images: (N, C, H, W) uint8 [, labels (N,): a conditional model's] -> one picture, the
    data row above the reconstructions row: (2 (H + 2) + 2, N (W + 2) + 2[, 3]) in [0, 1]."""
    return image_grid(reconstruction_images(model, images, seed, labels), nrow=len(images))
