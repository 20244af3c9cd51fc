"""Reproduce Burda, Grosse & Salakhutdinov (2015), Table 1, one stochastic layer, MNIST.

    python -m benchmarks.paper.reproduce_burda          # the paper's 3280 epochs (GPU-sized)
    python -m benchmarks.paper.reproduce_burda --epochs 13 --rows vae  # a short CPU run

Each row trains the `burda1` network (784-200-200-50 tanh encoder, 50-200-200-784
decoder) with Adam, batch 20 and the paper's schedule (lr 1e-3 * 10^(-i/7) for 3^i
epochs), as a VAE (k=1) or an IWAE (k=5, k=50), then estimates the test NLL by
importance sampling with K=5000. A row whose run directory already holds a
checkpoint resumes it, so a long run can be split across sessions.

Writes benchmarks/results/burda.md and burda.json (runs go to runs/burda/<row>).
Differences from the paper, kept on purpose: Adam's epsilon is PyTorch's 1e-8
(the paper used 1e-4), and the data is binarized afresh for every batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import vaelab
from vaelab.runs import CHECKPOINT
from vaelab.sampling import importance_sampled
from vaelab.train import pick_device

from benchmarks.lib.machine import RESULTS, cpu_description

PAPER = {"vae": ("VAE, k=1", "elbo", 1, 86.76), "iwae5": ("IWAE, k=5", "iwae", 5, 85.54),
         "iwae50": ("IWAE, k=50", "iwae", 50, 84.78)}


def run_row(row: str, args) -> dict:
    name, objective, k, paper = PAPER[row]
    run_dir = args.runs / row
    config = vaelab.RunConfig(model=vaelab.preset("burda1"), preset="burda1", objective=objective, k=k,
                              optimizer="adam", lr=1e-3, schedule="burda", batch_size=20,
                              epochs=args.epochs, device=args.device, seed=args.seed)
    resume = (run_dir / CHECKPOINT).is_file()
    print(f"{name}: {'resuming' if resume else 'training'} {run_dir}", file=sys.stderr)
    result = vaelab.train(config, run_dir, progress=not args.quiet, resume=resume)
    train_seconds = sum(m["seconds"] for m in result.metrics)
    start = time.perf_counter()
    r = importance_sampled(result.model, result.data.test_images, k=args.k_eval, progress=not args.quiet)
    eval_seconds = time.perf_counter() - start
    return {"row": name, "paper_nll": paper, "nll": r["nll"], "nll_se": r["nll_se"],
            "nll_se_images": r["nll_se_images"], "neg_elbo": r["neg_elbo"], "iwae": r["iwae"],
            "epochs": len(result.metrics), "train_seconds": train_seconds, "eval_seconds": eval_seconds,
            "eval_precision": r["precision"], "k_eval": args.k_eval}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="vae,iwae5,iwae50", help="comma-separated: vae, iwae5, iwae50")
    parser.add_argument("--epochs", type=int, default=3280, help="3280 = the paper's 3^0 + ... + 3^7")
    parser.add_argument("--k-eval", type=int, default=5000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=Path("runs/burda"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name()
    else:
        threads = torch.get_num_threads()
        hardware = f"{cpu_description()}, {threads} thread{'s' if threads > 1 else ''}"
    hardware += f", PyTorch {torch.__version__}"
    rows = [run_row(row.strip(), args) for row in args.rows.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "burda.json").write_text(json.dumps({"hardware": hardware, "rows": rows}, indent=2) + "\n")
    lines = [f"Hardware: {hardware}. Test NLL by importance sampling, K={args.k_eval}, nats per image "
             "(± Monte-Carlo standard error; ± over test images in brackets).", "",
             "| model | paper | vaelab | negative ELBO | epochs | training | evaluation |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['paper_nll']:.2f} | {r['nll']:.2f} ± {r['nll_se']:.3f} "
                     f"({r['nll_se_images']:.2f}) | {r['neg_elbo']:.2f} | {r['epochs']} | "
                     f"{r['train_seconds'] / 60:.1f} min | {r['eval_seconds'] / 60:.1f} min |")
    table = "\n".join(lines) + "\n"
    (args.out / "burda.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
