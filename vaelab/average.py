"""An exponential moving average of a model's weights (`--ema RATE`), the weights VDVAE (Child
2021; its train.py's ema_vae) evaluates and samples with: after the t-th update taken,

    average = d_t * average + (1 - d_t) * weights,  d_t = min(RATE, (1 + t) / (10 + t)),

the warm-up of TensorFlow's ExponentialMovingAverage (its num_updates), so that the average
leaves the initial weights within the first hundred updates rather than the first 1 / (1 - RATE)
(VDVAE's d_t is RATE throughout, over a million updates).

Training updates the model's own weights; the test pass, RUN/model.safetensors and so every
later command (evaluate, sample, report) use the average. The checkpoint holds both, so a resumed
run continues the average exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class WeightAverage:
    """The average of model's parameters (its buffers, a codebook's say, are the model's own),
    starting at the weights it has when made. `tensors` are the averages, in parameter order."""

    def __init__(self, model: nn.Module, rate: float):
        self.rate = rate
        self.parameters = list(model.parameters())
        self.tensors = [p.detach().clone() for p in self.parameters]
        self.updates = torch.zeros((), dtype=torch.float32, device=self.tensors[0].device)

    @property
    def held(self) -> list[torch.Tensor]:
        """Every tensor an update changes (a skipped update puts them back)."""
        return [*self.tensors, self.updates]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average towards the current weights (no host value: capturable)."""
        decay = ((1 + self.updates) / (10 + self.updates)).clamp_(max=self.rate)
        torch._foreach_lerp_(self.tensors, [p.detach() for p in self.parameters], 1 - decay)
        self.updates.add_(1)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within it the model holds the average; after it, its own weights again."""
        own = [p.detach().clone() for p in self.parameters]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self.parameters], own)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Put the average into the model's weights, for good."""
        torch._foreach_copy_([p.detach() for p in self.parameters], self.tensors)

    def state(self) -> dict[str, torch.Tensor]:
        """The averages by parameter index, and the count of updates, for the checkpoint."""
        return {**{str(i): t for i, t in enumerate(self.tensors)}, "updates": self.updates}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of state; ValueError where it does not fit the model."""
        mine = self.state()
        if set(state) != set(mine) or any(state[k].shape != t.shape for k, t in mine.items()):
            raise ValueError("its average of the weights does not fit the model")
        for key, t in mine.items():
            t.copy_(state[key])
