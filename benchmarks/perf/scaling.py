"""One process against two under torchrun, on this machine's CPU (gloo, one thread per process).

    python -m benchmarks.perf.scaling           # about 6 minutes on 2 cores

Alternating over repetitions: a training run of the tutorial recipe in one process and the same
under `torchrun --standalone --nproc-per-node 2` (s/epoch as metrics.jsonl records it, the first
epoch left out), then `vaelab evaluate RUN --k 5000` on the 10,000 test images each way (the
evaluation's own seconds, from eval.json), checking that the per-image values are identical.
Writes benchmarks/results/scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.lib.machine import RESULTS, cpu_description, write_results

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def vaelab(processes: int, *args: str) -> None:
    launcher = TORCHRUN if processes == 2 else [sys.executable]
    subprocess.run([*launcher, "-m", "vaelab", *args], check=True, env=ENV, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def epoch_seconds(run: Path) -> float:
    seconds = [json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(seconds[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    train = {1: [], 2: []}
    evaluation = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for n in (1, 2):
                run = Path(tmp) / f"train{n}-{rep}"
                vaelab(n, "train", "--device", "cpu", "--epochs", str(args.epochs), "--no-plots", "--quiet",
                       "--out", str(run))
                train[n].append(epoch_seconds(run))
            print(f"rep {rep + 1}: 1 process {train[1][-1]:.2f} s, 2 processes {train[2][-1]:.2f} s per epoch",
                  file=sys.stderr)
        runs = {n: Path(tmp) / f"eval{n}" for n in (1, 2)}
        for n, run in runs.items():
            shutil.copytree(Path(tmp) / "train1-0", run)
            vaelab(n, "evaluate", str(run), "--device", "cpu", "--k", str(args.k), "--quiet")
            evaluation[n] = json.loads((run / "eval.json").read_text())
            print(f"evaluation, {n} process(es): {evaluation[n]['seconds']:.1f} s", file=sys.stderr)
        identical = bool(np.array_equal(np.load(runs[1] / "log_px.npy"), np.load(runs[2] / "log_px.npy")))

    report = {
        "machine": cpu_description(), "cores": os.cpu_count(), "threads_per_process": 1,
        "train_epoch_seconds": train,
        "train_speedup": statistics.median(a / b for a, b in zip(train[1], train[2])),
        "evaluate_seconds": {n: r["seconds"] for n, r in evaluation.items()},
        "evaluate_speedup": evaluation[1]["seconds"] / evaluation[2]["seconds"],
        "evaluate_precision": evaluation[1]["precision"], "k": args.k,
        "per_image_values_identical": identical, "nll": evaluation[1]["nll"],
    }
    write_results(args.out, "scaling", report, markdown(report))
    return 0


def markdown(r: dict) -> str:
    t, e = r["train_epoch_seconds"], r["evaluate_seconds"]
    med = {n: statistics.median(v) for n, v in t.items()}
    return "\n".join([
        f"Machine: {r['machine']}, {r['cores']} cores; gloo, one thread per process.",
        "",
        "| workload | 1 process | 2 processes (torchrun) | speed-up |",
        "| --- | --- | --- | --- |",
        f"| training, tutorial recipe, s/epoch (median of {len(t['1'] if '1' in t else t[1])} alternating runs) "
        f"| {med[1]:.2f} | {med[2]:.2f} | {r['train_speedup']:.2f}x (paired) |",
        f"| `vaelab evaluate --k {r['k']}`, 10,000 test images ({r['evaluate_precision']}), s | {e[1]:.0f} | "
        f"{e[2]:.0f} | {r['evaluate_speedup']:.2f}x |",
        "",
        f"Per-image values identical between the two evaluations: {r['per_image_values_identical']}.",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
