"""Deeper latents, better gradients and the diagnostics, each pair under one recipe.

    python -m benchmarks.paper.deeper                  # every row; hours on a CPU
    python -m benchmarks.paper.deeper --rows burda1-vae,burda2-vae

Rows (Adam 1e-3 with the `burda` schedule, batch 20, dynamically binarized MNIST, seed 0):
- burda1-vae, burda2-vae: the ELBO, 121 epochs (the schedule's first five stages), one and two
  stochastic layers (Burda et al.'s networks);
- burda1-iwae50, burda1-iwae50-dreg: the IWAE bound with k=50, 40 epochs (its first four
  stages), the plain gradient and DReG;
- tutorial: the default recipe (20 epochs), for the gaps.

Every row is evaluated with `vaelab evaluate` (K=5000, all test images, fp32: NLL, bounds,
active units); the pairs go through `vaelab compare`; the tutorial and burda1-vae models through
`vaelab gap` (1,000 test images). A row whose run directory holds a checkpoint resumes it, and a
finished evaluation or gap is kept, so the script can stop at any time and be run again. Runs go
to runs/deeper/<row>; the tables to benchmarks/results/deeper.md and deeper.json; each finished
row's records (not its weights) to benchmarks/results/deeper/<row>/, from which the tables and
the comparisons are written again where runs/ is gone (`--table-only`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


import vaelab
from vaelab.diagnostics import compare_runs
from vaelab.runs import read_eval, read_metrics

from benchmarks.lib.machine import RESULTS, write_results
from benchmarks.lib.resumable import (
    chosen_rows,
    evaluate_row,
    finished,
    finished_gap,
    gap_row,
    keep,
    machines,
    threads,
    train_row,
)

BURDA = dict(optimizer="adam", lr=1e-3, schedule="burda", batch_size=20, device="cpu")
ROWS = {
    "burda1-vae": dict(preset="burda1", epochs=121, **BURDA),
    "burda2-vae": dict(preset="burda2", epochs=121, **BURDA),
    "burda1-iwae50": dict(preset="burda1", objective="iwae", k=50, epochs=40, **BURDA),
    "burda1-iwae50-dreg": dict(
        preset="burda1", objective="iwae", k=50, estimator="dreg", epochs=40, **BURDA
    ),
    "tutorial": dict(device="cpu"),
}
# Burda et al. (2015), Table 1, test NLL after 3,280 epochs (the IWAE with k=50, not DReG).
PAPER = {"burda1-vae": "86.76", "burda2-vae": "85.33", "burda1-iwae50": "84.78"}
PAIRS = (("burda2-vae", "burda1-vae"), ("burda1-iwae50-dreg", "burda1-iwae50"))
GAPS = ("tutorial", "burda1-vae")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", default=",".join(ROWS), help="comma-separated, from: " + ", ".join(ROWS)
    )
    parser.add_argument("--k-eval", type=int, default=5000)
    parser.add_argument("--gap-images", type=int, default=1000)
    parser.add_argument("--runs", type=Path, default=Path("runs/deeper"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--kept",
        type=Path,
        default=RESULTS / "deeper",
        help="where finished rows keep their records (default: benchmarks/results/deeper)",
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="write the tables from the rows already trained and evaluated; run nothing",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    rows = chosen_rows(parser, args.rows, ROWS)
    for row in [] if args.table_only else rows:  # a stopped run keeps the rows it finished
        run_dir = train_row(row, vaelab.RunConfig(**ROWS[row]), args.runs / row, args.quiet)
        evaluate_row(run_dir, args.k_eval, args.quiet)
        if row in GAPS:
            gap_row(run_dir, args.gap_images, args.k_eval, args.quiet)
        keep(run_dir, args.kept / row)
        write_tables(*collect(args), args)
    if args.table_only:
        write_tables(*collect(args), args)
    return 0


def collect(args) -> tuple[dict[str, tuple[Path, dict]], dict[str, dict]]:
    """Every row finished so far, in its run directory or kept beside the table: row ->
    (directory, evaluation), row -> gaps."""
    done, gaps = {}, {}
    for row, recipe in ROWS.items():
        kept_dir = args.kept / row
        where = finished(args.runs / row, kept_dir, vaelab.RunConfig(**recipe).epochs, args.k_eval)
        if where is None:
            continue
        done[row] = where, read_eval(where)
        gap = finished_gap(where, args.gap_images, args.k_eval, kept=where == kept_dir)
        if row in GAPS and gap is not None:
            gaps[row] = gap
    return done, gaps


def write_tables(done: dict, gaps: dict, args) -> None:
    hardware = machines([where for where, _ in done.values()])
    lines = [
        (
            f"Machine: {hardware}. Test NLL by importance sampling (K={args.k_eval}, all test"
            " images, fp32), nats per image ± its Monte-Carlo standard error; active units per"
            " layer (Burda et al.'s criterion, variance over test images of E_q[z_d] above 0.01)."
        ),
        "",
        (
            "Made by `python -m benchmarks.paper.deeper`. The `burda` rows train with their"
            " presets' recipe (Glorot weights, the output bias at the logit of the training pixels'"
            " mean, every KL from the draws, Adam at 1e-3 with eps 1e-4, batch 20) for the first"
            " stages of Burda et al.'s schedule: 121 epochs (stages 0-4) for the VAEs, 40 (0-3) for"
            " the IWAEs, where the paper trains 3,280 (0-7); its Table 1 figure is beside each."
            " Training is wall time at the torch thread count of the last column, and includes any"
            " other load on the machine."
        ),
        "",
        "| row | epochs | NLL | negative ELBO | IWAE k=50 | active units | Burda et al. | training"
        " | threads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    results = {}
    for row, (run_dir, r) in done.items():
        metrics = read_metrics(run_dir)
        minutes = sum(m["seconds"] for m in metrics) / 60
        results[row] = {
            "nll": r["nll"],
            "nll_se": r["nll_se"],
            "neg_elbo": r["neg_elbo"],
            "iwae": r["iwae"],
            "active_units": r["active_units"],
            "epochs": len(metrics),
            "train_minutes": minutes,
            "threads": threads(run_dir),
        }
        units = "+".join(map(str, r["active_units"]))
        lines.append(
            f"| {row} | {len(metrics)} | {r['nll']:.2f} ± {r['nll_se']:.3f} | {r['neg_elbo']:.2f} |"
            f" {r['iwae']['50']:.2f} | {units} | {PAPER.get(row, '')} | {minutes:.0f} min |"
            f" {results[row]['threads']} |"
        )
    pairs = [(a, b) for a, b in PAIRS if a in done and b in done]
    if pairs:
        lines += [
            "",
            (
                "`vaelab compare A B`: the paired mean of NLL(A) - NLL(B) over test images ± its"
                " standard error (negative: A is better)."
            ),
            "",
            "| A | B | difference |",
            "| --- | --- | --- |",
        ]
        for a, b in pairs:
            c = compare_runs(done[a][0], done[b][0])
            results[f"{a} vs {b}"] = {"difference": c["difference"], "se": c["se"]}
            lines.append(f"| {a} | {b} | {c['difference']:+.3f} ± {c['se']:.3f} |")
    if gaps:
        fit = next(iter(gaps.values()))["fit"]  # every row's gaps run with the same settings
        lines += [
            "",
            (
                f"`vaelab gap` ({args.gap_images} test images, K={args.k_eval}; q* fitted by"
                f" {fit['steps']} steps of {fit['optimizer']}, {fit['samples']} draws a step,"
                f" the {fit['gradient'].upper()} gradient): nats per image ± standard error over"
                " images, the gaps paired per image."
            ),
            "",
            "| row | log p(x) | L[q*] | L[q] | approximation gap | amortization gap |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row, g in gaps.items():
            cell = lambda name: f"{g[name]['mean']:.2f} ± {g[name]['se']:.2f}"
            results[f"{row} gap"] = {
                k: g[k]
                for k in (
                    "log_px",
                    "elbo_fitted",
                    "elbo_encoder",
                    "approximation_gap",
                    "amortization_gap",
                )
            }
            lines.append(
                f"| {row} | {cell('log_px')} | {cell('elbo_fitted')} | {cell('elbo_encoder')} |"
                f" {cell('approximation_gap')} | {cell('amortization_gap')} |"
            )
    pending = [row for row in ROWS if row not in done]
    if pending:
        lines += ["", f"Not yet run: {', '.join(pending)}."]
    write_results(
        args.out,
        "deeper",
        {"hardware": hardware, "k_eval": args.k_eval, "results": results, "pending": pending},
        "\n".join(lines) + "\n",
    )


if __name__ == "__main__":
    sys.exit(main())
