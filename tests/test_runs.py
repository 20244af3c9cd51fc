import pytest
import torch

from conftest import synthetic_dataset
from test_train import tiny_config
from vaelab import load_run, train
from vaelab.errors import RunError
from vaelab.runs import load_config, new_run_dir


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    result = train(tiny_config(), run_dir, synthetic_dataset(), progress=False)
    return run_dir, result


def test_load_run_gives_the_same_outputs_as_the_trained_model(trained_run):
    run_dir, result = trained_run
    loaded = load_run(run_dir)
    x = torch.rand(5, 64)
    z = torch.randn(5, 2)
    for a, b in zip(loaded.encode(x), result.model.encode(x)):
        assert torch.equal(a, b)
    assert torch.equal(loaded.decode(z), result.model.decode(z))
    assert isinstance(loaded, torch.nn.Module) and not loaded.training


def test_config_round_trips_through_json(trained_run):
    run_dir, _ = trained_run
    saved = load_config(run_dir)
    assert saved == tiny_config(model=saved.model, kernels=saved.kernels)
    assert saved.kernels in ("native", "torch")  # the kernels used, not "auto"
    assert load_config(run_dir).model.x_dim == 64


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
