"""Codes and scores of any images a run's model fits, for downstream work.

- `encode`: each image's posterior parameters (the latent code), with E_q[z] where it has no
  closed form;
- `score`: each image's log p(x) by importance sampling, the same computation as `vaelab
  evaluate` (sampling.importance_sampled), so scoring a run's own test set with evaluate's k,
  seed and precision gives its per-image values bitwise on the CPU.

`encode_run` and `score_run` (the commands) write FILE.npz and the same columns as FILE.csv,
after what identifies each image: its index, split, file (for a folder) and label (`listing`).
What image i draws is keyed by (seed, i), i its position in the listing, as in evaluation.
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import distributed, progress as show
from .config import READ_OPTIONS, EncodeOptions, ScoreOptions, check_option
from .data import Dataset
from .distributed import SINGLE, World
from .errors import VaelabError
from .fileio import atomic_write_bytes, check_output
from .images import stored
from .models import VAE
from .rng import image_keys
from .sampling import bits_per_dim, draw_noise, importance_sampled
from .start import open_run

BATCH = 500  # images encoded at a time


@torch.no_grad()
def encode(model: VAE, images: torch.Tensor, *, seed: int = 1234, draws: int = 100,
           progress: bool = False, world: World = SINGLE,
           labels: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """The latent codes of images: (N, C, H, W), uint8 or floats in [0, 1] (images.stored: the
    same images in either form give the same codes).

    Returns float32 arrays:
      mu, logvar  (N, z_dim) q(z_1|x)'s Gaussian: with --posterior iaf, the flow's base Gaussian;
                  (N, noise_dim) a top-down hierarchy's every layer (Model.gaussian)
      z_mean      (N, noise_dim) E_q[z] of every layer (z_1, then z_2, ...), the mean of `draws`
                  keyed draws; only where it is not mu: an IAF posterior or a bottom-up hierarchy
    labels: (N,) the images' labels, which a conditional model reads (and needs).
    Under torchrun the ranks share the batches and every rank gets every image's values.
    """
    model.eval()
    images = stored(images, model.config.image_shape)
    device, n = model.device, len(images)
    if model.conditional and labels is None:
        raise VaelabError("this model is conditional: encoding needs the images' labels")
    drawn = model.latent_mean_columns < model.noise_dim
    width = 2 * model.units + (model.noise_dim if drawn else 0)
    values = torch.zeros((n, width), dtype=torch.float32, device=device)
    components = model.prior_components() if drawn and not model.conditional else None
    starts = range(0, n, BATCH)[world.rank::world.size]
    bar = show.bar(n, "encoding", progress and world.main, unit="image")
    for start in starts:
        index = torch.arange(start, min(start + BATCH, n), device=device)
        x = model.observe(images[start:start + BATCH].to(device),
                          image_keys(seed, "observe", index))
        y = None if not model.conditional else labels[start:start + BATCH].to(device)
        q = model.posterior_params(x, y)
        parts = list(model.gaussian(q))
        if drawn:
            eps = draw_noise(image_keys(seed, "noise", index), model.noise_dim, draws)
            parts.append(model(x, eps, posterior=q, components=components, y=y).z.mean(0))
        values[index] = torch.cat(parts, dim=1)
        bar.update(len(index) * world.size)
    bar.close()
    values = distributed.all_sum(values, world).cpu().numpy()  # zeros elsewhere: exact
    units = model.units
    out = {"mu": values[:, :units], "logvar": values[:, units:2 * units]}
    if drawn:
        out["z_mean"] = values[:, 2 * units:]
    return out


def score(model: VAE, images: torch.Tensor, *, k: int = 5000, seed: int = 1234,
          precision: str = "fp32", progress: bool = False, world: World = SINGLE,
          labels: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Each image's log p(x) by importance sampling with K = k draws from q(z|x): images
    (N, C, H, W), uint8 or floats in [0, 1] (images.stored: the same images in either form give
    the same scores) -> float64 arrays (N,):
      log_px          the estimate, nats
      log_px_se       its Monte-Carlo standard error
      elbo            the ELBO from the same draws
      bits_per_dim    -log p(x) / (C H W log 2), for the discrete likelihoods only
    labels: (N,) the images' labels, which a conditional model reads (and needs).
    """
    images = stored(images, model.config.image_shape)
    r = importance_sampled(model, images, k=k, seed=seed, precision=precision,
                           progress=progress, world=world, labels=labels)
    out = {"log_px": r["log_px"], "log_px_se": np.sqrt(r["per_image"]["log_px_variance"]),
           "elbo": r["per_image"]["elbo"]}
    if model.likelihood.discrete:
        out["bits_per_dim"] = bits_per_dim(-r["log_px"], images.shape[1:])
    return out


def default_split(data: Dataset) -> str:
    """The split `vaelab encode` and `vaelab score` take when none is given: "all" for a folder of
    images or an .npz file (every image you brought; the train/test split is only vaelab's own
    hold-out), "test" for IDX files such as MNIST, whose test set is the benchmark and whose values
    are then `vaelab evaluate`'s."""
    return "test" if data.source == "idx" else "all"


def listing(data: Dataset, split: str | None = None,
            first: int | None = None) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """The images of a split (None: default_split), the first `first` of them (all when None),
    with what identifies each: images (N, C, H, W) uint8 and (N,) arrays index (its position,
    which keys its draws), split ("train" or "test"), file (a folder's, relative to it) and label
    where the data has them. "all" lists the test images first, so that theirs are the values of
    "test" and of `vaelab evaluate`, then the training images."""
    split = split or default_split(data)
    check_option(ScoreOptions, "split", split)
    parts = {"test": (data.test_images, data.test_labels, data.test_files),
             "train": (data.train_images, data.train_labels, data.train_files)}
    chosen = ("test", "train") if split == "all" else (split,)
    if not sum(len(parts[name][0]) for name in chosen):
        raise VaelabError(f"the data in {data.directory} has no {split} images")
    images, labels, files, names = [], [], [], []
    left = first
    for name in chosen:
        part_images, part_labels, part_files = (p if p is None else p[:left] for p in parts[name])
        left = None if left is None else left - len(part_images)
        images.append(part_images)
        labels.append(part_labels)
        files.append(part_files)
        names += [name] * len(part_images)
    images = images[0] if len(images) == 1 else torch.cat(images)
    out = {"index": np.arange(len(images), dtype=np.int64), "split": np.array(names, dtype=str)}
    if data.test_files is not None:
        out["file"] = np.array([f for part in files for f in part], dtype=str)
    if data.test_labels is not None:
        out["label"] = torch.cat(labels).cpu().numpy().astype(np.int64)
    return images, out


def _columns(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The CSV's columns: a (N,) array as one column, a (N, D) array as name_0 ... name_D-1."""
    columns = {}
    for name, v in values.items():
        if v.ndim == 1:
            columns[name] = v
        else:
            columns.update({f"{name}_{d}": v[:, d] for d in range(v.shape[1])})
    return columns


def _cell(kind: str) -> Callable:
    """How a CSV cell writes a value of numpy kind `kind`: integers as integers, floats by repr
    (every bit kept), text as it is (the csv module quotes it where it must)."""
    if kind in "iu":
        return lambda v: str(int(v))
    if kind in "US":
        return str
    return lambda v: repr(float(v))


def write_table(path: Path, values: dict[str, np.ndarray]) -> tuple[Path, Path]:
    """values (each with one row per image) as path (.npz) and the same columns as path's .csv,
    both written atomically."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:  # np.savez, which takes no key named "file"
        for name, array in values.items():
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())
    columns = _columns(values)
    cells = [list(map(_cell(c.dtype.kind), c.tolist())) for c in columns.values()]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(zip(*cells))
    path_csv = path.with_suffix(".csv")
    atomic_write_bytes(path_csv, text.getvalue().encode())
    return path, path_csv


def _outputs(output: str, force: bool) -> None:
    """FILE.npz, and its FILE.csv, checked before any work."""
    path = check_output(output, flag="-o", suffix=".npz", force=force)
    check_output(path.with_suffix(".csv"), flag="-o", suffix=".csv", force=force)


def _write_for_run(options, world: World, compute, command: str) -> tuple[Path, Path, dict]:
    """encode_run's and score_run's path: the output checked, the run and its split's images
    loaded, compute(model, images, labels) on every rank (labels: a conditional model's, the
    data's or --label's), and its arrays written by rank 0 after what identifies each image
    (`listing`). Returns both files' paths and the table written."""
    model, data = open_run(options, world, outputs=lambda: _outputs(options.output, options.force),
                           sampled=command,
                           **{name: getattr(options, name) for name in READ_OPTIONS})
    path = Path(options.output)  # as _outputs checked it
    images, identity = listing(data, options.split, options.images)
    if options.label is not None:
        labels = torch.full((len(images),), model.label_number(options.label))
    else:
        labels = torch.from_numpy(identity["label"]) if "label" in identity else None
    labels = model.checked_labels(labels)
    table = {**identity, **compute(model, images, labels)}
    if world.main:
        write_table(path, table)
    return path, path.with_suffix(".csv"), table


def encode_run(options: EncodeOptions, world: World = SINGLE) -> tuple[Path, Path, dict]:
    """`vaelab encode`: the codes of a split's images under a run's encoder, written by rank 0
    (index, split, file for a folder, label where there are labels, then encode's arrays).
    Returns both files' paths and the table written, by column."""
    return _write_for_run(options, world, lambda model, images, labels: encode(
        model, images, seed=options.seed, draws=options.draws, progress=not options.quiet,
        world=world, labels=labels), "encode")


def score_run(options: ScoreOptions, world: World = SINGLE) -> tuple[Path, Path, dict]:
    """`vaelab score`: each image's log p(x) for a split's images, written by rank 0 (index,
    split, file for a folder, label where there are labels, then score's arrays). Returns both
    files' paths and the table written, by column."""
    return _write_for_run(options, world, lambda model, images, labels: score(
        model, images, k=options.k or model.default_k, seed=options.seed,
        precision=options.precision,
        progress=not options.quiet, world=world, labels=labels), "score")
