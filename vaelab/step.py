"""One optimizer step: the batch gather, observation, forward, objective, backward
and update, as a function of tensors the epoch sets.

The step reads the epoch's draws and the current batch's positions from tensors
that live on the device, so it needs no host value per step: the same function
runs eagerly and, on CUDA, captured once and replayed as a graph. At these
sizes a step is bound by kernel launches, not arithmetic, and a replay launches
the whole step at once.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import rng
from .distributed import SINGLE, World
from .average import WeightAverage
from .models import VAE
from .objectives import Objective


class TrainStep:
    """Calling it trains on the next batch of the epoch set by `begin_epoch` and returns
    that batch's mean loss (a 0-d tensor on the device; nothing is synchronised).

    images: (N, C, H, W) uint8 on the model's device; labels: (N,) int64 beside them, read
    only by a conditional model (VAE.conditional). objective: an objectives.Objective, which
    gives the draws of z per image and the loss. batch_size is the global batch: under
    torchrun rank r trains on its r-th share, drawn as a single process would draw it, through
    `forward` (the model wrapped in DistributedDataParallel, which averages the gradients).
    say: where the step's one-line notices go (a CUDA graph that cannot be captured), the
    caller's progress; None: nowhere.
    """

    # Eager steps before capture: the optimizer creates its state, the allocator settles.
    WARMUP = 3

    def __init__(self, model: VAE, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                 objective: Objective, *, batch_size: int, labels: torch.Tensor | None = None,
                 cuda_graph: bool = True, world: World = SINGLE,
                 forward: torch.nn.Module | None = None, beta: float = 1.0,
                 kl_warmup_epochs: int = 0, grad_clip: float | None = None,
                 skip_threshold: float | None = None, say: Callable[[str], None] | None = None,
                 average: WeightAverage | None = None):
        device = images.device
        self.model, self.optimizer, self.images = model, optimizer, images
        self.forward = forward or model
        self.objective = objective
        self.say = say or (lambda line: None)
        samples = objective.samples
        # The ELBO's KL weight: beta, reached linearly over the first kl_warmup_epochs (counted in
        # steps). It lives in a tensor the step itself updates, so a captured step follows it too.
        self.beta, self.warmup_steps = beta, kl_warmup_epochs * (len(images) // batch_size)
        self.weighted = beta != 1.0 or kl_warmup_epochs > 0  # else the plain ELBO, with no multiply
        self.grad_clip, self.skip_threshold = grad_clip, skip_threshold
        self.average = average  # --ema: follows every update taken
        # What the last step measured, in tensors a captured step writes too: the gradient's
        # global norm before clipping, and whether the update was skipped (--skip-threshold).
        self.grad_norm = torch.zeros((), dtype=torch.float32, device=device)
        self.skipped = torch.zeros((), dtype=torch.bool, device=device)
        self._held: tuple[list, list] | None = None  # the update's tensors and their copies
        self.kl_weight = torch.full((), beta, dtype=torch.float32, device=device)
        self.steps_done = torch.zeros((), dtype=torch.int64, device=device)  # counted from the run's start while a warm-up runs
        self.samples, self.batch_size = samples, batch_size
        self.order = torch.zeros(len(images), dtype=torch.int64, device=device)
        # A chunk of the epoch's draws, made by begin_epoch and then as the steps need them: row r
        # is the image at position chunk_start + r of the epoch's order as the model sees it,
        # and its noise. Whole steps, at most CHUNK_BYTES: memory does not grow with the data.
        row_bytes = 4 * (images[0].numel() + samples * model.noise_dim)
        self.chunk_steps = max(1, min(self.steps_per_epoch, self.CHUNK_BYTES // (batch_size * row_bytes)))
        n = self.chunk_steps * batch_size
        self.x = torch.empty((n, *images.shape[1:]), dtype=torch.float32, device=device)
        self.eps = torch.empty((n, samples * model.noise_dim), dtype=torch.float32, device=device)
        # The chunk's conditioning, for a conditional model only: nothing otherwise.
        self.labels = labels.to(device) if model.conditional and labels is not None else None
        if model.conditional and self.labels is None:
            raise ValueError("a conditional model trains on labelled images: give labels")
        # (n, ...): a row of y per image, whatever its shape (a label, or a vector)
        self.y = None if self.labels is None else torch.empty(
            (n, *self.labels.shape[1:]), dtype=self.labels.dtype, device=device)
        self._seed, self._epoch, self._next_step = 0, 0, 0  # the host's count of the epoch's steps
        share = batch_size // world.size
        self.rows = torch.arange(world.rank * share, (world.rank + 1) * share, device=device)  # of each batch
        self.positions = self.rows.clone()  # the current batch's rows of x and eps, advanced by each step
        self.capture = cuda_graph and device.type == "cuda" and model.capturable
        if self.capture and world.distributed:  # DDP's all-reduce inside a graph is untested here
            self.capture = False
            if world.main:
                self.say("vaelab: under torchrun the step is not captured as a CUDA graph (not yet "
                         "tested with DistributedDataParallel); training eagerly")
        self.graph: torch.cuda.CUDAGraph | None = None
        self._loss: torch.Tensor | None = None  # the captured step's output
        self._eager_steps = 0

    @property
    def steps_per_epoch(self) -> int:
        """Whole batches only (the last partial batch is dropped, as in the tutorial)."""
        return len(self.images) // self.batch_size

    # Bytes of drawn rows a chunk holds (pixels as the model sees them, and noise).
    CHUNK_BYTES = 64 * 2**20
    # Rows drawn at a time within a chunk: bounds the drawing's temporaries.
    DRAW_ROWS = 4096

    def begin_epoch(self, seed: int, epoch: int) -> None:
        """Draw the epoch's order, keyed by (seed, epoch), and its first chunk of draws: for each
        position, its image's pixels and its noise, keyed by (seed, epoch, position). Drawn in
        bulk rather than in the step, a batch is two row gathers: the step then launches a third
        of the kernels. The step draws the next chunks as it reaches them."""
        device = self.order.device
        self.order.copy_(rng.permutation(rng.key(seed, "order", epoch), len(self.images), device))
        self._seed, self._epoch, self._next_step = seed, epoch, 0
        self._draw_chunk(0)
        self.steps_done.fill_((epoch - 1) * self.steps_per_epoch)

    def _draw_chunk(self, first_step: int) -> None:
        """Fill x and eps with the draws of steps first_step, ..., and point the batch at the
        chunk's first rows (host work between steps: a captured step reads the same buffers)."""
        device = self.order.device
        observe_key = rng.key(self._seed, "observe", self._epoch)
        noise_key = rng.key(self._seed, "noise", self._epoch)
        first = first_step * self.batch_size
        rows = min(len(self.x), self.steps_per_epoch * self.batch_size - first)
        for start in range(0, rows, self.DRAW_ROWS):
            stop = min(start + self.DRAW_ROWS, rows)
            positions = torch.arange(first + start, first + stop, device=device)
            images = self.images.index_select(0, self.order[first + start:first + stop])
            self.x[start:stop] = self.model.observe(images, rng.row_keys(observe_key, positions))
            self.eps[start:stop] = rng.normal(rng.row_keys(noise_key, positions), self.eps.shape[1])
            if self.y is not None:
                self.y[start:stop] = self.labels.index_select(0, self.order[first + start:first + stop])
        self.positions.copy_(self.rows)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current batch as the model sees it, x: (B, C, H, W), and its noise eps:
        (S, B, noise_dim).

        Keyed by each image's position in the epoch, so a slice of the batch draws
        what the whole batch would.
        """
        eps = self.eps.index_select(0, self.positions).view(
            len(self.positions), self.samples, self.model.noise_dim)
        return self.x.index_select(0, self.positions), eps.transpose(0, 1)

    def batch_labels(self) -> torch.Tensor | None:
        """The current batch's labels y: (B,) for a conditional model, else None."""
        return None if self.y is None else self.y.index_select(0, self.positions)

    def eager(self, check: Callable[[str, object], None] | None = None) -> torch.Tensor:
        """The step itself, run op by op. check(stage, value), when given, sees the terms and
        the loss ("terms"), the gradients ("gradients") and the updated weights ("update")."""
        x, eps = self.draw()
        y = self.batch_labels()
        extra = {} if y is None else {"y": y}  # an unconditional model's call is unchanged
        if self.objective.fixed_q:
            extra["fixed_q"] = True
        terms = self.forward(x, eps, **extra)
        if self.warmup_steps:
            ramp = self.steps_done.to(torch.float32).div_(self.warmup_steps).clamp_(max=1.0)
            self.kl_weight.copy_(ramp.mul_(self.beta))
            self.steps_done.add_(1)
        loss = self.objective.loss(terms, self.kl_weight if self.weighted else None)
        if check:
            check("terms", (terms, loss))
        self.optimizer.zero_grad(set_to_none=True)  # backward then writes the gradients, not adds to zeros
        loss.backward()
        if check:
            check("gradients", None)
        self._update()
        if check:
            check("update", None)
        self.positions.add_(self.batch_size)
        return loss.detach()

    def _update(self) -> None:
        """Measure the gradient's norm, clip it (--grad-clip), and take the optimizer's step, or
        leave every weight and the optimizer's state as they were (--skip-threshold)."""
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        if self.grad_clip is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], foreach=True)
        else:
            norm = torch.nn.utils.clip_grad_norm_(parameters, self.grad_clip, foreach=True)
        self.grad_norm.copy_(norm)
        if self.skip_threshold is None:
            self._step()
            return
        torch.logical_not(norm <= self.skip_threshold, out=self.skipped)  # NaN skips too
        if self._held is None and not self.optimizer.state:
            # The optimizer makes its state in its first step, so there is nothing yet to put
            # back: this once (a fresh run's first step, never captured), decide on the host.
            if not self.skipped.item():
                self._step()
            return
        if self._held is None:
            state = [v for s in self.optimizer.state.values() for v in s.values()
                     if isinstance(v, torch.Tensor)]
            average = self.average.held if self.average is not None else []
            held = [*self.model.parameters(), *state, *average]
            self._held = held, [t.clone() for t in held]
        held, copies = self._held
        with torch.no_grad():
            for t, before in zip(held, copies):
                before.copy_(t)
            self._step()
            for t, before in zip(held, copies):
                t.copy_(torch.where(self.skipped, before, t))

    def _step(self) -> None:
        """The optimizer's update, and the average's step after it (--ema)."""
        self.optimizer.step()
        if self.average is not None:
            self.average.update()

    def __call__(self, check: Callable[[str, object], None] | None = None) -> torch.Tensor:
        """The next step of the epoch; with check (see eager), run eagerly and watched."""
        if self._next_step and self._next_step % self.chunk_steps == 0:
            self._draw_chunk(self._next_step)
        self._next_step += 1
        if check is not None:
            return self.eager(check)
        if self.graph is not None:
            self.graph.replay()
            return self._loss
        if not self.capture:
            return self.eager()
        if self._eager_steps < self.WARMUP:
            # Warm-up on a side stream, as capture wants; these are real steps of the epoch.
            side = torch.cuda.Stream(device=self.positions.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.eager()
            torch.cuda.current_stream().wait_stream(side)
            self._eager_steps += 1
            return loss
        self._capture()
        return self() if self.graph is not None else self.eager()

    def forget_graph(self) -> None:
        """Drop a captured graph (the next steps warm up and capture again), and the tensors a
        skipped update puts back (a restored checkpoint replaces the optimizer's state)."""
        self.graph, self._loss, self._eager_steps, self._held = None, None, 0, None

    def _capture(self) -> None:
        """Record the step as a CUDA graph (nothing runs while recording); on failure, say why
        in one line and stay eager."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._loss = self.eager()
        except RuntimeError as e:
            self.capture, self._loss = False, None
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.say(f"vaelab: this step cannot be captured as a CUDA graph ({reason}); training "
                     "eagerly")
            return
        self.graph = graph
