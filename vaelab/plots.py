"""Figures of a run. Each `*_figure` function returns a matplotlib Figure
(shown inline in a notebook); `draw_figures` saves them all into RUN/figures.

Uses matplotlib's object API (no pyplot), so it never touches a global
backend and works on machines without a display.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .data import Dataset
from .errors import VaelabError
from .fileio import check_output
from .images import stored
from .models import VAE
from .rng import image_keys
from .runs import read_eval

LABEL_COLOURS = "tab10"
TSNE_MIN_IMAGES = 10  # fewer test images than this draw no t-SNE: there is nothing to see


def image_grid(images: np.ndarray, nrow: int, pad: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Tile images into one picture.

    images: (N, H, W) grey or (N, H, W, 3) RGB in [0, 1]
    -> (rows * (H + pad) + pad, nrow * (W + pad) + pad[, 3]).
    """
    n, h, w = images.shape[:3]
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, *images.shape[3:]), pad_value,
                   dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid


def square_nrow(n: int) -> int:
    """Columns for a near-square grid of n images."""
    return math.ceil(math.sqrt(n))


def save_image_grid(path: str | Path, images: np.ndarray) -> None:
    """Save (N, H, W) grey or (N, H, W, 3) RGB images in [0, 1] as one near-square PNG."""
    from matplotlib.image import imsave

    imsave(path, image_grid(images, nrow=square_nrow(len(images))).clip(0, 1), cmap="gray", vmin=0, vmax=1)


def _as_images(x: torch.Tensor, shape: tuple[int, int, int]) -> np.ndarray:
    """x: (N, C, H, W) (or flat) in [0, 1] -> (N, H, W) numpy for C = 1, (N, H, W, C) otherwise."""
    c, h, w = shape
    images = x.detach().float().cpu().reshape(-1, c, h, w).numpy()
    return images[:, 0] if c == 1 else images.transpose(0, 2, 3, 1)


def _show(ax, grid: np.ndarray, **kwargs) -> None:
    """imshow a grey (H, W) or RGB (H, W, 3) picture in [0, 1], pixels unsmoothed."""
    ax.imshow(grid.clip(0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest", **kwargs)


def _grid_figure(grid: np.ndarray, title: str, inches: float = 6.0) -> Figure:
    aspect = grid.shape[0] / grid.shape[1]
    fig = Figure(figsize=(inches, inches * aspect + 0.5))
    ax = fig.subplots()
    _show(ax, grid)
    ax.set_title(title)
    ax.axis("off")
    fig.tight_layout()
    return fig


def elbo_figure(metrics: list[dict]) -> Figure:
    """Train and test ELBO (nats per image) against epoch; for a run of the IWAE bound, the
    bound's train and test values, and the test ELBO beside them."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    epochs = [m["epoch"] for m in metrics]
    iwae = all("test_iwae" in m for m in metrics)
    weighted = any("kl_weight" in m for m in metrics)  # then train_loss is the beta-weighted objective
    train_label = ("train: the objective with the KL weighted (not an ELBO)" if weighted
                   else "train (mean over the epoch's batches)")
    if iwae:
        ax.plot(epochs, [-m["train_loss"] for m in metrics], "o-", label="IWAE bound, train")
        ax.plot(epochs, [-m["test_iwae"] for m in metrics], "s-", label="IWAE bound, test")
        ax.plot(epochs, [-m["test_loss"] for m in metrics], "^--", label="ELBO, test")
    else:
        ax.plot(epochs, [-m["train_loss"] for m in metrics], "o-", label=train_label)
        ax.plot(epochs, [-m["test_loss"] for m in metrics], "s-", label="test")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{'bound' if iwae else 'ELBO'} (nats per image)")
    ax.set_title("IWAE bound and ELBO" if iwae else "Evidence lower bound")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def data_figure(data: Dataset, n: int = 100) -> Figure:
    """A grid of training images as stored (grey levels or colours, before binarization)."""
    images = _as_images(data.train_images[:n].float() / 255, data.image_shape)
    return _grid_figure(image_grid(images, nrow=10), f"{len(images)} training images")


def conditioning(model: VAE, labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The y a figure gives a conditional model for n images: their labels (N,) int64, or without
    them its classes 0, 1, 2, ... in turn; None for any other model."""
    if not model.conditional:
        return None
    if labels is None:
        labels = torch.arange(n) % max(len(model.config.classes), 1)
    return torch.as_tensor(labels[:n], dtype=torch.int64).to(model.device)


@torch.no_grad()
def reconstruction_images(model: VAE, images: torch.Tensor, seed: int = 0,
                          labels: torch.Tensor | None = None) -> np.ndarray:
    """images: (N, C, H, W), uint8 or floats in [0, 1] (images.stored) -> (2N, H, W) or
    (2N, H, W, 3) in [0, 1]: the N images as the model sees them (observed with the seed's
    keys), then their reconstructions E[x | z = mu(x)]. labels: theirs, for a conditional
    model."""
    images = stored(images, model.config.image_shape).to(model.device)
    x = model.observe(images, image_keys(seed, "observe", torch.arange(len(images), device=model.device)))
    y = conditioning(model, labels, len(x))
    recon = model.decode_mean(model.posterior_mean(x, y), y)
    shape = model.config.image_shape
    return np.concatenate([_as_images(x, shape), _as_images(recon, shape)])


def reconstruction_figure(model: VAE, data: Dataset, n: int = 16, seed: int = 0) -> Figure:
    """Test images (as the model sees them) above their reconstructions E[x | z = mu(x)]."""
    images = data.test_images[:n]
    labels = None if data.test_labels is None else data.test_labels[:n]
    grid = image_grid(reconstruction_images(model, images, seed, labels), nrow=len(images))
    fig = Figure(figsize=(max(len(images), 4) * 0.6, 1.8))
    ax = fig.subplots()
    _show(ax, grid)
    ax.set_xticks([])
    half = grid.shape[0] / 2
    ax.set_yticks([half / 2, half + half / 2], ["data", "reconstruction"])
    ax.set_title("Test images and their reconstructions (decoder mean at z = mu(x))")
    fig.tight_layout()
    return fig


INTERPOLATION_PAIRS = 6  # rows of interpolation.png
INTERPOLATION_STEPS = 10  # decoded codes per row, the two endpoints included


def interpolation_pairs(data: Dataset, n: int = INTERPOLATION_PAIRS) -> np.ndarray:
    """(P, 2) indices of test images to join, P = min(n, N // 2), the same for every run of a data
    set: taken in order, each image not yet used paired with the next unused one of a different
    label (a path between two images of one class shows less); without labels, or where no other
    label is left, with the next unused one."""
    labels = None if data.test_labels is None else data.test_labels.tolist()
    unused = list(range(len(data.test_images)))
    pairs = []
    while len(pairs) < n and len(unused) >= 2:
        a = unused.pop(0)
        b = next((i for i in unused if labels is None or labels[i] != labels[a]), unused[0])
        unused.remove(b)
        pairs.append((a, b))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def linear_path(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """a, b: (P, D) -> (P, steps, D): (1 - t) a + t b at t = 0, 1 / (steps - 1), ..., 1, so that
    the first and last codes are a and b themselves."""
    if steps < 2:
        raise ValueError(f"a path needs steps >= 2 (its two endpoints), got {steps}")
    t = torch.linspace(0, 1, steps, device=a.device, dtype=a.dtype)[:, None]
    return torch.lerp(a[:, None], b[:, None], t)


def _pair_indices(data: Dataset, pairs: int | np.ndarray | list) -> np.ndarray:
    """pairs: a number of pairs (interpolation_pairs) or explicit (P, 2) test indices -> (P, 2)."""
    n = len(data.test_images)
    counted = isinstance(pairs, (int, np.integer))
    index = interpolation_pairs(data, int(pairs)) if counted else np.asarray(pairs, np.int64)
    if index.ndim != 2 or index.shape[1] != 2 or len(index) == 0:
        raise ValueError(f"pairs must be a positive number or (P, 2) test indices, got shape "
                         f"{index.shape}" + (f" from {n} test images" if counted else ""))
    if index.min() < 0 or index.max() >= n:
        raise ValueError(f"pair indices must lie in 0 .. {n - 1}, the test images")
    return index


@torch.no_grad()
def _interpolate(model: VAE, data: Dataset, pairs: int | np.ndarray | list, steps: int,
                 seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """-> x: (P, 2, C, H, W) the pairs' test images as the model sees them (each observed with
    its own key, as in reconstructions.png), and `interpolation`'s (P, steps, H, W[, C])."""
    index = torch.from_numpy(_pair_indices(data, pairs)).flatten().to(model.device)
    images = data.test_images.to(model.device)[index]
    x = model.observe(images, image_keys(seed, "observe", index))
    labels = None if data.test_labels is None else data.test_labels.to(model.device)[index]
    y = conditioning(model, labels, len(x))
    mu = model.posterior_mean(x, y)
    mu = mu.view(-1, 2, mu.shape[-1])
    path = linear_path(mu[:, 0], mu[:, 1], steps)  # (P, steps, z_dim)
    # a conditional model decodes each path under its first image's label
    y_path = None if y is None else y.view(-1, 2)[:, :1].expand(-1, steps)
    decoded = _as_images(model.decode_mean(path, y_path), model.config.image_shape)
    return x.view(-1, 2, *x.shape[1:]), decoded.reshape(*path.shape[:2], *decoded.shape[1:])


@torch.no_grad()
def interpolation(model: VAE, data: Dataset, pairs: int | np.ndarray | list = INTERPOLATION_PAIRS,
                  steps: int = INTERPOLATION_STEPS, seed: int = 0) -> np.ndarray:
    """Decoder means along straight lines between the posterior means of pairs of test images:
    (P, steps, H, W) grey or (P, steps, H, W, C) colour, in [0, 1]. Column 0 decodes image a's
    mean, column steps - 1 image b's, column k the code (1 - t) mu_a + t mu_b, t = k / (steps - 1).

    pairs: how many pairs (interpolation_pairs chooses them), or explicit (P, 2) test indices.
    The mean is VAE.posterior_mean: with an IAF posterior the flow's draw at eps = 0, with a
    hierarchy z_1's, the layer the decoder takes.

    Linear, not spherical: slerp suits draws from N(0, I), which in high dimensions lie on a thin
    shell of radius sqrt(z_dim) that a straight chord would leave. Posterior means are not such
    draws: they are points of the aggregate posterior, inside that shell, and the straight line
    between two of them assumes nothing of the prior's shape (standard, mog or vamp alike).
    """
    return _interpolate(model, data, pairs, steps, seed)[1]


@torch.no_grad()
def interpolation_figure(model: VAE, data: Dataset,
                         pairs: int | np.ndarray | list = INTERPOLATION_PAIRS,
                         steps: int = INTERPOLATION_STEPS, seed: int = 0) -> Figure:
    """One row per pair of test images: image a as the model sees it, the decoded linear path
    between the two posterior means (`interpolation`: its ends the decoded means), then image b."""
    x, path = _interpolate(model, data, pairs, steps, seed)
    shape = data.image_shape
    ends = [image_grid(_as_images(x[:, j], shape), nrow=1) for j in (0, 1)]
    middle = image_grid(path.reshape(-1, *path.shape[2:]), nrow=steps)
    h, w = path.shape[2:4]
    gap = np.ones((middle.shape[0], max(w // 2, 2), *middle.shape[2:]), dtype=np.float32)
    grid = np.concatenate([ends[0], gap, middle, gap, ends[1]], axis=1)
    fig = Figure(figsize=(max(steps + 3, 6) * 0.6, len(path) * 0.6 * h / w + 1.0))
    ax = fig.subplots()
    _show(ax, grid)
    centre = lambda start, k=0: start + 2 + k * (w + 2) + (w - 1) / 2  # image_grid's pad: 2
    middle_start = ends[0].shape[1] + gap.shape[1]
    ticks = [centre(0), *(centre(middle_start, k) for k in range(steps)),
             centre(grid.shape[1] - ends[1].shape[1])]
    ts = np.linspace(0, 1, steps)
    ax.set_xticks(ticks, ["a"] + [f"{t:.2g}" for t in ts] + ["b"], fontsize=7)
    ax.set_xlabel("test image a, decoded codes (1 - t) mu_a + t mu_b, test image b")
    ax.set_yticks([])
    ax.set_title("Linear paths between posterior means of test images (decoder means)")
    fig.tight_layout()
    return fig


@torch.no_grad()
def samples_figure(model: VAE, n: int = 64, seed: int = 0) -> Figure:
    """Decoder means E[x|z] for z ~ p(z), the model's prior."""
    images = sample_images(model, n, seed)
    return _grid_figure(image_grid(images, nrow=square_nrow(n)), f"{n} samples from the prior (decoder means)")


def write_samples(run_dir: str | Path, output: str | Path, n: int = 64, seed: int = 0,
                  force: bool = False, label: str | int | None = None,
                  temperature: float = 1.0) -> Path:
    """`vaelab sample`: a PNG grid of n decoder means of a run's model for z ~ p(z); a
    conditional model's of class `label` (a name or number; without one, its classes in turn).
    An existing file is overwritten only with force."""
    from .runs import load_run  # runs imports the evaluation, which this module's figures use

    path = check_output(output, flag="-o", suffix=".png", force=force)  # before the run is read
    model = load_run(run_dir)
    labels = None if label is None else torch.full((n,), model.label_number(label))
    try:
        save_image_grid(path, sample_images(model, n, seed, labels, temperature))
    except OSError as e:
        raise VaelabError(f"cannot write {path} ({e.strerror or e})") from None
    return path


@torch.no_grad()
def sample_images(model: VAE, n: int = 64, seed: int = 0,
                  labels: torch.Tensor | None = None, temperature: float = 1.0) -> np.ndarray:
    """(n, H, W) or (n, H, W, 3) decoder means for n draws z ~ p(z); a conditional model's
    under labels (n,) (default: 0, 1, 2, ... in turn); a top-down hierarchy's with its priors'
    standard deviations times temperature."""
    generator = torch.Generator(model.device).manual_seed(seed)
    y = conditioning(model, labels, n)
    if temperature != 1.0:
        if not model.top_down:
            raise VaelabError("--temperature scales the priors of a top-down hierarchy (--model"
                              " topdown); this run's model samples at 1")
        z = model.sample_prior(n, generator, temperature=temperature)
    else:
        z = model.sample_prior(n, generator, y)
    return _as_images(model.decode_mean(z, y), model.config.image_shape)


TEMPERATURES = (1.0, 0.9, 0.8, 0.7, 0.5)  # rows of temperatures.png


@torch.no_grad()
def temperature_figure(model: VAE, n: int = 10, seed: int = 0) -> Figure:
    """A top-down hierarchy's samples, a row per temperature (TEMPERATURES), each row from the
    same noise: lower temperatures trade variety for clean strokes (Child 2021)."""
    rows = [sample_images(model, n, seed, temperature=t) for t in TEMPERATURES]
    grid = image_grid(np.concatenate(rows), nrow=n)
    fig = Figure(figsize=(n * 0.6, len(rows) * 0.6 + 0.6))
    ax = fig.subplots()
    _show(ax, grid)
    ax.set_xticks([])
    step = grid.shape[0] / len(rows)
    ax.set_yticks([step * (i + 0.5) for i in range(len(rows))], [f"T = {t}" for t in TEMPERATURES])
    ax.set_title("Samples by the priors' temperature (decoder means)")
    fig.tight_layout()
    return fig


@torch.no_grad()
def layers_figure(model: VAE, data: Dataset, n: int = 8, seed: int = 0,
                  temperature: float = 0.8) -> Figure:
    """What a hierarchy's layers encode: each test image (a row, as the model sees it), then
    decoded with its top k layers at q's means and the rest drawn from the priors at
    temperature, for k = 1, ..., L (at most 8 values of k, spread evenly)."""
    images = data.test_images[:n].to(model.device)
    x = model.observe(images, image_keys(seed, "observe", torch.arange(len(images),
                                                                       device=model.device)))
    layers = len(model.sizes)
    ks = sorted({round(1 + i * (layers - 1) / 7) for i in range(8)}) if layers > 8 \
        else list(range(1, layers + 1))
    shape = model.config.image_shape
    columns = [_as_images(x, shape)]
    for k in ks:
        generator = torch.Generator(model.device).manual_seed(seed)
        z = model.reconstruct_top(x, k, generator, temperature=temperature)
        columns.append(_as_images(model.decode_mean(z), shape))
    tiles = np.stack(columns, 1).reshape(-1, *columns[0].shape[1:])  # row by row
    grid = image_grid(tiles, nrow=len(columns))
    fig = Figure(figsize=(len(columns) * 0.7, len(images) * 0.7 + 0.8))
    ax = fig.subplots()
    _show(ax, grid)
    ax.set_yticks([])
    step = grid.shape[1] / len(columns)
    ax.set_xticks([step * (i + 0.5) for i in range(len(columns))],
                  ["data", *(f"top {k}" for k in ks)])
    ax.set_title(f"Decoded from the top k layers, the rest from the priors (T = {temperature})",
                 fontsize=9)
    fig.tight_layout()
    return fig


CLASS_SAMPLES = 10  # columns of classes.png
CLASS_ROWS = 20  # the classes it shows at most


@torch.no_grad()
def class_samples(model: VAE, samples: int = CLASS_SAMPLES, seed: int = 0,
                  classes: int = CLASS_ROWS) -> np.ndarray:
    """A conditional model's samples by class: (K, samples, H, W[, 3]) decoder means for z ~
    p(z|y) (or p(z)) under each of its first K = min(classes, its classes) labels, each image
    its own draw of z."""
    k = min(classes, len(model.config.classes))
    y = torch.arange(k).repeat_interleave(samples)
    images = sample_images(model, k * samples, seed, y) if k else np.zeros((0,))
    return images.reshape(k, samples, *images.shape[1:])


def class_figure(model: VAE, samples: int = CLASS_SAMPLES, seed: int = 0) -> Figure:
    """classes.png: one row of samples per class of a conditional model, named by its class."""
    images = class_samples(model, samples, seed)
    names = model.config.classes
    grid = image_grid(images.reshape(-1, *images.shape[2:]), nrow=samples)
    h = images.shape[2]
    fig = Figure(figsize=(samples * 0.6 + 1.2, len(images) * 0.6 * h / images.shape[3] + 0.8))
    ax = fig.subplots()
    _show(ax, grid)
    ax.set_xticks([])
    ax.set_yticks([2 + r * (h + 2) + (h - 1) / 2 for r in range(len(images))],
                  [n.replace("$", r"\$") for n in names[:len(images)]])
    more = f" (the first {len(images)} of {len(names)})" if len(names) > len(images) else ""
    ax.set_title(f"Samples by class{more}: decoder means for z ~ p(z|y)")
    fig.tight_layout()
    return fig


@torch.no_grad()
def manifold_figure(model: VAE, n: int = 20, limit: float = 4.0) -> Figure:
    """For z_dim = 2: decoder means over an n x n grid of [-limit, limit]^2."""
    if model.config.z_dim != 2:
        raise ValueError("the latent manifold needs z_dim = 2")
    values = torch.linspace(-limit, limit, n)
    z1, z0 = torch.meshgrid(values.flip(0), values, indexing="ij")  # z_1 grows upwards
    z = torch.stack([z0.flatten(), z1.flatten()], dim=1).to(model.device)
    images = _as_images(model.decode_mean(z, conditioning(model, torch.zeros(len(z)), len(z))),
                        model.config.image_shape)  # a conditional model's under label 0
    grid = image_grid(images, nrow=n, pad=0)
    fig = Figure(figsize=(8, 8))
    ax = fig.subplots()
    _show(ax, grid, extent=(-limit, limit, -limit, limit), aspect=grid.shape[0] / grid.shape[1])  # images unstretched
    ax.set_xlabel("z_0")
    ax.set_ylabel("z_1")
    ax.set_title(f"Latent manifold: decoder means on a {n} x {n} grid")
    fig.tight_layout()
    return fig


@torch.no_grad()
def latent_means(model: VAE, data: Dataset, n: int | None = None, seed: int = 0) -> np.ndarray:
    """(N, z_dim) the first n test images' codes z(x) at the posterior's mean (VAE.posterior_mean)."""
    images = data.test_images[:n].to(model.device)
    keys = image_keys(seed, "observe", torch.arange(len(images), device=model.device))
    labels = None if data.test_labels is None else data.test_labels[:n]
    y = conditioning(model, labels, len(images))
    mus = [model.posterior_mean(model.observe(images[i:i + 1000], keys[i:i + 1000]),
                                None if y is None else y[i:i + 1000])
           for i in range(0, len(images), 1000)]
    return torch.cat(mus).cpu().numpy()


def _scatter_by_label(points: np.ndarray, labels: torch.Tensor | None, data: Dataset, title: str,
                      xlabel: str, ylabel: str) -> Figure:
    """points: (N, 2); labels: (N,) or None (one colour, no legend); their names and legend from data."""
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.6)
    else:
        legend, names = label_legend(data)
        labels = labels.numpy()
        for label in np.unique(labels):
            sel = labels == label
            name = names[label] if names else str(label)
            ax.scatter(points[sel, 0], points[sel, 1], s=3, alpha=0.6, color=label_colour(int(label)),
                       label=name.replace("$", r"\$"))  # a folder's name, not mathtext
        ax.legend(title=legend, markerscale=4, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def label_colour(label: int) -> tuple[float, float, float, float]:
    """The colour of a label in every scatter (and the report's explorer): tab10, cycling after 10."""
    return matplotlib.colormaps[LABEL_COLOURS](label % 10)


def label_legend(data: Dataset) -> tuple[str, list[str] | None]:
    """The legend's title and each label's name."""
    names = list(data.label_names) if data.label_names else None
    return ("digit" if data.verified else "class" if data.source == "folder" else "label"), names


def latent_figure(model: VAE, data: Dataset) -> Figure:
    """For z_dim = 2: the test set's posterior means, coloured by label where there are labels."""
    if model.config.z_dim != 2:
        raise ValueError("the latent scatter needs z_dim = 2; use tsne_figure")
    mu = latent_means(model, data)
    return _scatter_by_label(mu, data.test_labels, data, f"Posterior means of {len(mu)} test images",
                             "mu_0", "mu_1")


def tsne_figure(model: VAE, data: Dataset, n: int = 3000, seed: int = 0) -> Figure:
    """For z_dim > 2: a 2-D t-SNE of the first n test images' posterior means."""
    from sklearn.manifold import TSNE

    mu = latent_means(model, data, n)
    points = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, len(mu) - 1)).fit_transform(mu)
    labels = None if data.test_labels is None else data.test_labels[:n]
    return _scatter_by_label(points, labels, data,
                             f"t-SNE of the posterior means of {len(mu)} test images (z_dim={model.config.z_dim})",
                             "t-SNE 1", "t-SNE 2")


def kl_figure(kl_per_dim: list[float]) -> Figure:
    """The KL of each latent dimension (mean over test images, nats), largest first."""
    order = np.argsort(kl_per_dim)[::-1]
    values = np.asarray(kl_per_dim)[order]
    fig = Figure(figsize=(max(4.0, min(12.0, 0.25 * len(values) + 2)), 3.5))
    ax = fig.subplots()
    ax.bar(np.arange(len(values)), values, color="#4c72b0")
    if len(values) <= 50:  # room for each dimension's number
        ax.set_xticks(np.arange(len(values)), [str(d) for d in order], fontsize=7)
    ax.set_xlabel("latent dimension d (from 0, as the CSV's mu_d), by KL")
    ax.set_ylabel("KL(q(z_d|x) || p(z_d)) (nats)")
    ax.set_title(f"KL per latent dimension: {values.sum():.2f} nats in all")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def draw_kl_figure(run_dir: str | Path, evaluation: dict | None) -> Path | None:
    """RUN/figures/kl_per_dim.png from an evaluation that has the KL per dimension."""
    if not evaluation or "kl_per_dim" not in evaluation:
        return None
    path = Path(run_dir) / "figures" / "kl_per_dim.png"
    path.parent.mkdir(exist_ok=True)
    kl_figure(evaluation["kl_per_dim"]).savefig(path, dpi=100)
    return path


def draw_figures(run_dir: str | Path, model: VAE, data: Dataset, metrics: list[dict]) -> list[Path]:
    """Draw every figure of a run into RUN/figures and return their paths (with the KL per
    dimension once the run is evaluated)."""
    out = Path(run_dir) / "figures"
    out.mkdir(exist_ok=True)
    figures = {
        "elbo.png": lambda: elbo_figure(metrics),
        "data.png": lambda: data_figure(data),
        "reconstructions.png": lambda: reconstruction_figure(model, data),
    }
    if model.can_sample:  # a VQ-VAE's once its prior is trained
        figures["samples.png"] = lambda: samples_figure(model)
    if model.conditional:
        figures["classes.png"] = lambda: class_figure(model)
    if model.top_down:
        figures["temperatures.png"] = lambda: temperature_figure(model)
        figures["layers.png"] = lambda: layers_figure(model, data)
    if len(data.test_images) >= 2:  # a pair to join
        figures["interpolation.png"] = lambda: interpolation_figure(model, data)
    if model.plane:
        figures["manifold.png"] = lambda: manifold_figure(model)
        figures["latent.png"] = lambda: latent_figure(model, data)
    elif len(data.test_images) >= TSNE_MIN_IMAGES:
        figures["tsne.png"] = lambda: tsne_figure(model, data)
    paths = []
    for name, make in figures.items():
        if name == "elbo.png" and not metrics:
            continue
        make().savefig(out / name, dpi=100)
        paths.append(out / name)
    kl = draw_kl_figure(run_dir, read_eval(run_dir))
    return paths + ([kl] if kl else [])
