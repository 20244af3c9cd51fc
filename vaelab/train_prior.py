"""`vaelab train-prior`: the second stage of a run whose model has one (a VQ-VAE's prior over its
codes, vq.CodePrior), trained on the codes of the run's training images and kept in RUN/prior as
a run of its own: weights, checkpoint (resumed exactly: every draw is keyed by seed and epoch)
and metrics.jsonl.

It trains on the images the run trained on (its --train-size) and tests on its test set. Each
epoch's record names the run's epoch whose codes it learned (`run_epochs`): once the run trains
on (`vaelab train --resume`), its codes move, load_run no longer attaches the old prior, and
train-prior starts a new one. Each epoch encodes the training images afresh, observed with keys
(seed, "prior", epoch), so that the prior sees the codes of dynamically binarized images as the
VQ-VAE did; the test value is -log p(codes) of the test images as evaluation observes them, nats
per image.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from . import progress as show, rng
from .config import EVAL_SEED, TrainPriorOptions
from .distributed import SINGLE, World
from .errors import VaelabError
from .models import Model
from .runs import (CHECKPOINT, PRIOR, load_config, read_checkpoint, read_metrics,
                   restore_checkpoint, save_checkpoint, stage_is_current)
from .start import open_run

ENCODE_ROWS = 1000  # images encoded at a time


@torch.no_grad()
def image_codes(model: Model, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """images (N, C, H, W) uint8, keys (N,) -> their code grids (N, h * w) int64."""
    model.eval()
    codes = [model.codes(model.posterior_mean(model.observe(
        images[i:i + ENCODE_ROWS].to(model.device), keys[i:i + ENCODE_ROWS])))
        for i in range(0, len(images), ENCODE_ROWS)]
    return torch.cat(codes)


def train_prior(options: TrainPriorOptions, world: World = SINGLE) -> list[dict]:
    """Train (or continue) RUN/prior to options.epochs; returns every epoch's record."""
    model, data = open_run(options, world, writes=PRIOR)
    run_config = load_config(options.run)  # the images the model trained on, and its test set
    data = data.subset(run_config.train_size, run_config.test_size)
    with torch.random.fork_rng(devices=[]):  # its weights keyed by the seed
        torch.manual_seed(options.seed)
        prior = model.second_stage()
    if prior is None:
        raise VaelabError(f"{options.run} has no prior to train: `vaelab train-prior` is for a"
                          " run of --model vq-vae")
    if len(data.train_images) < options.batch_size:
        raise VaelabError(f"--batch-size {options.batch_size} is larger than the"
                          f" {len(data.train_images)} training images")
    directory = Path(options.run) / PRIOR
    optimizer = torch.optim.Adam(prior.parameters(), lr=options.lr)
    metrics: list[dict] = []
    run_epochs = len(read_metrics(options.run))
    if (directory / CHECKPOINT).is_file():
        if stage_is_current(options.run):
            metrics = restore_checkpoint(read_checkpoint(directory), directory, prior, optimizer,
                                         "adam")
        else:  # trained on the codes of an earlier epoch: the run has trained on since
            done = read_metrics(directory)
            show.write(f"vaelab: {directory} was trained on the codes of epoch"
                       f" {done[-1].get('run_epochs') if done else None}, the run is at epoch"
                       f" {run_epochs}: training a new prior", not options.quiet and world.main,
                       file=sys.stderr)
    device = model.device
    index = torch.arange(len(data.test_images), device=device)
    test_codes = image_codes(model, data.test_images, rng.image_keys(EVAL_SEED, "observe", index))
    train_index = torch.arange(len(data.train_images), device=device)
    progress = not options.quiet and world.main
    for epoch in range(len(metrics) + 1, options.epochs + 1):
        start = time.perf_counter()
        keys = rng.row_keys(rng.key(options.seed, "prior", epoch), train_index)
        codes = image_codes(model, data.train_images, keys)
        order = rng.permutation(rng.key(options.seed, "prior-order", epoch), len(codes), device)
        prior.train()
        total, steps = 0.0, len(codes) // options.batch_size
        for step in range(steps):
            batch = codes[order[step * options.batch_size:(step + 1) * options.batch_size]]
            loss = -prior.log_prob(batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        prior.eval()
        with torch.no_grad():
            test = -torch.cat([prior.log_prob(test_codes[i:i + ENCODE_ROWS])
                               for i in range(0, len(test_codes), ENCODE_ROWS)]).mean().item()
        if not math.isfinite(test):
            raise VaelabError(f"the prior's test loss became {test} in epoch {epoch}; try a lower"
                              " --lr")
        metrics.append({"epoch": epoch, "train_nll": total / steps, "test_nll": test,
                        "run_epochs": run_epochs, "seconds": time.perf_counter() - start})
        if world.main:
            directory.mkdir(exist_ok=True)
            save_checkpoint(directory, prior, optimizer, metrics)
        show.write(f"prior epoch {epoch:3d}  train {metrics[-1]['train_nll']:8.3f}  test"
                   f" {test:8.3f} nats per image of codes  ({metrics[-1]['seconds']:.1f} s)",
                   progress, file=sys.stderr)
    return metrics
