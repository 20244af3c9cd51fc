"""The mixture of discretized logistics (PixelCNN++'s, colours coupled within a pixel) against the
single discretized logistic, on 32x32 RGB photo patches, under the same top-down hierarchy;
bits per dimension, paired image by image.

    pip install scikit-image        # the photos (its bundled sample images)
    python -m benchmarks.paper.rgb_mixture                       # both rows, 30 epochs each
    python -m benchmarks.paper.rgb_mixture --epochs 5 --table-only

The data: the seven colour photographs bundled with scikit-image (astronaut, coffee, chelsea,
rocket, immunohistochemistry, retina, hubble_deep_field), cut into non-overlapping 32x32 patches,
every tenth patch held out for the test set (3,880 patches, 388 of them test). Written once as an
.npz into the runs folder and read with `--data-dir`.

The rows, both `--preset topdown-rgb` (width 32, z of 4 channels, 1, 2, 2, 2, 1 layers at 1, 4,
8, 16, 32, Adam 1e-3, batch 100), differing in the likelihood only:

    logistic          one discretized logistic per pixel and channel (its location and scale)
    logistic-mixture  10 logistics per pixel, the colours coupled as in PixelCNN++

Each is evaluated with the hierarchy's default K on every test patch; `vaelab compare` pairs the
mixture with the single logistic. A row resumes from its checkpoint; runs go to
runs/rgb_mixture/<row>, the table to benchmarks/results/rgb_mixture.md and .json, each finished
row's records to benchmarks/results/rgb_mixture/<row>/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import vaelab
from benchmarks.lib.machine import write_results
from benchmarks.lib.resumable import (chosen_rows, evaluate_row, evaluated_rows, keep, kept_dir,
                                      machines, paired_cell, paired_rows, table_parser,
                                      train_row)

ROWS = ("logistic", "logistic-mixture")
BASELINE = "logistic"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina",
          "hubble_deep_field")
SIDE = 32
TEST_EVERY = 10


def photo_patches(directory: Path) -> Path:
    """directory/patches.npz: the photos' non-overlapping SIDE x SIDE patches (N, SIDE, SIDE, 3)
    uint8, every TEST_EVERY-th held out as x_test (written once)."""
    path = directory / "patches.npz"
    if path.is_file():
        return path
    import skimage.data

    patches = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()[..., :3]
        rows, columns = image.shape[0] // SIDE, image.shape[1] // SIDE
        cut = image[:rows * SIDE, :columns * SIDE].reshape(rows, SIDE, columns, SIDE, 3)
        patches.append(cut.transpose(0, 2, 1, 3, 4).reshape(-1, SIDE, SIDE, 3))
    patches = np.concatenate(patches)
    test = np.arange(len(patches)) % TEST_EVERY == TEST_EVERY - 1
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=patches[~test], x_test=patches[test])
    return path


def row_config(row: str, args, data: Path) -> vaelab.RunConfig:
    model = vaelab.preset("topdown-rgb").replace(likelihood=row)
    return vaelab.RunConfig(preset="topdown-rgb", model=model, epochs=args.epochs,
                            seed=args.seed, device="cpu", data_dir=str(data))


def train_and_evaluate(row: str, args) -> None:
    """The row trained (or resumed) on the patches, evaluated with its model's default K, and its
    records kept."""
    run_dir = args.runs / row
    data = photo_patches(args.runs / "data")
    train_row(row, row_config(row, args, data), run_dir, args.quiet)
    evaluate_row(run_dir, k=vaelab.load_run(run_dir).default_k, quiet=args.quiet)
    keep(run_dir, kept_dir(row, args))


def main(argv=None) -> int:
    parser = table_parser(__doc__, ROWS, "rgb_mixture")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    rows = chosen_rows(parser, args.rows, ROWS)
    run_dirs = evaluated_rows(rows, args, lambda row: train_and_evaluate(row, args))
    if run_dirs:
        write_table(run_dirs, args)
    return 0


def write_table(run_dirs: dict, args) -> None:
    hardware = machines(list(run_dirs.values()))
    results = [{**values, "bits_per_dim": record["bits_per_dim"]}
               for values, record, _ in paired_rows(run_dirs, BASELINE)]
    dims = 3 * SIDE * SIDE
    lines = [
        f"Machine: {hardware}. 32x32 RGB patches of scikit-image's seven colour photographs"
        f" ({', '.join(PHOTOS)}), every tenth held out; `--preset topdown-rgb` with each"
        " likelihood, the same seed. Test NLL by importance sampling with the hierarchy's"
        " default K (fp32) on every test patch: nats per image ± its Monte-Carlo standard"
        f" error, and bits per dimension (nats / ({dims} ln 2)). `vaelab compare ROW logistic`:"
        " the paired mean difference over the test patches ± its standard error, in nats"
        " (negative: ROW is better).",
        "",
        "| row | epochs | training | K | test patches | NLL (nats) | bits/dim | negative ELBO |"
        " test KL | vs logistic | threads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        versus = paired_cell(r["paired"])
        lines.append(
            f"| {r['row']} | {r['epochs']} | {r['train_seconds'] / 60:.0f} min | {r['k']} |"
            f" {r['images']} | {r['nll']:.1f} ± {r['nll_se']:.2f} | {r['bits_per_dim']:.3f} |"
            f" {r['neg_elbo']:.1f} | {r['kl']:.1f} | {versus} | {r['threads']} |")
    lines += ["", f"Made by `python -m benchmarks.paper.rgb_mixture --epochs {args.epochs}`. Training"
              " is wall time at the torch thread count of the last column, and includes any other"
              " load on the machine."]
    report = {"hardware": hardware, "epochs": args.epochs, "rows": results}
    write_results(args.out, args.name, report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
