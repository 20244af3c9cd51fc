"""Novelty detection by likelihood: train on MNIST without the digit 9, then ask how well
-log p(x) (`vaelab score`) tells held-out images from the test digits it was trained on.

    python -m benchmarks.paper.detection [--out benchmarks/results] \\
        [--work /tmp/vaelab-detection] [--epochs 20] [--k 1000] [--noise 1000]

Writes three .npz data sets into --work (MNIST without 9s; the test set's 9s; uniform noise
images), trains the default recipe on the first, scores the test images of each with the same
K, and reports the AUROC of -log p(x) as a detector of each kind of novel image against the
other test digits (1: every novel image scores a higher -log p(x); 0.5: chance). The AUROC is
the Mann-Whitney statistic, ties counted as halves. Writes detection.md and .json to --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from vaelab import RunConfig, train
from vaelab.config import ScoreOptions
from vaelab.data import load_data
from vaelab.score import score_run

from benchmarks.lib.machine import hardware, write_results

HELD_OUT = 9


def auroc(novel: np.ndarray, known: np.ndarray) -> float:
    """P(a novel image scores higher than a known one), ties as halves: (N,), (M,) -> [0, 1]."""
    known = np.sort(known)
    below = np.searchsorted(known, novel, side="left")
    at_most = np.searchsorted(known, novel, side="right")
    return float((below + 0.5 * (at_most - below)).sum() / (len(novel) * len(known)))


def write_sets(work: Path, noise: int, seed: int = 0) -> dict[str, Path]:
    """The three data sets, as .npz files of (N, 28, 28) uint8 (an .npz needs a training split:
    the novel sets carry a few images there, never used)."""
    mnist = load_data(progress=False)
    train_x, train_y = mnist.train_images[:, 0].numpy(), mnist.train_labels.numpy()
    test_x, test_y = mnist.test_images[:, 0].numpy(), mnist.test_labels.numpy()
    keep_train, keep_test = train_y != HELD_OUT, test_y != HELD_OUT
    noise_images = np.random.default_rng(seed).integers(0, 256, (noise, 28, 28), dtype=np.uint8)
    sets = {
        "known": dict(x_train=train_x[keep_train], y_train=train_y[keep_train],
                      x_test=test_x[keep_test], y_test=test_y[keep_test]),
        "nines": dict(x_train=test_x[~keep_test][:10], x_test=test_x[~keep_test]),
        "noise": dict(x_train=noise_images[:10], x_test=noise_images),
    }
    paths = {}
    for name, arrays in sets.items():
        paths[name] = work / f"{name}.npz"
        np.savez(paths[name], **arrays)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vaelab-detection"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--noise", type=int, default=1000)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = write_sets(args.work, args.noise)
    run = args.work / "run"
    start = time.perf_counter()
    if not (run / "metrics.jsonl").exists():
        train(RunConfig(epochs=args.epochs, data_dir=str(paths["known"])), run, progress=False)
    trained = time.perf_counter() - start
    nll = {}
    for name, path in paths.items():
        out = args.work / f"scores_{name}.npz"
        out.unlink(missing_ok=True), out.with_suffix(".csv").unlink(missing_ok=True)
        options = ScoreOptions(run=str(run), output=str(out), data_dir=str(path), k=args.k,
                               split="test", quiet=True)
        nll[name] = -score_run(options)[2]["log_px"]
    rows = [dict(novel="held-out 9s", images=len(nll["nines"]),
                 mean_nll=float(nll["nines"].mean()), auroc=auroc(nll["nines"], nll["known"])),
            dict(novel="uniform noise", images=len(nll["noise"]),
                 mean_nll=float(nll["noise"].mean()), auroc=auroc(nll["noise"], nll["known"]))]
    lines = [
        f"Machine: {hardware()}; {time.strftime('%Y-%m-%d')}.",
        "",
        f"The default recipe (`vaelab train`, {args.epochs} epochs) trained on MNIST's training"
        f" images without the digit {HELD_OUT}; `vaelab score` (K={args.k}) of the test set's"
        f" other digits ({len(nll['known'])} images, mean -log p(x) {nll['known'].mean():.2f}"
        " nats), of its 9s and of uniform noise images. AUROC of -log p(x) as the detector of"
        " each novel kind against the known digits:",
        "",
        "| novel images | images | mean -log p(x), nats | AUROC |",
        "| --- | --- | --- | --- |",
        *(f"| {r['novel']} | {r['images']} | {r['mean_nll']:.2f} | {r['auroc']:.3f} |"
          for r in rows),
        "",
        f"Training took {trained / 60:.1f} min (wall). Made by"
        " `python -m benchmarks.paper.detection`.",
    ]
    report = {"rows": rows, "known_images": len(nll["known"]), "epochs": args.epochs,
              "known_mean_nll": float(nll["known"].mean()), "k": args.k}
    write_results(args.out, "detection", report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
