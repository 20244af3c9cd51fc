"""Before and after: one `vaelab` command run by two checkouts in turn, timed.

    python -m benchmarks.decisions.ab BASELINE_TREE [--reps 5] [--name NAME] [--out DIR] \\
        -- train --epochs 3 --quiet --no-plots --out {run}

Each repetition runs `python -m vaelab ARGS` once with the baseline tree's vaelab (another
checkout, put first on PYTHONPATH) and once with this one's, in a fresh interpreter, the order
swapped every other repetition so that a drift of the machine's speed hits both alike. `{run}`
in ARGS becomes a fresh run folder each time. For each side: the median wall time, and where
the command wrote a run, the median epoch time (each run's median over the epochs after the
first, which also holds the warm-up; the first alone for a one-epoch run) and the final test
loss. The ratios are this over the baseline, the median of the repetitions' ratios. With
--out, writes ab_NAME.json and .md there, naming the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.lib.machine import REPO, cpu_description, write_results


def run_once(tree: Path, args: list[str]) -> dict:
    """`python -m vaelab args` with tree's vaelab: wall seconds, and the run's epoch seconds and
    final test loss when it wrote one."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        command = [sys.executable, "-m", "vaelab", *(a.replace("{run}", str(run)) for a in args)]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(
                f"{tree}: {' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}"
            )
        result = {"wall": wall}
        metrics = run / "metrics.jsonl"
        if metrics.is_file():
            records = [
                json.loads(line) for line in metrics.read_text().splitlines() if line.strip()
            ]
            seconds = [r["seconds"] for r in records]
            result["epoch"] = statistics.median(seconds[1:] or seconds)
            result["test_loss"] = records[-1]["test_loss"]
    return result


def compare(baseline: Path, args: list[str], reps: int) -> dict:
    """Alternate the two trees reps times; per side the medians, and the median ratios."""
    pairs = []
    for i in range(reps):
        order = [("baseline", baseline), ("this", REPO)]
        if i % 2:
            order.reverse()
        pairs.append({side: run_once(tree, args) for side, tree in order})
    keys = [k for k in ("wall", "epoch") if all(k in p[s] for p in pairs for s in p)]
    median = {
        s: {k: statistics.median(p[s][k] for p in pairs) for k in keys}
        for s in ("baseline", "this")
    }
    ratio = {k: statistics.median(p["this"][k] / p["baseline"][k] for p in pairs) for k in keys}
    losses = {
        s: sorted({p[s].get("test_loss") for p in pairs} - {None}) for s in ("baseline", "this")
    }
    return {
        "args": args,
        "baseline": str(baseline),
        "reps": reps,
        "pairs": pairs,
        "median": median,
        "ratio": ratio,
        "test_losses": losses,
    }


def table(report: dict, host: str) -> str:
    """The markdown summary of a comparison."""
    rows = "".join(
        f"| {k} s | {report['median']['baseline'][k]:.3f} | {report['median']['this'][k]:.3f} "
        f"| {report['ratio'][k]:.3f} |\n"
        for k in report["ratio"]
    )
    losses = "".join(
        f"\nFinal test loss, {side}: {', '.join(f'{v:.4f}' for v in values)}."
        for side, values in report["test_losses"].items()
        if values
    )
    return (
        f"Host: {host}. `vaelab {' '.join(report['args'])}`, {report['reps']} alternating"
        f" repetitions; baseline {Path(report['baseline']).name}, against this checkout.\n\n| |"
        " baseline | this | this / baseline (median of ratios) |\n| --- | --- | --- | --- |\n"
        + rows
        + losses
        + "\n"
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    argv, args = argv[:split], argv[split + 1:]  # ab.py's options, then the vaelab command
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path, help="the other checkout (its root folder)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--name", default="default", help="names the result files: ab_NAME")
    parser.add_argument("--out", type=Path, help="write ab_NAME.json and .md here")
    options = parser.parse_args(argv)
    if not (options.baseline / "vaelab" / "__init__.py").is_file():
        parser.error(f"{options.baseline} holds no vaelab package")
    if not args or options.reps < 1:
        parser.error("give the vaelab command after --, and --reps of at least 1")
    report = compare(options.baseline.resolve(), args, options.reps)
    host = (
        f"{cpu_description()}, {torch.get_num_threads()} torch threads, PyTorch"
        f" {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    text = table(report, host)
    if options.out:
        write_results(options.out, f"ab_{options.name}", {"host": host, **report}, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
