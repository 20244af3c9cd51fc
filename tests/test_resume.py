"""Runs that are killed lose nothing and resume exactly."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_vaelab, synthetic_dataset
from test_train import tiny_config
from vaelab import load_run, train
from vaelab.train import TrainingDiverged

TRAIN = ["--train-size", "6000", "--test-size", "1000", "--quiet", "--no-plots", "--seed", "3", "--device", "cpu"]


def vaelab(*args):
    return subprocess.run([sys.executable, "-m", "vaelab", *map(str, args)], capture_output=True, text=True)


def metrics_without_time(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def assert_same_weights(a: Path, b: Path):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_run_killed_mid_epoch_resumes_to_exactly_the_uninterrupted_result(tmp_path, optimizer):
    args = [*TRAIN, "--epochs", 4, "--optimizer", optimizer, "--lr", 5e-3 if optimizer == "sgd" else 1e-3]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert vaelab("train", *args, "--out", whole).returncode == 0

    proc = subprocess.Popen([sys.executable, "-m", "vaelab", "train", *map(str, args), "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until epoch 2 is saved, then kill during epoch 3
        if (killed / "metrics.jsonl").exists() and len((killed / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len((killed / "metrics.jsonl").read_text().splitlines())
    assert 2 <= done < 4, "the kill did not land mid-run"

    resumed = vaelab("train", "--resume", killed, "--quiet", "--no-plots")
    assert resumed.returncode == 0, resumed.stderr
    assert metrics_without_time(killed) == metrics_without_time(whole)
    assert_same_weights(killed, whole)


def test_resume_in_process_equals_an_uninterrupted_run(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = train(tiny_config(epochs=3, optimizer="adam", lr=1e-3), tmp_path / "a", synthetic_dataset(),
                  progress=False)
    train(tiny_config(epochs=1, optimizer="adam", lr=1e-3), tmp_path / "b", synthetic_dataset(), progress=False)
    resumed = train(tiny_config(epochs=3, optimizer="adam", lr=1e-3), tmp_path / "b", synthetic_dataset(),
                    progress=False, resume=True)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert strip(resumed.metrics) == strip(whole.metrics)
    for p, q in zip(resumed.model.parameters(), whole.model.parameters()):
        assert torch.equal(p, q)


def test_divergence_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    train(tiny_config(epochs=1), run, synthetic_dataset(), progress=False)
    before = (run / "model.safetensors").read_bytes()
    config = tiny_config(epochs=3, lr=1e5)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step \d+ of 6.*lower the learning rate"):
        train(config, run, synthetic_dataset(), progress=False, resume=True)
    assert (run / "model.safetensors").read_bytes() == before
    model = load_run(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_non_finite_test_loss_also_stops_before_the_checkpoint(tmp_path, monkeypatch):
    trainer = sys.modules["vaelab.train"]  # the module; vaelab.train is the function

    run = tmp_path / "run"
    train(tiny_config(epochs=1), run, synthetic_dataset(), progress=False)
    before = (run / "checkpoint.safetensors").read_bytes()
    monkeypatch.setattr(trainer, "test_means", lambda *args, **kwargs: {"test_loss": math.nan})
    with pytest.raises(TrainingDiverged, match="the test loss became nan after epoch 2"):
        train(tiny_config(epochs=2), run, synthetic_dataset(), progress=False, resume=True)
    assert (run / "checkpoint.safetensors").read_bytes() == before


def test_resuming_a_run_with_no_finished_epoch_starts_it_again_in_its_folder(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(tiny_config(epochs=1).to_dict()))
    again = train(tiny_config(epochs=1), tmp_path / "run", synthetic_dataset(), progress=False,
                  resume=True)
    fresh = train(tiny_config(epochs=1), tmp_path / "fresh", synthetic_dataset(), progress=False)
    assert [m["epoch"] for m in again.metrics] == [1]
    assert [m["test_loss"] for m in again.metrics] == [m["test_loss"] for m in fresh.metrics]
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()


def test_a_new_run_into_a_run_with_no_finished_epoch_is_told_to_resume_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    result = run_vaelab("train", "--out", tmp_path, "--quiet")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"start it again there with vaelab train --resume {tmp_path}" in result.stderr


def interrupted(tmp_path: Path, args: list, ready) -> tuple[subprocess.CompletedProcess, Path]:
    """`vaelab train ARGS --out RUN`, sent a real SIGINT (Ctrl-C) once ready(RUN) holds."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "vaelab", "train", *map(str, args), "--out", str(run)]
    proc = subprocess.Popen(command,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ready(run):
        time.sleep(0.02)
    time.sleep(0.3)  # into the epoch's steps
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), run


@pytest.mark.slow  # a real MNIST run, stopped by SIGINT (about 5 s)
def test_ctrl_c_in_the_first_epoch_says_nothing_is_trained_and_how_to_start_it_in_place(tmp_path):
    args = ["--batch-size", 1, "--epochs", 2, "--no-plots", "--quiet", "--device", "cpu"]
    result, run = interrupted(tmp_path, args, lambda run: (run / "config.json").is_file())
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"vaelab: interrupted; no epoch had finished, so {run} holds nothing trained; start it"
        f" again there with: vaelab train --resume {run}")
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]  # resumable: see the test above
    refused = run_vaelab("train", "--out", run, "--quiet")
    assert refused.returncode == 2 and f"vaelab train --resume {run}" in refused.stderr


@pytest.mark.slow  # a real MNIST run, stopped by SIGINT after its first epoch (about 8 s)
def test_ctrl_c_after_an_epoch_names_the_epoch_saved_and_the_resume_command(tmp_path):
    args = ["--train-size", 100, "--test-size", 100, "--batch-size", 1, "--epochs", 50, "--no-plots",
            "--quiet", "--device", "cpu"]
    result, run = interrupted(tmp_path, args, lambda run: (run / "metrics.jsonl").is_file())
    assert result.returncode == 130, result.stderr
    done = len((run / "metrics.jsonl").read_text().splitlines())
    assert result.stderr.strip().splitlines()[-1] == (
        f"vaelab: interrupted; epoch {done} of 50 is saved in {run}; continue with: vaelab train"
        f" --resume {run}")
