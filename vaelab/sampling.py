"""The test set and what is computed over it, in nats per image.

- `TestSet` / `mean_loss` / `test_means`: the test set with its keyed pixels and noise, and an
  objective's mean over it: the per-epoch test loss and KL.
- `importance_sampled`: log p(x) per image by importance sampling with q(z|x) as
  proposal (Burda et al. 2015): log p(x) ~ logsumexp_k log w_k - log K, and from
  the same weights the IWAE bounds for smaller k. Memory is bounded for any K.
- `bits_per_dim`: nats per image in bits per pixel and channel.
- the decoder's precision (`resolve_precision`) and the tiles' sizes.

What test image i draws (its pixels, and noise for sample j) is keyed by
(seed, i) alone. Importance sampling runs in fixed tiles of TILE_IMAGES images
x TILE_SAMPLES samples (the last padded), adding sample tiles in order, so on
the CPU each image's estimate is bitwise the same whatever the test size or the
launch size. On CUDA a launch stacks as many tiles as memory allows.

What the latent code is used for (`diagnostics.diagnostics`) is found from the same pass.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import distributed, progress as show, rng
from .config import EvaluateOptions, check_option
from .diagnostics import ACTIVE_THRESHOLD, diagnostics, fingerprint
from .distributed import SINGLE, World
from .errors import VaelabError
from .images import stored
from .models import VAE
from .nets import Workspace
from .objectives import BOUNDS, log_weights
from .rng import image_keys

TILE_IMAGES = 50
TILE_SAMPLES = 50   # IWAE bounds need k that divides it or is a multiple of it
# Bytes a CPU call may create, in layer outputs and the likelihood's temporaries (about what a tile
# of the tutorial's MLP makes in float32): a wider decoder, such as the conv preset's, or a
# likelihood with more temporaries takes a tile's samples in several calls. Tensors this small are
# reused from the allocator's heap; larger ones would be mapped and page-faulted afresh per tile.
CPU_CALL_BYTES = 12 * 2**20


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively (not emulated) on device."""
    if device.type == "cuda":  # Ampere (8.x) and later; is_bf16_supported() also counts emulation
        return torch.cuda.get_device_capability(device)[0] >= 8
    try:  # Linux: the CPU's own flags; elsewhere assume emulation and say no
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device, own_decoder: bool = True) -> str:
    """The decoder's arithmetic: "auto" picks bf16 where it is native and the decoder is one of
    vaelab's own (which can hold bf16 weights); your own decoders run in float32."""
    check_option(EvaluateOptions, "precision", precision)
    if precision == "bf16" and not own_decoder:
        raise VaelabError("--precision bf16 needs one of vaelab's own decoders; yours runs in fp32")
    if precision == "auto":
        return "bf16" if own_decoder and native_bf16(device) else "fp32"
    return precision


def draw_noise(keys: torch.Tensor, z_dim: int, samples: int, first: int = 0) -> torch.Tensor:
    """Samples first .. first+samples-1 of each image's noise: (N,) keys -> (samples, N, z_dim)."""
    eps = rng.normal(keys, samples * z_dim, start=first * z_dim)
    return eps.view(len(keys), samples, z_dim).transpose(0, 1)


@dataclass
class TestSet:
    """Test images and the seed of what the model sees of them: test image i's pixels and noise
    are keyed by (seed, i) alone and drawn as a batch is read (`draw`), so every epoch sees the
    same draws and memory stays that of the uint8 images.

    images: (N, C, H, W) uint8. Sample j of image i's noise is the j-th of its importance-sampling
    noise (the same keys as `importance_sampled`).
    """

    __test__ = False  # not a pytest class, whatever its name

    images: torch.Tensor
    seed: int
    labels: torch.Tensor | None = None  # (N,), kept for a conditional model only

    def __len__(self) -> int:
        return len(self.images)

    def y(self, rows: slice = slice(None)) -> torch.Tensor | None:
        """The labels of images `rows`, or None where the set keeps none."""
        return None if self.labels is None else self.labels[rows]

    def draw(self, model: VAE, rows: slice = slice(None), samples: int = 1
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `rows` as the model sees them, x: (B, C, H, W) float32, and their first
        `samples` draws of noise, eps: (samples, B, noise_dim)."""
        index = torch.arange(len(self.images), device=self.images.device)[rows]
        x = model.observe(self.images[rows], image_keys(self.seed, "observe", index))
        return x, draw_noise(image_keys(self.seed, "noise", index), model.noise_dim, samples)


# Images x samples per call of a test pass: 1,000 images of one sample, 200 of the IWAE's 50,
# so that the pass's memory does not grow with k.
TEST_ROWS = 10_000


@torch.no_grad()
def test_means(model: VAE, test_set: TestSet, values: dict[str, Callable], *, samples: int = 1,
               batch_size: int = 1000, world: World = SINGLE,
               active: bool = False) -> dict[str, float]:
    """For each name, the mean over the test set of `values[name](terms)`, a function of the model's
    terms for `samples` draws of z giving (N,) nats; one pass over the test set, in batches of at
    most batch_size images and TEST_ROWS images x samples. Under torchrun the ranks share the
    batches and add their sums. With active, also "active_units": the units whose posterior
    mean varies over the test images by more than ACTIVE_THRESHOLD (Burda et al.'s criterion,
    from the same pass: Model.test_unit_means, a VAE's closed-form E_q[z_1] or a flow's base
    Gaussian's mu)."""
    batch_size = max(1, min(batch_size, TEST_ROWS // samples))
    active = active and model.has_active_units
    unconditional = test_set.labels is None
    components = model.prior_components() if unconditional else None
    device = test_set.images.device
    totals = torch.zeros(len(values), dtype=torch.float64, device=device)
    moments = torch.zeros(2, model.units, dtype=torch.float64, device=device)
    for start in range(world.rank * batch_size, len(test_set), world.size * batch_size):
        rows = slice(start, start + batch_size)
        x, eps = test_set.draw(model, rows, samples)
        y = test_set.y(rows)
        q = model.posterior_params(x, y)
        terms = model(x, eps, posterior=q, components=components, y=y)
        totals += torch.stack([f(terms).sum(dtype=torch.float64) for f in values.values()])
        if active:
            mu = model.test_unit_means(q).double()
            moments += torch.stack([mu.sum(0), mu.square().sum(0)])
    n = len(test_set)
    means = dict(zip(values, distributed.all_sum(totals, world).div_(n).tolist()))
    if active:
        total, square = distributed.all_sum(moments, world)
        variance = (square - total.square() / n) / max(n - 1, 1)  # unbiased, as diagnostics' var(0)
        means["active_units"] = int((variance > ACTIVE_THRESHOLD).sum())
    return means


def mean_loss(model: VAE, test_set: TestSet, objective: str = "elbo", *, samples: int = 1,
              batch_size: int = 1000, world: World = SINGLE) -> float:
    """Mean over the test set of the negative ELBO (`samples` draws of z; the KL as the model's
    terms hold it: analytic for N(0, I) and a Gaussian posterior) or the
    negative IWAE bound (k = samples), nats per image."""
    loss = {objective: BOUNDS[objective]}
    return test_means(model, test_set, loss, samples=samples, batch_size=batch_size, world=world)[objective]


class _Accumulator:
    """Streams (S, N) log-weights into what the estimates need, in float64.

    Keeps a running max m and the sums s1 = sum exp(log w - m), s2 = sum exp(2 (log w - m)),
    plus, for each k in iwae_ks, the sum over disjoint groups of k samples of
    log mean_group w and the number of groups.
    """

    def __init__(self, n: int, iwae_ks: tuple[int, ...], device: torch.device):
        kw = dict(dtype=torch.float64, device=device)
        self.m = torch.full((n,), -math.inf, **kw)
        self.s1 = torch.zeros(n, **kw)
        self.s2 = torch.zeros(n, **kw)
        self.count = 0
        self.iwae_sum = {k: torch.zeros(n, **kw) for k in iwae_ks}
        self.iwae_groups = dict.fromkeys(iwae_ks, 0)

    def add(self, log_w: torch.Tensor) -> None:
        log_w = log_w.double()
        new_m = torch.maximum(self.m, log_w.max(0).values)
        shift = torch.exp(self.m - new_m)
        centred = log_w - new_m
        self.s1 = self.s1 * shift + centred.exp().sum(0)
        self.s2 = self.s2 * shift.square() + (2 * centred).exp().sum(0)
        self.m = new_m
        self.count += len(log_w)
        for k in self.iwae_sum:
            groups = len(log_w) // k
            if groups:
                g = log_w[:groups * k].view(groups, k, -1)
                self.iwae_sum[k] += (torch.logsumexp(g, dim=1) - math.log(k)).sum(0)
                self.iwae_groups[k] += groups

    def log_px(self) -> torch.Tensor:
        """(N,) log p(x) estimates."""
        return self.m + self.s1.log() - math.log(self.count)

    def log_px_variance(self) -> torch.Tensor:
        """(N,) Monte-Carlo variance of log p_hat(x), by the delta method:
        Var[log mean w] ~ Var[w] / (K E[w]^2) = (K s2 / s1^2 - 1) / K."""
        k = self.count
        return ((k * self.s2 / self.s1.square() - 1) / k).clamp_min(0)

    def iwae(self, k: int) -> torch.Tensor:
        """(N,) the IWAE_k bound estimated from the groups seen."""
        return self.iwae_sum[k] / self.iwae_groups[k]


def _samples_per_call(model: VAE, samples: int) -> int:
    """How many of a launch's samples (for all its images) one call of the model decodes: on the
    CPU the largest divisor of `samples` within about CPU_CALL_BYTES, always the same for a given
    model, precision and tile (so the results stay bitwise); on CUDA the whole launch."""
    if model.device.type == "cuda":
        return samples
    floats, itemsize, prior_bytes = model.draw_footprint()
    row_bytes = (floats * itemsize + prior_bytes
                 + model.likelihood.temporaries * math.prod(model.config.image_shape) * 4)
    fit = max(1, CPU_CALL_BYTES // (TILE_IMAGES * row_bytes))
    return max(d for d in range(1, min(fit, samples) + 1) if samples % d == 0)


def _launch_size(model: VAE, n_tiles: int, sample_tiles: int, tile_samples: int) -> tuple[int, int]:
    """(image tiles, sample tiles) per launch. The CPU runs one tile at a time: for the MLPs 2,500
    decoded rows keep the logits in cache, and fixed shapes keep every result bitwise.
    On CUDA, as many as a quarter of the free memory holds."""
    device = model.device
    if device.type != "cuda":
        return 1, 1
    free, _ = torch.cuda.mem_get_info(device)
    out = math.prod(model.out_shape)
    # logits and their temporaries, hidden layers, a mixture prior's temporaries
    floats, _, prior_bytes = model.draw_footprint()
    row_bytes = 4 * (4 * out + 2 * floats) + prior_bytes
    rows = max(1, free // 4 // row_bytes)
    per_image_tile = TILE_IMAGES * tile_samples
    s = max(1, min(sample_tiles, rows // per_image_tile))
    i = max(1, min(n_tiles, rows // (per_image_tile * s)))
    return i, s


@torch.no_grad()
def importance_sampled(model: VAE, images: torch.Tensor, *, k: int = 5000, seed: int = 1234,
                       iwae_ks: tuple[int, ...] = (1, 5, 50), batch_size: int | None = None,
                       chunk: int | None = None, precision: str = "fp32", progress: bool = True,
                       world: World = SINGLE, posterior: tuple[torch.Tensor, ...] | None = None,
                       labels: torch.Tensor | None = None) -> dict:
    """Importance-sampled test log-likelihood of images: (N, C, H, W), uint8 or floats in [0, 1]
    (images.stored).

    Returns a dict (all in nats per image):
      nll           mean over images of -log p_hat(x), K = k samples each
      nll_se        its Monte-Carlo standard error (from the importance weights' variance)
      nll_se_images the standard error of the mean over test images (their spread)
      neg_elbo      the negative ELBO, estimated from the same K samples (the IWAE bound with k=1)
      iwae          {k': negative IWAE bound for k'} for each k' in iwae_ks that is <= k
      log_px        (N,) float64 numpy array, each image's log p(x) estimate
      per_image     {"elbo", "log_px_variance"}: (N,) float64 numpy arrays, each image's ELBO
                    from the same draws, and the Monte-Carlo variance of its log p(x) estimate
      bits_per_dim  nll in bits per pixel and channel, for the discrete likelihoods
    and what fixes the numbers: k, seed, precision, the test set's size and SHA-256.

    batch_size images x chunk samples run per launch on CUDA (default: as many as
    fit); the CPU runs tile by tile. precision "bf16" decodes in bfloat16
    ("auto": where the hardware has it natively). Under torchrun the ranks share the
    launches and every rank gets every image's values: each is computed as one process
    would compute it, so the result is the same. posterior: q's parameters for each image,
    as VAE.posterior_params gives them (N, ...) each, to sample from instead of the encoder's
    (the amortization gap's fitted posteriors). labels: (N,) the images' labels, which a
    conditional model reads (and needs).
    """
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if posterior is not None and any(len(t) != len(images) for t in posterior):
        raise ValueError(f"posterior= needs one row per image ({len(images)})")
    model.eval()
    images = stored(images, model.config.image_shape)
    device = model.device
    if model.conditional and labels is None:
        raise VaelabError("this model is conditional: evaluating it needs the images' labels")
    proposal = "q(z|x, y)" if model.conditional else "q(z|x)"
    iwae_ks = tuple(sorted({j for j in (*iwae_ks, 1) if j <= k}))
    odd = [j for j in iwae_ks if TILE_SAMPLES % j and j % TILE_SAMPLES]
    if odd:  # their groups would straddle tiles
        raise ValueError(f"IWAE bounds need k that divides {TILE_SAMPLES} or is a multiple of it; got {odd}")
    tile_samples = math.lcm(TILE_SAMPLES, *iwae_ks)
    precision = resolve_precision(precision, device, model.own_decoder)
    if precision == "bf16":
        model = copy.deepcopy(model)
        model.decoder.to(torch.bfloat16)

    n = len(images)
    n_tiles, sample_tiles = -(-n // TILE_IMAGES), -(-k // tile_samples)
    tiles_i, tiles_s = _launch_size(model, n_tiles, sample_tiles, tile_samples)
    if device.type == "cuda":
        tiles_i = max(1, batch_size // TILE_IMAGES) if batch_size else tiles_i
        tiles_s = max(1, chunk // tile_samples) if chunk else tiles_s
    # The ranks share launches by index, so they must cut the images alike: the least of their sizes.
    tiles_i, tiles_s = distributed.all_min(torch.tensor([tiles_i, tiles_s], device=device), world).tolist()
    nb, ns = tiles_i * TILE_IMAGES, tiles_s * tile_samples
    per_call = _samples_per_call(model, ns)
    padded = torch.zeros((n_tiles * TILE_IMAGES, *images.shape[1:]), dtype=torch.uint8, device=device)
    padded[:n] = images.to(device)
    index = torch.arange(len(padded), device=device)
    observe_keys, noise_keys = image_keys(seed, "observe", index), image_keys(seed, "noise", index)
    y_all = None
    if model.conditional:  # padded as the images are: the padding rows' values are dropped
        y_all = labels.to(device)[index.clamp(max=n - 1)]
    z_dim, noise_dim = model.config.z_dim, model.noise_dim
    k_drawn = -(-k // ns) * ns  # the draws made per image, the last launch's padding included
    # Once for the whole evaluation (a VampPrior's encodings); per call where y conditions them.
    components = None if model.conditional else model.prior_components()
    workspace = Workspace() if model.own_decoder else None
    # Per image: log p(x), its variance, and each IWAE bound; rows this rank does not compute stay 0.
    values = torch.zeros((2 + len(iwae_ks), len(padded)), dtype=torch.float64, device=device)
    # Per image, for the diagnostics: E_q[z] of every layer (noise_dim), and the KL of each
    # dimension where it is defined (z_dim). E_q[z] comes in closed form where the posterior
    # has one, for its first columns (z_1's mu of a hierarchy); the rest from the draws.
    factorized = model.kl_per_dim_note() is None
    closed_means = model.latent_mean_columns
    drawn_means = closed_means < noise_dim
    latent = torch.zeros((len(padded), noise_dim + (z_dim if factorized else 0)), dtype=torch.float64,
                         device=device)
    # A hierarchy's KL of each layer (given the layers above: Terms.kl_per_dim), averaged over
    # every draw made, the padding samples' too (they are draws from q all the same).
    layer_kl = (torch.zeros((len(padded), len(model.sizes)), dtype=torch.float64, device=device)
                if model.kl_per_layer else None)
    launches = range(0, len(padded), nb)
    mine = launches[world.rank::world.size]
    bar = show.bar(sum(min(nb, n - s) for s in mine if s < n) * k, f"importance sampling, K={k}",
                   progress and world.main, report=True, unit="sample", unit_scale=True)
    with _exact_convolutions(precision == "fp32"):
        for start in mine:
            rows = slice(start, min(start + nb, len(padded)))
            x = model.observe(padded[rows], observe_keys[rows])
            y = None if y_all is None else y_all[rows]
            q = model.posterior_params(x, y) if posterior is None else _rows(posterior, rows, n)
            acc = _Accumulator(len(x), iwae_ks, device)
            z_sum = torch.zeros((len(x), noise_dim), dtype=torch.float64, device=device)
            for first in range(0, k, ns):
                eps = draw_noise(noise_keys[rows], noise_dim, ns, first)
                calls = [model(x, eps[s:s + per_call], workspace, q, components, y=y)
                         for s in range(0, ns, per_call)]
                keep = k - first  # the last launch's padding samples are dropped
                acc.add(torch.cat([log_weights(terms) for terms in calls])[:keep])
                if drawn_means:  # E_q[z] has no closed form: the mean of the K draws
                    z_sum += torch.cat([terms.z for terms in calls])[:keep].sum(0, dtype=torch.float64)
                if layer_kl is not None:
                    layer_kl[rows] += sum(t.kl_per_dim.double() * (len(t.z) / k_drawn)
                                          for t in calls)
                bar.update(min(ns, k - first) * max(0, min(rows.stop, n) - rows.start))
            values[:, rows] = torch.stack([acc.log_px(), acc.log_px_variance(), *(acc.iwae(j) for j in iwae_ks)])
            if drawn_means:
                latent[rows, :noise_dim] = z_sum / k
            if closed_means:
                latent[rows, :closed_means] = model.latent_means(q).double()
            if factorized:
                latent[rows, noise_dim:] = model.kl_per_dim(q, y).double()
    bar.close()
    values = distributed.all_sum(values, world)[:, :n]  # adding zeros is exact: one value per image
    latent = distributed.all_sum(latent, world)[:n]
    log_px_all, var, iwae = values[0], values[1], dict(zip(iwae_ks, values[2:]))
    return {
        "k": k,
        "nll": -log_px_all.mean().item(),
        "nll_se": (var.sum().sqrt() / n).item(),
        "nll_se_images": (log_px_all.std() / math.sqrt(n)).item() if n > 1 else None,
        "neg_elbo": -iwae[1].mean().item(),
        "iwae": {str(j): -iwae[j].mean().item() for j in iwae_ks},
        **({"bits_per_dim": bits_per_dim(-log_px_all.mean().item(), images.shape[1:])}
           if model.likelihood.discrete else {}),
        "test_images": n,
        "test_set_sha256": fingerprint(images),
        "seed": seed,
        "unit": "nats per image",
        "estimator": (f"importance sampling with"
                      f" {proposal if posterior is None else 'the given posteriors'} as proposal,"
                      f" K={k} samples per image"),
        # a conditional model's bound and estimate are of log p(x|y), y each image's label
        "quantity": "log p(x|y)" if model.conditional else "log p(x)",
        "precision": precision,
        **diagnostics(model, latent[:, :noise_dim], latent[:, noise_dim:] if factorized else None, k,
                      closed_means,
                      None if layer_kl is None else distributed.all_sum(layer_kl, world)[:n]),
        "log_px": log_px_all.cpu().numpy(),
        "per_image": {"elbo": iwae[1].cpu().numpy(), "log_px_variance": var.cpu().numpy()},
    }


def _rows(posterior: tuple[torch.Tensor, ...], rows: slice, n: int) -> tuple[torch.Tensor, ...]:
    """Rows of given per-image posterior parameters (N, ...), the padding images' taken as the
    last image's (their values are dropped)."""
    index = torch.arange(rows.start, rows.stop, device=posterior[0].device).clamp_(max=n - 1)
    return tuple(t.index_select(0, index) for t in posterior)


def _exact_convolutions(exact: bool):
    """cuDNN convolutions run in TF32 by default (on Ampere and later): with exact, in float32."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=cudnn.allow_tf32 and not exact)


def bits_per_dim(nats: float | np.ndarray, image_shape: Sequence[int]) -> float | np.ndarray:
    """Nats per image (a number, or an array of one per image) in bits per pixel and channel:
    nats / (C H W log 2), for images of image_shape (C, H, W)."""
    return nats / (math.prod(image_shape) * math.log(2))
