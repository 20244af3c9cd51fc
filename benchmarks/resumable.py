"""Rows of a results table that train for hours: each resumes from its checkpoint, and a finished
step (training, evaluation, the gaps) is kept, so a table's script can be stopped and run again.
Shared by components.py and deeper.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import vaelab
from vaelab.config import EvaluateOptions, GapOptions
from vaelab.evaluate import evaluate_run
from vaelab.gap import GAP, gap_run, read_gap
from vaelab.runs import CHECKPOINT, EVAL, METRICS, read_eval, read_metrics

THREADS = "threads.json"  # beside a row's run: torch's thread counts its wall times were taken at


def _record_threads(run_dir: Path, phase: str) -> None:
    """Add this process's thread count to RUN/threads.json under phase (a row can be trained in
    parts, at different counts)."""
    path = run_dir / THREADS
    record = json.loads(path.read_text()) if path.is_file() else {}
    counts = set(record.get(phase, [])) | {torch.get_num_threads()}
    record[phase] = sorted(counts)
    path.write_text(json.dumps(record) + "\n")


def threads(run_dir: Path) -> str:
    """The thread counts a row's training and evaluation ran at, as a table cell ("2", "1-2")."""
    path = run_dir / THREADS
    if not path.is_file():
        return "?"
    counts = sorted({n for phase in json.loads(path.read_text()).values() for n in phase})
    return "-".join(map(str, (counts[0], counts[-1]) if len(counts) > 1 else counts))


def train_row(name: str, config: vaelab.RunConfig, run_dir: Path, quiet: bool = True) -> Path:
    """Train (or resume, or leave alone when it has all its epochs) one row's run."""
    done = len(read_metrics(run_dir)) if (run_dir / CHECKPOINT).is_file() else 0
    if done >= config.epochs:
        return run_dir
    print(
        f"{name}: {'resuming at epoch ' + str(done + 1) if done else 'training'} {run_dir}",
        file=sys.stderr,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    _record_threads(run_dir, "training")
    vaelab.train(config, run_dir, progress=not quiet, resume=done > 0)
    return run_dir


def _fresh(run_dir: Path, name: str) -> bool:
    """Whether RUN/name was written after the run's last epoch."""
    path = run_dir / name
    return path.is_file() and path.stat().st_mtime > (run_dir / METRICS).stat().st_mtime


def _evaluated(run_dir: Path, k: int) -> dict | None:
    """RUN/eval.json when it evaluates the run's last epoch with this K, else None."""
    if not _fresh(run_dir, EVAL):
        return None
    record = read_eval(run_dir)
    return record if record["k"] == k else None


def evaluate_row(run_dir: Path, k: int, quiet: bool = True) -> dict:
    """`vaelab evaluate` (fp32, CPU) unless an evaluation of the last epoch with this K is there."""
    if _evaluated(run_dir, k) is None:
        _record_threads(run_dir, "evaluation")
        evaluate_run(
            EvaluateOptions(run=str(run_dir), k=k, precision="fp32", device="cpu", quiet=quiet)
        )
    return read_eval(run_dir)


def finished_eval(run_dir: Path, epochs: int, k: int) -> dict | None:
    """A row's evaluation when its run has all its epochs and an evaluation of the last one with
    this K, else None (for tables written while other rows still run)."""
    return None if len(read_metrics(run_dir)) < epochs else _evaluated(run_dir, k)


def finished_gap(run_dir: Path, images: int, k: int) -> dict | None:
    """A row's gaps when `vaelab gap` ran on its last epoch with these settings, else None."""
    if not _fresh(run_dir, GAP):
        return None
    record = read_gap(run_dir)
    return record if record["images"] == images and record["k"] == k else None


def gap_row(run_dir: Path, images: int, k: int, quiet: bool = True) -> dict:
    """`vaelab gap` on the CPU unless a result for the last epoch with these settings is there."""
    if finished_gap(run_dir, images, k) is None:
        _record_threads(run_dir, "gap")
        gap_run(GapOptions(run=str(run_dir), images=images, k=k, device="cpu", quiet=quiet))
    return read_gap(run_dir)
