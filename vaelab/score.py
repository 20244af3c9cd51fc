"""Codes and scores of any images a run's model fits, for downstream work.

- `encode`: each image's posterior parameters (the latent code), with E_q[z] where it has no
  closed form;
- `score`: each image's log p(x) by importance sampling, the same computation as `vaelab
  evaluate` (evaluate.importance_sampled), so scoring a run's own test set with evaluate's k,
  seed and precision gives its per-image values bitwise on the CPU.

`encode_run` and `score_run` (the commands) write FILE.npz and the same columns as FILE.csv.
What image i draws is keyed by (seed, i), i its position in the chosen split, as in evaluation.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from . import distributed, progress as show
from .config import EncodeOptions, ScoreOptions, check
from .data import Dataset
from .distributed import SINGLE, World
from .errors import VaelabError
from .evaluate import draw_noise, image_keys, importance_sampled
from .fileio import atomic_write_bytes, check_output
from .models import VAE
from .runs import load_run_and_data

BATCH = 500  # images encoded at a time


@torch.no_grad()
def encode(model: VAE, images: torch.Tensor, *, seed: int = 1234, draws: int = 100,
           progress: bool = False, world: World = SINGLE) -> dict[str, np.ndarray]:
    """The latent codes of images: (N, C, H, W) uint8.

    Returns float32 arrays:
      mu, logvar  (N, z_dim) q(z_1|x)'s Gaussian: with --posterior iaf, the flow's base Gaussian
      z_mean      (N, noise_dim) E_q[z] of every layer (z_1, then z_2, ...), the mean of `draws`
                  keyed draws; only where it is not mu: an IAF posterior or a hierarchy
    Under torchrun the ranks share the batches and every rank gets every image's values.
    """
    model.eval()
    device, n = model.device, len(images)
    drawn = model.flow is not None or model.hierarchy is not None
    width = 2 * model.config.z_dim + (model.noise_dim if drawn else 0)
    values = torch.zeros((n, width), dtype=torch.float32, device=device)
    components = model.prior_components() if drawn else None
    starts = range(0, n, BATCH)[world.rank::world.size]
    bar = show.bar(n, "encoding", progress and world.main, unit="image")
    for start in starts:
        index = torch.arange(start, min(start + BATCH, n), device=device)
        x = model.observe(images[start:start + BATCH].to(device),
                          image_keys(seed, "observe", index))
        q = model.encode_posterior(x)
        parts = list(q[:2])
        if drawn:
            eps = draw_noise(image_keys(seed, "noise", index), model.noise_dim, draws)
            parts.append(model(x, eps, posterior=q, components=components).z.mean(0))
        values[index] = torch.cat(parts, dim=1)
        bar.update(len(index) * world.size)
    bar.close()
    values = distributed.all_sum(values, world).cpu().numpy()  # zeros elsewhere: exact
    z_dim = model.config.z_dim
    out = {"mu": values[:, :z_dim], "logvar": values[:, z_dim:2 * z_dim]}
    if drawn:
        out["z_mean"] = values[:, 2 * z_dim:]
    return out


def score(model: VAE, images: torch.Tensor, *, k: int = 5000, seed: int = 1234,
          precision: str = "fp32", progress: bool = False, world: World = SINGLE
          ) -> dict[str, np.ndarray]:
    """Each image's log p(x) by importance sampling with K = k draws from q(z|x): images
    (N, C, H, W) uint8 -> float64 arrays (N,):
      log_px          the estimate, nats
      log_px_se       its Monte-Carlo standard error
      elbo            the ELBO from the same draws
      bits_per_dim    -log p(x) / (C H W log 2), for the discrete likelihoods only
    """
    r = importance_sampled(model, images, k=k, seed=seed, precision=precision,
                           progress=progress, world=world)
    out = {"log_px": r["log_px"], "log_px_se": np.sqrt(r["per_image"]["log_px_variance"]),
           "elbo": r["per_image"]["elbo"]}
    if model.likelihood.discrete:
        out["bits_per_dim"] = -r["log_px"] / (images[0].numel() * math.log(2))
    return out


def _images(data: Dataset, split: str, first: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chosen split's first images (all when first is None), and their labels."""
    images, labels = (data.test_images, data.test_labels) if split == "test" else \
        (data.train_images, data.train_labels)
    if not len(images):
        raise VaelabError(f"the data in {data.directory} has no {split} images")
    return images[:first], None if labels is None else labels[:first]


def _columns(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The CSV's columns: a (N,) array as one column, a (N, D) array as name_0 ... name_D-1."""
    columns = {}
    for name, v in values.items():
        if v.ndim == 1:
            columns[name] = v
        else:
            columns.update({f"{name}_{d}": v[:, d] for d in range(v.shape[1])})
    return columns


def write_table(path: Path, values: dict[str, np.ndarray]) -> tuple[Path, Path]:
    """values (each with one row per image) as path (.npz) and the same columns as path's .csv,
    both written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **values)
    atomic_write_bytes(path, buffer.getvalue())
    columns = _columns(values)
    rows = np.column_stack([c.astype(np.float64) for c in columns.values()])
    text = io.StringIO()
    integer = [c.dtype.kind in "iu" for c in columns.values()]
    text.write(",".join(columns) + "\n")
    for row in rows:
        text.write(",".join(str(int(v)) if i else repr(float(v)) for v, i in zip(row, integer)) + "\n")
    csv = path.with_suffix(".csv")
    atomic_write_bytes(csv, text.getvalue().encode())
    return path, csv


def _outputs(output: str, force: bool) -> Path:
    """FILE.npz, and its FILE.csv, checked before any work."""
    path = check_output(output, flag="-o", suffix=".npz", force=force)
    check_output(path.with_suffix(".csv"), flag="-o", suffix=".csv", force=force)
    return path


def _identity(images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, np.ndarray]:
    out = {"index": np.arange(len(images), dtype=np.int64)}
    if labels is not None:
        out["label"] = labels.cpu().numpy().astype(np.int64)
    return out


def _write_for_run(options, world: World, compute) -> tuple[Path, Path, dict]:
    """encode_run's and score_run's path: the output checked, the run and its split's images
    loaded, compute(model, images) on every rank, and its arrays written by rank 0 after each
    image's index and label. Returns both files' paths and compute's arrays."""
    check(options)
    distributed.start(world)  # under torchrun: join the group (nothing for one process)
    path = distributed.share_result(lambda: _outputs(options.output, options.force), world)
    model, data = load_run_and_data(options.run, options.data_dir, options.device, world)
    images, labels = _images(data, options.split, options.images)
    values = compute(model, images)
    if world.main:
        write_table(path, {**_identity(images, labels), **values})
    return path, path.with_suffix(".csv"), values


def encode_run(options: EncodeOptions, world: World = SINGLE) -> tuple[Path, Path, int]:
    """`vaelab encode`: the codes of a split's images under a run's encoder, written by rank 0
    (index, label where there are labels, then encode's arrays). Returns both files' paths and
    the number of images."""
    path, csv, codes = _write_for_run(options, world, lambda model, images: encode(
        model, images, seed=options.seed, draws=options.draws, progress=not options.quiet,
        world=world))
    return path, csv, len(codes["mu"])


def score_run(options: ScoreOptions, world: World = SINGLE) -> tuple[Path, Path, dict]:
    """`vaelab score`: each image's log p(x) for a split's images, written by rank 0 (index,
    label where there are labels, then score's arrays). Returns both files' paths and the
    scores."""
    return _write_for_run(options, world, lambda model, images: score(
        model, images, k=options.k, seed=options.seed, precision=options.precision,
        progress=not options.quiet, world=world))
