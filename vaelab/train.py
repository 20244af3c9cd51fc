"""The training loop: data resident in memory, one optimizer step per batch.

After every epoch a checkpoint (weights, optimizer and random-number state),
the weights and the metrics are written atomically into the run directory, so a
finished epoch is never lost and a killed run resumes exactly.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import native
from .config import RunConfig
from .data import Dataset, TrainingBatches, load_data
from .errors import VaelabError
from .evaluate import mean_negative_elbo, mean_negative_iwae
from .manual import contiguous_weights, negative_elbo_backward, supports
from .models import VAE, build_model
from .objectives import negative_elbo, negative_iwae
from .runs import load_checkpoint, new_run_dir, save_checkpoint, save_config


class TrainingDiverged(VaelabError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    model: VAE
    metrics: list[dict]
    data: Dataset
    run_dir: Path | None


def pick_device(name: str) -> torch.device:
    """'auto' means CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise VaelabError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


class PlainSGD:
    """Plain SGD, no momentum: the tutorial's `param -= lr * grad`.

    It offers the parts of torch.optim's interface that the trainer and the
    checkpoints use. torch.optim.SGD computes the same, but its first call
    imports TorchDynamo, a second of every run's start on a small CPU.
    """

    def __init__(self, params, lr: float):
        self.param_groups = [{"params": list(params), "lr": lr}]

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def state_dict(self) -> dict:
        # No state: only each group's learning rate and parameter indices.
        first, groups = 0, []
        for group in self.param_groups:
            groups.append({"lr": group["lr"], "params": list(range(first, first + len(group["params"])))})
            first += len(group["params"])
        return {"state": {}, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        groups = state["param_groups"]
        if state["state"] or [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the saved state is not plain SGD's for these parameters")
        for group, saved in zip(self.param_groups, groups):
            group["lr"] = saved["lr"]


def make_optimizer(config: RunConfig, model: VAE):
    """torch.optim.Adam (fused), or PlainSGD."""
    if config.optimizer == "adam":
        # The fused kernel: one pass per parameter instead of a dozen small ops.
        return torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    return PlainSGD(model.parameters(), lr=config.lr)


def _manual(config: RunConfig, model: VAE) -> bool:
    """Whether the step uses the hand-derived gradients (manual.py)."""
    return config.backward == "manual" or (config.backward == "auto" and supports(model)
                                           and config.objective != "iwae")


def use_native_kernels(config: RunConfig, model: VAE, device: torch.device) -> bool:
    """Whether training batches are binary on-pixel lists for the C kernels
    (native.py): for the hand-derived step with plain SGD, Bernoulli, on the CPU."""
    if config.kernels == "torch":
        return False
    fits = (device.type == "cpu" and config.model.likelihood == "bernoulli" and config.optimizer == "sgd"
            and _manual(config, model) and config.objective == "elbo")
    if config.kernels == "native":
        if not fits:
            raise VaelabError("--kernels native needs the default step: --likelihood bernoulli, --optimizer sgd, "
                              "--objective elbo, a manual backward and the CPU; use --kernels torch")
        if not native.available():
            raise VaelabError(f"--kernels native: {native.unavailable_reason()}; use --kernels torch")
        return True
    return fits and native.available()


def make_step(config: RunConfig, model: VAE, optimizer):
    """The function that does one optimizer step on a batch and returns its loss."""
    iwae = config.objective == "iwae"
    manual = _manual(config, model)
    if manual and (iwae or not supports(model)):
        what = "the iwae objective" if iwae else f"the {model.config.activation} activation"
        raise VaelabError(f"--backward manual does not support {what}; use --backward autograd")
    if manual and config.optimizer == "sgd":
        # Plain SGD fused into the gradient GEMMs: no gradient tensors at all.
        group = optimizer.param_groups[0]  # its "lr" follows the schedule
        return lambda x, g: negative_elbo_backward(model, x, config.samples, g, sgd_lr=group["lr"])

    def manual_step(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        loss = negative_elbo_backward(model, x, config.samples, g)
        optimizer.step()
        return loss

    def autograd_step(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if iwae:
            loss = negative_iwae(model, x, config.k, g).mean()
        else:
            loss = negative_elbo(model, x, config.samples, g).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return manual_step if manual else autograd_step


def train_epoch(train_step, batches: TrainingBatches, config: RunConfig, generator: torch.Generator,
                epoch: int, progress: bool) -> torch.Tensor:
    """One pass over the training images in a fresh random order, whole batches
    only (drop_last, as the tutorial). Returns the (steps,) batch losses, kept on
    the device: no per-step synchronisation."""
    device = batches.device
    steps = len(batches) // config.batch_size
    order = torch.randperm(len(batches), generator=generator, device=device)
    losses = torch.empty(steps, device=device)
    bar = tqdm(range(steps), desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = order[step * config.batch_size:(step + 1) * config.batch_size]
        losses[step] = train_step(batches.batch(idx, generator), generator)
        if progress and step % 50 == 49:
            bar.set_postfix(loss=f"{losses[step].item():.2f}")
    return losses


def _advice(config: RunConfig, epoch: int, run_dir: Path | None) -> str:
    """What to do after a divergence in `epoch`, and what was kept."""
    rate = f"--lr {config.lr}" if config.schedule == "constant" else \
        f"--lr {config.lr}, which the schedule had brought to {config.lr_at(epoch):.3g}"
    kept = f"; the checkpoint of epoch {epoch - 1} in {run_dir} is intact" if run_dir and epoch > 1 else ""
    return f"lower the learning rate ({rate}){kept}"


def train(config: RunConfig, run_dir: str | Path | None = None, data: Dataset | None = None,
          progress: bool = True, resume: bool = False) -> TrainResult:
    """Train a VAE as `config` says; with run_dir, save everything there.

    After every epoch the run directory gets a checkpoint (weights, optimizer
    and random-number state). With resume=True, training continues from the
    run directory's checkpoint; on the CPU the result is bit for bit that of
    an uninterrupted run.

    Returns the trained model (in eval mode) and one metrics record per epoch:
    epoch, train_loss (the training objective's mean over the epoch's batches:
    negative ELBO, or negative IWAE bound), test_loss (negative ELBO of the test
    set with fixed binarization), seconds; with --objective iwae also test_iwae.
    """
    config.validate()
    device = pick_device(config.device)
    if data is None:
        data = load_data(config.data_dir, progress=progress)
    data = data.subset(config.train_size, config.test_size)
    config.model.x_dim, config.model.image_shape = data.x_dim, data.image_shape
    if len(data.train_images) < config.batch_size:
        raise VaelabError(f"--batch-size {config.batch_size} is larger than the "
                          f"{len(data.train_images)} training images")

    model = build_model(config.model, seed=config.seed).to(device)
    optimizer = make_optimizer(config, model)
    train_step = make_step(config, model, optimizer)
    generator = torch.Generator(device).manual_seed(config.seed)
    binary = use_native_kernels(config, model, device)
    # Recorded as used, not as asked: the two kernels draw different random pixels,
    # so a resumed run must keep to the same ones to repeat an uninterrupted run.
    config.kernels = "native" if binary else "torch"
    train_batches = TrainingBatches(data.train_images.to(device), config.model.likelihood, binary=binary)
    test_images = data.test_images.to(device)
    metrics: list[dict] = []
    if resume:
        if run_dir is None:
            raise VaelabError("resuming needs the run directory")
        metrics = load_checkpoint(Path(run_dir), model, optimizer, generator)
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
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(epoch)
        model.train()
        losses = train_epoch(train_step, train_batches, config, generator, epoch, progress)
        contiguous_weights(model)  # the native step's layout: undone for evaluation and the checkpoint
        train_loss = losses.mean().item()
        if not math.isfinite(train_loss):
            bad = int((~torch.isfinite(losses)).nonzero()[0])
            raise TrainingDiverged(f"the loss became {losses[bad].item()} at epoch {epoch}, step {bad + 1} "
                                   f"of {len(losses)}: training diverged; {_advice(config, epoch, run_dir)}")
        test_loss = mean_negative_elbo(model, test_images, samples=config.samples, seed=config.eval_seed)
        if not math.isfinite(test_loss):  # the epoch's last updates broke the weights: keep the last good checkpoint
            raise TrainingDiverged(f"the test loss became {test_loss} after epoch {epoch}: training diverged; "
                                   f"{_advice(config, epoch, run_dir)}")
        record = {"epoch": epoch, "train_loss": train_loss, "test_loss": test_loss,
                  "seconds": time.perf_counter() - start}
        if config.objective == "iwae":
            record["test_iwae"] = mean_negative_iwae(model, test_images, k=config.k, seed=config.eval_seed)
        metrics.append(record)
        if run_dir is not None:
            save_checkpoint(Path(run_dir), model, optimizer, generator, metrics)
        if progress:
            epochs.write(f"epoch {epoch:3d}  train {train_loss:8.3f}  test {test_loss:8.3f} "
                         f"nats  ({record['seconds']:.1f} s)")
    return TrainResult(model.eval(), metrics, data, run_dir)
