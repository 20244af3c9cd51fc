"""The conditional VAE against the unconditional one on the same network: log p(x|y) against
log p(x), paired image by image.

    python -m benchmarks.paper.conditional                    # all three rows, 50 epochs each
    python -m benchmarks.paper.conditional --rows vae,cvae --epochs 5 --k-eval 100

Every row trains the `burda1` network (784-200-200-50 tanh encoder, 50-200-200-784 decoder) with
its initialisation (Glorot weights, the decoder's output bias at the logit of the training
pixels' mean) under the ELBO with the analytic KL, Adam at 1e-3 (eps 1e-4), batch 100, no KL
warm-up, on dynamically binarized MNIST, with the same seed. The rows:

    vae             p(z) = N(0, I), q(z|x), p(x|z)
    cvae            q(z|x, y) and p(x|z, y), y the digit as one-hot columns; p(z) = N(0, I)
    cvae-per-class  the same with p(z|y) a learned Gaussian per digit (--prior per-class)

Each run is evaluated with `vaelab evaluate` (importance sampling on all 10,000 test images, fp32,
seed 1234): log p(x) for the VAE, log p(x|y) for the others, each test image under its own label.
`vaelab compare` pairs them. Exact likelihoods would differ by log p(y|x) - log p(y) per image,
at most log 10 = 2.30 nats for MNIST's ten nearly equally frequent digits: a gap larger than that
would mean the conditional model is also a better density model of the images, not only better
informed. The rows' class grids (samples under each digit) are drawn into
benchmarks/results/conditional/<row>/classes.png.

A row whose run directory holds a checkpoint resumes it; a finished evaluation is kept. Runs go to
runs/conditional/<row>; the table to benchmarks/results/conditional.md and conditional.json, each
finished row's records to benchmarks/results/conditional/<row>/.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import vaelab
from vaelab.plots import class_figure
from vaelab.runs import read_eval, read_metrics

from benchmarks.lib.machine import write_results
from benchmarks.lib.resumable import (chosen_rows, finished, kept_dir, machines, paired_cell,
                                      row_values, table_parser, train_evaluate_keep)

ROWS = ("vae", "cvae", "cvae-per-class")
BASELINE = "vae"


def row_config(row: str, args) -> vaelab.RunConfig:
    """One row's recipe: burda1 with its initialisation, the ELBO with the analytic KL, Adam 1e-3
    (eps 1e-4), batch 100, a constant rate; only the conditioning and the prior change."""
    model = vaelab.preset("burda1").replace(
        kl="analytic", conditional=row != "vae",
        prior="per-class" if row.endswith("per-class") else "standard")
    return vaelab.RunConfig(preset="burda1", model=model, objective="elbo", optimizer="adam",
                            lr=1e-3, schedule="constant", batch_size=100, epochs=args.epochs,
                            seed=args.seed, device="cpu")


def train_and_evaluate(row: str, args) -> tuple[Path, dict]:
    run_dir, record = train_evaluate_keep(row, row_config(row, args), args)
    if row != BASELINE:
        figure = class_figure(vaelab.load_run(run_dir))
        figure.savefig(kept_dir(row, args) / "classes.png", dpi=100)
    return run_dir, record


def main(argv=None) -> int:
    parser = table_parser(__doc__, ROWS, "conditional")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--k-eval", type=int, default=1000)
    args = parser.parse_args(argv)
    rows = chosen_rows(parser, args.rows, ROWS)
    if BASELINE not in rows:
        rows.insert(0, BASELINE)  # every row is paired with it
    run_dirs, records = {}, {}
    for row in rows:
        if args.table_only:
            where = finished(args.runs / row, kept_dir(row, args), args.epochs, args.k_eval)
            if where is None:
                continue
            run_dirs[row], records[row] = where, read_eval(where)
        else:
            run_dirs[row], records[row] = train_and_evaluate(row, args)
        if BASELINE in records:  # the table rewritten after each row
            write_table(rows, run_dirs, records, args)
    if BASELINE not in records:
        parser.error(f"{BASELINE} is not trained and evaluated yet; no row can be paired")
    return 0


def write_table(rows: list[str], run_dirs: dict, records: dict, args) -> None:
    """The table of the rows evaluated so far; those still to run are named below it."""
    hardware = machines(list(run_dirs.values()))
    results = []
    for row in records:
        record, metrics = records[row], read_metrics(run_dirs[row])
        values = row_values(row, run_dirs[row], None if row == BASELINE else run_dirs[BASELINE])
        values["vs_vae"] = values.pop("paired")
        results.append({**values, "quantity": record.get("quantity", "log p(x)"),
                         "kl": metrics[-1]["test_kl"],
                         "active_units": metrics[-1]["active_units"]})
    lines = [
        f"Machine: {hardware}. `burda1` network and initialisation (Glorot weights, output bias"
        " at the logit of the training pixels' mean), ELBO with the analytic KL, Adam 1e-3 (eps"
        f" 1e-4), batch 100, {args.epochs} epoch{'s' * (args.epochs != 1)}, seed {args.seed},"
        " dynamically binarized MNIST."
        f" Test NLL by importance sampling (K={args.k_eval}, all test images, fp32), nats per"
        " image, ± its Monte-Carlo standard error: -log p(x) for the VAE, -log p(x|y) for the"
        " conditional rows, each test image under its own label. The column vs VAE is `vaelab"
        " compare ROW vae`: the paired mean difference over test images ± its standard error"
        f" (negative: ROW is better). Exact likelihoods would differ by at most log 10 ="
        f" {math.log(10):.2f} nats per image, what the label can tell about a digit.",
        "",
        "| row | estimates | NLL | negative ELBO | test KL | active units | vs VAE | training |"
        " evaluation | threads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        versus = paired_cell(r["vs_vae"])
        evaluation = "" if r["eval_seconds"] is None else f"{r['eval_seconds'] / 60:.0f} min"
        quantity = r["quantity"].replace("|", "\\|")  # a bar inside a table's cell
        lines.append(
            f"| {r['row']} | {quantity} | {r['nll']:.2f} ± {r['nll_se']:.3f} |"
            f" {r['neg_elbo']:.2f} | {r['kl']:.2f} | {r['active_units']} | {versus} |"
            f" {r['train_seconds'] / 60:.0f} min | {evaluation} | {r['threads']} |")
    pending = [row for row in rows if row not in records]
    if pending:
        lines += ["", f"Not yet run: {', '.join(pending)}."]
    grids = [row for row in records if (kept_dir(row, args) / "classes.png").is_file()]
    lines += [""] + [f"![{row}: samples by class]({args.name}/{row}/classes.png)" for row in grids]
    lines += ["", "Made by `python -m benchmarks.paper.conditional`. Training and evaluation are"
              " wall times at the torch thread count of the last column, and include any other"
              " load on the machine."]
    report = {"hardware": hardware, "epochs": args.epochs, "k_eval": args.k_eval,
              "rows": results, "pending": pending}
    write_results(args.out, args.name, report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
