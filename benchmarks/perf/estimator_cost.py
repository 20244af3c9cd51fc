"""What the DReG estimator costs per training epoch, against the plain IWAE gradient, in one run.

    python -m benchmarks.perf.estimator_cost [--reps 5] [--train-size 3000] [--out DIR]

The burda1 and burda2 networks, Adam, batch 20, --objective iwae --k 50, with --estimator reparam
and dreg alternating within each repetition (benchmarks.lib.epoch_cost). Reports each one's median
epoch time and the median over repetitions of dreg's ratio to reparam's (a paired ratio).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.lib.epoch_cost import alternate, host
from benchmarks.lib.machine import write_results

ESTIMATORS = ("reparam", "dreg")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is not timed")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = {}
    for net in ("burda1", "burda2"):
        base = [
            "--preset",
            net,
            "--objective",
            "iwae",
            "--k",
            "50",
            "--optimizer",
            "adam",
            "--lr",
            "1e-3",
            "--batch-size",
            "20",
            "--train-size",
            str(args.train_size),
            "--test-size",
            "500",
        ]
        report[net] = alternate(
            {e: [*base, "--estimator", e] for e in ESTIMATORS}, args.reps, args.epochs
        )
    host_text = host()
    rows = "".join(
        f"| {net} | {e} | {r['median_s'][e]:.2f} | {r['ratio'][e]:.3f}x |\n"
        for net, r in report.items()
        for e in ESTIMATORS
    )
    timed = "epoch 2" if args.epochs == 2 else f"the median of epochs 2-{args.epochs}"
    table = (
        f"Host: {host_text}. IWAE k=50, Adam 1e-3, batch 20, {args.train_size} training images;"
        f" epoch time ({timed}, then the median of {args.reps} alternating"
        " repetitions), and the median of the paired ratios.\n\nMade by `python -m"
        f" benchmarks.perf.estimator_cost --reps {args.reps} --epochs {args.epochs} --train-size"
        f" {args.train_size}`.\n\n| network | estimator | s per epoch | against reparam"
        " |\n| --- | --- | --- | --- |\n" + rows
    )
    report = {"host": host_text, "train_size": args.train_size, **report}
    write_results(args.out, "estimator_cost", report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
