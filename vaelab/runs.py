"""A run on disk: one directory holding everything a run produced.

    RUN/config.json         the RunConfig (JSON only, never pickle)
    RUN/model.safetensors   the weights (safetensors only, never torch.load)
    RUN/checkpoint.safetensors  weights, optimizer state and the metrics so far, of
                            the last finished epoch (for --resume)
    RUN/metrics.jsonl       one JSON object per finished epoch
    RUN/batch_losses.npy    (epochs, steps) float32: each global batch's mean training loss
    RUN/eval.json           written by `vaelab evaluate`
    RUN/log_px.npy          its per-image log p(x) estimates (float64, test-set order)
    RUN/figures/*.png
    RUN/.torchrun-id        the torchrun job that created the run (start.claim writes it)

This module owns the format: the files' names, saving and loading the config, the weights, the
checkpoint (and the epochs it holds), the metrics, the evaluation and the commands' records,
`load_run`, and `check_writable`. Which folder a run starts in, whether it resumes, and how a
trained run is opened with its data are start.py's.
"""

from __future__ import annotations

import copy
import io
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from . import config as configs, distributed
from .average import WeightAverage
from .config import CUSTOM, RunConfig
from .errors import RunError, VaelabError
from .fileio import atomic_write_bytes, atomic_write_json
from .models import VAE, model_class
from .registry import import_plugins

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
TORCHRUN_ID = ".torchrun-id"  # the torchrun job that created the run: its restarts may continue it
LOG_PX = "log_px.npy"
BATCH_LOSSES = "batch_losses.npy"
FIGURES = "figures"
RUN_FILES = (CONFIG, WEIGHTS, CHECKPOINT, METRICS)
PROBE = ".vaelab-write-test"  # check_writable's file, there only for an instant
PRIOR = "prior"  # RUN/prior: a run of its own (weights, checkpoint, metrics) of a second stage


def check_writable(path: Path, hint: str) -> None:
    """Create the folder path if need be and prove that a file can be written in it.

    Raises RunError naming path and `hint` (what the user can do about it).
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / PROBE
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to {path} ({e.strerror or e}); {hint}") from None


def finished_epochs(run_dir: str | Path) -> int:
    """The epochs a run's checkpoint holds (0 when it has none or it cannot be read)."""
    try:
        with open(Path(run_dir) / CHECKPOINT, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return int(json.loads(f.read(n))["__metadata__"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def save_config(run_dir: Path, config: RunConfig) -> None:
    atomic_write_json(Path(run_dir) / CONFIG, config.to_dict())


def load_config(run_dir: str | Path) -> RunConfig:
    """The RunConfig of a run directory, with a clear error for what is wrong."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory {run_dir} does not exist")
    path = run_dir / CONFIG
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run: it has no {CONFIG}")
    try:
        config = configs.RunConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, VaelabError) as e:
        raise RunError(f"{path} is unreadable or corrupt: {e}") from None
    import_plugins(config.plugins)  # the components the run was trained with
    return config


def save_weights(run_dir: Path, model: VAE, average: WeightAverage | None = None) -> None:
    """Write the model's weights atomically as safetensors: with average, the average's."""
    with average.applied() if average is not None else nullcontext():
        tensors = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(Path(run_dir) / WEIGHTS, save_safetensors(tensors))


def load_weights(run_dir: Path, model: VAE) -> None:
    """Load safetensors weights into model, refusing anything that does not fit."""
    path = Path(run_dir) / WEIGHTS
    if not path.is_file():
        raise RunError(f"{run_dir} has no {WEIGHTS}: the run has not finished an epoch")
    try:
        tensors = load_safetensors(path.read_bytes())
    except (OSError, SafetensorError, ValueError) as e:
        raise RunError(f"{path} is corrupt: {e}") from None
    expected = {k: v.shape for k, v in model.state_dict().items()}
    found = {k: v.shape for k, v in tensors.items()}
    if expected != found:
        raise RunError(f"{path} does not match the model in {CONFIG} "
                       f"(expected {len(expected)} tensors of the configured shapes)")
    model.load_state_dict(tensors)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu",
             encoder: torch.nn.Module | None = None, decoder: torch.nn.Module | None = None) -> VAE:
    """The trained model of a run, ready for `encode(images)` and `decode(z)`, in eval mode, on
    `device` ("cpu", "cuda", "auto" or a torch.device).

    A model trained from your own networks comes back from modules built as they were: give
    fresh ones as encoder and decoder, and the run's weights are loaded into them (and into
    vaelab's parts: the head, the prior, the flow). Nothing read from the run runs code."""
    config = load_config(run_dir)
    if (encoder is None) != (decoder is None):
        raise VaelabError("give load_run both the encoder and the decoder, or neither")
    if encoder is None and config.model.architecture == CUSTOM:
        raise _own_networks(run_dir, "load it in Python with vaelab.load_run(run, encoder=..., decoder=...)")
    if encoder is None:
        model = model_class(config.model).from_config(config.model)
    elif config.model.architecture != CUSTOM:
        raise VaelabError(f"{run_dir} was trained with vaelab's {config.model.architecture} "
                          "networks: load it without encoder and decoder")
    else:
        model = model_class(config.model)(copy.deepcopy(encoder), copy.deepcopy(decoder),
                                          config.model)
    load_weights(Path(run_dir), model)
    stage = model.second_stage()
    if stage is not None and stage_is_current(run_dir):
        load_weights(Path(run_dir) / PRIOR, stage)
        model.attach(stage)
    device = distributed.pick_device(device) if device == "auto" else torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VaelabError(f"device {str(device)!r} was asked for but no CUDA GPU is available; use "
                          "device 'cpu'")
    return model.to(device).eval()


def stage_is_current(run_dir: str | Path) -> bool:
    """Whether RUN/prior holds a second stage trained on the run as it is now: on the codes of
    its last finished epoch (a resumed run's codes move, and an older prior no longer fits)."""
    metrics = read_metrics(Path(run_dir) / PRIOR) if (Path(run_dir) / PRIOR / WEIGHTS).is_file() \
        else []
    return bool(metrics) and metrics[-1].get("run_epochs") == len(read_metrics(run_dir))


def _own_networks(run_dir: str | Path, advice: str) -> RunError:
    """The error for a run of your own modules where vaelab would have to build them."""
    return RunError(f"{run_dir} was trained with your own encoder and decoder, which only you can build: {advice}")


def write_metrics(run_dir: Path, records: list[dict]) -> None:
    """Rewrite metrics.jsonl atomically with all records so far."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write_bytes(Path(run_dir) / METRICS, text.encode())


def _save_npy(path: Path, array: np.ndarray) -> None:
    """One array as a .npy file, atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def write_batch_losses(run_dir: Path, epoch: int, losses: np.ndarray) -> None:
    """Put epoch's (steps,) batch losses in row epoch - 1 of RUN/batch_losses.npy, atomically."""
    path = Path(run_dir) / BATCH_LOSSES
    rows = np.full((epoch - 1, len(losses)), np.nan, dtype=np.float32)  # NaN: an epoch whose row is missing
    if path.is_file():
        try:
            saved = np.load(path, allow_pickle=False)[:epoch - 1]
        except (OSError, ValueError):
            saved = None  # unreadable: rows of NaN (the checkpoint, not this file, is the truth)
        if saved is not None and saved.ndim == 2 and saved.shape[1] == len(losses):
            rows[:len(saved)] = saved
    _save_npy(path, np.concatenate([rows, losses[None]]).astype(np.float32))


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as e:
        raise RunError(f"{path} is corrupt: {e}") from None


def save_checkpoint(run_dir: Path, model: VAE, optimizer: torch.optim.Optimizer, metrics: list[dict],
                    average: WeightAverage | None = None) -> None:
    """Everything needed to continue after the epoch just finished, in one atomic file: with an
    average of the weights (--ema), that too.

    Then model.safetensors (the average, where there is one) and metrics.jsonl are rewritten
    from the same state: a crash between the writes leaves the checkpoint as the truth. Learning
    rates are stored as numbers, whatever the optimizer holds them in.
    """
    run_dir = Path(run_dir)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if average is not None:
        tensors.update({f"average.{i}": t.cpu().contiguous() for i, t in average.state().items()})
    state = optimizer.state_dict()
    scalars = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{**g, "lr": float(g["lr"])} for g in state["param_groups"]]
    metadata = {"epoch": str(metrics[-1]["epoch"]), "metrics": json.dumps(metrics),
                "optimizer": json.dumps({"param_groups": groups, "scalars": scalars})}
    atomic_write_bytes(run_dir / CHECKPOINT, save_safetensors(tensors, metadata=metadata))
    save_weights(run_dir, model, average)
    write_metrics(run_dir, metrics)


# The per-parameter state each optimizer keeps (plain SGD keeps none).
OPTIMIZER_STATE = {"sgd": set(), "adam": {"step", "exp_avg", "exp_avg_sq"}}


def read_checkpoint(run_dir: Path) -> bytes:
    """The bytes of RUN/checkpoint.safetensors (rank 0 reads them and shares them)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise RunError(f"{run_dir} has no {CHECKPOINT} to resume from: no epoch of it has finished")
    try:
        return path.read_bytes()
    except OSError as e:
        raise RunError(f"{path} cannot be read ({e.strerror or e})") from None


def _metadata(data: bytes) -> dict:
    """The __metadata__ of safetensors bytes: an 8-byte little-endian length, then a JSON header."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n])["__metadata__"]


def restore_checkpoint(data: bytes, run_dir: Path, model: VAE, optimizer: torch.optim.Optimizer,
                       kind: str, average: WeightAverage | None = None) -> list[dict]:
    """Put checkpoint bytes back into model and optimizer (`kind`: "sgd" or "adam"), and the
    average of the weights where the run keeps one; returns the metrics of the finished epochs. Checkpoints of earlier versions load too: their random-number
    state is not needed any more, and their plain-SGD optimizer groups become torch.optim.SGD's."""
    path = Path(run_dir) / CHECKPOINT
    try:
        tensors = load_safetensors(data)
        metadata = _metadata(data)
        metrics = json.loads(metadata["metrics"])
        saved = json.loads(metadata["optimizer"])
    except (SafetensorError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path} is corrupt: {e}") from None
    try:
        _restore(tensors, saved, model, optimizer, kind)
        saved_average = {k[len("average."):]: v for k, v in tensors.items()
                         if k.startswith("average.")}
        if (average is None) != (not saved_average):
            raise ValueError("it was written " + ("with" if saved_average else "without")
                             + " an average of the weights (--ema), which this run "
                             + ("does not keep" if saved_average else "keeps"))
        if average is not None:
            average.load(saved_average)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise RunError(f"{path} does not fit this run (corrupt, or written for another model, "
                       f"optimizer or device): {e}") from None
    return metrics


def _restore(tensors: dict, saved: dict, model: VAE, optimizer: torch.optim.Optimizer, kind: str) -> None:
    """Put a checkpoint's tensors back into model and optimizer."""
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if {k: v.shape for k, v in weights.items()} != expected:
        raise ValueError(f"its weights are not the shapes of the model in {CONFIG}")
    model.load_state_dict(weights)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in saved["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    mine, theirs = optimizer.param_groups, saved["param_groups"]
    if [len(g["params"]) for g in mine] != [len(g["params"]) for g in theirs]:
        raise ValueError("its optimizer holds other parameters")
    n_params = sum(len(g["params"]) for g in theirs)
    expected = {i: OPTIMIZER_STATE[kind] for i in range(n_params)} if OPTIMIZER_STATE[kind] else {}
    if {i: set(entries) for i, entries in state.items()} != expected:
        raise ValueError(f"its optimizer state is not {kind}'s")  # torch would load it and fail later
    # Only the state and each group's learning rate come from the file; the other settings
    # are the configured optimizer's (earlier plain-SGD checkpoints stored no others).
    lrs = [g["lr"] for g in mine]
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "lr": float(s["lr"]), "params": s["params"]}
              for g, s in zip(mine, theirs)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for group, lr, s in zip(optimizer.param_groups, lrs, theirs):
        if torch.is_tensor(lr):  # keep the tensor a captured step reads
            group["lr"] = lr.fill_(float(s["lr"]))


def write_eval(run_dir: str | Path, result: dict) -> None:
    """RUN/eval.json, and with the result's "log_px" (per-image values) RUN/log_px.npy, atomically."""
    record = {k: v for k, v in result.items() if k not in ("log_px", "per_image")}
    try:
        if "log_px" in result:
            _save_npy(Path(run_dir) / LOG_PX, np.asarray(result["log_px"], dtype=np.float64))
        atomic_write_json(Path(run_dir) / EVAL, record)
    except OSError as e:
        raise RunError(f"cannot write the evaluation into {run_dir} ({e.strerror or e})") from None


def read_log_px(run_dir: str | Path) -> np.ndarray | None:
    """RUN/log_px.npy (float64, one value per test image), or None when it is not there."""
    path = Path(run_dir) / LOG_PX
    if not path.is_file():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is unreadable or corrupt ({e}); run `vaelab evaluate {run_dir}` again") from None


def read_record(run_dir: str | Path, name: str, command: str) -> dict | None:
    """RUN/name (a JSON record that `vaelab COMMAND` writes), or None when it has not run."""
    path = Path(run_dir) / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is unreadable or corrupt ({e}); run `vaelab {command} {run_dir}` again") from None


def read_eval(run_dir: str | Path) -> dict | None:
    """RUN/eval.json, or None when the run has not been evaluated."""
    return read_record(run_dir, EVAL, "evaluate")
