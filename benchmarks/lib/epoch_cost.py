"""Epoch times of a few variants of one training command, alternated, in one run.

Shared by the cost benchmarks (benchmarks.perf.prior_cost and .estimator_cost): each variant
trains in a fresh interpreter for a few epochs on the CPU; its time is the median epoch after
the first (which warms up), and the variants alternate within each repetition, so a slower or
busier stretch of the machine falls on all of them.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def epoch_seconds(args: list[str], epochs: int = 3) -> float:
    """The median epoch time, after the first, of `vaelab train ARGS` run for `epochs`."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        command = [
            sys.executable,
            "-m",
            "vaelab",
            "train",
            *args,
            "--epochs",
            str(epochs),
            "--device",
            "cpu",
            "--quiet",
            "--no-plots",
            "--out",
            str(run),
        ]
        subprocess.run(command, check=True, capture_output=True)
        seconds = [
            json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()
        ]
    return statistics.median(seconds[1:])


def alternate(variants: dict[str, list[str]], reps: int, epochs: int = 3) -> dict:
    """Each variant's epoch times over `reps` alternating repetitions, their medians, and the
    median over repetitions of each one's ratio to the first variant's."""
    times = {name: [] for name in variants}
    for _ in range(reps):
        for name, args in variants.items():
            times[name].append(epoch_seconds(args, epochs))
    first = next(iter(variants))
    return {
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "ratio": {
            name: statistics.median(a / b for a, b in zip(t, times[first]))
            for name, t in times.items()
        },
        "times": times,
    }


def host() -> str:
    import torch

    from benchmarks.lib.machine import cpu_description

    return (
        f"{cpu_description()}, {torch.get_num_threads()} torch threads, PyTorch"
        f" {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
