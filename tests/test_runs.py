import json

import pytest
import torch

import shutil
from pathlib import Path

from conftest import run_vaelab as vaelab, synthetic_dataset
from test_train import tiny_config
from vaelab import load_run, train
from vaelab.config import resolve
from vaelab.errors import RunError, VaelabError
from vaelab.runs import load_config, read_metrics
from vaelab.start import new_run_dir


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    result = train(tiny_config(), run_dir, synthetic_dataset(), progress=False)
    return run_dir, result


def test_load_run_gives_the_same_outputs_as_the_trained_model(trained_run):
    run_dir, result = trained_run
    loaded = load_run(run_dir)
    x = torch.rand(5, 1, 8, 8)
    z = torch.randn(5, 2)
    for a, b in zip(loaded.encode(x), result.model.encode(x)):
        assert torch.equal(a, b)
    assert torch.equal(loaded.decode(z), result.model.decode(z))
    assert isinstance(loaded, torch.nn.Module) and not loaded.training


def test_a_conv_run_rebuilds_its_architecture_from_config_json(tmp_path):
    from vaelab.models import preset

    model = preset("conv", conv_channels=(4, 8), encoder_hidden=(16,), decoder_hidden=(16,), z_dim=3,
                   likelihood="logistic")
    data = synthetic_dataset(shape=(8, 8))
    result = train(tiny_config(model=model, epochs=1), tmp_path / "run", data, progress=False)
    loaded = load_run(tmp_path / "run")
    assert loaded.config.architecture == "conv" and loaded.config.conv_channels == (4, 8)
    z = torch.randn(5, 3)
    assert torch.equal(loaded.decode(z), result.model.decode(z))


def test_config_round_trips_through_json(trained_run):
    run_dir, _ = trained_run
    saved = load_config(run_dir)
    assert saved == resolve(tiny_config(model=saved.model))  # what build resolved, as it was
    assert saved.model.image_shape == (1, 8, 8) and saved.model.x_dim == 64


def test_a_directory_holding_a_run_is_never_reused(trained_run):
    run_dir, _ = trained_run
    with pytest.raises(RunError, match="already holds a run"):
        new_run_dir(run_dir)


def test_default_run_directories_do_not_collide(tmp_path):
    assert new_run_dir(root=tmp_path) != new_run_dir(root=tmp_path)


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "config.json").unlink(), "has no config.json"),
    (lambda d: (d / "config.json").write_text("{not json"), "corrupt"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 20), "corrupt"),
])
def test_a_damaged_run_gives_a_clear_error(trained_run, tmp_path, damage, message):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained_run[0], copy)
    damage(copy)
    with pytest.raises(RunError, match=message):
        load_run(copy)


def test_weights_of_another_model_are_refused(trained_run, tmp_path):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained_run[0], copy)
    config = json.loads((copy / "config.json").read_text())
    config["model"]["z_dim"] = 3
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="does not match the model"):
        load_run(copy)


def test_missing_run_directory_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        load_run(tmp_path / "nope")


# Runs written by vaelab before the single training path (hand-derived step, C kernels,
# its own plain-SGD class): config.json names --backward and --kernels, the image
# shape is (H, W), the checkpoint holds a generator state and plain-SGD's param groups.
OLD_RUNS = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["old_run_sgd", "old_run_adam"])
def test_a_run_of_the_earlier_version_loads_evaluates_and_resumes(tmp_path, name, mnist_dir):
    run = tmp_path / name
    shutil.copytree(OLD_RUNS / name, run)
    config = load_config(run)
    assert config.model.image_shape == (1, 28, 28) and not hasattr(config, "kernels")
    model = load_run(run)
    assert model.decode(torch.zeros(1, 2)).shape == (1, 1, 28, 28)

    evaluated = vaelab("evaluate", run, "--k", 50, "--test-size", 500, "--quiet")
    assert evaluated.returncode == 0, evaluated.stderr
    assert (run / "log_px.npy").is_file()

    resumed = vaelab("train", "--resume", run, "--epochs", 2, "--quiet", "--no-plots")
    assert resumed.returncode == 0, resumed.stderr
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]
    saved = json.loads((run / "config.json").read_text())
    assert "kernels" not in saved and "backward" not in saved and saved["model"]["image_shape"] == [1, 28, 28]


def test_an_old_plain_sgd_checkpoint_becomes_torch_sgds_state(tmp_path):
    from vaelab.runs import read_checkpoint, restore_checkpoint
    from vaelab.train import build

    run = tmp_path / "run"
    shutil.copytree(OLD_RUNS / "old_run_sgd", run)
    training = build(load_config(run), data=synthetic_dataset(shape=(28, 28)), progress=False)
    restore_checkpoint(read_checkpoint(run), run, training.model, training.optimizer, "sgd")
    group = training.optimizer.param_groups[0]
    assert group["lr"] is training.lr and training.lr.item() == pytest.approx(5e-3)
    assert group["momentum"] == 0 and training.optimizer.state_dict()["state"] == {}


def test_batch_losses_keep_the_rows_of_earlier_epochs_when_one_is_missing(tmp_path):
    import numpy as np

    from vaelab.runs import write_batch_losses

    write_batch_losses(tmp_path, 1, np.array([1.0, 2.0], dtype=np.float32))
    write_batch_losses(tmp_path, 2, np.array([3.0, 4.0], dtype=np.float32))
    write_batch_losses(tmp_path, 4, np.array([7.0, 8.0], dtype=np.float32))  # epoch 3's row never written
    rows = np.load(tmp_path / "batch_losses.npy")
    np.testing.assert_array_equal(rows[[0, 1, 3]], [[1, 2], [3, 4], [7, 8]])
    assert np.isnan(rows[2]).all()


def test_from_python_a_taken_run_dir_is_named_run_dir(trained_run):
    run_dir, _ = trained_run
    with pytest.raises(RunError, match="already holds a run .*; choose another run_dir$"):
        new_run_dir(run_dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_load_run_on_cuda_without_a_gpu_says_so_in_one_line(trained_run):
    run_dir, _ = trained_run
    with pytest.raises(VaelabError, match="no CUDA GPU is available; use device 'cpu'"):
        load_run(run_dir, device="cuda")
