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
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed, progress as show
from .average import WeightAverage
from .callbacks import Callback, as_callbacks
from .config import SKIP_LIMIT, ModelConfig, RunConfig, explicit, resolve
from .data import Dataset, load_data
from .distributed import SINGLE, World, pick_device
from .errors import VaelabError
from .registry import import_plugins
from .models import VAE, build_model, initialise
from .objectives import OBJECTIVES, Objective
from .runs import (load_config, read_checkpoint, restore_checkpoint, save_checkpoint, save_config,
                   save_weights, write_batch_losses, write_metrics)
from .sampling import TestSet, test_means
from .start import claim, new_run_dir, started
from .step import TrainStep


class TrainingDiverged(VaelabError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    model: VAE
    metrics: list[dict]
    data: Dataset
    run_dir: Path | None
    batch_losses: list[np.ndarray]  # per epoch trained here, each (steps,): the global batches' mean losses


@dataclass
class Training:
    """What `build` makes and `fit` runs. `config` is the resolved copy, as config.json records it."""

    config: RunConfig
    data: Dataset
    model: VAE
    optimizer: torch.optim.Optimizer
    lr: torch.Tensor          # the optimizer's learning rate, a tensor the schedule fills
    step: TrainStep
    test_set: TestSet         # the test images, with the same keyed pixels and noise every epoch
    world: World = SINGLE
    objective: Objective | None = None  # the step's; None: made from config.objective
    average: WeightAverage | None = None  # --ema's average of the weights, the step's

    def averaged(self):
        """A context in which the model holds the average of its weights (--ema), if any."""
        return self.average.applied() if self.average is not None else nullcontext()

    def __post_init__(self):
        if self.objective is None:
            self.objective = OBJECTIVES[self.config.objective](self.config)


def make_optimizer(config: RunConfig, model: VAE, lr: torch.Tensor) -> torch.optim.Optimizer:
    """Plain SGD (no momentum: the tutorial's update) or Adam, both fused kernels.

    lr is a tensor so that a schedule can change it without a new optimizer (and,
    under a captured step, without a new graph).
    """
    if config.optimizer == "adam":
        # capturable: its step count stays on the GPU, so a CUDA graph can hold the update
        return torch.optim.Adam(model.parameters(), lr=lr, eps=config.adam_eps, fused=True,
                                capturable=lr.device.type == "cuda")
    return torch.optim.SGD(model.parameters(), lr=lr, fused=True)


def set_deterministic(device: torch.device) -> None:
    """Deterministic CUDA arithmetic: cuBLAS with a fixed workspace (read when its first
    handle is made, so before any matrix product) and no nondeterministic kernels."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def build(config: RunConfig, data: Dataset | None = None, progress: bool = True,
          world: World = SINGLE, model: VAE | None = None) -> Training:
    """Everything a run needs, from its config; `config` itself is left as it was.

    With model (a VAE, e.g. from your own networks), a copy of it is trained: its own
    `model.config` replaces config.model, and `model` is left as it was. Its weights are its
    own (config.seed still fixes the batches and the noise).

    The returned `Training.config` is the resolved one (config.resolve: what was set, then the
    likelihood's recommendations for the data's images, the preset, the defaults); when build
    reads the data itself, a data folder other than the verified MNIST default is recorded as an
    absolute path. Under torchrun (world of several ranks) the model is wrapped in
    DistributedDataParallel and each rank trains on its share of every (global) batch; in a
    script of yours, `world = vaelab.distributed.from_environment()`.
    """
    if model is not None:
        twice = ", ".join(sorted(explicit(config.model)))
        if twice:
            raise VaelabError(f"the model's options come from the model given ({twice} set in "
                              "config.model too): leave them out of config")
        # The model is what it is: every field of its config counts as set, so no preset or
        # recommendation rewrites the record of it.
        config = config.replace(model=ModelConfig.from_dict(model.config.to_dict()))
    import_plugins(config.plugins)  # the run's own components, before their names are checked
    config.validate(world.size)  # every option's error before any data is read
    asked = "output_init" in explicit(config)  # (once resolved, every option counts as set)
    distributed.start(world)  # under torchrun: join the process group (once)
    # Where the data is and the device are the caller's alone (config.CALLERS_ONLY): no preset or
    # recommendation sets them, so they are read before resolving.
    device = pick_device(config.device, world)
    if config.deterministic:
        set_deterministic(device)
    data_dir = config.data_dir
    if data is None:
        data = load_data(config.data_dir, progress=progress and world.main, **config.data_options())
        if config.data_dir is not None or not data.verified:
            # Recorded absolute, so that later commands find it from any folder.
            data_dir = str(data.directory.resolve())
    data = data.subset(config.train_size, config.test_size)
    if model is not None and model.config.image_shape != data.image_shape:
        raise VaelabError(f"the model takes images of shape {model.config.image_shape} (C, H, W), "
                          f"but the data's are {data.image_shape}")
    # Resolved once, for these images: a likelihood's recommendations depend on their shape.
    config = resolve(config, data.image_shape).replace(data_dir=data_dir)
    if config.model.conditional:  # the classes are a fact of the data, like the images' shape
        config = config.replace(model=config.model.replace(
            classes=class_names(data, config.model.classes)))
    config.validate(world.size)
    if len(data.train_images) < config.batch_size:
        raise VaelabError(f"--batch-size {config.batch_size} is larger than the "
                          f"{len(data.train_images)} training images")
    if model is None:
        model = build_model(config.model, seed=config.seed)
    else:
        model = copy.deepcopy(model)
        model.config = config.model  # with the data's classes
    why_not = initialise(model, config.init, config.output_init, data.train_images, config.seed)
    if why_not:
        if asked:
            raise VaelabError(f"--output-init data cannot be applied: {why_not}")
        show.write(f"vaelab: the decoder's output bias keeps its own initialisation: {why_not}",
                   progress and world.main, file=sys.stderr)
        config = config.replace(output_init="none")  # config.json records what was done
    model = model.to(device)
    lr = torch.tensor(config.lr_at(1), dtype=torch.float32, device=device)
    optimizer = make_optimizer(config, model, lr)
    objective = OBJECTIVES[config.objective](config)
    average = WeightAverage(model, config.ema) if config.ema else None
    forward = model
    if world.distributed:  # averages the gradients over the ranks during backward
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                            else None)
    say = (lambda line: show.write(line, progress and world.main, file=sys.stderr))
    step = TrainStep(model, optimizer, data.train_images.to(device), objective,
                     labels=_labels(model, data.train_labels, device),
                     batch_size=config.batch_size,
                     cuda_graph=config.cuda_graph, world=world, forward=forward, beta=config.beta,
                     kl_warmup_epochs=config.kl_warmup, grad_clip=config.grad_clip,
                     skip_threshold=config.skip_threshold, say=say, average=average)
    test_set = TestSet(data.test_images.to(device), seed=config.eval_seed,
                       labels=_labels(model, data.test_labels, device))
    return Training(config, data, model, optimizer, lr, step, test_set, world, objective, average)


def class_names(data: Dataset, recorded: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A conditional model's classes on data: those recorded (a resumed run's, a model's), which
    every label must be below, else the data's names (label_names), else "0", "1", ... up to
    its largest label."""
    labels = [t for t in (data.train_labels, data.test_labels) if t is not None and len(t)]
    if not labels:
        raise VaelabError("this model is conditional: it trains on labelled images (IDX label "
                          "files, class folders, or y_train and y_test in an .npz)")
    top = max(int(t.max()) for t in labels)
    names = recorded or data.label_names or tuple(map(str, range(top + 1)))
    if top >= len(names):
        raise VaelabError(f"the data has the label {top}, but the model knows {len(names)} classes"
                          f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    return tuple(names)


def _labels(model: VAE, labels: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The labels a conditional model reads, on device; None for any other model."""
    if not model.conditional:
        return None
    if labels is None:
        raise VaelabError("this model is conditional: it trains on labelled images (IDX label "
                          "files, class folders, or y_train and y_test in an .npz)")
    return labels.to(device)


@dataclass
class EpochSteps:
    """What each step of an epoch measured, (steps,) tensors on the device: the global batch's
    mean loss (averaged over the ranks), the gradient's norm before clipping, and whether the
    update was skipped (--skip-threshold)."""

    losses: torch.Tensor
    grad_norms: torch.Tensor
    skipped: torch.Tensor

    def summary(self) -> dict:
        """The epoch's record of them: train_loss over the updates taken, the gradient norm's
        median and largest finite value, and the skips where a threshold is set."""
        taken = ~self.skipped
        norms = self.grad_norms[torch.isfinite(self.grad_norms)]
        return {"train_loss": self.losses[taken].mean().item() if taken.any() else math.nan,
                "grad_norm_median": norms.median().item() if len(norms) else math.nan,
                "grad_norm_max": norms.max().item() if len(norms) else math.nan}


def train_epoch(training: Training, epoch: int, progress: bool) -> EpochSteps:
    """One pass over the training images in the epoch's order, its measurements kept on the
    device until the epoch ends: no per-step synchronisation."""
    step, config = training.step, training.config
    step.begin_epoch(config.seed, epoch)
    device = step.images.device
    measured = EpochSteps(*(torch.zeros(step.steps_per_epoch, dtype=dtype, device=device)
                            for dtype in (torch.float32, torch.float32, torch.bool)))
    bar = show.bar(step.steps_per_epoch, f"epoch {epoch}", progress, leave=False)
    live = progress and show.interactive()  # reading a loss waits for the device: only for a bar on screen
    for i in range(step.steps_per_epoch):
        measured.losses[i] = step()
        measured.grad_norms[i] = step.grad_norm
        if config.skip_threshold is not None:
            measured.skipped[i] = step.skipped
        bar.update()
        if live and i % 50 == 49:
            bar.set_postfix(loss=f"{measured.losses[i].item():.2f}")
    bar.close()
    distributed.all_sum(measured.losses, training.world).div_(training.world.size)
    return measured


def _advice(config: RunConfig, epoch: int, run_dir: Path | None) -> str:
    """What to do after a divergence in `epoch`, and what was kept."""
    rate = f"--lr {config.lr}" if config.schedule == "constant" else \
        f"--lr {config.lr}, which the schedule had brought to {config.lr_at(epoch):.3g}"
    kept = f"; the checkpoint of epoch {epoch - 1} in {run_dir} is intact" if run_dir and epoch > 1 else ""
    # plain SGD's steps grow with the gradient, which the continuous likelihoods' sums over pixels make large
    adam = " or train with --optimizer adam --lr 1e-3" if config.optimizer == "sgd" else ""
    return f"lower the learning rate ({rate}){adam}{kept}"


def fit(training: Training, run_dir: str | Path | None = None, progress: bool = True,
        resume: bool = False, tensorboard: str | Path | None = None,
        callbacks: list | None = None) -> TrainResult:
    """Run the epochs of `training.config`; with run_dir, save everything there. callbacks:
    Callbacks or functions f(record, training) (callbacks.py), called on rank 0 after each
    epoch's checkpoint; one that returns True stops the run there, cleanly. tensorboard, a
    folder: a tensorboard.TensorBoard callback writing each epoch's record and pictures there
    (needs the `tensorboard` extra).

    With resume=True, training continues from the run directory's checkpoint; on
    the CPU the result is bit for bit that of an uninterrupted run. A run with no finished
    epoch (no checkpoint: interrupted in its first) starts again from its first epoch in its
    own folder.

    Returns the trained model (in eval mode) and one metrics record per epoch:
    epoch, train_loss (the training objective's mean over the epoch's batches:
    negative ELBO, negative IWAE bound, or with --beta / --kl-warmup the negative
    ELBO with its KL weighted), test_loss (the true negative ELBO of the test set,
    KL weight 1, its pixels and noise keyed the same every epoch), test_kl (its KL term),
    seconds, and what the objective's test passes add (objectives.Objective.test_passes); with
    a KL weight also kl_weight (at the epoch's last step).
    """
    config, model, world = training.config, training.model, training.world
    progress = progress and world.main  # rank 0 writes and shows; the others only compute
    callbacks = as_callbacks(callbacks)
    if tensorboard:
        from .tensorboard import TensorBoard  # matplotlib and TensorBoard: only when asked

        callbacks.append(TensorBoard(tensorboard))  # a missing extra is said before the run starts
    callbacks = callbacks if world.main else []
    metrics: list[dict] = []
    if resume and run_dir is None:
        raise VaelabError("resuming needs the run directory")
    if resume and not distributed.share_result(lambda: started(run_dir), world):
        resume = False  # nothing trained yet: start again in the run's folder
        # (a folder that is not a run is refused by load_config, not written into)
        distributed.share_result(lambda: save_config(Path(run_dir), config) if load_config(run_dir)
                                 else None, world)
    elif resume:
        # Rank 0 holds the run folder; the others get its checkpoint from it (no shared disk needed).
        data = distributed.share_result(lambda: read_checkpoint(Path(run_dir)), world)
        metrics = restore_checkpoint(data, Path(run_dir), model, training.optimizer, config.optimizer,
                                     training.average)
        training.step.forget_graph()  # a graph captured before would update the optimizer state replaced here
        if len(metrics) > config.epochs:
            raise VaelabError(f"{run_dir} has finished {len(metrics)} epochs already; --epochs {config.epochs} "
                              f"would undo some: give at least {len(metrics)}")
        if world.main:
            save_weights(Path(run_dir), model, training.average)
            write_metrics(Path(run_dir), metrics)
            save_config(Path(run_dir), config)  # records a longer --epochs, another device or data folder
    elif run_dir is not None:
        # created if need be; one holding a run, or other files, is refused
        run_dir = distributed.share_result(lambda: new_run_dir(run_dir), world)
        if world.main:
            save_config(run_dir, config)
            if world.torchrun:
                claim(run_dir, world.run_id)
    show.write(f"run directory: {run_dir}", progress and run_dir is not None, file=sys.stderr)

    batch_losses: list[np.ndarray] = []
    result = None
    for callback in callbacks:
        callback.on_fit_start(training, None if run_dir is None else Path(run_dir))
    try:
        _epochs(training, metrics, batch_losses, run_dir, progress, callbacks)
        if training.average is not None:  # what the run saved, and what evaluation uses
            training.average.copy_to_model()
        result = TrainResult(model.eval(), metrics, training.data, run_dir, batch_losses)
    finally:
        for callback in callbacks:
            callback.on_fit_end(result)
    return result


def _epochs(training: Training, metrics: list[dict], batch_losses: list[np.ndarray],
            run_dir: Path | None, progress: bool, callbacks: list[Callback]) -> None:
    """fit's loop: the epochs after those in metrics, each appending its record and losses."""
    config, model, world = training.config, training.model, training.world
    epochs = show.bar(config.epochs - len(metrics), "epochs", progress)
    collapsed = False  # said once as it happens, again only after a recovery
    for epoch in range(len(metrics) + 1, config.epochs + 1):
        start = time.perf_counter()
        training.lr.fill_(config.lr_at(epoch))
        model.train()
        before = _snapshot(training)  # to find a divergence's first non-finite value
        measured = train_epoch(training, epoch, progress)
        record = {"epoch": epoch, **measured.summary()}
        _check_epoch(training, epoch, measured, before, run_dir)
        model.eval()
        test = {}
        with training.averaged():  # the weights it saves are the ones it tests
            for i, (samples, values) in enumerate(training.objective.test_passes()):
                test.update(test_means(model, training.test_set, values, samples=samples,
                                       world=world, active=i == 0))
        test_loss = test["test_loss"]
        if not math.isfinite(test_loss):  # the epoch's last updates broke the weights: keep the last good checkpoint
            raise TrainingDiverged(f"the test loss became {test_loss} after epoch {epoch}: training diverged; "
                                   f"{_advice(config, epoch, run_dir)}")
        record.update(test)
        record.update(model.epoch_metrics())
        if config.skip_threshold is not None:
            record["skipped"] = int(measured.skipped.sum())
        if config.weighted:  # train_loss is then the weighted objective, not the negative ELBO
            record["kl_weight"] = training.step.kl_weight.item()  # at the epoch's last step
        record["seconds"] = time.perf_counter() - start
        metrics.append(record)
        batch_losses.append(measured.losses.cpu().numpy())
        if run_dir is not None and world.main:
            save_checkpoint(Path(run_dir), model, training.optimizer, metrics, training.average)
            write_batch_losses(Path(run_dir), epoch, batch_losses[-1])
        stop = any([bool(c.on_epoch_end(dict(record), training)) for c in callbacks])
        epochs.update()
        show.write(training.objective.epoch_line(record), progress)
        now = model.has_active_units and (record["active_units"] == 0
                                          or record["test_kl"] < COLLAPSED_KL)
        if now and not collapsed:
            show.write(collapse_warning(record), progress, file=sys.stderr)
        collapsed = now
        if distributed.share_result(lambda: stop, world):  # rank 0's callbacks decide for all
            show.write(f"vaelab: a callback stopped the run after epoch {epoch}", progress,
                       file=sys.stderr)
            break
    epochs.close()


# A test KL below this many nats (or no active unit) after an epoch: the posterior has collapsed.
COLLAPSED_KL = 0.1


def collapse_warning(record: dict) -> str:
    """One line naming a posterior collapse after an epoch, and the remedies."""
    return (f"vaelab: warning: the posterior collapsed in epoch {record['epoch']}: test KL "
            f"{record['test_kl']:.3f} nats, {record['active_units']} active "
            f"unit{'' if record['active_units'] == 1 else 's'}, so the decoder "
            "ignores z; remedies: --kl-warmup E, --free-bits LAMBDA, --output-init data, a lower"
            " --lr")


def _snapshot(training: Training) -> tuple[dict, dict]:
    """Copies of the model's and the optimizer's state: an epoch's starting point."""
    return (copy.deepcopy(training.model.state_dict()),
            copy.deepcopy(training.optimizer.state_dict()))


def _check_epoch(training: Training, epoch: int, measured: EpochSteps, before: tuple[dict, dict],
                 run_dir: Path | None) -> None:
    """Stop the run after an epoch that skipped too many of its updates or whose loss went
    non-finite, naming the first non-finite value (the checkpoint of the epoch before stays)."""
    config, steps = training.config, len(measured.losses)
    if config.skip_threshold is not None:
        skipped = int(measured.skipped.sum())
        if skipped > SKIP_LIMIT * steps:
            raise TrainingDiverged(
                f"epoch {epoch} skipped {skipped} of its {steps} updates (gradient norm above "
                f"--skip-threshold {config.skip_threshold} or not finite; median norm "
                f"{measured.summary()['grad_norm_median']:.3g}): raise the threshold or "
                f"{_advice(config, epoch, run_dir)}")
    finite = torch.isfinite(measured.losses) | measured.skipped
    if bool(finite.all()):
        return
    bad = int((~finite).nonzero()[0])
    source = find_nonfinite(training, epoch, bad, before)
    raise TrainingDiverged(f"the loss became {measured.losses[bad].item()} at epoch {epoch}, step "
                           f"{bad + 1} of {steps}: {source}; training diverged; "
                           f"{_advice(config, epoch, run_dir)}")


def find_nonfinite(training: Training, epoch: int, last: int, before: tuple[dict, dict]) -> str:
    """Replay steps 0..last of the epoch from its starting state, eagerly, watching every
    module's output, the terms, the gradients and the updated weights; say where the first
    non-finite value appeared. The keyed draws make the replay the same computation."""
    model, optimizer, step = training.model, training.optimizer, training.step
    model.load_state_dict(before[0])
    optimizer.load_state_dict(before[1])
    step.forget_graph()
    step.begin_epoch(training.config.seed, epoch)
    found: list[str] = []

    def watch(name: str):
        def hook(module, inputs, output):
            outputs = output if isinstance(output, tuple) else (output,)
            for t in outputs:
                if isinstance(t, torch.Tensor) and not found and not bool(torch.isfinite(t).all()):
                    found.append(f"the output of {name} ({type(module).__name__}) was the first "
                                 f"non-finite value ({_kind(t)})")
        return hook

    def check(stage: str, value) -> None:
        if found:
            return
        if stage == "terms":
            terms, loss = value
            for name, t in (("log p(x|z)", terms.log_px_z), ("KL", terms.kl), ("loss", loss)):
                if not bool(torch.isfinite(t).all()):
                    found.append(f"the term {name} was the first non-finite value ({_kind(t)})")
                    return
        for name, p in model.named_parameters():
            t = p.grad if stage == "gradients" else p if stage == "update" else None
            if t is not None and not bool(torch.isfinite(t).all()):
                what = "gradient of" if stage == "gradients" else "parameter"
                found.append(f"the {what} {name} was the first non-finite value ({_kind(t)})"
                             + (" after the update" if stage == "update" else ""))
                return

    hooks = [m.register_forward_hook(watch(name)) for name, m in model.named_modules() if name]
    try:
        for i in range(last + 1):
            step(check)
            if found:
                return f"{found[0]} in step {i + 1}"
    finally:
        for h in hooks:
            h.remove()
    return "its replay stayed finite, so the first non-finite value could not be named"


def _kind(t: torch.Tensor) -> str:
    """'nan' or 'inf' (or both), for the first non-finite tensor."""
    kinds = [k for k, has in (("nan", torch.isnan(t).any()), ("inf", torch.isinf(t).any())) if has]
    return " and ".join(kinds)


def train(config: RunConfig, run_dir: str | Path | None = None, data: Dataset | None = None,
          progress: bool = True, resume: bool = False, world: World = SINGLE,
          model: VAE | None = None, tensorboard: str | Path | None = None,
          callbacks: list | None = None) -> TrainResult:
    """build, then fit: train a VAE as `config` says (or a copy of `model`, see build); with
    run_dir, save everything there; tensorboard and callbacks: see fit."""
    return fit(build(config, data, progress, world, model), run_dir, progress, resume, tensorboard,
               callbacks)


def summary(config: RunConfig, record: dict) -> str:
    """What a run reports after its last epoch (record): the test value of the bound it trained,
    named, in nats per image (the objective's own line)."""
    return OBJECTIVES[config.objective](config).summary(record)
