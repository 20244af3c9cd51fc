"""MNIST as a folder of PNGs: how long vaelab takes to read it, and a run trained from it.

Writes MNIST's 70,000 images (from $VAELAB_DATA_DIR) as train/<digit>/*.png and
test/<digit>/*.png under --folder, then times `load_data` on it twice (decoding every
file, then from the cache, in a fresh cache folder) and one pass over the pixels the
second read gave (the cache is memory-mapped, so the read itself touches none), then
runs `vaelab train` and `vaelab evaluate` on the folder and writes
benchmarks/results/image_folder.md and .json.

    python -m benchmarks.perf.image_folder --folder /tmp/mnist_pngs
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.lib.machine import RESULTS, cpu_description, write_results



def write_pngs(folder: Path) -> None:
    """MNIST's images as PNGs, one folder per split and digit."""
    import numpy as np
    from PIL import Image

    from vaelab.data import load_data

    mnist = load_data(progress=False)
    for split, images, labels in (("train", mnist.train_images, mnist.train_labels),
                                  ("test", mnist.test_images, mnist.test_labels)):
        for digit in range(10):
            (folder / split / str(digit)).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images.numpy(), labels.tolist())):
            Image.fromarray(np.ascontiguousarray(image[0])).save(folder / split / str(label) / f"{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="where to write the PNGs (created)")
    parser.add_argument("--train", default="", help="extra `vaelab train` options")
    parser.add_argument("--k", type=int, default=5000, help="importance samples per test image")
    parser.add_argument("--runs", default="runs/image_folder", help="folder for the run")
    args = parser.parse_args()

    if not (args.folder / "test").is_dir():
        start = time.perf_counter()
        write_pngs(args.folder)
        print(f"wrote the PNGs in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    files = sum(1 for _ in args.folder.rglob("*.png"))

    cache = tempfile.mkdtemp(prefix="vaelab-cache-")
    os.environ["XDG_CACHE_HOME"] = cache  # a cold cache: the first read decodes every file
    from vaelab.data import load_data

    reads = []
    for _ in range(2):
        start = time.perf_counter()
        data = load_data(args.folder, progress=False)
        reads.append(time.perf_counter() - start)
    start = time.perf_counter()
    int(data.train_images.sum()) + int(data.test_images.sum())  # every page of the map read
    first_pass = time.perf_counter() - start
    cache_bytes = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file())

    run = Path(args.runs) / time.strftime("%Y%m%d-%H%M%S")
    env = {**os.environ, "XDG_CACHE_HOME": cache}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vaelab", "train", "--data-dir", str(args.folder), "--out", str(run),
                    "--quiet", *shlex.split(args.train)], check=True, env=env)
    train_wall = time.perf_counter() - start
    subprocess.run([sys.executable, "-m", "vaelab", "evaluate", str(run), "--k", str(args.k), "--quiet"],
                   check=True, env=env)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluation = json.loads((run / "eval.json").read_text())

    table = "\n".join([
        "# MNIST as a folder of PNGs", "",
        f"Machine: {cpu_description()}. {files} PNG files (train/<digit>/, test/<digit>/).", "",
        "| | |", "| --- | --- |",
        f"| first read (decode every file, write the cache) | {reads[0]:.1f} s |",
        f"| second read (from the cache, memory-mapped) | {reads[1]:.1f} s |",
        f"| one pass over the mapped pixels | {first_pass:.2f} s "
        f"(cache {cache_bytes / 2**20:.0f} MiB) |",
        f"| `vaelab train --data-dir FOLDER {args.train}`, wall | {train_wall:.1f} s ({len(metrics)} epochs) |",
        f"| test negative ELBO, last epoch | {metrics[-1]['test_loss']:.2f} nats |",
        f"| `vaelab evaluate RUN --k {args.k}`: test NLL | {evaluation['nll']:.2f} ± {evaluation['nll_se']:.3f} nats "
        f"({evaluation['bits_per_dim']:.4f} bits/dim), {evaluation['test_images']} images |",
    ]) + "\n"
    write_results(RESULTS, "image_folder",
                  {"machine": cpu_description(), "files": files, "read_seconds": reads,
                   "first_pass_seconds": first_pass, "cache_bytes": cache_bytes,
                   "train_wall": train_wall,
                   "train_options": args.train, "metrics": metrics,
                   "eval": {k: v for k, v in evaluation.items() if k not in ("log_px", "per_image")}, "run": str(run)}, table)


if __name__ == "__main__":
    main()
