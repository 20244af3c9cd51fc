"""Rows of a results table that train for hours: each resumes from its checkpoint, and a finished
step (training, evaluation, the gaps) is kept, so a table's script can be stopped and run again.
A finished row's records (not its weights) are also copied beside the table, under
benchmarks/results/<table>/<row>/, so the table and its paired comparisons can be written again
where the run directory is gone. Shared by benchmarks.paper.components and .deeper."""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

import vaelab
from vaelab.callbacks import EpochFunction
from vaelab.config import EvaluateOptions, GapOptions
from vaelab.diagnostics import compare_runs
from vaelab.evaluate import evaluate_run
from vaelab.gap import GAP, gap_run, read_gap
from vaelab.runs import CHECKPOINT, CONFIG, EVAL, LOG_PX, METRICS, read_eval, read_metrics

from benchmarks.lib.machine import RESULTS, cpu_and_torch

HOSTS = "hosts.json"  # beside a row's run: the machines, dates and torch thread counts it ran at
KEPT = (CONFIG, METRICS, EVAL, LOG_PX, GAP, HOSTS)  # what a finished row keeps beside its table


def _record_host(run_dir: Path, phase: str) -> None:
    """Add this process's machine, date and thread count to RUN/hosts.json under phase (a row can
    be trained in parts, on different machines and at different counts)."""
    record = _hosts(run_dir)
    record["machines"] = sorted(set(record["machines"]) | {cpu_and_torch()})
    record["dates"] = sorted(set(record["dates"]) | {datetime.date.today().isoformat()})
    counts = set(record["threads"].get(phase, [])) | {torch.get_num_threads()}
    record["threads"][phase] = sorted(counts)
    (run_dir / HOSTS).write_text(json.dumps(record, indent=1) + "\n")


def _hosts(run_dir: Path) -> dict:
    path = run_dir / HOSTS
    record = json.loads(path.read_text()) if path.is_file() else {}
    return {"machines": [], "dates": [], "threads": {}, **record}


def threads(run_dir: Path) -> str:
    """The thread counts a row's training and evaluation ran at, as a table cell ("2", "1-2")."""
    counts = sorted({n for phase in _hosts(run_dir)["threads"].values() for n in phase})
    if not counts:
        return "?"
    return "-".join(map(str, (counts[0], counts[-1]) if len(counts) > 1 else counts))


def machines(run_dirs: list[Path]) -> str:
    """The machines (CPU and PyTorch) these rows ran on and the dates, for a table's header."""
    names: dict[str, None] = {}
    dates: set[str] = set()
    for run_dir in run_dirs:
        record = _hosts(run_dir)
        names.update(dict.fromkeys(record["machines"]))
        dates.update(record["dates"])
    if not names:
        return "none yet"
    span = " to ".join(sorted({min(dates), max(dates)})) if dates else "undated"
    return f"{'; '.join(names)}; {span}"


def keep(run_dir: Path, kept_dir: Path, extra: tuple[str, ...] = ()) -> None:
    """Copy a finished row's records (config, metrics, evaluation, per-image log p(x), gaps,
    machines, and the table's own `extra` files) to kept_dir, where `finished` finds them once
    the run directory is gone."""
    kept_dir.mkdir(parents=True, exist_ok=True)
    for name in (*KEPT, *extra):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, kept_dir / name)


def finished(run_dir: Path, kept_dir: Path, epochs: int, k: int) -> Path | None:
    """The directory that holds a row's finished evaluation: its run, else its kept copy, else
    None."""
    if finished_eval(run_dir, epochs, k) is not None:
        return run_dir
    return kept_dir if finished_eval(kept_dir, epochs, k, kept=True) is not None else None


def table_parser(doc: str, rows, name: str) -> argparse.ArgumentParser:
    """The options every table of rows shares: --rows (comma-separated, from rows), --seed,
    --runs (default runs/<name>), --out, --name, --table-only and --quiet; the caller adds its
    own. doc: the script's docstring, whose first paragraph describes it."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(rows),
                        help="comma-separated, from: " + ", ".join(rows))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=Path("runs") / name)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default=name)
    parser.add_argument("--table-only", action="store_true",
                        help="write the table from the rows already evaluated; run nothing")
    parser.add_argument("--quiet", action="store_true")
    return parser


def chosen_rows(parser, text: str, rows) -> list[str]:
    """The rows named in text (comma-separated), each one of rows; parser.error names the first
    unknown one."""
    chosen = [row.strip() for row in text.split(",")]
    unknown = [row for row in chosen if row not in rows]
    if unknown:
        parser.error(f"unknown row {unknown[0]!r}; choose from {', '.join(rows)}")
    return chosen


def train_row(name: str, config: vaelab.RunConfig, run_dir: Path, quiet: bool = True,
              model: vaelab.VAE | None = None, seconds: float | None = None) -> Path:
    """Train (or resume, or leave alone when it has all its epochs) one row's run; model: a
    model of your own networks to train (vaelab.train's). seconds: a budget of training time
    (the epochs' recorded seconds): the run stops after the epoch that reaches it."""
    metrics = read_metrics(run_dir) if (run_dir / CHECKPOINT).is_file() else []
    done = len(metrics)
    spent = lambda: sum(m["seconds"] for m in read_metrics(run_dir))  # noqa: E731
    if done >= config.epochs or (seconds is not None and done and spent() >= seconds):
        return run_dir
    print(
        f"{name}: {'resuming at epoch ' + str(done + 1) if done else 'training'} {run_dir}",
        file=sys.stderr,
    )
    # recorded once the run's folder is one (a fresh run refuses a folder of other files)
    callbacks = [EpochFunction(lambda record, training: _record_host(run_dir, "training"))]
    if seconds is not None:
        callbacks.append(EpochFunction(lambda record, training: spent() >= seconds))
    vaelab.train(config, run_dir, progress=not quiet, resume=done > 0, callbacks=callbacks,
                 model=model)
    return run_dir


def _fresh(run_dir: Path, name: str) -> bool:
    """Whether RUN/name was written after the run's last epoch."""
    path = run_dir / name
    return path.is_file() and path.stat().st_mtime > (run_dir / METRICS).stat().st_mtime


def _current(run_dir: Path, name: str, kept: bool = False) -> bool:
    """Whether RUN/name speaks for the run's last epoch: written after it, or, in a kept copy
    (kept=True, only made once the row is finished), there at all."""
    return (run_dir / name).is_file() if kept else _fresh(run_dir, name)


def _evaluated(run_dir: Path, k: int, kept: bool = False) -> dict | None:
    """RUN/eval.json when it evaluates the run's last epoch with this K, else None. A kept copy
    (kept=True) is only made once the row is finished, so its files' times are not checked."""
    if not _current(run_dir, EVAL, kept):
        return None
    record = read_eval(run_dir)
    return record if record["k"] == k else None


def evaluate_row(run_dir: Path, k: int, quiet: bool = True) -> dict:
    """`vaelab evaluate` (fp32, CPU) unless an evaluation of the last epoch with this K is there."""
    if _evaluated(run_dir, k) is None:
        _record_host(run_dir, "evaluation")
        evaluate_run(
            EvaluateOptions(run=str(run_dir), k=k, precision="fp32", device="cpu", quiet=quiet)
        )
    return read_eval(run_dir)


def finished_eval(run_dir: Path, epochs: int, k: int, kept: bool = False) -> dict | None:
    """A row's evaluation when its run has all its epochs and an evaluation of the last one with
    this K, else None (for tables written while other rows still run)."""
    return None if len(read_metrics(run_dir)) < epochs else _evaluated(run_dir, k, kept)


def finished_gap(run_dir: Path, images: int, k: int, kept: bool = False) -> dict | None:
    """A row's gaps when `vaelab gap` ran on its last epoch with these settings, else None (kept
    as in `_evaluated`)."""
    if not _current(run_dir, GAP, kept):
        return None
    record = read_gap(run_dir)
    return record if record["images"] == images and record["k"] == k else None


def gap_row(run_dir: Path, images: int, k: int, quiet: bool = True) -> dict:
    """`vaelab gap` on the CPU unless a result for the last epoch with these settings is there."""
    if finished_gap(run_dir, images, k) is None:
        _record_host(run_dir, "gap")
        gap_run(GapOptions(run=str(run_dir), images=images, k=k, device="cpu", quiet=quiet))
    return read_gap(run_dir)


def row_values(row: str, run_dir: Path, baseline_dir: Path | None) -> dict:
    """What every row of an evaluated table holds: its NLL and Monte-Carlo error, negative ELBO,
    epochs, training and evaluation times, thread counts, and "paired", the difference of its
    NLL against the baseline run's by `vaelab compare` ({"difference", "se"}; None for the
    baseline itself, baseline_dir None)."""
    record, metrics = read_eval(run_dir), read_metrics(run_dir)
    paired = None if baseline_dir is None else compare_runs(run_dir, baseline_dir)
    return {"row": row, "nll": record["nll"], "nll_se": record["nll_se"],
            "neg_elbo": record["neg_elbo"], "epochs": len(metrics),
            "train_seconds": sum(m["seconds"] for m in metrics),
            "eval_seconds": record.get("seconds"), "threads": threads(run_dir),
            "paired": None if paired is None else {"difference": paired["difference"],
                                                   "se": paired["se"]}}


def paired_rows(run_dirs: dict, baseline: str) -> list[tuple[dict, dict, list[dict]]]:
    """For each evaluated row (run_dirs: row -> the folder of its evaluation), its row_values
    paired with the baseline row where that is evaluated, with the K, the test images, the last
    epoch's test KL and any KL per layer added; and its eval.json record and metrics."""
    base = run_dirs.get(baseline)
    out = []
    for row, run_dir in run_dirs.items():
        record, metrics = read_eval(run_dir), read_metrics(run_dir)
        values = row_values(row, run_dir, None if row == baseline or base is None else base)
        values.update(k=record["k"], images=record["test_images"], kl=metrics[-1]["test_kl"],
                      kl_per_layer=record.get("kl_per_layer"))
        out.append((values, record, metrics))
    return out


def paired_cell(paired: dict | None) -> str:
    """A table's cell for a paired difference ({"difference", "se"}, in nats): "+1.23 ± 0.45",
    or "—" for the row the others are paired with."""
    return "—" if paired is None else f"{paired['difference']:+.2f} ± {paired['se']:.2f}"


def evaluated_where(row: str, args) -> Path | None:
    """The folder that holds a row's evaluation: its run (args.runs/<row>), else its kept records
    (kept_dir); None before it is evaluated."""
    for where in (args.runs / row, kept_dir(row, args)):
        if (where / EVAL).is_file():
            return where
    return None


def evaluated_rows(rows: list[str], args, run: Callable[[str], object]) -> dict[str, Path]:
    """Each row trained and evaluated by run(row), unless args.table_only; then, by row, the
    folders that hold an evaluation (evaluated_where), for the table."""
    run_dirs = {}
    for row in rows:
        if not args.table_only:
            run(row)
        where = evaluated_where(row, args)
        if where is not None:
            run_dirs[row] = where
    return run_dirs


def kept_dir(row: str, args) -> Path:
    """Where a table's finished row keeps its records: beside the table, results/<name>/<row>/
    (args: the script's, with out and name)."""
    return args.out / args.name / row


def train_evaluate_keep(row: str, config: vaelab.RunConfig, args) -> tuple[Path, dict]:
    """A table's row trained (or resumed) in args.runs/<row>, evaluated with K = args.k_eval
    and its records kept (kept_dir): its run folder and its evaluation."""
    run_dir = train_row(row, config, args.runs / row, args.quiet)
    record = evaluate_row(run_dir, args.k_eval, args.quiet)
    keep(run_dir, kept_dir(row, args))
    return run_dir, record
