"""`vaelab evaluate`: a run's test log-likelihood, in nats per image, written into the run.

The computation is the model family's (Model.estimate): sampling.importance_sampled's for a
VAE (the tiles, the keyed draws, the precision), vq.bound's upper bound for a VQ-VAE; what the
latent code is used for, and comparing two evaluations, are diagnostics.py's.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import vq
from .config import EvaluateOptions
from .distributed import SINGLE, World
from .runs import EVAL, write_eval
from .sampling import importance_sampled
from .start import open_run


def evaluate_run(options: EvaluateOptions, world: World = SINGLE) -> dict:
    """`vaelab evaluate`: importance_sampled over a run's test images, written by rank 0 into
    RUN/eval.json and RUN/log_px.npy. Returns the result, with the seconds it took, the device and
    the number of processes."""
    model, data = open_run(options, world, writes=EVAL)  # found writable before minutes of work
    data = data.subset(None, options.images)
    start = time.perf_counter()
    if model.estimate == "bound":
        r = vq.bound(model, data.test_images, seed=options.seed, world=world)
    else:
        r = importance_sampled(model, data.test_images, k=options.k or model.default_k,
                               seed=options.seed,
                               precision=options.precision, progress=not options.quiet,
                               world=world,
                               labels=model.checked_labels(data.test_labels, "the test images"))
    r["seconds"] = time.perf_counter() - start
    r["device"], r["processes"] = str(model.device), world.size
    if world.main:
        write_eval(Path(options.run), r)
    return r
