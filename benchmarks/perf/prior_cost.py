"""What a learned prior costs per training epoch, against the standard normal, in one run.

    python -m benchmarks.perf.prior_cost [--reps 3] [--train-size 6000] [--out DIR]

The burda1 network with Adam, at batch 100 and at batch 20, for --prior standard, mog and vamp
(K = 500, the default), each run in a fresh interpreter, the priors alternating within each
repetition. Reports each one's median epoch time (metrics.jsonl's seconds, the second epoch on)
and its ratio to the standard prior's, the median of the repetitions' ratios.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.lib.epoch_cost import alternate, host

PRIORS = ("standard", "mog", "vamp")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = {}
    for batch in (100, 20):
        base = ["--preset", "burda1", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", str(batch),
                "--train-size", str(args.train_size), "--test-size", "1000"]
        report[str(batch)] = alternate({p: [*base, "--prior", p] for p in PRIORS}, args.reps)
    from benchmarks.lib.machine import write_results

    host_text = host()
    rows = "".join(
        f"| {batch} | {p} | {r['median_s'][p]:.2f} | {r['ratio'][p]:.2f}x |\n"
        for batch, r in report.items()
        for p in PRIORS
    )
    table = (
        f"Host: {host_text}. burda1 network, Adam 1e-3, {args.train_size} training images, epoch time"
        f" (median of epochs 2-3, then of {args.reps} alternating repetitions); mog and vamp with K"
        " = 500.\n\n| batch | prior | s per epoch | against standard |\n| --- | --- | --- |"
        " --- |\n"
        + rows
    )
    report = {"host": host_text, "train_size": args.train_size, **report}
    write_results(args.out, "prior_cost", report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
