"""Evaluating a trained model: the test negative ELBO (nats per example)."""

from __future__ import annotations

import torch

from .data import Dataset, observe
from .models import VAE
from .objectives import negative_elbo


@torch.no_grad()
def mean_negative_elbo(model: VAE, images: torch.Tensor, *, samples: int = 1, seed: int = 1234,
                       batch_size: int = 1000) -> float:
    """Mean negative ELBO over images, in nats per example.

    images: (N, D) uint8. The binarization and the noise come from a generator
    seeded by `seed`, so the same model always gets the same number.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(images), batch_size):
        x = observe(images[start:start + batch_size].to(device), model.config.likelihood, generator)
        total += negative_elbo(model, x, samples, generator).sum(dtype=torch.float64)
    model.train(was_training)
    return total.item() / len(images)


def evaluate_run(model: VAE, data: Dataset, *, samples: int = 1, seed: int = 1234) -> dict:
    """The evaluation record written to eval.json."""
    neg_elbo = mean_negative_elbo(model, data.test_images, samples=samples, seed=seed)
    return {
        "neg_elbo": neg_elbo,
        "estimator": f"negative ELBO, {samples} Monte-Carlo sample(s) of z per image",
        "unit": "nats per image",
        "test_images": len(data.test_images),
        "samples": samples,
        "seed": seed,
    }

