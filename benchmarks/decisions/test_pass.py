"""Memory and time of the per-epoch test pass under IWAE k=50, its calls bounded in rows or not.

    python -m benchmarks.decisions.test_pass [--reps 5] [--out benchmarks/results]

After each epoch, training measures the test loss and, under `--objective iwae`, the IWAE bound
with k samples of every test image: `sampling.test_means`. Its calls hold at most
`sampling.TEST_ROWS` images x samples (200 images at k=50); unbounded, they held 1,000 images,
so 50,000 decoder rows at k=50. Each measurement is a fresh interpreter that builds a model
(seed 0), reads its test images, and runs one `mean_loss(..., "iwae", samples=50)` pass,
reporting the pass's wall time and the process's peak resident set size (ru_maxrss) before and
after it. Two cases: MNIST's 10,000 test images under the `burda1` network, and 500 synthetic
64x64 RGB images (uniform noise, uint8) under the tutorial MLP. Bounded and unbounded alternate,
--reps times each; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from benchmarks.lib.machine import REPO, hardware, write_results

CASES = ("mnist-burda1", "rgb64-tutorial")
UNBOUNDED = 10**9


def child(case: str, test_rows: int) -> dict:
    """One pass in this process: its seconds, and the peak RSS (GiB) before and after it."""
    import torch

    import vaelab
    from vaelab import sampling
    from vaelab.data import load_data

    sampling.TEST_ROWS = test_rows
    torch.manual_seed(0)
    if case == "mnist-burda1":
        images = load_data(progress=False).test_images
        model = vaelab.VAE.from_config(vaelab.preset("burda1"))
    else:
        images = torch.randint(
            0, 256, (500, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
        model = vaelab.VAE.from_config(vaelab.preset("tutorial").replace(image_shape=(3, 64, 64)))
    test_set = sampling.TestSet(images, 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    loss = sampling.mean_loss(model, test_set, "iwae", samples=50)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"seconds": seconds, "peak_before_gib": before, "peak_gib": after, "loss": loss}


def measure(case: str, test_rows: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", __spec__.name, "--child", case, str(test_rows)],  # this module
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return 0

    from vaelab.sampling import TEST_ROWS

    runs: dict[str, dict[str, list[dict]]] = {c: {"bounded": [], "unbounded": []} for c in CASES}
    ways = (("bounded", TEST_ROWS), ("unbounded", UNBOUNDED))
    for rep in range(args.reps):
        for case in CASES:
            for name, rows in ways if rep % 2 == 0 else ways[::-1]:  # each goes first in turn
                runs[case][name].append(measure(case, rows))
                r = runs[case][name][-1]
                print(
                    f"rep {rep + 1} {case} {name}: {r['seconds']:.2f} s, {r['peak_gib']:.2f} GiB",
                    file=sys.stderr,
                )

    summary = {}
    lines = [
        f"Machine: {hardware()}, {date.today()}. One IWAE k=50 test pass (`sampling.mean_loss(...,"
        ' "iwae", samples=50)`),'
        f" each in a fresh process, {args.reps} alternations; medians. Peak: the"
        " process's peak resident set size after the pass (before it: data and model). Times"
        " include any other load on the machine; the two ways alternate under the same load.",
        "",
        "| case | calls | pass | peak | peak before the pass | loss agrees |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for case in CASES:
        summary[case] = {}
        for name in ("bounded", "unbounded"):
            rs = runs[case][name]
            summary[case][name] = {
                "seconds": statistics.median(r["seconds"] for r in rs),
                "peak_gib": statistics.median(r["peak_gib"] for r in rs),
                "peak_before_gib": statistics.median(r["peak_before_gib"] for r in rs),
            }
        bounded, unbounded = runs[case]["bounded"][0]["loss"], runs[case]["unbounded"][0]["loss"]
        agree = f"{abs(bounded - unbounded):.1e} nats apart"
        for name, label in (("bounded", f"≤ {TEST_ROWS:,} rows"), ("unbounded", "1,000 images")):
            s = summary[case][name]
            lines.append(
                f"| {case} | {label} | {s['seconds']:.2f} s | {s['peak_gib']:.2f} GiB |"
                f" {s['peak_before_gib']:.2f} GiB | {agree if name == 'bounded' else ''} |"
            )
        summary[case]["time_ratio"] = (
            summary[case]["bounded"]["seconds"] / summary[case]["unbounded"]["seconds"]
        )
    lines += ["", "Made by `python -m benchmarks.decisions.test_pass`."]
    report = {
        "hardware": hardware(),
        "reps": args.reps,
        "test_rows": TEST_ROWS,
        "summary": summary,
        "runs": runs,
    }
    write_results(args.out, "test_pass", report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
