"""Peak memory of a training epoch against the size of the data set.

    python -m benchmarks.perf.memory [--sizes 20000,40000,80000] \\
        [--baseline TREE --baseline-sizes 20000,40000] [--full 20000] [--out benchmarks/results]

Synthetic sets of 64x64 RGB images (smooth random colour blobs with pixel noise, uint8; 500
test images in each) are written once as .npz files under --sets and reused. Each measurement
is one fresh interpreter running the tutorial MLP (--preset tutorial, its default Bernoulli
likelihood, Adam 1e-3) for one epoch with vaelab's own `train.build` and `train.fit`, under
the ELBO (batch 100) and under IWAE k=50 (batch 20), with the first 500 test images. The child
reads its own peak resident set size (VmHWM, the figure getrusage reports as ru_maxrss) after
`build` (the load phase: the .npz read, the model, the step's buffers, the test set), resets
it (/proc/self/clear_refs) and reads it again after the epoch (its steps, the test pass, the
checkpoint); the process's peak is the larger of the two. A parent's ru_maxrss for a child is
no use here: a child started by vfork and exec inherits the parent's own peak in it.

A full epoch of IWAE k=50 on 80,000 such images takes about two hours on two cores (4,000
steps of 1,000 decoder rows of 12,288 pixels), so the epochs are cut, except the ELBO epochs of
--full: fit runs its epoch with the step's steps_per_epoch cut once the epoch's draws are made
(its order and its first chunk of draws, or in a tree that draws the whole epoch at once all
of them), which is where memory that grows with the data would be taken. The ELBO's cut epoch
runs into its third chunk (two redraws); IWAE's, 5 steps, stays in its first (a chunk is 67 of
its steps). --full runs whole ELBO epochs, to show that the cut epoch's peak is the epoch's.

With --baseline, another checkout (e.g. `git worktree add /tmp/baseline REV`) is measured the
same way at --baseline-sizes, its vaelab first on PYTHONPATH. Reported: each peak, and for each
tree and objective the growth per added image (least-squares slope of the peak over the sizes)
as a multiple of one image's uint8 size, 12,288 bytes. Writes memory.md and memory.json to
--out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.lib.machine import REPO, hardware, write_results

SIDE, TEST_IMAGES = 64, 500
IMAGE_BYTES = SIDE * SIDE * 3
PHASES = ("peak", "load", "epoch")  # the process's peak, and each phase's
OBJECTIVES = {  # objective: (RunConfig fields, chunks of draws the cut epoch enters, or steps)
    "elbo": ({"objective": "elbo", "batch_size": 100}, {"chunks": 3}),
    "iwae": ({"objective": "iwae", "k": 50, "batch_size": 20}, {"steps": 5}),
}

# The measurement, in a fresh interpreter: argv[1] is a JSON spec.
CHILD = r"""
import json, re, sys, time
from pathlib import Path

def status(field):  # VmHWM: the peak resident set size; VmRSS: what is resident now
    text = Path("/proc/self/status").read_text()
    return int(re.search(field + r":\s+(\d+) kB", text).group(1)) * 1024

def peak():
    return status("VmHWM")

spec = json.loads(sys.argv[1])
from vaelab.config import RunConfig
from vaelab.train import build, fit
imported = peak()
start = time.perf_counter()
config = RunConfig(data_dir=spec["data"], epochs=1, test_size=spec["test"], optimizer="adam",
                   lr=1e-3, **spec["config"])
training = build(config, progress=False)
loaded, resident, built = peak(), status("VmRSS"), time.perf_counter()
Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from what is resident
step = training.step
full = step.steps_per_epoch
steps = spec.get("steps")
if spec.get("chunks"):
    # the tree's chunk of steps; a tree that draws the whole epoch runs as many steps
    row_bytes = 4 * (step.images[0].numel() + step.samples * training.model.noise_dim)
    chunk = getattr(step, "chunk_steps", None) or (64 << 20) // (step.batch_size * row_bytes)
    steps = (spec["chunks"] - 1) * chunk + 1
if steps is not None and steps < full:
    cls = type(step)

    class Cut(cls):
        # the whole epoch's count until its draws are made, then the cut's
        cut = False

        @property
        def steps_per_epoch(self):
            return steps if self.cut else cls.steps_per_epoch.fget(self)

        def begin_epoch(self, seed, epoch):
            super().begin_epoch(seed, epoch)
            self.cut = True

    step.__class__ = Cut
fit(training, run_dir=spec["run"], progress=False)
print(json.dumps({"imported": imported, "load": loaded, "resident": resident, "epoch": peak(),
                  "steps": min(steps or full, full), "steps_per_epoch": full,
                  "chunk_steps": getattr(step, "chunk_steps", None),
                  "load_s": built - start, "epoch_s": time.perf_counter() - built}))
"""


def blobs(n: int, rng: np.random.Generator, low: int = 8) -> np.ndarray:
    """n (SIDE, SIDE, 3) uint8 images: Gaussian colour noise on a low x low grid, bilinearly
    enlarged, plus pixel noise."""
    a = np.clip((np.arange(SIDE) + 0.5) * low / SIDE - 0.5, 0, low - 1)
    i0 = np.floor(a).astype(int)
    i1, f = np.minimum(i0 + 1, low - 1), a - i0
    up = np.zeros((SIDE, low))
    up[np.arange(SIDE), i0] += 1 - f
    up[np.arange(SIDE), i1] += f
    up = up.astype(np.float32)
    out = np.empty((n, SIDE, SIDE, 3), np.uint8)
    for s in range(0, n, 5000):
        m = min(5000, n - s)
        grid = rng.normal(128, 60, (m, low, low, 3)).astype(np.float32)
        img = np.einsum("hl,nlmc,wm->nhwc", up, grid, up, optimize=True)
        out[s:s + m] = np.clip(img + rng.normal(0, 8, img.shape).astype(np.float32), 0, 255)
    return out


def make_sets(folder: Path, sizes: list[int]) -> dict[int, Path]:
    """folder/blobs_N.npz for each size: the first N of max(sizes) images (seed 0), and 500 test
    images; written once (atomically) and then reused."""
    paths = {n: folder / f"blobs_{n}.npz" for n in sizes}
    missing = [n for n, p in paths.items() if not p.is_file()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        rng = np.random.default_rng(0)
        train, test = blobs(max(sizes), rng), blobs(TEST_IMAGES, rng)
        for n in missing:
            tmp = paths[n].with_name(f".{paths[n].stem}.{os.getpid()}.npz")
            np.savez(tmp, x_train=train[:n], x_test=test)
            tmp.replace(paths[n])
        print(f"wrote {len(missing)} sets in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return paths


def measure(tree: Path, data: Path, objective: str, full: bool = False) -> dict:
    """One child's peaks (bytes) and times for one epoch of `objective` on `data`."""
    config, cut = OBJECTIVES[objective]
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"data": str(data), "test": TEST_IMAGES, "config": config,
                "run": str(Path(tmp) / "run"), **({} if full else cut)}
        env = {**os.environ, "PYTHONPATH": str(tree)}
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=tmp, env=env,
                              capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{tree}: {objective} on {data} failed: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["peak"] = max(result["load"], result["epoch"])
    return result


def growth(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of rows' key over their sizes, in uint8 images."""
    if len({r["images"] for r in rows}) < 2:
        return None
    slope = np.polyfit([r["images"] for r in rows], [r[key] for r in rows], 1)[0]
    return float(slope / IMAGE_BYTES)


def table(report: dict) -> str:
    mb = 2**20
    lines = [
        "# Peak memory of a training epoch against the data set's size",
        "",
        f"Machine: {report['machine']}. {report['date']}. Synthetic 64x64 RGB images (uint8, "
        f"{IMAGE_BYTES:,} bytes each) in an .npz, {TEST_IMAGES} test images; the tutorial MLP "
        "(Bernoulli likelihood, Adam 1e-3); ELBO at batch 100, IWAE k=50 at batch 20. One "
        "fresh process per row; the load phase is `train.build` (the .npz read, the model, the "
        "step, the test set), the epoch phase is `train.fit`'s epoch "
        "(cut to its first steps, which follow the draws for the whole epoch: see "
        "benchmarks/perf/memory.py), its test pass and checkpoint; the epoch phase's peak counts "
        "what the load left resident, the uint8 images among it. MB are 2^20 bytes.",
        "",
        f"Made by `{report['command']}` in {report['wall_s'] / 60:.1f} min (and "
        f"{report['sets_s'] / 60:.1f} min writing the sets).",
        "",
        "| tree | objective | images | steps run | peak RSS MB | load phase MB | resident after "
        "load MB | epoch phase MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        steps = f"{r['steps']} of {r['steps_per_epoch']}"
        lines.append(f"| {r['tree']} | {r['objective']} | {r['images']:,} | {steps} | "
                     f"{r['peak'] / mb:,.0f} | {r['load'] / mb:,.0f} | {r['resident'] / mb:,.0f} | "
                     f"{r['epoch'] / mb:,.0f} |")
    lines += [
        "",
        "Growth of the peak per added image, in uint8 images (the least-squares slope over the"
        " sizes; 1 is one more copy of the image):",
        "",
        "| tree | objective | sizes | peak RSS | load phase | epoch phase |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for g in report["growth"]:
        cells = " | ".join("-" if g[k] is None else f"{g[k]:.2f}x" for k in PHASES)
        lines.append(f"| {g['tree']} | {g['objective']} | {g['sizes']} | {cells} |")
    return "\n".join(lines) + "\n"


def parse(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,40000,80000", help="training images per set")
    parser.add_argument("--baseline", type=Path, help="another checkout to measure as well")
    parser.add_argument("--baseline-sizes", default="20000,40000")
    parser.add_argument("--full", default="", help="sizes at which to run an uncut ELBO epoch too")
    parser.add_argument("--objectives", default="elbo,iwae")
    parser.add_argument("--sets", type=Path, default=Path("/tmp/vaelab_memory"),
                        help="folder for the synthetic .npz sets (written once)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sizes, baseline_sizes, full = parse(args.sizes), parse(args.baseline_sizes), parse(args.full)
    objectives = args.objectives.split(",")
    start = time.perf_counter()
    sets = make_sets(args.sets, sorted({*sizes, *full, *(baseline_sizes if args.baseline else [])}))
    made = time.perf_counter()
    trees = [("this", REPO, sizes)]
    if args.baseline:
        rev = ["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"]
        label = "baseline " + subprocess.run(rev, capture_output=True, text=True).stdout.strip()
        trees.append((label, args.baseline.resolve(), baseline_sizes))
    rows, growths = [], []
    for objective in objectives:
        for name, tree, tree_sizes in trees:
            group = []
            for n in tree_sizes:
                r = {"tree": name, "objective": objective, "images": n,
                     **measure(tree, sets[n], objective)}
                print(json.dumps(r), file=sys.stderr)
                group.append(r)
            rows += group
            growths.append({"tree": name, "objective": objective,
                            "sizes": ", ".join(f"{n // 1000}k" for n in tree_sizes),
                            **{k: growth(group, k) for k in PHASES}})
    for n in full:
        r = {"tree": "this", "objective": "elbo (full epoch)", "images": n,
             **measure(REPO, sets[n], "elbo", full=True)}
        print(json.dumps(r), file=sys.stderr)
        rows.append(r)
    command = "python -m benchmarks.perf.memory " + " ".join(
        argv if argv is not None else sys.argv[1:])
    report = {"machine": hardware(), "date": time.strftime("%Y-%m-%d"), "command": command.strip(),
              "image_bytes": IMAGE_BYTES, "test_images": TEST_IMAGES,
              "objectives": {k: v[0] for k, v in OBJECTIVES.items()}, "rows": rows,
              "growth": growths, "sets_s": made - start, "wall_s": time.perf_counter() - made}
    write_results(args.out, "memory", report, table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
