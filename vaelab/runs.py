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

Also the policy of starting one: a fresh run, `--resume` (which options may change), a torchrun
restart (continue from the folder's checkpoint, or start afresh there), and the check that a
run's model fits the data it is given.
"""

from __future__ import annotations

import copy
import io
import json
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from . import config as configs, distributed
from .config import CUSTOM, RunConfig
from .data import Dataset, load_data
from .distributed import SINGLE, World
from .errors import RunError, VaelabError
from .fileio import atomic_write_bytes, atomic_write_json
from .models import VAE
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


def fresh_run_path(root: str | Path = "runs") -> Path:
    """runs/<timestamp>, with a suffix if that is taken; nothing is created."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = Path(root) / stamp, 1
    while path.exists():
        path, i = Path(root) / f"{stamp}-{i}", i + 1
    return path


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


def check_new_run_dir(path: Path, name: str = "run_dir") -> None:
    """Refuse path as a new run's folder, naming the argument that gave it (`name`: "--out" on
    the command line, "run_dir" from Python): a file, a folder that holds a run (a run never
    overwrites another's files), and a folder of other files (a run's files would mix with
    them). A missing or empty folder passes."""
    if not path.exists():
        return
    if not path.is_dir():
        raise RunError(f"{name} {path} is a file, not a directory; choose another {name}")
    if (path / CONFIG).is_file() and not started(path):
        again = (f"vaelab train --resume {path}" if name == "--out"
                 else f"train(config, run_dir={str(path)!r}, resume=True)")
        raise RunError(f"{path} holds a run with no finished epoch: start it again there with"
                       f" {again}, or choose another {name}")
    taken = [file for file in RUN_FILES if (path / file).exists()]
    if taken:
        raise RunError(f"{path} already holds a run ({', '.join(taken)}); choose another {name}")
    others = sorted(entry.name for entry in path.iterdir()
                    if entry.name not in (TORCHRUN_ID, PROBE))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise RunError(f"{name} {path} is a folder of other files ({shown}), not a run; choose an"
                       " empty or new folder")


def new_run_dir(out: str | Path | None = None, root: str | Path = "runs",
                name: str = "run_dir") -> Path:
    """Create the directory for a new run and return it.

    Without `out`, a fresh runs/<timestamp>. A folder that is not empty is refused
    (check_new_run_dir; `name` is how the caller called it).
    """
    path = fresh_run_path(root) if out is None else Path(out)
    check_new_run_dir(path, name)
    check_writable(path, f"choose another {name}")
    return path


def started(run_dir: str | Path) -> bool:
    """Whether a run has finished an epoch (it has a checkpoint to resume from)."""
    return (Path(run_dir) / CHECKPOINT).is_file()


def finished_epochs(run_dir: str | Path) -> int:
    """The epochs a run's checkpoint holds (0 when it has none or it cannot be read)."""
    try:
        with open(Path(run_dir) / CHECKPOINT, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            return int(json.loads(f.read(n))["__metadata__"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def interrupted_note(run_dir: str | Path | None) -> str:
    """What an interrupted `vaelab train` left in run_dir, and the command that goes on."""
    if run_dir is None or not (Path(run_dir) / CONFIG).is_file():
        return "nothing was saved"
    command = f"vaelab train --resume {shlex.quote(str(run_dir))}"
    done = finished_epochs(run_dir)
    if not done:
        return (f"no epoch had finished, so {run_dir} holds nothing trained; start it again there"
                f" with: {command}")
    try:
        total = f" of {load_config(run_dir).epochs}"
    except RunError:
        total = ""
    return f"epoch {done}{total} is saved in {run_dir}; continue with: {command}"


def claim(run_dir: Path, run_id: str) -> None:
    """Mark run_dir as created by torchrun job run_id."""
    atomic_write_bytes(Path(run_dir) / TORCHRUN_ID, run_id.encode())


def claimed_by(run_dir: Path, run_id: str) -> bool:
    """Whether torchrun job run_id created run_dir (so that its restart may continue it)."""
    path = Path(run_dir) / TORCHRUN_ID
    try:
        return bool(run_id) and path.read_text() == run_id
    except OSError:
        return False


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


def save_weights(run_dir: Path, model: VAE) -> None:
    """Write the model's weights atomically as safetensors."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
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
        model = VAE.from_config(config.model)
    elif config.model.architecture != CUSTOM:
        raise VaelabError(f"{run_dir} was trained with vaelab's {config.model.architecture} "
                          "networks: load it without encoder and decoder")
    else:
        model = VAE(copy.deepcopy(encoder), copy.deepcopy(decoder), config.model)
    load_weights(Path(run_dir), model)
    device = distributed.pick_device(device) if device == "auto" else torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VaelabError(f"device {str(device)!r} was asked for but no CUDA GPU is available; use "
                          "device 'cpu'")
    return model.to(device).eval()


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


def save_checkpoint(run_dir: Path, model: VAE, optimizer: torch.optim.Optimizer, metrics: list[dict]) -> None:
    """Everything needed to continue after the epoch just finished, in one atomic file.

    Then model.safetensors and metrics.jsonl are rewritten from the same state:
    a crash between the writes leaves the checkpoint as the truth. Learning
    rates are stored as numbers, whatever the optimizer holds them in.
    """
    run_dir = Path(run_dir)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
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
    save_weights(run_dir, model)
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
                       kind: str) -> list[dict]:
    """Put checkpoint bytes back into model and optimizer (`kind`: "sgd" or "adam"); returns the
    metrics of the finished epochs. Checkpoints of earlier versions load too: their random-number
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


# --- starting a run: fresh, resumed, or restarted by torchrun ---------------------------------

def resumed_config(run_dir: str | Path, changes: dict) -> RunConfig:
    """The config of the run that --resume continues, with `changes` (option name -> value) set;
    only the options declared `resume=True` may change."""
    cls = configs.RunConfig
    allowed = configs.resumable(cls)
    fixed = [name for name in changes if name not in {f.name for f in allowed}]
    if fixed:
        flags = ", ".join(configs.flag_for(name) for name in fixed)
        raise VaelabError(f"{flags} cannot change when resuming: {run_dir}/config.json fixes the run; "
                          f"leave {'them' if len(fixed) > 1 else 'it'} out "
                          f"(only {configs.listed([configs.flag_of(f) for f in allowed])} may be given)")
    config = load_config(run_dir)
    if config.model.architecture == CUSTOM:
        raise _own_networks(run_dir, "resume it in Python: vaelab.train(config, run, resume=True, model=...)")
    return config.replace(**changes)


def _same_run(saved: RunConfig, config: RunConfig) -> bool:
    """Whether a saved run is the one config asks for: every option the caller gave has the
    saved value (the others were resolved when it started)."""
    asked = {**configs.given_values(config.model), **configs.given_values(config)}
    recorded = {**saved.model.to_dict(), **saved.to_dict()}
    return all(recorded[k] == v for k, v in asked.items() if k not in ("model", "data_dir"))


def plan(options: dict, out: str | Path | None = None, resume: str | Path | None = None,
         world: World = SINGLE) -> tuple[RunConfig, Path, bool]:
    """The config of a training run (as given: build resolves it), its folder and whether it resumes (decided by
    rank 0, which holds the folder). options: the options set explicitly (name -> value).

    After torchrun restarted the group (same command line), the run resumes from its folder's
    checkpoint, or starts afresh there if none was written yet (as `--resume` of a run with no
    finished epoch does: train.fit). A new run's --out must be new or empty (check_new_run_dir).
    """
    if resume:
        if out:
            raise VaelabError("--resume RUN continues RUN in place; leave out --out")
        return resumed_config(resume, options), Path(resume), True
    config = configs.RunConfig.from_options(options)  # build resolves it, for the data's images
    run_dir = Path(out or fresh_run_path())
    # Only a folder this torchrun job created: another's is refused as at a first start.
    if world.restarts and (run_dir / CONFIG).is_file() and claimed_by(run_dir, world.run_id):
        saved = load_config(run_dir)
        if not _same_run(saved, config):
            raise VaelabError(f"torchrun restarted this job, but {run_dir / CONFIG} describes another run; "
                              "choose another --out")
        return saved, run_dir, True  # with no epoch finished, fit starts afresh in the same folder
    check_new_run_dir(run_dir, "--out")
    return config, run_dir, False


def prepare(options: dict, out: str | Path | None = None, resume: str | Path | None = None,
            world: World = SINGLE) -> tuple[RunConfig, Path, bool]:
    """Join the process group (under torchrun), then `plan` on rank 0, shared with every rank,
    each of which may keep the data in a folder of its own. (`train.build` validates the config,
    before anything is fetched or written.)"""
    if world.distributed and not (out or resume):
        raise VaelabError("under torchrun, give --out DIR: every rank, and every restart, must name the same run")
    distributed.start(world)
    config, run_dir, resuming = distributed.share_result(lambda: plan(options, out, resume, world), world)
    if "data_dir" in options or not resume:
        config = config.replace(data_dir=options.get("data_dir"))
    return config, run_dir, resuming


def load_run_and_data(run_dir: str | Path, data_dir: str | Path | None = None, device: str = "cpu",
                      world: World = SINGLE, progress: bool = True,
                      **folder: Any) -> tuple[VAE, Dataset]:
    """A run's model and the data it fits (the run's own data folder unless data_dir is given).
    folder: how to read and split an image folder (config.READ_OPTIONS: image_size, channels,
    background, skip_bad, test_fraction, split_seed), each given as None (or False) taking the
    run's own. progress: a bar while a folder is decoded, and its report of skipped files. Under
    torchrun rank 0 reads the run and passes the weights on; every rank reads its own data."""
    config, model = distributed.share_result(lambda: (load_config(run_dir), load_run(run_dir)), world)
    model = model.to(distributed.pick_device(device, world))
    options = config.data_options()
    unknown = set(folder) - set(configs.READ_OPTIONS)
    if unknown:
        raise TypeError(f"load_run_and_data has no folder option {', '.join(sorted(unknown))}")
    options.update({name: value for name, value in folder.items()
                    if value is not None and value is not False})
    resized = folder.get("image_size") is None and config.image_size
    if data_dir and resized and not Path(data_dir).is_dir():
        raise VaelabError(f"{run_dir} was trained on an image folder resized to {config.image_size} pixels "
                          f"(config.json); --data-dir {data_dir} is not a folder of images")
    data = load_data(data_dir or config.data_dir, progress=progress and world.main, **options)
    if data.image_shape != model.config.image_shape:
        shape = lambda s: "x".join(map(str, s))
        (c, h, w), (mc, mh, mw) = data.image_shape, model.config.image_shape
        fixes = [] if data.source != "folder" else [
            *([f"--channels {'grey' if mc == 1 else 'rgb'}"] if c != mc and mc in (1, 3) else []),
            *([f"--image-size {mh}"] if (h, w) != (mh, mw) and mh == mw else [])]
        fix = f"; read the folder with {' '.join(fixes)}" if fixes else ""
        raise VaelabError(f"the images in {data.directory} are {shape(data.image_shape)}"
                          f" (channels x height x width) but the model in {run_dir} expects"
                          f" {shape(model.config.image_shape)}{fix}")
    return model, data
