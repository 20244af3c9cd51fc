"""VQ-VAE against a Gaussian VAE on the same encoder and decoder: the VQ-VAE's upper bounds on
-log p(x) (uniform and learned prior over its codes) against the Gaussian VAE's importance-
sampled NLL, paired image by image.

    python -m benchmarks.paper.vq                       # 20 epochs each, the prior 20 epochs
    python -m benchmarks.paper.vq --epochs 1 --prior-epochs 1 --k-eval 20   # a smoke run

Both rows use `--preset vq-vae`'s networks on dynamically binarized MNIST: the encoder's two
stride-2 4x4 convolutions (32, 64 channels, ReLU) and a 3x3 convolution to a 7x7 grid of
D = 16 channels; the decoder its mirror (a 3x3 convolution, then two stride-2 transposed
convolutions) to the Bernoulli logits. The rows:

    vq-vae     K = 512 codes per cell (the paper's), commitment 0.25, EMA decay 0.99; the prior
               over codes trained afterwards by `vaelab train-prior` for --prior-epochs
    gaussian   the same encoder, a linear head giving mu and logvar for each of the grid's
               16 x 7 x 7 = 784 latents, p(z) = N(0, I) and the analytic KL, the same decoder

Adam 1e-3, batch 100, seed 0, the decoder's output bias at the training pixels' logit. The VQ-VAE
is evaluated by its bounds, -log p(x|z_q) - log p(z_q) at each test image's codes (exact, no
Monte Carlo), the Gaussian VAE by importance sampling with --k-eval draws per image (an estimate
whose bias is upwards, towards the IWAE bound). `vaelab compare` pairs them on all 10,000 test
images. Runs go to runs/vq/<row>; the table to benchmarks/results/vq.md and vq.json, each row's
records to benchmarks/results/vq/<row>/, with the VQ-VAE's samples from its learned prior.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

import vaelab
from vaelab.config import EvaluateOptions, TrainPriorOptions
from vaelab.diagnostics import compare_runs
from vaelab.evaluate import evaluate_run
from vaelab.nets import GridDecoder, GridEncoder
from vaelab.plots import samples_figure
from vaelab.runs import METRICS, PRIOR, read_eval, read_metrics, write_eval
from vaelab.sampling import importance_sampled
from vaelab.train_prior import train_prior

from benchmarks.lib.machine import RESULTS, write_results
from benchmarks.lib.resumable import chosen_rows, keep, machines, threads, train_row

ROWS = ("vq-vae", "gaussian")
CHANNELS, D, SIDE = (32, 64), 16, 7


class Flat(nn.Module):
    """GridEncoder's output flattened: (N, 1, 28, 28) -> (N, D * 7 * 7) features."""

    def __init__(self):
        super().__init__()
        self.grid = GridEncoder((1, 28, 28), CHANNELS, D, "relu")

    def forward(self, x):
        return self.grid(x).flatten(1)


class Unflat(nn.Module):
    """z (M, D * 7 * 7) -> GridDecoder -> (M, 1, 28, 28) logits."""

    def __init__(self):
        super().__init__()
        self.grid = GridDecoder(D, CHANNELS, "relu", 1)

    def forward(self, z):
        return self.grid(z.view(len(z), D, SIDE, SIDE))


def gaussian_model(seed: int) -> vaelab.VAE:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return vaelab.VAE(Flat(), Unflat(), z_dim=D * SIDE * SIDE)


def row_config(row: str, args) -> vaelab.RunConfig:
    common = dict(optimizer="adam", lr=1e-3, batch_size=100, epochs=args.epochs, seed=args.seed,
                  device="cpu", output_init="data")
    if row == "vq-vae":
        return vaelab.RunConfig(preset="vq-vae", **common)
    return vaelab.RunConfig(**common)


def run_row(row: str, args) -> Path:
    run_dir = args.runs / row
    model = gaussian_model(args.seed) if row == "gaussian" else None
    train_row(row, row_config(row, args), run_dir, args.quiet, model=model)
    record = read_eval(run_dir)
    if row == "vq-vae":
        prior = read_metrics(run_dir / PRIOR) if (run_dir / PRIOR).is_dir() else []
        if len(prior) < args.prior_epochs:
            train_prior(TrainPriorOptions(run=str(run_dir), epochs=args.prior_epochs,
                                          quiet=args.quiet))
            record = None
        if record is None or record.get("bound") != "learned":
            evaluate_run(EvaluateOptions(run=str(run_dir), device="cpu", quiet=args.quiet))
        figure = samples_figure(vaelab.load_run(run_dir), 100)
        (args.out / args.name / row).mkdir(parents=True, exist_ok=True)
        figure.savefig(args.out / args.name / row / "samples.png", dpi=100)
    elif record is None or record.get("k") != args.k_eval:
        loaded = vaelab.load_run(run_dir, encoder=Flat(), decoder=Unflat())
        data = vaelab.load_data()
        start = time.perf_counter()
        r = importance_sampled(loaded, data.test_images, k=args.k_eval, progress=not args.quiet)
        r["seconds"], r["device"], r["processes"] = time.perf_counter() - start, "cpu", 1
        write_eval(run_dir, r)
    keep(run_dir, args.out / args.name / row)
    if (run_dir / PRIOR / METRICS).is_file():  # the prior's epochs beside the run's records
        shutil.copyfile(run_dir / PRIOR / METRICS,
                        args.out / args.name / row / "prior_metrics.jsonl")
    return run_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS),
                        help="comma-separated, from: " + ", ".join(ROWS))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--prior-epochs", type=int, default=20)
    parser.add_argument("--k-eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=Path("runs/vq"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="vq")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    rows = chosen_rows(parser, args.rows, ROWS)
    run_dirs = {row: run_row(row, args) for row in rows}
    write_table(run_dirs, args)
    return 0


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def write_table(run_dirs: dict, args) -> None:
    hardware = machines(list(run_dirs.values()))
    results = []
    for row, run_dir in run_dirs.items():
        record, metrics = read_eval(run_dir), read_metrics(run_dir)
        entry = {"row": row, "nll": record["nll"], "epochs": len(metrics),
                 "train_seconds": sum(m["seconds"] for m in metrics),
                 "eval_seconds": record.get("seconds"), "threads": threads(run_dir),
                 # the VQ-VAE's at its codes; the Gaussian's E_q[-log p(x|z)], of the last epoch
                 "reconstruction": record.get("reconstruction", metrics[-1]["test_loss"]
                                              - metrics[-1]["test_kl"]),
                 "last_epoch": metrics[-1]}
        if row == "vq-vae":
            prior = read_metrics(run_dir / PRIOR)
            entry.update(bounds=record["bounds"], prior_epochs=len(prior),
                         prior_seconds=sum(m["seconds"] for m in prior))
        else:
            entry.update(nll_se=record["nll_se"], neg_elbo=record["neg_elbo"], k=record["k"])
        results.append(entry)
    paired = (compare_runs(run_dirs["vq-vae"], run_dirs["gaussian"])
              if len(run_dirs) == 2 else None)
    by_row = {r["row"]: r for r in results}
    lines = [
        f"Machine: {hardware}. Dynamically binarized MNIST, all 10,000 test images, nats per"
        f" image. Both models: `--preset vq-vae`'s encoder and decoder (two stride-2 convolutions,"
        f" 32 and 64 channels, to a 7x7 grid of 16 channels, and back), Adam 1e-3, batch 100,"
        f" {plural(args.epochs, 'epoch')}, seed {args.seed}. The VQ-VAE's codes: K = 512 per"
        " cell, 49 cells; its learned prior, a causal transformer over the 49 codes, trained"
        f" {plural(args.prior_epochs, 'epoch')} by `vaelab train-prior`. Its numbers are upper"
        " bounds on -log p(x), exact at each image's codes; the Gaussian VAE's is importance"
        " sampled (K draws per image).",
        "",
        "| model | -log p(x) | how | reconstruction -log p(x\\|z) | training | evaluation |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    if "vq-vae" in by_row:
        r = by_row["vq-vae"]
        for name, how in (("uniform", "bound, uniform prior (log K per code)"),
                          ("learned", "bound, learned prior")):
            if name in r["bounds"]:
                extra = (f" + prior {r['prior_seconds'] / 60:.0f} min" if name == "learned"
                         else "")
                lines.append(
                    f"| VQ-VAE | {r['bounds'][name]['nats']:.2f} | {how} |"
                    f" {r['reconstruction']:.2f} | {r['train_seconds'] / 60:.0f} min{extra} |"
                    f" {(r['eval_seconds'] or 0):.0f} s |")
    if "gaussian" in by_row:
        r = by_row["gaussian"]
        lines.append(
            f"| Gaussian VAE | {r['nll']:.2f} ± {r['nll_se']:.2f} | importance sampled,"
            f" K={r['k']} | {r['reconstruction']:.2f} | {r['train_seconds'] / 60:.0f} min |"
            f" {r['eval_seconds'] / 60:.0f} min |")
    if paired is not None:
        lines += ["", f"`vaelab compare` (VQ-VAE's tighter bound minus the Gaussian VAE's NLL),"
                  f" paired over the test images: {paired['difference']:+.2f} ±"
                  f" {paired['se']:.2f} nats per image."]
    if (args.out / args.name / "vq-vae" / "samples.png").is_file():
        lines += ["", f"![VQ-VAE: codes drawn from its learned prior, decoded]({args.name}/vq-vae/"
                  "samples.png)"]
    lines += ["", "Made by `python -m benchmarks.paper.vq`. Times are wall times at the torch"
              " thread count of each run, with any other load on the machine."]
    report = {"hardware": hardware, "epochs": args.epochs, "prior_epochs": args.prior_epochs,
              "k_eval": args.k_eval, "rows": results,
              "paired": None if paired is None else {"difference": paired["difference"],
                                                     "se": paired["se"]}}
    write_results(args.out, args.name, report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
