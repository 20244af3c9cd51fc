"""Operations one training step launches, per recipe: a proxy for a captured step's GPU time.

    python -m benchmarks.perf.step_ops [--out benchmarks/results]

At the tutorial's sizes a CUDA-graph replay costs about as many microseconds per kernel as
it holds, whatever they compute, so the count of operations a step dispatches (views, which
launch nothing, left out) tracks its time on a card, and it can be counted on any CPU. Counts
one eager step after three warm-up steps, on the CPU, with a TorchDispatchMode; synthetic
28x28 data. (Some operations launch more than one kernel on CUDA; the count is a proxy.)
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vaelab
from vaelab.data import Dataset
from vaelab.train import build
# name -> (preset and its overrides, the run's options)
RECIPES = {
    "tutorial (ELBO, SGD)": ({"name": "tutorial"}, {}),
    "KL warm-up": ({"name": "tutorial"}, {"kl_warmup": 2}),
    "IWAE k=5": ({"name": "tutorial"}, {"objective": "iwae", "k": 5}),
    "burda1 VAE (Adam)": ({"name": "burda1"}, {"optimizer": "adam", "lr": 1e-3}),
    "conv, logistic (Adam)": ({"name": "conv", "likelihood": "logistic"}, {"optimizer": "adam", "lr": 1e-3}),
}
LAUNCH_FREE = {"view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze", "squeeze", "detach", "alias",
               "split", "permute", "as_strided", "slice", "select", "_reshape_alias"}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in LAUNCH_FREE and not str(func).startswith("profiler."):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count(model: dict, options: dict) -> int:
    g = torch.Generator().manual_seed(0)
    images = lambda n: torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    data = Dataset(images(1000), None, images(200), None, Path("."), verified=False)
    config = vaelab.RunConfig(model=vaelab.preset(**model), preset=model["name"], device="cpu", **options)
    step = build(config, data, progress=False).step
    step.begin_epoch(config.seed, 1)
    for _ in range(3):
        step()
    with CountOps() as counter:
        step()
    return sum(counter.ops.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write step_ops.json and .md here")
    args = parser.parse_args(argv)
    counts = {name: count(model, options) for name, (model, options) in RECIPES.items()}
    table = ("Operations one training step dispatches (views left out), counted on the CPU.\n\n"
             "| recipe | operations per step |\n| --- | --- |\n"
             + "".join(f"| {name} | {n} |\n" for name, n in counts.items()))
    if args.out:
        from benchmarks.lib.machine import write_results

        write_results(args.out, "step_ops", {"torch": torch.__version__, "counts": counts}, table)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
