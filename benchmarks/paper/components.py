"""Priors and posteriors under one recipe: the test NLL of each, paired against N(0, I).

    python -m benchmarks.paper.components                 # all seven rows, 100 epochs each
    python -m benchmarks.paper.components --rows standard-gaussian,vamp-gaussian --epochs 5

Every row trains the `burda1` network (784-200-200-50 tanh encoder, 50-200-200-784 decoder) with
its initialisation (Glorot weights, the decoder's output bias at the logit of the training
pixels' mean) as a VAE (the ELBO, one sample) with Adam at 1e-3 (eps 1e-4), batch 100, no KL
warm-up, on dynamically binarized MNIST, with the same seed. Only the prior (standard, mog,
vamp; K=500 components) and the posterior (gaussian, iaf with 2 steps) change, and every row
takes its KL from the draws, the one way all of them can: the baseline is N(0, I) with a
Gaussian posterior under that estimator, and the same model with the analytic KL stands beside
it. Each run is then evaluated with `vaelab evaluate` (K=5000 importance samples on all 10,000
test images, fp32, seed 1234) and paired with the baseline by `vaelab compare`.

A row whose run directory holds a checkpoint resumes it; a finished evaluation is kept. So the
script can be stopped at any time and run again. Runs go to runs/components/<row>; the table
goes to benchmarks/results/components.md and components.json, and each finished row's records
(not its weights) to benchmarks/results/components/<row>/, from which `--table-only` writes the
table again where runs/ is gone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


import vaelab
from vaelab.runs import read_eval

from benchmarks.lib.machine import RESULTS, write_results
from benchmarks.lib.resumable import (chosen_rows, finished, kept_dir, machines, row_values,
                                      train_evaluate_keep, train_row)

# prior-posterior, and -analytic for the closed-form KL (the others take it from the draws)
ROWS = ("standard-gaussian", "standard-gaussian-analytic", "mog-gaussian", "vamp-gaussian",
        "standard-iaf", "mog-iaf", "vamp-iaf")
BASELINE = "standard-gaussian"


def row_config(row: str, args) -> vaelab.RunConfig:
    """One row's recipe: burda1 with its initialisation, ELBO, Adam 1e-3 (eps 1e-4), batch 100,
    a constant rate; only the prior, the posterior and the KL estimator change."""
    prior, posterior, *kl = row.split("-")
    model = vaelab.preset("burda1").replace(
        prior=prior, posterior=posterior, flow_steps=2, prior_components=500,
        kl=kl[0] if kl else "sampled",
    )
    return vaelab.RunConfig(
        preset="burda1",
        model=model,
        objective="elbo",
        optimizer="adam",
        lr=1e-3,
        schedule="constant",
        batch_size=100,
        epochs=args.epochs,
        seed=args.seed,
        device="cpu",
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", default=",".join(ROWS), help="comma-separated, from: " + ", ".join(ROWS)
    )
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--k-eval", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=Path("runs/components"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="components")
    parser.add_argument("--train-only", action="store_true", help="train the rows, evaluate none")
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="write the table from the rows already trained and evaluated; run nothing",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    rows = chosen_rows(parser, args.rows, ROWS)
    if BASELINE not in rows:
        rows.insert(0, BASELINE)  # every row is paired with it

    if args.train_only:
        for row in rows:
            train_row(row, row_config(row, args), args.runs / row, args.quiet)
        return 0
    run_dirs, records = {}, {}
    if args.table_only:
        for row in rows:
            where = finished(args.runs / row, kept_dir(row, args), args.epochs, args.k_eval)
            if where is not None:
                run_dirs[row], records[row] = where, read_eval(where)
        if BASELINE not in records:
            parser.error(f"{BASELINE} is not trained and evaluated yet; no row can be paired")
        write_table(rows, run_dirs, records, args)
        return 0
    # Row by row, the table rewritten after each: a run stopped part-way keeps what it finished.
    for row in rows:
        run_dirs[row], records[row] = train_evaluate_keep(row, row_config(row, args), args)
        write_table(rows, run_dirs, records, args)
    return 0


def write_table(rows: list[str], run_dirs: dict, records: dict, args) -> None:
    """The table of the rows evaluated so far; those still to run are named below it."""
    hardware = machines(list(run_dirs.values()))
    results = []
    for row in records:
        record = records[row]
        values = row_values(row, run_dirs[row], None if row == BASELINE else run_dirs[BASELINE])
        values["vs_standard"] = values.pop("paired")
        results.append({**values, "iwae": record["iwae"]})
    lines = [
        (
            f"Machine: {hardware}. `burda1` network and initialisation (Glorot weights, output"
            f" bias at the logit of the training pixels' mean), ELBO, Adam 1e-3 (eps 1e-4), batch"
            f" 100, {args.epochs} epochs, no KL warm-up, seed {args.seed}, dynamically binarized"
            " MNIST; every row's KL from the draws but the `analytic` one. Test NLL by importance"
            f" sampling (K={args.k_eval}, all test images, fp32), nats per image, ± its Monte-Carlo"
            " standard error. The column vs standard Gaussian is `vaelab compare ROW"
            " standard-gaussian` (the same KL estimator): the paired mean difference over test"
            " images ± its standard error (negative: ROW is better). The gap is the negative ELBO"
            " less the NLL: what the posterior misses of log p(x), KL(q(z|x) || p(z|x)) on average."
            " The budget: 100 epochs at a constant rate, where Tomczak & Welling (2018) train up to"
            " 2,000 epochs (Adam 5e-4, a 100-epoch KL warm-up, early stopping after 50 epochs"
            " without progress)."
        ),
        "",
        (
            "| prior | posterior | KL | NLL | negative ELBO | gap | vs standard Gaussian | training |"
            " evaluation | threads |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        prior, posterior, *kl = r["row"].split("-")
        versus = (
            "—"
            if r["vs_standard"] is None
            else f"{r['vs_standard']['difference']:+.2f} ± {r['vs_standard']['se']:.2f}"
        )
        evaluation = "" if r["eval_seconds"] is None else f"{r['eval_seconds'] / 60:.0f} min"
        lines.append(
            f"| {prior} | {posterior} | {kl[0] if kl else 'sampled'} |"
            f" {r['nll']:.2f} ± {r['nll_se']:.3f} | "
            f"{r['neg_elbo']:.2f} | {r['neg_elbo'] - r['nll']:.2f} | {versus} | "
            f"{r['train_seconds'] / 60:.0f} min | {evaluation} | {r['threads']} |"
        )
    pending = [row for row in rows if row not in records]
    if pending:
        lines += ["", f"Not yet run: {', '.join(pending)}."]
    lines += [
        "",
        "Made by `python -m benchmarks.paper.components`. Training and evaluation are wall times"
        " at the torch thread count of the last column, and include any other load on the machine"
        " (the rows at one thread ran two at a time).",
    ]
    report = {
        "hardware": hardware,
        "epochs": args.epochs,
        "k_eval": args.k_eval,
        "rows": results,
        "pending": pending,
    }
    write_results(args.out, args.name, report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
