"""Which samples of a conditional VAE look like the class asked for: N(0, I) or the per-class
prior p(z|y), at two latent sizes.

    python -m benchmarks.decisions.class_prior [--epochs 3] [--out benchmarks/results]

Each row trains the tutorial's networks (784-256-128, ReLU) as a conditional VAE on dynamically
binarized MNIST with Adam 1e-3, batch 100, seed 0, then draws 100 samples of each digit (decoder
means for z ~ p(z|y)) and asks a classifier (benchmarks.lib.digits: an MLP trained for two
epochs on MNIST's training images) which digit each shows. The table gives, per row, the share
of each digit's samples classified as that digit, and the test negative ELBO.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import torch

import vaelab
from vaelab.plots import sample_images

from benchmarks.lib.digits import classify, digit_classifier
from benchmarks.lib.machine import hardware, write_results

ROWS = ((2, "standard"), (16, "standard"), (16, "per-class"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    data = vaelab.load_data(progress=False)
    classifier = digit_classifier(data)
    results = []
    for z_dim, prior in ROWS:
        config = vaelab.RunConfig(epochs=args.epochs, optimizer="adam", lr=1e-3,
                                  model=vaelab.ModelConfig(z_dim=z_dim, conditional=True,
                                                           prior=prior))
        result = vaelab.train(config, data=data, progress=False)
        shares = [(classify(classifier, sample_images(result.model, 100, seed=digit,
                                                      labels=torch.full((100,), digit)))
                   == digit).float().mean().item() for digit in range(10)]
        results.append({"z_dim": z_dim, "prior": prior, "shares": shares,
                        "test_loss": result.metrics[-1]["test_loss"]})
        print(f"z_dim {z_dim}, {prior}: {min(shares):.2f} to {max(shares):.2f}", file=sys.stderr)
    lines = [
        f"Machine: {hardware()}, {date.today()}. Conditional VAEs of the tutorial's networks,"
        f" {args.epochs} epochs (Adam 1e-3); 100 samples of each digit, the share the classifier"
        " gives that digit.",
        "",
        "| z_dim | prior | lowest share | median | highest | by digit 0-9 | test negative ELBO |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        s = sorted(r["shares"])
        lines.append(f"| {r['z_dim']} | {r['prior']} | {s[0]:.2f} | {(s[4] + s[5]) / 2:.2f} |"
                     f" {s[-1]:.2f} | {', '.join(f'{v:.2f}' for v in r['shares'])} |"
                     f" {r['test_loss']:.2f} |")
    lines += ["", "Made by `python -m benchmarks.decisions.class_prior`."]
    write_results(args.out, "class_prior", {"epochs": args.epochs, "rows": results},
                  "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
