"""vaelab.tracking: what an MLflowTracker logs, read back with MLflow's own client from a local
file store."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

from conftest import synthetic_dataset
from vaelab.config import ModelConfig, RunConfig
from vaelab.errors import VaelabError
from vaelab.runs import load_config, read_metrics, save_config
from vaelab.tracking import (MISSING, RUN_FILE, MLflowTracker, flat_params, log_artifacts,
                             log_evaluation, store_uri)
from vaelab.train import build, train

CONFIG = RunConfig(model=ModelConfig(z_dim=2, encoder_hidden=(16,), decoder_hidden=(16,)),
                   epochs=2, batch_size=100, device="cpu")


def fit_with(callbacks: list, config: RunConfig, run_dir: Path, resume: bool = False):
    """Train config on 200 tiny images into run_dir, quietly, fit calling the callbacks."""
    return train(config, run_dir, synthetic_dataset(n_train=200), progress=False, resume=resume,
                 callbacks=callbacks)


def _need_mlflow() -> None:
    """Skip without MLflow, except in CI, whose test extra has it."""
    if os.environ.get("CI") == "true":
        importlib.import_module("mlflow")  # CI must run these tests: fail, never skip
    else:
        pytest.importorskip("mlflow")


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A file store's URI under tmp_path."""
    _need_mlflow()
    # The tracker itself asks MLflow for its file store; the environment is restored afterwards.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    return f"file:{tmp_path / 'mlruns'}"


def _client(run_dir: Path):
    """MLflow's client on the store that run_dir/mlflow.json names, and the run's id there."""
    from mlflow.tracking import MlflowClient

    recorded = json.loads((run_dir / RUN_FILE).read_text())
    return MlflowClient(tracking_uri=recorded["tracking_uri"]), recorded["run_id"]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artifacts(client, run_id: str) -> set[str]:
    listed = client.list_artifacts(run_id)
    inner = [a for d in listed if d.is_dir for a in client.list_artifacts(run_id, d.path)]
    return {a.path for a in listed + inner if not a.is_dir}


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(exist_ok=True)
    Image.new("L", (4, 4)).save(path)


def test_a_run_logs_its_config_as_parameters_and_each_epochs_record_as_metrics(tmp_path, store):
    run = tmp_path / "run"
    fit_with([MLflowTracker(store)], CONFIG, run)
    client, run_id = _client(run)
    assert json.loads((run / RUN_FILE).read_text())["tracking_uri"] == store_uri(store)
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run"
    assert logged.data.tags["vaelab.run_dir"] == str(run.resolve())
    params = logged.data.params
    assert params == flat_params(load_config(run).to_dict(), 6000)  # the resolved config
    assert params["model.z_dim"] == "2" and params["model.encoder_hidden"] == "(16,)"
    assert params["epochs"] == "2" and params["grad_clip"] == "None"
    records = read_metrics(run)
    keys = {k for r in records for k, v in r.items() if isinstance(v, (int, float))}
    assert {"epoch", "train_loss", "test_loss", "test_kl", "seconds"} <= keys
    assert set(logged.data.metrics) == keys
    for key in keys:
        assert _history(client, run_id, key) == [(r["epoch"], r[key]) for r in records]
    assert _artifacts(client, run_id) == {"config.json"}  # the figures are drawn after fit


def test_a_resumed_run_continues_the_same_mlflow_run(tmp_path, store):
    run = tmp_path / "run"
    fit_with([MLflowTracker(store)], CONFIG.replace(epochs=1), run)
    first = json.loads((run / RUN_FILE).read_text())
    _png(run / "figures" / "elbo.png")  # drawn after the first part
    fit_with([MLflowTracker(store)], CONFIG, run, resume=True)
    assert json.loads((run / RUN_FILE).read_text()) == first
    client, run_id = _client(run)
    assert len(client.search_runs([first["experiment_id"]])) == 1
    assert _history(client, run_id, "test_loss") == [(r["epoch"], r["test_loss"])
                                                     for r in read_metrics(run)]
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"
    # MLflow keeps a parameter's first value; the resume's change is a tag
    assert logged.data.params["epochs"] == "1" and logged.data.tags["resumed.epochs"] == "2"
    assert _artifacts(client, run_id) == {"config.json", "figures/elbo.png"}


def test_epochs_trained_before_tracking_began_are_logged_when_it_does(tmp_path, store):
    run = tmp_path / "run"
    fit_with([], CONFIG.replace(epochs=1), run)
    fit_with([MLflowTracker(store)], CONFIG, run, resume=True)
    client, run_id = _client(run)
    assert [step for step, _ in _history(client, run_id, "epoch")] == [1, 2]


def test_without_a_run_folder_the_run_is_tracked_and_a_failure_says_so(store):
    training = build(CONFIG, synthetic_dataset(n_train=200), progress=False)
    tracker = MLflowTracker(store)
    tracker.on_fit_start(training, None)
    tracker.on_epoch_end({"epoch": 1, "test_loss": 50.5, "note": "text", "stopped": True},
                         training)
    run_id = tracker.run_id
    tracker.on_fit_end(None)  # training ended by an error
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(tracking_uri=store_uri(store)).get_run(run_id)
    assert logged.info.status == "FAILED" and logged.data.params["epochs"] == "2"
    assert logged.data.metrics == {"epoch": 1.0, "test_loss": 50.5}  # numbers only


def test_the_evaluation_and_later_figures_go_into_the_runs_mlflow_run(tmp_path, store):
    from vaelab.runs import write_eval

    run = tmp_path / "run"
    fit_with([MLflowTracker(store)], CONFIG.replace(epochs=1), run)
    write_eval(run, {"nll": 44.5, "neg_elbo": 45.25, "iwae": {"5": 45.0}, "k": 5,
                     "kl_per_dim": [0.5, 0.25], "precision": "fp32"})
    _png(run / "figures" / "kl_per_dim.png")
    _png(run / "figures" / "samples.png")
    client, run_id = _client(run)
    assert log_evaluation(store, run) == run_id
    metrics = client.get_run(run_id).data.metrics
    assert {k: v for k, v in metrics.items() if k.startswith("eval/")} == {
        "eval/nll": 44.5, "eval/neg_elbo": 45.25, "eval/iwae/5": 45.0, "eval/k": 5.0}
    assert client.get_metric_history(run_id, "eval/nll")[0].step == 1  # the epochs trained
    assert _artifacts(client, run_id) == {"config.json", "eval.json", "figures/kl_per_dim.png"}
    assert log_artifacts(store, run) == run_id
    assert _artifacts(client, run_id) == {"config.json", "eval.json", "figures/kl_per_dim.png",
                                          "figures/samples.png"}


def test_evaluating_a_run_that_was_not_tracked_gives_it_an_mlflow_run(tmp_path, store):
    from vaelab.runs import write_eval

    run = tmp_path / "run"
    fit_with([], CONFIG.replace(epochs=1), run)
    write_eval(run, {"nll": 44.5})
    run_id = log_evaluation(store, run)
    client, recorded = _client(run)
    logged = client.get_run(run_id)
    assert recorded == run_id and logged.info.status == "FINISHED"
    assert logged.data.params["epochs"] == "1"
    assert logged.data.metrics["eval/nll"] == 44.5 and "test_loss" in logged.data.metrics


def test_evaluation_without_eval_json_is_refused(tmp_path, store):
    save_config(tmp_path, CONFIG)
    with pytest.raises(VaelabError, match="no eval.json: evaluate it first"):
        log_evaluation(store, tmp_path)


def test_without_mlflow_a_tracker_is_refused_in_one_line_naming_the_extra(tmp_path, monkeypatch):
    for name in ["mlflow", *(m for m in sys.modules if m.startswith("mlflow."))]:
        monkeypatch.setitem(sys.modules, name, None)  # its import then fails, even once imported
    for make in (lambda: MLflowTracker(f"file:{tmp_path}"),
                 lambda: log_evaluation(f"file:{tmp_path}", tmp_path)):
        with pytest.raises(VaelabError) as refused:
            make()
        message = str(refused.value)
        assert message == MISSING == "--mlflow needs MLflow: pip install 'vaelab[mlflow]'"
    assert not any(tmp_path.iterdir())


def test_a_file_store_refused_by_the_users_setting_is_said_in_one_line(tmp_path, store,
                                                                          monkeypatch):
    from mlflow import environment_variables

    if not hasattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE"):
        pytest.skip("this MLflow takes a file store without asking")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    with pytest.raises(VaelabError, match="MLFLOW_ALLOW_FILE_STORE") as refused:
        MLflowTracker(f"file:{tmp_path / 'refused'}")
    assert "\n" not in str(refused.value)


def test_parameters_are_flat_text_within_mlflows_limit():
    params = flat_params({"lr": 0.001, "grad_clip": None, "cuda_graph": True, "data_dir": "x" * 600,
                          "model": {"z_dim": 2, "upper_z_dims": (), "image_shape": (1, 28, 28)}},
                         limit=500)
    assert params == {"lr": "0.001", "grad_clip": "None", "cuda_graph": "True",
                      "data_dir": "x" * 497 + "...", "model.z_dim": "2",
                      "model.upper_z_dims": "()", "model.image_shape": "(1, 28, 28)"}


def test_a_local_store_is_recorded_by_its_absolute_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    absolute = (tmp_path / "mlruns").as_uri()
    assert store_uri("file:./mlruns") == store_uri("mlruns") == store_uri(absolute) == absolute
    for uri in ("sqlite:///mlflow.db", "http://localhost:5000", "databricks"):
        assert store_uri(uri) == uri
    with pytest.raises(VaelabError, match="needs a tracking URI"):
        store_uri(" ")
