"""The amortization gap (Cremer, Li & Duvenaud 2018): how much of the distance between the
encoder's ELBO and log p(x) is the encoder's fault, and how much the posterior family's.

For each test image, q* is a posterior of the model's own family (the head's outputs: mu,
logvar, and an IAF's context, the flow's weights shared) fitted to that image alone, starting
from the encoder's q. Then, in nats per image,

    log p(x) - L[q]  =  (log p(x) - L[q*])  +  (L[q*] - L[q])
                        approximation gap     amortization gap

Procedure: every image's q* is fitted at once, in one batch, by Adam on its ELBO (`samples`
keyed draws of z per image and step), its rate falling linearly to 0 over a fixed number of
steps, so each image's fit depends on that image alone. A Gaussian family's gradient is
"sticking the landing"'s (objectives.estimated), whose noise vanishes at the true posterior;
an IAF's is the plain one. L[q], L[q*] and log p(x) are
then estimated by importance sampling (sampling.importance_sampled, K draws per image) on keyed
noise apart from the fit's, so L[q*] is not biased upward by the noise it was fitted on. log p(x)
takes, per image, the better proposal of q and q*: the one whose estimate has the smaller
Monte-Carlo variance on a pilot of other draws. With stochastic layers above z_1, q* frees
q(z_1|x) alone; the upper layers stay amortized. Standard errors are
over images, the gaps paired per image. Under torchrun the ranks share the fits and the sampling.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from . import distributed, progress as show, rng
from .config import GapOptions
from .distributed import SINGLE, World
from .errors import VaelabError
from .images import stored
from .fileio import atomic_write_json
from .models import VAE
from .objectives import negative_elbo
from .rng import image_keys
from .runs import read_record
from .sampling import draw_noise, importance_sampled
from .start import open_run

GAP = "gap.json"
PILOT_SAMPLES = 100  # draws per image that choose log p(x)'s proposal


def fit_posteriors(
    model: VAE,
    x: torch.Tensor,
    index: torch.Tensor,
    *,
    steps: int,
    samples: int,
    lr: float,
    seed: int,
    progress: bool = False,
    y: torch.Tensor | None = None,
) -> tuple[tuple[torch.Tensor, ...], list]:
    """q* for each image: Adam on its ELBO from the encoder's q. x: (N, C, H, W) as the model
    sees them; index: (N,) the images' numbers, which key their noise; y: their labels (N,), for
    a conditional model. Returns the fitted
    parameters (as VAE.posterior_params gives them, (N, ...) each) and each step's sum over the
    images of the negative ELBO on the fit's own draws, (steps,)."""
    with torch.no_grad():
        start = model.posterior_params(x, y)
        components = model.prior_components(y)
    params = tuple(t.detach().clone().requires_grad_() for t in start)
    optimizer = torch.optim.Adam(params, lr=lr)
    # The rate falls linearly to 0, so that the last steps settle rather than jitter about q*.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / steps)
    estimator = fit_gradient(model)
    noise_dim, trace = model.noise_dim, []
    bar = show.bar(steps, "fitting each image's posterior", progress)
    for step in range(steps):
        eps = draw_noise(rng.row_keys(rng.key(seed, "gap fit", step), index), noise_dim, samples)
        terms = model(x, eps, posterior=params, components=components, y=y,
                      fixed_q=estimator == "stl")
        loss = negative_elbo(terms).sum()
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
        optimizer.step()
        schedule.step()
        trace.append(loss.detach())
        bar.update()
    bar.close()
    losses = torch.stack(trace) if trace else torch.zeros(0, device=x.device)
    return tuple(p.detach() for p in params), losses


def fit_gradient(model: VAE) -> str:
    """A Gaussian family's ELBO gradient sticks the landing (no noise at the true posterior);
    an IAF's has no fixed-parameter log q, so it takes the plain one."""
    return "stl" if model.posterior.has_log_prob else "reparam"


def _mean_se(values: torch.Tensor) -> dict:
    n = len(values)
    return {
        "mean": values.mean().item(),
        "se": (values.std() / math.sqrt(n)).item() if n > 1 else None,
    }


def amortization_gap(
    model: VAE,
    images: torch.Tensor,
    *,
    k: int = 5000,
    steps: int = 1000,
    samples: int = 10,
    lr: float = 1e-2,
    seed: int = 1234,
    progress: bool = True,
    world: World = SINGLE,
    labels: torch.Tensor | None = None,
) -> dict:
    """The two gaps over images: (N, C, H, W), uint8 or floats in [0, 1] (images.stored; see the
    module's docstring). Returns
    log_px, elbo_fitted (L[q*]), elbo_encoder (L[q]), approximation_gap and amortization_gap,
    each {"mean", "se"} in nats per image, with what fixes them and the fit's course. labels: (N,)
    the images' labels, which a conditional model reads (and needs)."""
    model.eval()
    if model.conditional and labels is None:
        raise VaelabError("this model is conditional: its gaps need the images' labels")
    labels = labels.to(model.device) if model.conditional else None
    images = stored(images, model.config.image_shape)
    n, device = len(images), model.device
    images = images.to(device)
    index = torch.arange(n, device=device)
    x = model.observe(images, image_keys(seed, "observe", index))
    # Rank r fits images r, r + size, ...; the fitted parameters are then shared by adding zeros.
    mine = index[world.rank :: world.size]
    fitted, losses = fit_posteriors(
        model,
        x[mine],
        mine,
        steps=steps,
        samples=samples,
        lr=lr,
        seed=seed,
        progress=progress and world.main,
        y=None if labels is None else labels[mine],
    )
    shared = []
    for t in fitted:
        full = torch.zeros((n, *t.shape[1:]), dtype=t.dtype, device=device)
        full[mine] = t
        shared.append(distributed.all_sum(full, world))
    fitted = tuple(shared)
    trace = (-distributed.all_sum(losses, world) / n).tolist()  # the mean ELBO over all images
    sampled = dict(k=k, seed=seed, progress=progress, world=world, labels=labels)
    encoder = importance_sampled(model, images, **sampled)
    best = importance_sampled(model, images, posterior=fitted, **sampled)
    elbo_q = torch.from_numpy(encoder["per_image"]["elbo"])
    elbo_fitted = torch.from_numpy(best["per_image"]["elbo"])
    # The better proposal: the one whose estimate has the smaller Monte-Carlo variance, judged on
    # a pilot of other draws (the same draws would favour a proposal that missed some of p(z|x)).
    pilot = dict(sampled, k=min(k, PILOT_SAMPLES), seed=seed + 1, progress=False)
    pilot_q = importance_sampled(model, images, **pilot)["per_image"]["log_px_variance"]
    pilot_fitted = importance_sampled(model, images, posterior=fitted, **pilot)["per_image"]
    use_fitted = torch.from_numpy(pilot_fitted["log_px_variance"] < pilot_q)
    log_px = torch.where(
        use_fitted, torch.from_numpy(best["log_px"]), torch.from_numpy(encoder["log_px"])
    )
    tenth = max(1, steps // 10)
    return {
        "images": n,
        "k": k,
        "seed": seed,
        "unit": "nats per image",
        "log_px": _mean_se(log_px),
        "elbo_fitted": _mean_se(elbo_fitted),
        "elbo_encoder": _mean_se(elbo_q),
        "approximation_gap": _mean_se(log_px - elbo_fitted),
        "amortization_gap": _mean_se(elbo_fitted - elbo_q),
        "proposal": (
            "per image, the one of q and q* whose log p(x) estimate has the smaller Monte-Carlo"
            f" variance on a pilot of {min(k, PILOT_SAMPLES)} draws keyed by seed + 1 (q* for"
            f" {int(use_fitted.sum())} of {n})"
        ),
        "fit": {
            "optimizer": f"Adam, lr {lr} falling linearly to 0",
            "steps": steps,
            "samples": samples,
            "gradient": fit_gradient(model),
            "family": "the head's outputs per image (mu, logvar"
            + (", the IAF's context; the flow's weights shared"
               if not model.posterior.has_log_prob else "")
            + ("; the upper layers' q(z_l+1|z_l) stay amortized, so their part of the gap counts"
               " as approximation" if len(model.sizes) > 1 else "")
            + ")",
            # the mean ELBO on the fit's own draws: how far the last tenth of the steps moved it
            "elbo_first_step": trace[0] if trace else None,
            "elbo_last_step": trace[-1] if trace else None,
            "rise_over_last_tenth": (
                float(np.mean(trace[-tenth:]) - np.mean(trace[-2 * tenth : -tenth]))
                if len(trace) >= 2 * tenth
                else None
            ),
        },
        "precision": encoder["precision"],
    }


def read_gap(run_dir: str | Path) -> dict | None:
    """RUN/gap.json, or None when `vaelab gap` has not run."""
    return read_record(run_dir, GAP, "gap")


def gap_run(options: GapOptions, world: World = SINGLE) -> dict:
    """`vaelab gap`: amortization_gap over a run's first test images, written by rank 0 into
    RUN/gap.json. Returns the result, with the seconds it took."""
    model, data = open_run(options, world, writes=GAP, sampled="gap")
    if not model.fits_posterior:
        raise VaelabError(f"`vaelab gap` fits each image's Gaussian posterior, and a"
                          f" {model.config.family} model's posterior is a chain of layers, each"
                          " conditioned on those above, which it does not fit")
    images = data.subset(None, options.images).test_images
    run = Path(options.run)
    start = time.perf_counter()
    r = amortization_gap(
        model,
        images,
        k=options.k,
        steps=options.steps,
        samples=options.samples,
        lr=options.lr,
        seed=options.seed,
        progress=not options.quiet,
        world=world,
        labels=model.checked_labels(data.subset(None, options.images).test_labels,
                                    "the test images"),
    )
    r["seconds"] = time.perf_counter() - start
    if world.main:
        atomic_write_json(run / GAP, r)
    return r
