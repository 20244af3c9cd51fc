"""Every user mistake: exit status 2, one line on stderr naming the problem, no
traceback, and nothing that existed before is changed."""

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import synthetic_dataset, write_idx_dir
from test_train import tiny_config
from vaelab import train
from vaelab.cli import main
from vaelab.data import FILES, encode_idx


def run_cli(capsys, *args) -> tuple[int, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_user_error(code: int, err: str, message: str):
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# --- bad data ---------------------------------------------------------------------

def _bad_folder_cases():
    from test_folders import BAD_FOLDERS

    return [pytest.param(build, says, id=build.__name__.strip("_")) for build, says in BAD_FOLDERS]


@pytest.mark.parametrize("build,says", _bad_folder_cases())
def test_the_bad_image_corpus_at_the_command_line(tmp_path, capsys, monkeypatch, build, says):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    culprit = build(tmp_path / "data")
    before = snapshot(tmp_path / "data")
    code, err = run_cli(capsys, "train", "--data-dir", tmp_path / "data", "--out", tmp_path / "run", "--quiet")
    assert_user_error(code, err, says)
    assert str(culprit) in err
    assert snapshot(tmp_path / "data") == before
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def _truncate_gz(d: Path):
    p = d / f"{FILES['train_images']}.gz"
    p.write_bytes(p.read_bytes()[:50])


def _not_gzip(d: Path):
    (d / f"{FILES['test_images']}.gz").write_bytes(b"these bytes are not gzip at all")


def _wrong_magic(d: Path):
    p = d / f"{FILES['train_labels']}.gz"
    content = bytearray(gzip.decompress(p.read_bytes()))
    content[2] = 0x0D  # float, not unsigned byte
    p.write_bytes(gzip.compress(bytes(content)))


def _wrong_dims(d: Path):
    (d / f"{FILES['test_images']}.gz").write_bytes(gzip.compress(encode_idx(np.zeros((100, 64), np.uint8))))


def _count_mismatch(d: Path):
    (d / f"{FILES['train_labels']}.gz").write_bytes(gzip.compress(encode_idx(np.zeros(299, np.uint8))))


@pytest.mark.parametrize("damage,message", [
    (_truncate_gz, "not a valid gzip file"),
    (_not_gzip, "not a valid gzip file"),
    (_wrong_magic, "wrong IDX magic number"),
    (_wrong_dims, "images must have 3 dimensions"),
    (_count_mismatch, "300 images but 299 labels"),
])
def test_bad_data_files(tmp_path, capsys, damage, message):
    data = write_idx_dir(tmp_path / "data", synthetic_dataset(), gz=True)
    damage(data)
    before = snapshot(data)
    code, err = run_cli(capsys, "train", "--data-dir", data, "--out", tmp_path / "run", "--quiet")
    assert_user_error(code, err, message)
    assert snapshot(data) == before and not (tmp_path / "run").exists()


def test_missing_data_directory(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--data-dir", tmp_path / "none", "--out", tmp_path / "run")
    assert_user_error(code, err, "does not exist")


def test_mnist_file_with_the_wrong_sha256(tmp_path, capsys, mnist_dir):
    data = tmp_path / "mnist"
    data.mkdir()
    for name in FILES.values():
        src = next(mnist_dir.glob(f"{name}*"))
        (data / src.name).symlink_to(src)
    labels = next(data.glob("t10k-labels*"))
    content = bytearray(gzip.decompress(labels.read_bytes()) if labels.suffix == ".gz" else labels.read_bytes())
    content[-1] ^= 1
    labels.unlink()
    (data / "t10k-labels-idx1-ubyte").write_bytes(bytes(content))
    before = snapshot(data)
    code, err = run_cli(capsys, "data", "--data-dir", data)
    assert_user_error(code, err, "SHA-256 mismatch")
    assert "t10k-labels-idx1-ubyte" in err and snapshot(data) == before


# --- nonsensical options --------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--epochs", "-3"], "--epochs must be a positive integer"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--z-dim", "0"], "--z-dim must be a positive integer"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lr", "-0.1"], "--lr must be a positive number"),
    (["--samples", "0"], "--samples must be a positive integer"),
    (["--likelihood", "poisson"], "argument --likelihood: invalid choice"),
    (["--optimizer", "lbfgs"], "argument --optimizer: invalid choice"),
    (["--preset", "huge"], "argument --preset: invalid choice"),
    (["--epochs", "ten"], "argument --epochs: invalid int value"),
    (["--encoder-hidden", "256,x"], "expected comma-separated integers"),
    (["--conv-channels", "8,16"], "--conv-channels sets the convolutions of --preset conv; an MLP has none"),
])
def test_nonsensical_options(tmp_path, capsys, args, message):
    code, err = run_cli(capsys, "train", *args, "--out", tmp_path / "run")
    assert_user_error(code, err, message)
    assert not (tmp_path / "run").exists()


# --- bad run directories ---------------------------------------------------------------

@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("good") / "run"
    run.mkdir()
    train(tiny_config(), run, synthetic_dataset(), progress=False)
    return run


def _no_config(run: Path):
    (run / "config.json").unlink()


def _corrupt_weights(run: Path):
    (run / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")


def _mismatched_weights(run: Path):
    config = json.loads((run / "config.json").read_text())
    config["model"]["decoder_hidden"] = [17]
    (run / "config.json").write_text(json.dumps(config))


def _corrupt_config(run: Path):
    (run / "config.json").write_text('{"model": {"z_dim": 2}, "epochs": ')


@pytest.mark.parametrize("damage,message", [
    (_no_config, "has no config.json"),
    (_corrupt_config, "config.json is unreadable or corrupt"),
    (_corrupt_weights, "model.safetensors is corrupt"),
    (_mismatched_weights, "does not match the model in config.json"),
])
@pytest.mark.parametrize("command", [["sample", "-n", "4", "-o", "{tmp}/s.png"], ["evaluate", "--k", "2"]])
def test_bad_run_directories(tmp_path, capsys, good_run, damage, message, command):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    damage(run)
    before = snapshot(run)
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    code, err = run_cli(capsys, args[0], run, *args[1:])
    assert_user_error(code, err, message)
    assert snapshot(run) == before and not (tmp_path / "s.png").exists()


def test_run_directory_that_does_not_exist(tmp_path, capsys):
    code, err = run_cli(capsys, "plot", tmp_path / "missing")
    assert_user_error(code, err, "does not exist")


def test_output_directory_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file, not a folder")
    code, err = run_cli(capsys, "train", "--train-size", "300", "--out", blocker / "run", "--quiet")
    assert_user_error(code, err, "cannot write to")
    assert blocker.read_text() == "I am a file, not a folder"


def test_debug_shows_the_traceback(tmp_path):
    from vaelab.errors import VaelabError

    with pytest.raises(VaelabError):
        main(["--debug", "plot", str(tmp_path / "missing")])


# --- mistakes only training can see: still one line, and no run directory left behind ----

@pytest.mark.parametrize("args,message", [
    (["--batch-size", "500"], "--batch-size 500 is larger than the 300 training images"),
    (["--device", "cuda"], "no CUDA GPU is available"),
])
def test_mistakes_found_by_the_trainer_leave_no_run_directory(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU, here too
    data = write_idx_dir(tmp_path / "data", synthetic_dataset())
    code, err = run_cli(capsys, "train", "--data-dir", data, *args, "--out", tmp_path / "run")
    assert_user_error(code, err, message)
    assert not (tmp_path / "run").exists()


# --- resuming -------------------------------------------------------------------------

@pytest.fixture
def finished_run(tmp_path, good_run):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    return run


@pytest.mark.parametrize("args,message", [
    (["--lr", "0.1"], "--lr cannot change when resuming"),
    (["--z-dim", "3", "--seed", "4"], "--z-dim, --seed cannot change when resuming"),
    (["--out", "elsewhere"], "leave out --out"),
    (["--epochs", "1"], "has finished 2 epochs already"),
])
def test_resume_refuses_what_it_cannot_honour(finished_run, capsys, args, message):
    before = snapshot(finished_run)
    code, err = run_cli(capsys, "train", "--resume", finished_run, *args, "--quiet", "--no-plots",
                        "--data-dir", write_idx_dir(finished_run.parent / "data", synthetic_dataset()))
    assert_user_error(code, err, message)
    assert snapshot(finished_run) == before


def test_resume_may_move_to_another_data_folder(finished_run, capsys):
    data = write_idx_dir(finished_run.parent / "moved", synthetic_dataset())
    code, err = run_cli(capsys, "train", "--resume", finished_run, "--epochs", "3", "--data-dir", data,
                        "--quiet", "--no-plots")
    assert code == 0, err
    config = json.loads((finished_run / "config.json").read_text())
    assert config["epochs"] == 3 and config["data_dir"] == str(data.resolve())


def test_a_relative_data_folder_is_recorded_absolute(tmp_path, capsys, monkeypatch):
    write_idx_dir(tmp_path / "data", synthetic_dataset())
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "train", "--data-dir", "data", "--epochs", "1", "--out", "run",
                        "--quiet", "--no-plots")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_dir"] == str(tmp_path / "data")


def _checkpoint_without_a_weight(run: Path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = run / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.head.bias"}
        metadata = f.metadata()
    save_file(tensors, str(path), metadata=metadata)


def _checkpoint_of_another_optimizer(run: Path):
    config = json.loads((run / "config.json").read_text())
    config["optimizer"] = "adam"
    (run / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage", [_checkpoint_without_a_weight, _checkpoint_of_another_optimizer])
def test_a_checkpoint_that_does_not_fit_is_one_line(finished_run, capsys, damage):
    damage(finished_run)
    data = write_idx_dir(finished_run.parent / "data", synthetic_dataset())
    before = snapshot(finished_run)
    code, err = run_cli(capsys, "train", "--resume", finished_run, "--epochs", "3", "--data-dir", data,
                        "--quiet", "--no-plots")
    assert_user_error(code, err, "checkpoint.safetensors does not fit this run")
    assert snapshot(finished_run) == before


def test_a_corrupt_eval_json_is_one_line(finished_run, capsys):
    (finished_run / "eval.json").write_text('{"nll": 1')
    code, err = run_cli(capsys, "report", finished_run,
                        "--data-dir", write_idx_dir(finished_run.parent / "data", synthetic_dataset()))
    assert_user_error(code, err, "eval.json is unreadable or corrupt")
    assert not (finished_run / "report.html").exists()
