"""The signal-to-noise ratio of the inference network's gradient against k, IWAE against DReG.

    python -m benchmarks.paper.gradient_snr [--draws 200] [--out DIR]

As in Rainforth et al. (2018), "Tighter variational bounds are not necessarily better": a model
(the tutorial's network with a 10-dimensional latent) is trained briefly on MNIST with the IWAE
bound (k=10), then, on a fixed batch of test images, the gradient of the negative IWAE bound is
drawn `--draws` times for each k (keyed noise). For each parameter the SNR is |mean| / standard
deviation over the draws; reported is its mean over the encoder head's weights (the inference
network), and, for reference, over the decoder's last layer (the generative network), which both
estimators share. One image by default, as Rainforth et al. measure it per data point.
Writes gradient_snr.md, .json and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import vaelab
from vaelab import rng
from vaelab.objectives import estimated, negative_iwae

from benchmarks.lib.machine import RESULTS, cpu_description, write_results

KS = (1, 3, 10, 30, 100, 300, 1000)


def snr(model, x, k: int, estimator: str, draws: int) -> dict:
    """Mean SNR over the head's weights and over the decoder's last layer, for draws of k."""
    head, last = model.head.weight, model.decoder[-1].weight
    rows = {"encoder": [], "decoder": []}
    d = model.noise_dim
    for r in range(draws):
        eps = rng.normal(rng.row_keys(rng.key(11, "snr", k, r), torch.arange(len(x))), k * d)
        terms = estimated(model, x, eps.view(len(x), k, d).transpose(0, 1), estimator)
        g_head, g_last = torch.autograd.grad(negative_iwae(terms).mean(), (head, last))
        rows["encoder"].append(g_head.flatten())
        rows["decoder"].append(g_last.flatten())
    out = {}
    for part, grads in rows.items():
        g = torch.stack(grads).double()
        ratio = g.mean(0).abs() / g.std(0).clamp_min(1e-30)
        out[part] = float(ratio.mean())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--images", type=int, default=1, help="the fixed batch")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    config = vaelab.RunConfig(
        model=vaelab.ModelConfig(z_dim=10),
        objective="iwae",
        k=10,
        optimizer="adam",
        lr=1e-3,
        epochs=3,
        train_size=20000,
        test_size=1000,
        device="cpu",
    )
    result = vaelab.train(config, progress=False)
    model = result.model
    x = model.observe(result.data.test_images[: args.images], torch.arange(args.images))
    table = {e: {k: snr(model, x, k, e, args.draws) for k in KS} for e in ("reparam", "dreg")}
    seconds = time.perf_counter() - start

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for estimator, style in (("reparam", "o-"), ("dreg", "s-")):
        name = "IWAE" if estimator == "reparam" else "DReG"
        ax.plot(
            KS,
            [table[estimator][k]["encoder"] for k in KS],
            style,
            label=f"{name}: inference network",
        )
    ax.plot(
        KS,
        [table["reparam"][k]["decoder"] for k in KS],
        "^--",
        color="grey",
        label="generative network (both)",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("k (importance samples per image)")
    ax.set_ylabel("mean SNR of the gradient")
    ax.set_title("Gradient signal-to-noise ratio against k")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "gradient_snr.png", dpi=100)

    hardware = f"{cpu_description()}, PyTorch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    lines = [
        (
            f"Machine: {hardware}. The tutorial network with z_dim=10, trained 3 epochs (IWAE k=10,"
            f" Adam 1e-3, 20,000 images); {args.images} test image{'s' if args.images > 1 else ''},"
            f" {args.draws} keyed draws per k; mean over parameters of |mean| / std of the"
            f" gradient. {seconds / 60:.1f} minutes in all."
        ),
        "",
        (
            "Made by `python -m benchmarks.paper.gradient_snr`. Figure:"
            " [gradient_snr.png](gradient_snr.png)."
        ),
        "",
        "| k | IWAE, inference | DReG, inference | generative (IWAE) |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {k} | {table['reparam'][k]['encoder']:.3f} | {table['dreg'][k]['encoder']:.3f} |"
        f" {table['reparam'][k]['decoder']:.3f} |"
        for k in KS
    ]
    slope = {
        e: float(np.polyfit(np.log(KS), np.log([table[e][k]["encoder"] for k in KS]), 1)[0])
        for e in table
    }
    lines += [
        "",
        (
            f"Slope of log SNR against log k, inference network: IWAE {slope['reparam']:+.2f},"
            f" DReG {slope['dreg']:+.2f}. Rainforth et al. (2018) find that the IWAE bound's"
            " inference-network SNR falls as k grows."
        ),
    ]
    write_results(
        args.out,
        "gradient_snr",
        {
            "hardware": hardware,
            "draws": args.draws,
            "images": args.images,
            "snr": table,
            "slope": slope,
            "seconds": seconds,
        },
        "\n".join(lines) + "\n",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
