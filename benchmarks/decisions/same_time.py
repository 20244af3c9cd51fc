"""Train several `vaelab train` recipes for the same wall time, side by side, then evaluate
each by importance sampling and compare them pairwise with `vaelab compare`.

Each recipe runs in its own process with one thread, all at once, so that they share the
machine alike; at the deadline every process is killed, and its run keeps the epochs that
finished (a checkpoint is written after each). Then `vaelab evaluate` runs on each, one at a
time with every core.

    python -m benchmarks.decisions.same_time --minutes 12 --name conv-vs-mlp \
        "conv=--preset conv --optimizer adam --lr 1e-3" \
        "mlp=--z-dim 16 --optimizer adam --lr 1e-3"

Writes benchmarks/results/<name>.md and .json: epochs finished, the test negative ELBO of the
last one, and the evaluation's NLL (and bits/dim where the likelihood is discrete), with the
first recipe's paired difference from each of the others.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.lib.machine import RESULTS, cpu_description, write_results


def vaelab(*args: str, threads: int | None = None, **kwargs) -> subprocess.Popen:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, "-m", "vaelab", *args], env=env, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", metavar="NAME=ARGS", help="a name and `vaelab train` options")
    parser.add_argument("--minutes", type=float, default=12.0, help="wall time each recipe trains")
    parser.add_argument("--k", type=int, default=1000, help="importance samples per test image")
    parser.add_argument("--test-size", type=int, default=2000, help="test images evaluated")
    parser.add_argument("--name", default="same_time", help="results file name")
    parser.add_argument("--runs", default="runs/same_time", help="folder for the runs")
    args = parser.parse_args()

    recipes = dict(r.split("=", 1) for r in args.recipes)
    root = Path(args.runs)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = {name: root / f"{name}-{stamp}" for name in recipes}
    logs = {name: open(root / f"{name}-{stamp}.log", "w") for name in recipes}
    processes = {name: vaelab("train", *shlex.split(options), "--epochs", "100000", "--out", str(runs[name]),
                              "--no-plots", threads=1, stdout=logs[name], stderr=subprocess.STDOUT)
                 for name, options in recipes.items()}
    start = time.perf_counter()
    deadline = start + 60 * args.minutes
    while time.perf_counter() < deadline and all(p.poll() is None for p in processes.values()):
        time.sleep(1)
    for name, p in processes.items():
        if p.poll() is not None:
            sys.exit(f"{name} ended early (status {p.returncode}); see {logs[name].name}")
        p.kill()
        p.wait()
    trained = time.perf_counter() - start

    results = {}
    for name, run in runs.items():
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "vaelab", "evaluate", str(run), "--k", str(args.k),
                              "--test-size", str(args.test_size), "--quiet"], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"evaluating {name} failed: {out.stderr.strip()}")
        evaluation = json.loads((run / "eval.json").read_text())
        results[name] = {
            "options": recipes[name], "run": str(run), "epochs": len(metrics),
            "train_seconds": sum(m["seconds"] for m in metrics),
            "test_neg_elbo": metrics[-1]["test_loss"], "nll": evaluation["nll"],
            "nll_se": evaluation["nll_se"], "bits_per_dim": evaluation.get("bits_per_dim"),
            "eval_seconds": time.perf_counter() - t,
        }
    first = next(iter(runs))
    for name in list(runs)[1:]:
        out = subprocess.run([sys.executable, "-m", "vaelab", "compare", str(runs[first]), str(runs[name])],
                             capture_output=True, text=True, check=True)
        found = re.search(r"paired difference \(first minus second\): ([-+\d.]+) .*standard error ([\d.]+)",
                          out.stdout)
        results[name]["difference_from_" + first] = {"difference": float(found[1]), "se": float(found[2]),
                                                      "output": out.stdout.strip()}

    lines = [f"# {args.name}: each recipe trained for {args.minutes:g} minutes of wall time, side by side",
             "", f"Machine: {cpu_description()}; one thread per training process, {len(recipes)} at once "
             f"(killed after {trained:.0f} s; the epochs that finished count). Evaluation: "
             f"`vaelab evaluate RUN --k {args.k} --test-size {args.test_size}`, one at a time.", "",
             "| recipe | `vaelab train` options | epochs | test -ELBO (last epoch) | NLL (K=%d) | bits/dim | "
             "minus %s (paired) |" % (args.k, first), "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        diff = r.get("difference_from_" + first)
        paired = f"{-diff['difference']:+.2f} ± {diff['se']:.2f}" if diff else ""
        bits = f"{r['bits_per_dim']:.4f}" if r["bits_per_dim"] is not None else ""
        lines.append(f"| {name} | `{r['options']}` | {r['epochs']} | {r['test_neg_elbo']:.2f} | "
                     f"{r['nll']:.2f} ± {r['nll_se']:.2f} | {bits} | {paired} |")
    lines += ["", "The last column is each recipe's NLL minus the first's, per test image, from `vaelab compare` "
              "(negative: lower NLL than the first), with the standard error over images."]
    write_results(RESULTS, args.name, {"machine": cpu_description(), "minutes": args.minutes,
                                                "k": args.k, "test_size": args.test_size, "results": results},
                  "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
