"""What a learned prior costs per training epoch, against the standard normal, in one run.

    PYTHONPATH=. python benchmarks/prior_cost.py [--reps 3] [--train-size 6000] [--out DIR]

The burda1 network with Adam, at batch 100 and at batch 20, for --prior standard, mog and vamp
(K = 500, the default), each run in a fresh interpreter, the priors alternating within each
repetition. Reports each one's median epoch time (metrics.jsonl's seconds, the second epoch on)
and its ratio to the standard prior's, the median of the repetitions' ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRIORS = ("standard", "mog", "vamp")


def epoch_seconds(prior: str, batch: int, train_size: int) -> float:
    """The median epoch time after the first of a 3-epoch burda1 run with this prior."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "vaelab",
                "train",
                "--preset",
                "burda1",
                "--prior",
                prior,
                "--optimizer",
                "adam",
                "--lr",
                "1e-3",
                "--batch-size",
                str(batch),
                "--epochs",
                "3",
                "--train-size",
                str(train_size),
                "--test-size",
                "1000",
                "--device",
                "cpu",
                "--quiet",
                "--no-plots",
                "--out",
                str(run),
            ],
            check=True,
            capture_output=True,
        )
        seconds = [
            json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()
        ]
    return statistics.median(seconds[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = {}
    for batch in (100, 20):
        times = {p: [] for p in PRIORS}
        for _ in range(args.reps):
            for prior in PRIORS:
                times[prior].append(epoch_seconds(prior, batch, args.train_size))
        report[str(batch)] = {
            "median_s": {p: statistics.median(t) for p, t in times.items()},
            "ratio": {
                p: statistics.median(a / b for a, b in zip(times[p], times["standard"]))
                for p in PRIORS
            },
            "times": times,
        }
    import torch
    from machine import cpu_description, write_results  # benchmarks/machine.py, beside this script

    host = (
        f"{cpu_description()}, {torch.get_num_threads()} torch threads, PyTorch"
        f" {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    rows = "".join(
        f"| {batch} | {p} | {r['median_s'][p]:.2f} | {r['ratio'][p]:.2f}x |\n"
        for batch, r in report.items()
        for p in PRIORS
    )
    table = (
        f"Host: {host}. burda1 network, Adam 1e-3, {args.train_size} training images, epoch time"
        f" (median of epochs 2-3, then of {args.reps} alternating repetitions); mog and vamp with K"
        " = 500.\n\n| batch | prior | s per epoch | against standard |\n| --- | --- | --- |"
        " --- |\n"
        + rows
    )
    if args.out:
        write_results(
            args.out, "prior_cost", {"host": host, "train_size": args.train_size, **report}, table
        )
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
