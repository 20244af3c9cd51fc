"""vaelab on a CUDA GPU against the tutorial's own pipeline on the same card, in one process.

    python -m benchmarks.perf.gpu --out benchmarks/results

Measures, alternating over repetitions (all in the same process, on the same card):
  notebook   the tutorial notebook's loop as written, on the GPU: per-image Dataset, shuffling
             DataLoaders whose 8 workers start afresh every epoch, the notebook's model, a
             progress bar, each step's loss read back to the host, manual SGD
             (benchmarks.perf.speed has it)
  lean       the same loop tuned: persistent workers, pinned memory, no per-step read-back or bar
  eager      vaelab's trainer, tutorial recipe, --cuda-graph off
  captured   the same with the step captured as a CUDA graph (the default)
then, once each: the burda1 VAE (Adam, batch 20) and IWAE k=50 epochs, a whole default
`vaelab train --device cuda` (wall time), `vaelab evaluate` of that run with K=5000, and last
an experiment: the captured step with the model under torch.compile, which fuses the step's
elementwise kernels (not a vaelab option; measured to see whether one would pay).
vaelab's s/epoch is what metrics.jsonl records (training pass plus test loss); the first
epoch of a run, which holds the capture, is reported apart.

Writes gpu.json and gpu.md into --out, naming the card and the torch/CUDA versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import vaelab

from benchmarks.lib.machine import RESULTS, write_results
from benchmarks.perf.speed import TutorialVAE, baseline_epoch, tutorial_loaders

BURDA_EPOCHS = 3280


def run_epochs(config: vaelab.RunConfig, data) -> list[float]:
    """Seconds of each epoch, as metrics.jsonl records them."""
    return [m["seconds"] for m in vaelab.train(config, data=data, progress=False).metrics]


def compiled_epochs(config: vaelab.RunConfig, data) -> dict:
    """The experiment: build, put the model under torch.compile as the step's forward (the
    step wraps whatever computes the terms), then fit. Its first epoch holds the compilation."""
    try:
        training = vaelab.build(config, data, progress=False)
        training.step.forward = torch.compile(training.model)
        seconds = [m["seconds"] for m in vaelab.fit(training, progress=False).metrics]
    except Exception as e:  # an experiment: report why, measure the rest
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
    return {"first_epoch": seconds[0], "epoch": statistics.median(seconds[1:])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per vaelab run (the first is reported apart)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--run-dir", type=Path, default=Path("gpu_default_run"),
                        help="where the default run is written (and evaluated)")
    args = parser.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA GPU"

    data = vaelab.load_data(progress=False)
    loaders = {"notebook": tutorial_loaders(data, args.workers, lean=False),
               "lean": tutorial_loaders(data, args.workers, lean=True, pin=True)}

    times = {"notebook": [], "lean": [], "eager": [], "captured": []}
    first = {"eager": [], "captured": []}
    for rep in range(args.reps):
        for key, (train_loader, test_loader) in loaders.items():
            torch.manual_seed(0)
            model = TutorialVAE().cuda()
            t = time.perf_counter()
            baseline_epoch(model, train_loader, test_loader, "cuda", as_written=key == "notebook")
            torch.cuda.synchronize()
            times[key].append(time.perf_counter() - t)
        for key, graph in (("eager", False), ("captured", True)):
            seconds = run_epochs(vaelab.RunConfig(epochs=args.epochs, device="cuda", cuda_graph=graph), data)
            first[key].append(seconds[0])
            times[key].append(statistics.median(seconds[1:]))
        print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()) + " per epoch",
              file=sys.stderr)

    burda = {}
    for name, objective, k in (("burda1 VAE", "elbo", 1), ("burda1 IWAE k=50", "iwae", 50)):
        config = vaelab.RunConfig(model=vaelab.preset("burda1"), preset="burda1", objective=objective, k=k,
                                  optimizer="adam", lr=1e-3, schedule="burda", batch_size=20, epochs=3,
                                  device="cuda")
        seconds = run_epochs(config, data)
        burda[name] = {"first_epoch": seconds[0], "epoch": statistics.median(seconds[1:]),
                       "projected_3280_epochs_hours": statistics.median(seconds[1:]) * BURDA_EPOCHS / 3600}
        print(f"{name}: {burda[name]['epoch']:.3f} s per epoch", file=sys.stderr)

    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vaelab", "train", "--device", "cuda", "--quiet", "--out",
                    str(args.run_dir)], check=True)
    train_wall = time.perf_counter() - t
    t = time.perf_counter()
    evaluated = subprocess.run([sys.executable, "-m", "vaelab", "evaluate", str(args.run_dir), "--device", "cuda",
                                "--quiet"], check=True, capture_output=True, text=True)
    eval_wall = time.perf_counter() - t
    record = json.loads((args.run_dir / "eval.json").read_text())

    paired = {key: statistics.median(b / c for b, c in zip(times[key], times["captured"])) for key in loaders}
    report = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "epoch_seconds": times, "first_epoch_seconds": first,
        "median": {k: statistics.median(v) for k, v in times.items()},
        "captured_vs_tutorial_paired": paired,
        "burda": burda,
        "default_train": {"wall_seconds": train_wall,
                          "metrics": [json.loads(x) for x in (args.run_dir / "metrics.jsonl").read_text().splitlines()]},
        "evaluate": {"wall_seconds": eval_wall, "seconds": record.get("seconds"), "nll": record["nll"],
                     "nll_se": record["nll_se"], "precision": record["precision"], "k": record["k"],
                     "printed": evaluated.stdout},
    }
    write_results(args.out, "gpu", report, markdown(report))
    # last, as its compilation may take long: the results above are written already
    report["captured_compiled"] = compiled_epochs(vaelab.RunConfig(epochs=args.epochs, device="cuda"), data)
    write_results(args.out, "gpu", report, markdown(report))
    return 0


def markdown(r: dict) -> str:
    m, f = r["median"], r["first_epoch_seconds"]
    last = r["default_train"]["metrics"][-1]
    e = r["evaluate"]
    rows = [f"Card: {r['card']}, PyTorch {r['torch']}, CUDA {r['cuda']}. Medians of {len(r['epoch_seconds']['notebook'])} "
            "alternating repetitions; vaelab's s/epoch as metrics.jsonl records it (training pass and test loss), "
            "its first epoch (warm-up and capture) apart.",
            "",
            "| workload | s/epoch | first epoch |",
            "| --- | --- | --- |",
            f"| tutorial notebook's loop as written (fresh DataLoader workers each epoch, bar, per-step read-back) "
            f"| {m['notebook']:.3f} | |",
            f"| the same loop, lean (persistent pinned workers, no per-step read-back or bar) | {m['lean']:.3f} | |",
            f"| vaelab, tutorial recipe, eager (`--cuda-graph off`) | {m['eager']:.3f} | {statistics.median(f['eager']):.2f} |",
            f"| vaelab, tutorial recipe, captured step (default) | {m['captured']:.3f} | {statistics.median(f['captured']):.2f} |"]
    c = r.get("captured_compiled", {"error": "not run"})
    rows.append(f"| experiment: captured step, model under torch.compile | {c['epoch']:.3f} | {c['first_epoch']:.2f} |"
                if "epoch" in c else f"| experiment: captured step, model under torch.compile | {c['error']} | |")
    for name, b in r["burda"].items():
        rows.append(f"| {name} (Adam, batch 20) | {b['epoch']:.3f} | {b['first_epoch']:.2f} |")
    paired = r["captured_vs_tutorial_paired"]
    rows += ["", f"Captured vs the notebook's loop as written: {paired['notebook']:.1f}x; vs the lean loop: "
                 f"{paired['lean']:.1f}x (medians of each repetition's own ratio); vs eager: "
                 f"{m['eager'] / m['captured']:.1f}x.",
             "",
             "Projected time of a Burda et al. row (3,280 epochs): " + "; ".join(
                 f"{name} {b['projected_3280_epochs_hours']:.2f} h" for name, b in r["burda"].items()) + ".",
             "",
             f"A whole default `vaelab train --device cuda` (20 epochs, figures included): "
             f"{r['default_train']['wall_seconds']:.1f} s wall, test negative ELBO {last['test_loss']:.2f} nats.",
             "",
             f"`vaelab evaluate` of that run, K={e['k']}, 10,000 test images, {e['precision']}: "
             f"{e['seconds']:.2f} s of evaluation, {e['wall_seconds']:.1f} s wall; test NLL "
             f"{e['nll']:.3f} ± {e['nll_se']:.3f} nats."]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
