"""What the latent code is used for, and comparing two evaluations.

- `diagnostics`: active units per layer (Burda et al.'s criterion: the variance over test
  images of E_q[z_d] above ACTIVE_THRESHOLD), that variance, and the KL per dimension, from
  what importance sampling (sampling.importance_sampled) found for each test image;
- `fingerprint`: the SHA-256 of a test set, which an evaluation records;
- `compare` / `compare_runs`: the paired difference of two evaluations over the same images,
  as `vaelab compare` reports it.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch

from .errors import VaelabError
from .models import VAE
from .runs import read_eval, read_log_px


ACTIVE_THRESHOLD = 0.01  # Burda et al. (2015): a unit is active if Cov_x(E_q[z_d]) exceeds it


def diagnostics(model: VAE, posterior_means: torch.Tensor, kl_per_image: torch.Tensor | None,
                k: int, closed_means: int | None = None,
                kl_per_layer: torch.Tensor | None = None) -> dict:
    """What the latent code is used for, over the test images.

    posterior_means: (N, noise_dim) E_q[z] of each image, every layer's; kl_per_image: (N, z_dim)
    each dimension's KL(q(z_d|x) || p(z_d)), or None where q and p do not factorize over
    dimensions. Returns active_units per layer (z_1 first; Burda et al.'s criterion: the
    variance over test images of E_q[z_d] above ACTIVE_THRESHOLD), that variance per dimension,
    how E_q[z] was found, and kl_per_dim (mean over images, nats) or the reason it is left out.
    A mean from K draws carries Var_q / K of Monte-Carlo noise into the variance: negligible at
    the default K=5000, but it can lift a unit over the threshold at K below a hundred or so.
    closed_means: how many of the first columns are in closed form (default: all of them).
    kl_per_layer: (N, L) a hierarchy's KL of each layer given the layers above (Model.kl_per_layer),
    recorded as kl_per_layer, the mean over images (nats), in the order of model.sizes.
    """
    sizes = model.sizes
    closed = sum(sizes) if closed_means is None else closed_means
    n = len(posterior_means)
    layers = posterior_means.split(sizes, dim=-1)
    variance = [m.var(0) if n > 1 else torch.zeros(m.shape[1], dtype=m.dtype) for m in layers]
    drawn = f"the mean of the K={k} importance samples of z from q(z|x)"
    out = {
        "active_units": [int((v > ACTIVE_THRESHOLD).sum()) for v in variance],
        "active_threshold": ACTIVE_THRESHOLD,
        "latent_variance": [v.tolist() for v in variance],
        "posterior_mean": (model.posterior_mean_note or "mu of q(z|x)" if closed >= sum(sizes) else
                           drawn if closed == 0 else f"layer 1: mu of q(z_1|x); above: {drawn}"),
    }
    if kl_per_image is not None:
        out["kl_per_dim"] = kl_per_image.mean(0).tolist()
    else:
        out["kl_per_dim_note"] = f"KL per dimension left out: {model.kl_per_dim_note()}"
    if kl_per_layer is not None:
        out["kl_per_layer"] = kl_per_layer.mean(0).tolist()
    return out


def fingerprint(images: torch.Tensor) -> str:
    """SHA-256 of the test images' bytes and shape: two evaluations pair only on the same images."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def compare(a: dict, log_px_a: np.ndarray, b: dict, log_px_b: np.ndarray) -> dict:
    """The paired difference NLL(a) - NLL(b) over the same test images, with its standard error.

    a, b: two eval.json records; log_px_*: their per-image estimates. Pairing removes the
    spread between images, which is far larger than either estimate's Monte-Carlo error.
    The same draws decoded at two precisions pair too (bf16 moves log p(x) far less than its
    Monte-Carlo error); "precisions" then names both, else it is None. A conditional model's
    log p(x|y) pairs with another's log p(x): what knowing the label is worth, log p(y|x) -
    log p(y) for exact likelihoods, so at most -log p(y) (log 10 for ten equally frequent
    classes); "quantities" then names both, else it is None. Estimates with different K pair
    too (a top-down hierarchy's default K is smaller than a VAE's): "ks" then names both, else
    it is None; an estimate's bias is towards a lower log p(x), the more so the smaller its K.
    """
    for key, what in (("seed", "seed"), ("test_set_sha256", "test set")):
        if a.get(key) != b.get(key):
            raise VaelabError(f"the two runs were evaluated with different {what} ({a.get(key)} and {b.get(key)}); "
                              "evaluate both the same way to compare them")
    if log_px_a.shape != log_px_b.shape:
        raise VaelabError(f"the per-image values have different lengths ({len(log_px_a)} and {len(log_px_b)})")
    d = -(log_px_a - log_px_b)  # per-image NLL(a) - NLL(b)
    n = len(d)
    return {"difference": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
            "mc_se": math.sqrt(a["nll_se"] ** 2 + b["nll_se"] ** 2), "images": n,
            "nll_a": a["nll"], "nll_b": b["nll"],
            "precisions": None if a.get("precision") == b.get("precision") else
            (a.get("precision"), b.get("precision")),
            "quantities": None if quantity(a) == quantity(b) else (quantity(a), quantity(b)),
            "estimates": None if estimate(a) == estimate(b) else (estimate(a), estimate(b)),
            "ks": (None if a.get("k") == b.get("k") or "bound" in (estimate(a), estimate(b))
                   else (a.get("k"), b.get("k")))}


def estimate(record: dict) -> str:
    """How an evaluation got its numbers: "importance sampling", or "bound" (a VQ-VAE's)."""
    return record.get("estimate", "importance sampling")


def quantity(record: dict) -> str:
    """What an evaluation estimated: log p(x), or a conditional model's log p(x|y)."""
    return record.get("quantity", "log p(x)")


def compare_runs(run_a: str | Path, run_b: str | Path) -> dict:
    """`compare` of two evaluated run directories (their eval.json and log_px.npy), with the k
    they were evaluated with."""
    records = []
    for run in (run_a, run_b):
        record, log_px = read_eval(run), read_log_px(run)
        if record is None or log_px is None:
            missing = "eval.json" if record is None else "log_px.npy"
            raise VaelabError(f"{run} has no {missing}: run `vaelab evaluate {run}` first")
        records.append((record, log_px))
    (a, pa), (b, pb) = records
    return {**compare(a, pa, b, pb), "k": a.get("k") or b.get("k")}
