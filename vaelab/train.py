"""Training in two parts: `build` turns a config into data, model, optimizer and
step; `fit` runs the epochs, the test loss, the checkpoints and the divergence guard.

After every epoch a checkpoint (weights, optimizer state, metrics) is written
atomically into the run directory. Randomness is keyed by (seed, epoch), so a
killed run resumes exactly from its last finished epoch.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .config import RunConfig
from .data import Dataset, load_data
from .errors import VaelabError
from .evaluate import TestSet, mean_loss
from .models import VAE, build_model
from .runs import load_checkpoint, new_run_dir, save_checkpoint, save_config
from .step import TrainStep


class TrainingDiverged(VaelabError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    model: VAE
    metrics: list[dict]
    data: Dataset
    run_dir: Path | None


@dataclass
class Training:
    """What `build` makes and `fit` runs. `config` is the resolved copy, as config.json records it."""

    config: RunConfig
    data: Dataset
    model: VAE
    optimizer: torch.optim.Optimizer
    lr: torch.Tensor          # the optimizer's learning rate, a tensor the schedule fills
    step: TrainStep
    test_set: TestSet         # the test images drawn once: the same pixels and noise every epoch


def pick_device(name: str) -> torch.device:
    """'auto' means CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise VaelabError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def make_optimizer(config: RunConfig, model: VAE, lr: torch.Tensor) -> torch.optim.Optimizer:
    """Plain SGD (no momentum: the tutorial's update) or Adam, both fused kernels.

    lr is a tensor so that a schedule can change it without a new optimizer (and,
    under a captured step, without a new graph).
    """
    if config.optimizer == "adam":
        # capturable: its step count stays on the GPU, so a CUDA graph can hold the update
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=lr.device.type == "cuda")
    return torch.optim.SGD(model.parameters(), lr=lr, fused=True)


def set_deterministic(device: torch.device) -> None:
    """Deterministic CUDA arithmetic: cuBLAS with a fixed workspace (read when its first
    handle is made, so before any matrix product) and no nondeterministic kernels."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def build(config: RunConfig, data: Dataset | None = None, progress: bool = True) -> Training:
    """Everything a run needs, from its config; `config` itself is left as it was."""
    config = copy.deepcopy(config)
    config.validate()
    device = pick_device(config.device)
    if config.deterministic:
        set_deterministic(device)
    if data is None:
        data = load_data(config.data_dir, progress=progress)
    data = data.subset(config.train_size, config.test_size)
    if len(data.train_images) < config.batch_size:
        raise VaelabError(f"--batch-size {config.batch_size} is larger than the "
                          f"{len(data.train_images)} training images")
    config.model.image_shape = data.image_shape
    model = build_model(config.model, seed=config.seed).to(device)
    lr = torch.tensor(config.lr_at(1), dtype=torch.float32, device=device)
    optimizer = make_optimizer(config, model, lr)
    samples = config.k if config.objective == "iwae" else config.samples
    step = TrainStep(model, optimizer, data.train_images.to(device), objective=config.objective,
                     samples=samples, batch_size=config.batch_size, cuda_graph=config.cuda_graph)
    test_set = TestSet.draw(model, data.test_images.to(device), seed=config.eval_seed, samples=samples)
    return Training(config, data, model, optimizer, lr, step, test_set)


def train_epoch(training: Training, epoch: int, progress: bool) -> torch.Tensor:
    """One pass over the training images in the epoch's order. Returns the (steps,) batch
    losses, kept on the device: no per-step synchronisation."""
    step, config = training.step, training.config
    step.begin_epoch(config.seed, epoch)
    losses = torch.empty(step.steps_per_epoch, device=step.images.device)
    bar = tqdm(range(len(losses)), desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True)
    for i in bar:
        losses[i] = step()
        if progress and i % 50 == 49:
            bar.set_postfix(loss=f"{losses[i].item():.2f}")
    return losses


def _advice(config: RunConfig, epoch: int, run_dir: Path | None) -> str:
    """What to do after a divergence in `epoch`, and what was kept."""
    rate = f"--lr {config.lr}" if config.schedule == "constant" else \
        f"--lr {config.lr}, which the schedule had brought to {config.lr_at(epoch):.3g}"
    kept = f"; the checkpoint of epoch {epoch - 1} in {run_dir} is intact" if run_dir and epoch > 1 else ""
    return f"lower the learning rate ({rate}){kept}"


def fit(training: Training, run_dir: str | Path | None = None, progress: bool = True,
        resume: bool = False) -> TrainResult:
    """Run the epochs of `training.config`; with run_dir, save everything there.

    With resume=True, training continues from the run directory's checkpoint; on
    the CPU the result is bit for bit that of an uninterrupted run.

    Returns the trained model (in eval mode) and one metrics record per epoch:
    epoch, train_loss (the training objective's mean over the epoch's batches:
    negative ELBO, or negative IWAE bound), test_loss (negative ELBO of the test
    set, its pixels and noise drawn once per run), seconds; with --objective iwae
    also test_iwae.
    """
    config, model = training.config, training.model
    metrics: list[dict] = []
    if resume:
        if run_dir is None:
            raise VaelabError("resuming needs the run directory")
        metrics = load_checkpoint(Path(run_dir), model, training.optimizer, config.optimizer)
        if len(metrics) > config.epochs:
            raise VaelabError(f"{run_dir} has finished {len(metrics)} epochs already; --epochs {config.epochs} "
                              f"would undo some: give at least {len(metrics)}")
        save_config(Path(run_dir), config)  # records a longer --epochs, another device or data folder
    elif run_dir is not None:
        run_dir = new_run_dir(run_dir)  # created if need be; one holding a run is refused
        save_config(run_dir, config)
    if progress and run_dir is not None:
        tqdm.write(f"run directory: {run_dir}", file=sys.stderr)

    epochs = tqdm(range(len(metrics) + 1, config.epochs + 1), desc="epochs", disable=not progress,
                  dynamic_ncols=True)
    for epoch in epochs:
        start = time.perf_counter()
        training.lr.fill_(config.lr_at(epoch))
        model.train()
        losses = train_epoch(training, epoch, progress)
        train_loss = losses.mean().item()
        if not math.isfinite(train_loss):
            bad = int((~torch.isfinite(losses)).nonzero()[0])
            raise TrainingDiverged(f"the loss became {losses[bad].item()} at epoch {epoch}, step {bad + 1} "
                                   f"of {len(losses)}: training diverged; {_advice(config, epoch, run_dir)}")
        model.eval()
        test_loss = mean_loss(model, training.test_set, "elbo", samples=config.samples)
        if not math.isfinite(test_loss):  # the epoch's last updates broke the weights: keep the last good checkpoint
            raise TrainingDiverged(f"the test loss became {test_loss} after epoch {epoch}: training diverged; "
                                   f"{_advice(config, epoch, run_dir)}")
        record = {"epoch": epoch, "train_loss": train_loss, "test_loss": test_loss}
        if config.objective == "iwae":
            record["test_iwae"] = mean_loss(model, training.test_set, "iwae", samples=config.k)
        record["seconds"] = time.perf_counter() - start
        metrics.append(record)
        if run_dir is not None:
            save_checkpoint(Path(run_dir), model, training.optimizer, metrics)
        if progress:
            epochs.write(f"epoch {epoch:3d}  train {train_loss:8.3f}  test {test_loss:8.3f} "
                         f"nats  ({record['seconds']:.1f} s)")
    return TrainResult(model.eval(), metrics, training.data, run_dir)


def train(config: RunConfig, run_dir: str | Path | None = None, data: Dataset | None = None,
          progress: bool = True, resume: bool = False) -> TrainResult:
    """build, then fit: train a VAE as `config` says; with run_dir, save everything there."""
    return fit(build(config, data, progress), run_dir, progress, resume)
