"""MLflow tracking of a training run (`--mlflow URI`) and of its evaluation.

`MLflowTracker(URI)` is the callback that `fit` runs (vaelab.callbacks): at the start it opens an
MLflow run and logs the resolved config as parameters, after each epoch it logs the record's
numbers as metrics at step=epoch, and at the end it logs the run folder's files as artifacts and
ends the MLflow run. `log_evaluation(URI, RUN)` adds eval.json to it (`vaelab evaluate --mlflow`).

The run folder remembers its MLflow run in RUN/mlflow.json, so `--resume` continues the same
MLflow run; epochs that MLflow missed (a run stopped between its checkpoint and the logging) are
logged then. A URI is anything MLflow takes: `file:./mlruns` (a folder), `sqlite:///mlflow.db`,
`http://host:5000`. A local folder's URI is recorded absolute, so a run resumed from another
working folder finds the same store.

Needs the optional extra `pip install 'vaelab[mlflow]'` (mlflow-skinny); MLflow is imported only
when a tracker is made, so vaelab imports without it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlparse

from .callbacks import Callback
from .errors import VaelabError, one_line
from .fileio import atomic_write_json
from .runs import CONFIG, EVAL, FIGURES, finished_epochs, load_config, read_eval, read_metrics

MISSING = "--mlflow needs MLflow: pip install 'vaelab[mlflow]'"
RUN_FILE = "mlflow.json"  # in the run folder: {"tracking_uri", "experiment_id", "run_id"}
DEFAULT_EXPERIMENT = "Default"  # MLflow's own, which a file or database store starts with
KL_FIGURE = "kl_per_dim.png"  # in RUN/figures, drawn by `vaelab evaluate`
RESUMED_TAG = "resumed."  # + a parameter's name: its value after a resume that changed it
EVAL_PREFIX = "eval/"  # eval.json's numbers, as metrics
# MLflow's limits on one log_batch (mlflow.utils.validation); MLflow says them when it can.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores


class _MLflow:
    """MLflow's client for one tracking store, with the pieces of MLflow this module uses."""

    def __init__(self, uri: str):
        try:
            from mlflow.entities import Metric, Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            if (e.name or "").split(".")[0] == "mlflow":
                raise VaelabError(MISSING) from e
            # installed, but one of its own imports fails (an old MLflow without pkg_resources)
            raise VaelabError(f"MLflow cannot be imported ({one_line(e)}): "
                              "pip install -U 'vaelab[mlflow]'") from e
        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
        except ImportError:  # not public API: the smallest limit MLflow has had since 1.x
            MAX_PARAM_VAL_LENGTH = 500
        self.uri, self.Metric, self.Param = uri, Metric, Param
        self.MlflowException, self.max_param = MlflowException, MAX_PARAM_VAL_LENGTH
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked for it; a file: URI given to vaelab is
            # that request. A user's own MLFLOW_ALLOW_FILE_STORE=false still refuses.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        scheme = urlparse(uri).scheme.split("+")[0]
        if scheme in DATABASES and importlib.util.find_spec("sqlalchemy") is None:
            # mlflow-skinny leaves them out, and MLflow's own error speaks of a model registry
            raise VaelabError(f"MLflow at {uri}: a database store needs SQLAlchemy and Alembic: "
                              "pip install sqlalchemy alembic")
        with self.said():
            self.client = MlflowClient(tracking_uri=uri)

    @contextlib.contextmanager
    def said(self) -> Iterator[None]:
        """MLflow's errors (a store it cannot open, a server it cannot reach) as one line."""
        try:
            yield
        except self.MlflowException as e:
            raise VaelabError(f"MLflow at {self.uri}: {one_line(e)}") from None
        except OSError as e:  # a file store's folder that cannot be written
            raise VaelabError(f"MLflow at {self.uri}: {e.strerror or e}") from None


def store_uri(uri: str | os.PathLike) -> str:
    """The tracking URI as vaelab gives it to MLflow and records it: a local folder (a file: URI
    or a plain path) as an absolute file:/// URI; any other URI as it is."""
    text = os.fspath(uri).strip()
    if not text:
        raise VaelabError("--mlflow needs a tracking URI, such as file:./mlruns")
    parsed = urlparse(text)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        path = unquote(parsed.path)
    elif parsed.scheme == "" and text != "databricks":  # MLflow's one URI without a scheme
        path = text
    else:
        return text
    return Path(path).expanduser().resolve().as_uri()


def flat_params(config: dict, limit: int = 500, prefix: str = "") -> dict[str, str]:
    """A config's to_dict() as MLflow parameters: nested fields by dotted name (model.z_dim),
    every value as text (a tuple as "(256, 128)", None as "None"), cut to limit characters."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, limit, f"{name}."))
        else:
            text = str(value)
            out[name] = text if len(text) <= limit else text[:limit - 3] + "..."
    return out


def numbers(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a record (a metrics.jsonl line, eval.json) by name; booleans, text and
    lists are left out, a dict of numbers is named key/inner (eval.json's iwae/5000)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class MLflowTracker(Callback):
    """The callback that tracks a run in MLflow at uri, in the experiment named experiment
    (made if need be; None: MLflow's "Default"). Made before fit, it says a missing extra or a
    store that cannot be opened before the run folder is made.

    Parameters: training.config.to_dict(), flattened (flat_params). A resume that changes one
    (--epochs, say) keeps the first value, as MLflow requires, and records the new one as the tag
    "resumed.<name>"; config.json, an artifact at the end, is the run's last config. Metrics:
    each number of each epoch's record (epoch and seconds too), at step=epoch. Artifacts:
    config.json, eval.json where present, figures/*.png where present (figures drawn after fit
    are logged by log_artifacts). The MLflow run ends FINISHED, or FAILED when training ended
    by an error. Without a run folder the MLflow run is a fresh one and has no artifacts.
    """

    def __init__(self, uri: str | os.PathLike, experiment: str | None = None):
        self.mlflow = _MLflow(store_uri(uri))
        self.experiment = experiment
        self.run_id: str | None = None
        self.run_dir: Path | None = None

    def on_fit_start(self, training: Any, run_dir: Path | None) -> None:
        self.run_dir = None if run_dir is None else Path(run_dir)
        done = 0 if run_dir is None else finished_epochs(run_dir)
        # fit has rewritten metrics.jsonl from the checkpoint by now: its first `done` lines
        records = read_metrics(run_dir)[:done] if done else []
        self.run_id, _ = open_run(self.mlflow, self.run_dir, training.config.to_dict(), records,
                                  self.experiment, running=True)

    def on_epoch_end(self, record: dict, training: Any) -> None:
        log_records(self.mlflow, self.run_id, [record])

    def on_fit_end(self, result: Any) -> None:
        if self.run_id is None:
            return
        try:
            if self.run_dir is not None:
                log_files(self.mlflow, self.run_id, self.run_dir)
        finally:
            with self.mlflow.said():
                self.mlflow.client.set_terminated(
                    self.run_id, status="FINISHED" if result is not None else "FAILED")
            self.run_id = None


def log_artifacts(uri: str | os.PathLike, run_dir: str | Path,
                  experiment: str | None = None) -> str:
    """Log a run folder's config.json, eval.json and figures/*.png, those present, into its
    MLflow run at uri (the one RUN/mlflow.json names; a run not tracked there yet gets one, with
    its parameters and metrics.jsonl). For figures drawn after fit. Returns the MLflow run id."""
    mlflow, run_dir = _MLflow(store_uri(uri)), Path(run_dir)
    run_id = _tracked_run(mlflow, run_dir, experiment)
    log_files(mlflow, run_id, run_dir)
    return run_id


def log_evaluation(uri: str | os.PathLike, run_dir: str | Path,
                   experiment: str | None = None) -> str:
    """Log a run's evaluation into its MLflow run at uri (`vaelab evaluate --mlflow URI`): eval.json
    and figures/kl_per_dim.png (where present) as artifacts, and eval.json's numbers as metrics
    "eval/<name>" (nll, neg_elbo, iwae/<k>, ...) at step = the epochs trained. The MLflow run is
    the one RUN/mlflow.json names; a run not tracked at uri gets one, with its parameters and
    metrics.jsonl. Returns the MLflow run id."""
    mlflow, run_dir = _MLflow(store_uri(uri)), Path(run_dir)
    evaluation = read_eval(run_dir)
    if evaluation is None:
        raise VaelabError(f"{run_dir} has no {EVAL}: evaluate it first (vaelab evaluate {run_dir})")
    run_id = _tracked_run(mlflow, run_dir, experiment)
    epochs = finished_epochs(run_dir)
    stamp = _now_ms()
    metrics = [mlflow.Metric(key, value, stamp, epochs)
               for key, value in numbers(evaluation, EVAL_PREFIX).items()]
    with mlflow.said():
        _log_metrics(mlflow, run_id, metrics)
        mlflow.client.log_artifact(run_id, str(run_dir / EVAL))
        figure = run_dir / FIGURES / KL_FIGURE
        if figure.is_file():
            mlflow.client.log_artifact(run_id, str(figure), FIGURES)
    return run_id


def _tracked_run(mlflow: _MLflow, run_dir: Path, experiment: str | None) -> str:
    """The MLflow run of a finished run folder, found or made (then ended: nothing trains)."""
    config = load_config(run_dir)  # a folder that is not a run is refused here, in one line
    records = read_metrics(run_dir)[:finished_epochs(run_dir)]
    run_id, new = open_run(mlflow, run_dir, config.to_dict(), records, experiment, running=False)
    if new:
        with mlflow.said():
            mlflow.client.set_terminated(run_id, status="FINISHED")
    return run_id


def recorded_run(mlflow: _MLflow, run_dir: Path | None) -> str | None:
    """The id of the MLflow run that run_dir/mlflow.json names, if it is in this store and not
    deleted; else None."""
    if run_dir is None:
        return None
    try:
        recorded = json.loads((run_dir / RUN_FILE).read_text())
        run_id = recorded["run_id"]
        same_store = recorded["tracking_uri"] == mlflow.uri
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none yet, or one that cannot be read: a new MLflow run replaces it
    if not same_store:
        return None  # another store: this one gets its own run, and mlflow.json names it
    try:
        run = mlflow.client.get_run(run_id)
    except mlflow.MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise VaelabError(f"MLflow at {mlflow.uri}: {one_line(e)}") from None
    return None if run.info.lifecycle_stage == "deleted" else run_id


def open_run(mlflow: _MLflow, run_dir: Path | None, config: dict, records: list[dict],
             experiment: str | None, running: bool) -> tuple[str, bool]:
    """The MLflow run of run_dir: the one mlflow.json names (status RUNNING again if running),
    else a new one, named after the folder, whose id mlflow.json then records. Logs the config's
    parameters it lacks and the records of the finished epochs it lacks. Returns its id, and
    whether it is new."""
    params = flat_params(config, mlflow.max_param)
    run_id = recorded_run(mlflow, run_dir)
    new_run = run_id is None
    with mlflow.said():
        client = mlflow.client
        if new_run:
            tags = {} if run_dir is None else {"vaelab.run_dir": str(run_dir.resolve())}
            run = client.create_run(_experiment_id(mlflow, experiment),
                                    run_name=None if run_dir is None else run_dir.name, tags=tags)
            run_id = run.info.run_id
            if run_dir is not None:
                atomic_write_json(run_dir / RUN_FILE, {"tracking_uri": mlflow.uri,
                                                       "experiment_id": run.info.experiment_id,
                                                       "run_id": run_id})
            logged, epochs = {}, set()
        else:
            if running:
                client.update_run(run_id, status="RUNNING")
            logged = client.get_run(run_id).data.params
            epochs = {int(m.step) for m in client.get_metric_history(run_id, "epoch")}
        new = [mlflow.Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=new[i:i + PARAMS_PER_BATCH])
        changed = {RESUMED_TAG + k: v for k, v in params.items() if k in logged and logged[k] != v}
        for key, value in changed.items():  # parameters cannot change in MLflow; tags can
            client.set_tag(run_id, key, value)
    log_records(mlflow, run_id, [r for r in records if r["epoch"] not in epochs])
    return run_id, new_run


def log_records(mlflow: _MLflow, run_id: str, records: list[dict]) -> None:
    """Each number of each metrics record as a metric at step=record["epoch"]."""
    stamp = _now_ms()
    metrics = [mlflow.Metric(key, value, stamp, int(record["epoch"]))
               for record in records for key, value in numbers(record).items()]
    with mlflow.said():
        _log_metrics(mlflow, run_id, metrics)


def log_files(mlflow: _MLflow, run_id: str, run_dir: Path) -> None:
    """config.json, eval.json and figures/*.png of run_dir, those present, as artifacts (the
    figures under figures/)."""
    with mlflow.said():
        for name in (CONFIG, EVAL):
            if (run_dir / name).is_file():
                mlflow.client.log_artifact(run_id, str(run_dir / name))
        for figure in sorted((run_dir / FIGURES).glob("*.png")):
            mlflow.client.log_artifact(run_id, str(figure), FIGURES)


def _log_metrics(mlflow: _MLflow, run_id: str, metrics: list) -> None:
    for i in range(0, len(metrics), METRICS_PER_BATCH):
        mlflow.client.log_batch(run_id, metrics=metrics[i:i + METRICS_PER_BATCH])


def _experiment_id(mlflow: _MLflow, name: str | None) -> str:
    """The id of experiment `name` (None: MLflow's default one), made if it does not exist."""
    name = name or DEFAULT_EXPERIMENT
    found = mlflow.client.get_experiment_by_name(name)
    if found is None:
        return mlflow.client.create_experiment(name)
    if found.lifecycle_stage == "deleted":
        raise VaelabError(f"MLflow experiment {name!r} at {mlflow.uri} is deleted: restore it "
                          "(mlflow experiments restore) or name another")
    return found.experiment_id


def _now_ms() -> int:
    return int(time.time() * 1000)
