"""The top-down hierarchy against Burda et al.'s two stochastic layers at equal training time, on
dynamically binarized MNIST, paired image by image; and what its evaluation costs.

    python -m benchmarks.paper.topdown --rows burda2 &   # the two rows at once, one core each
    python -m benchmarks.paper.topdown --rows topdown    # (OMP_NUM_THREADS=1)
    python -m benchmarks.paper.topdown --table-only

The rows:

    burda2    `--preset burda2`: its recipe (Glorot weights, the output bias from the data, the KL
              from the draws, Adam at 1e-3 with eps 1e-4, batch 20, Burda et al.'s schedule)
    topdown   `--preset topdown-mnist`: widths 32, z of 4 channels at 1, 7, 14 and 28 (1, 2, 2
              and 1 layers), GELU blocks, Adam at 1e-3, batch 100, gradient clipping at 200,
              skipping above 400, the weights' average at 0.999

Each trains until its epochs' recorded seconds (the test pass included) reach --minutes, then
stops after that epoch; run at the same time on one core each, the two share the machine's load.
Each is evaluated with its model's default K (`vaelab evaluate`: 5000 for burda2, 100 for the
hierarchy, whose every draw is a full top-down pass) on the first --images test images, and
`vaelab compare` pairs them. The hierarchy's K is then checked against K=5000 on the first
--check-images test images, paired.

A row resumes from its checkpoint and keeps its finished evaluation; runs go to runs/topdown/<row>,
the table to benchmarks/results/topdown.md and topdown.json, each finished row's records to
benchmarks/results/topdown/<row>/.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import vaelab
from vaelab.config import EvaluateOptions
from vaelab.data import load_data
from vaelab.diagnostics import compare
from vaelab.evaluate import evaluate_run
from vaelab.runs import read_eval
from vaelab.sampling import importance_sampled

from benchmarks.lib.machine import cpu_and_torch, write_results
from benchmarks.lib.resumable import (_record_host, chosen_rows, evaluated_rows, keep, kept_dir,
                                      machines, paired_rows, paired_cell, table_parser, train_row)

ROWS = ("burda2", "topdown")
BASELINE = "burda2"
PRESETS = {"burda2": "burda2", "topdown": "topdown-mnist"}
CHECK = "k_check.json"  # beside the hierarchy's run: its K against K=5000 on a subset


def row_config(row: str, args) -> vaelab.RunConfig:
    """The row's preset, as it is, stopped by time rather than epochs."""
    return vaelab.RunConfig(preset=PRESETS[row], epochs=10_000, seed=args.seed, device="cpu")


def evaluated(run_dir: Path, images: int) -> dict | None:
    """RUN/eval.json when it evaluates the run's last epoch on these images with the model's
    default K, else None."""
    path = run_dir / "eval.json"
    if not path.is_file() or path.stat().st_mtime < (run_dir / "metrics.jsonl").stat().st_mtime:
        return None
    record = read_eval(run_dir)
    return record if record["test_images"] == images else None


def train_and_evaluate(row: str, args) -> None:
    """The row trained for its minutes (or resumed), evaluated with its model's default K, the
    hierarchy's K checked, and its records kept."""
    run_dir = train_row(row, row_config(row, args), args.runs / row, args.quiet,
                        seconds=60 * args.minutes)
    if evaluated(run_dir, args.images) is None:
        _record_host(run_dir, "evaluation")
        evaluate_run(EvaluateOptions(run=str(run_dir), images=args.images, precision="fp32",
                                     device="cpu", quiet=args.quiet))
    if row == "topdown" and not (run_dir / CHECK).is_file():
        (run_dir / CHECK).write_text(json.dumps(k_check(run_dir, args.check_images)) + "\n")
    keep(run_dir, kept_dir(row, args), extra=(CHECK,))


def k_check(run_dir: Path, images: int) -> dict:
    """The hierarchy's default K against K=5000 on the first `images` test images: each NLL, the
    paired difference, and the seconds per image of each."""
    model = vaelab.load_run(run_dir)
    test = load_data(None).test_images[:images]
    out = {"images": images, "machine": cpu_and_torch(), "threads": torch.get_num_threads()}
    records = {}
    for k in (model.default_k, 5000):
        start = time.perf_counter()
        records[k] = importance_sampled(model, test, k=k, progress=False)
        out[f"k{k}"] = {"nll": records[k]["nll"], "nll_se": records[k]["nll_se"],
                        "seconds_per_image": (time.perf_counter() - start) / images}
    a, b = records[model.default_k], records[5000]
    paired = compare(a, a["log_px"], b, b["log_px"])
    out["paired"] = {"difference": paired["difference"], "se": paired["se"]}
    out["default_k"] = model.default_k
    return out


def main(argv=None) -> int:
    parser = table_parser(__doc__, ROWS, "topdown")
    parser.add_argument("--minutes", type=float, default=45.0,
                        help="each row's training time")
    parser.add_argument("--images", type=int, default=10_000, help="test images evaluated")
    parser.add_argument("--check-images", type=int, default=100,
                        help="test images of the K check")
    args = parser.parse_args(argv)
    rows = chosen_rows(parser, args.rows, ROWS)
    run_dirs = evaluated_rows(rows, args, lambda row: train_and_evaluate(row, args))
    if run_dirs:
        write_table(run_dirs, args)
    return 0


def write_table(run_dirs: dict, args) -> None:
    """The table of the rows evaluated so far, paired with burda2 where it is there."""
    hardware = machines(list(run_dirs.values()))
    results = []
    for values, record, metrics in paired_rows(run_dirs, BASELINE):
        check = run_dirs[values["row"]] / CHECK
        values.update(active_units=record["active_units"],
                      seconds_per_epoch=values["train_seconds"] / len(metrics),
                      seconds_per_image=(record["seconds"] / record["test_images"]
                                         if record.get("seconds") else None),
                      k_check=json.loads(check.read_text()) if check.is_file() else None)
        results.append(values)
    lines = [
        f"Machine: {hardware}. Dynamically binarized MNIST; each row trained for about"
        f" {args.minutes:.0f} minutes (its epochs' seconds, the test pass included, the last epoch"
        " finished), then evaluated by importance sampling with its model's default K (fp32)."
        " NLL in nats per image ± its Monte-Carlo standard error; `vaelab compare ROW burda2`:"
        " the paired mean difference over the test images ± its standard error (negative: ROW"
        " is better).",
        "",
        "| row | epochs | training | s per epoch | K | test images | NLL | negative ELBO | test KL"
        " | active units | vs burda2 | evaluation | s per image | threads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        versus = paired_cell(r["paired"])
        evaluation = "" if r["eval_seconds"] is None else f"{r['eval_seconds'] / 60:.0f} min"
        per_image = "" if r["seconds_per_image"] is None else f"{r['seconds_per_image']:.3f}"
        units = "+".join(map(str, r["active_units"]))
        lines.append(
            f"| {r['row']} | {r['epochs']} | {r['train_seconds'] / 60:.0f} min |"
            f" {r['seconds_per_epoch']:.0f} | {r['k']} | {r['images']} |"
            f" {r['nll']:.2f} ± {r['nll_se']:.3f} | {r['neg_elbo']:.2f} | {r['kl']:.2f} |"
            f" {units} | {versus} | {evaluation} | {per_image} | {r['threads']} |")
    for r in results:
        if r["kl_per_layer"]:
            shown = ", ".join(f"{v:.2f}" for v in r["kl_per_layer"])
            lines += ["", f"KL per layer of {r['row']}, the top first (nats): {shown}."]
        c = r["k_check"]
        if c:
            low, high = c[f"k{c['default_k']}"], c["k5000"]
            lines += ["", f"The K check ({c['machine']}, {c['threads']} thread"
                      f"{'s' * (c['threads'] != 1)}): on the first {c['images']} test images"
                      f" of {r['row']}, K={c['default_k']} gives {low['nll']:.2f} ±"
                      f" {low['nll_se']:.3f} and K=5000 {high['nll']:.2f} ±"
                      f" {high['nll_se']:.3f} nats, paired {c['paired']['difference']:+.2f} ±"
                      f" {c['paired']['se']:.2f}; {low['seconds_per_image']:.2f} and"
                      f" {high['seconds_per_image']:.2f} s per image."]
    lines += ["", f"Made by `python -m benchmarks.paper.topdown --minutes {args.minutes:g}`, a"
              " process per row at once. Training and evaluation are wall times at the torch thread"
              " count of the last column, and include any other load on the machine."]
    report = {"hardware": hardware, "minutes": args.minutes, "rows": results}
    write_results(args.out, args.name, report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
