"""Starting a run, and opening a trained one: the policy, where runs.py holds the format.

- a new run: its folder (`new_run_dir`: a fresh runs/<timestamp>, or an --out that must be new
  or empty);
- `--resume` (`resumed_config`: which options may change) and a torchrun restart (`plan`,
  `prepare`: continue from the folder's checkpoint, or start afresh there), with `claim` marking
  the folder as this torchrun job's, and what an interrupted run says (`interrupted_note`);
- a trained run opened with the data it fits (`load_run_and_data`), and the preamble shared by
  the commands that read one (`open_run`: evaluate, gap, encode and score).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any, Callable

from . import config as configs, distributed
from .config import CUSTOM, Options, RunConfig, check
from .data import Dataset, load_data
from .distributed import SINGLE, World
from .errors import RunError, VaelabError
from .fileio import atomic_write_bytes
from .models import VAE
from .runs import (CHECKPOINT, CONFIG, PROBE, RUN_FILES, TORCHRUN_ID, _own_networks,
                   check_writable, finished_epochs, load_config, load_run)


def fresh_run_path(root: str | Path = "runs") -> Path:
    """runs/<timestamp>, with a suffix if that is taken; nothing is created."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = Path(root) / stamp, 1
    while path.exists():
        path, i = Path(root) / f"{stamp}-{i}", i + 1
    return path


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


def open_run(options: Options, world: World = SINGLE, *, writes: str | None = None,
             outputs: Callable[[], object] | None = None, sampled: str | None = None,
             **read: Any) -> tuple[VAE, Dataset]:
    """The preamble of the commands that read a trained run (evaluate, gap, encode, score):
    the options checked, the process group joined (under torchrun; nothing for one process),
    outputs() on rank 0 (the check of what the command writes outside the run, before any work),
    the run and its data loaded (load_run_and_data from options.run, .data_dir, .device and
    .quiet; read: how to read an image folder), and, where the command writes the file `writes`
    into the run folder, that folder found writable by rank 0 before minutes of work. sampled:
    the command's name, where it draws z from the posterior (a VQ-VAE's run is then refused).
    An error on rank 0 is raised on every rank."""
    check(options)
    distributed.start(world)
    if outputs is not None:
        distributed.share_result(outputs, world)
    model, data = load_run_and_data(options.run, options.data_dir, options.device, world,
                                    progress=not options.quiet, **read)
    if sampled and model.estimate != "importance sampling":
        raise VaelabError(f"`vaelab {sampled}` draws z from the posterior, which this run's"
                          f" {model.config.family} does not have (its codes are a point);"
                          " `vaelab evaluate` bounds its log p(x)")
    if writes is not None:
        run = Path(options.run)
        distributed.share_result(
            lambda: check_writable(run, f"{writes} goes there: make it writable"), world)
    return model, data
