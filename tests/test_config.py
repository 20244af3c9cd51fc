"""The option declarations (config.py): one declaration gives a flag, a rule, a resume policy and
a JSON round trip; one precedence rule resolves a run's effective options, from Python and from
the command line alike."""

import json
from dataclasses import fields
from pathlib import Path

import pytest

import vaelab.config
from conftest import synthetic_dataset, write_idx_dir
from vaelab import likelihoods
from vaelab.cli import main
from vaelab.config import (
    POSITIVE,
    PRESETS,
    ModelConfig,
    RunConfig,
    declared,
    explicit,
    option,
    options_dataclass,
    resolve,
)
from vaelab.errors import VaelabError
from vaelab.runs import load_config
from vaelab.train import build

OLD_RUNS = sorted((Path(__file__).parent / "data").glob("old_run_*"))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own exits: --help and its errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --- a dummy option, declared in one place --------------------------------------------------


def _config_with_a_dummy(resumable: bool) -> type:
    @options_dataclass
    class WithDummy(RunConfig):
        dummy: int = option(
            3, "a dummy option declared by this test", rule=POSITIVE, resume=resumable
        )

    return WithDummy


@pytest.fixture(params=[False, True], ids=["fixed", "resumable"])
def dummy(request, monkeypatch, tmp_path):
    """RunConfig with one more option (its resume policy by the parameter), and a data folder."""
    monkeypatch.setattr(vaelab.config, "RunConfig", _config_with_a_dummy(request.param))
    return request.param, write_idx_dir(tmp_path / "data", synthetic_dataset())


def _train(capsys, data, out, *args):
    return run_cli(
        capsys,
        "train",
        "--data-dir",
        data,
        "--epochs",
        1,
        "--batch-size",
        50,
        "--out",
        out,
        "--quiet",
        "--no-plots",
        *args,
    )


def test_a_declared_option_appears_in_help(dummy, capsys):
    resumable, _ = dummy
    code, out, _ = run_cli(capsys, "train", "--help")
    text = " ".join(out.split())
    assert code == 0 and "--dummy DUMMY a dummy option declared by this test (default: 3" in text
    assert ("(default: 3; with --resume, the run's own)" in text) == resumable


def test_a_declared_option_round_trips_through_config_json(dummy, capsys, tmp_path):
    _, data = dummy
    code, _, err = _train(capsys, data, tmp_path / "run", "--dummy", 4)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dummy"] == 4
    assert load_config(tmp_path / "run").dummy == 4


def test_resume_refuses_or_accepts_a_declared_option_by_its_declaration(dummy, capsys, tmp_path):
    resumable, data = dummy
    assert _train(capsys, data, tmp_path / "run", "--dummy", 4)[0] == 0
    code, _, err = run_cli(
        capsys,
        "train",
        "--resume",
        tmp_path / "run",
        "--epochs",
        2,
        "--dummy",
        5,
        "--quiet",
        "--no-plots",
    )
    if resumable:
        assert code == 0, err
        assert load_config(tmp_path / "run").dummy == 5
    else:
        assert code == 2 and one_line(err) and "--dummy cannot change when resuming" in err
        assert load_config(tmp_path / "run").dummy == 4


@pytest.mark.parametrize(
    "value,says",
    [
        ("0", "--dummy must be a positive integer, got 0"),
        ("x", "argument --dummy: invalid int value"),
    ],
)
def test_a_bad_value_of_a_declared_option_is_one_line_and_status_2(
    dummy, capsys, tmp_path, value, says
):
    _, data = dummy
    code, _, err = _train(capsys, data, tmp_path / "run", "--dummy", value)
    assert code == 2 and one_line(err) and says in err, err
    assert not (tmp_path / "run").exists()


# --- what the caller set ----------------------------------------------------------------------


def test_the_constructor_and_assignments_mark_what_the_caller_set():
    config = RunConfig(preset="conv", epochs=1)
    assert explicit(config) == {"preset", "epochs"} and explicit(config.model) == set()
    config.lr = 0.1
    assert explicit(config) == {"preset", "epochs", "lr"}


def test_replace_sets_its_changes_and_keeps_what_was_set():
    config = RunConfig(preset="conv")
    twin = config.replace(seed=3)
    assert twin.seed == 3 and explicit(twin) == {"preset", "seed"}
    assert config.seed == 0 and explicit(config) == {"preset"}  # the original is untouched


def test_a_copy_keeps_its_own_record_of_what_was_set():
    import copy

    config = RunConfig(preset="conv")
    twin = copy.copy(config)
    twin.lr = 0.1
    assert explicit(twin) == {"preset", "lr"} and explicit(config) == {"preset"}


def test_an_assigned_value_takes_its_stored_form():
    model = ModelConfig()
    model.encoder_hidden = [64]  # as JSON gives it
    model.image_shape = [28, 28]  # as runs saved before (C, H, W) give it
    assert model.encoder_hidden == (64,) and model.image_shape == (1, 28, 28)


def test_an_option_class_made_with_a_plain_dataclass_is_refused():
    from dataclasses import dataclass

    @dataclass
    class Plain(RunConfig):
        pass

    with pytest.raises(TypeError, match="options_dataclass"):
        resolve(Plain(epochs=7))


# --- the precedence rule ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_fills_what_the_caller_left_unset(name):
    run = resolve(RunConfig(preset=name))
    owner = lambda k: run.model if k in ModelConfig.__dataclass_fields__ else run
    assert all(getattr(owner(k), k) == v for k, v in PRESETS[name].items())


def test_the_continuous_likelihoods_and_bernoulli_on_larger_images_recommend_adam():
    for likelihood in ("gaussian", "gaussian-learned", "logistic"):
        run = resolve(RunConfig(model=ModelConfig(likelihood=likelihood)))
        assert (run.optimizer, run.lr) == ("adam", 1e-3)
    rgb = resolve(RunConfig(model=ModelConfig(image_shape=(3, 32, 32))))
    assert (rgb.optimizer, rgb.lr) == ("adam", 1e-3)
    assert (resolve(RunConfig()).optimizer, resolve(RunConfig()).lr) == ("sgd", 5e-3)  # the tutorial's


def test_what_the_caller_set_wins_over_the_preset():
    model = resolve(
        RunConfig(preset="conv", model=ModelConfig(z_dim=8, likelihood="logistic"))
    ).model
    assert (model.z_dim, model.likelihood, model.architecture, model.conv_channels) == (
        8,
        "logistic",
        "conv",
        (32, 64),
    )


def test_an_explicit_default_value_still_wins_over_the_preset():
    assert resolve(RunConfig(preset="burda1", model=ModelConfig(z_dim=2))).model.z_dim == 2


def test_the_likelihoods_recommendation_sits_between_the_caller_and_the_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, "conv", {**PRESETS["conv"], "lr": 0.01, "optimizer": "adam"})
    monkeypatch.setattr(likelihoods.DiscretizedLogistic, "recommended", {"lr": 0.002})
    logistic = ModelConfig(likelihood="logistic")
    resolved = resolve(RunConfig(preset="conv", model=logistic))
    assert (resolved.lr, resolved.optimizer) == (
        0.002,
        "adam",
    )  # recommended over preset; preset over default
    assert resolve(RunConfig(preset="conv", model=logistic, lr=0.1)).lr == 0.1
    assert resolve(RunConfig(preset="conv")).lr == 0.01  # the Bernoulli recommends nothing


def test_resolve_leaves_its_argument_alone_and_resolving_twice_changes_nothing():
    config = RunConfig(preset="conv", epochs=1)
    resolved = resolve(config)
    assert config.model == ModelConfig() and explicit(config) == {"preset", "epochs"}
    assert resolve(resolved) == resolved and resolved.model.z_dim == 16


def test_an_unknown_preset_is_one_line():
    with pytest.raises(
        VaelabError, match="unknown preset 'huge'; choose one of burda1, burda2, conv, tutorial"
    ):
        resolve(RunConfig(preset="huge"))


@pytest.mark.parametrize("name,network,z_dim", [("conv", "ConvEncoder", 16), ("burda1", "ImageMLP", 50)])
def test_a_preset_given_in_python_trains_its_networks(tmp_path, name, network, z_dim):
    from vaelab import train

    config = RunConfig(preset=name, epochs=1, batch_size=50, device="cpu")
    result = train(config, tmp_path / "run", synthetic_dataset(shape=(8, 8)), progress=False)
    assert type(result.model.encoder).__name__ == network and result.model.config.z_dim == z_dim
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["preset"] == name and recorded["model"]["z_dim"] == z_dim
    if name == "burda1":
        assert result.model.config.activation == "tanh" and recorded["model"]["encoder_hidden"] == [
            200,
            200,
        ]


def test_build_records_the_resolved_options_and_leaves_the_callers_config_alone():
    config = RunConfig(preset="conv", epochs=1, batch_size=50, device="cpu")
    training = build(config, synthetic_dataset(shape=(8, 8)), progress=False)
    assert training.config.model.architecture == "conv" and config.model.architecture == "mlp"


# --- saved runs -------------------------------------------------------------------------------


@pytest.mark.parametrize("run", OLD_RUNS, ids=lambda p: p.name)
def test_a_saved_run_loads_to_exactly_its_recorded_fields_and_is_never_re_preset(run):
    recorded = json.loads((run / "config.json").read_text())
    config = load_config(run)
    assert resolve(config) == config
    loaded = config.to_dict()
    for key, value in recorded.items():
        if key == "model":
            for k, v in value.items():
                if k == "image_shape":
                    assert list(loaded["model"][k])[-2:] == v  # saved (H, W), loaded (1, H, W)
                elif k != "x_dim":  # follows from image_shape
                    assert loaded["model"][k] == (tuple(v) if isinstance(v, list) else v), k
        elif key not in vaelab.config.RETIRED:
            assert loaded[key] == value, key
    assert config.model.encoder_hidden == tuple(
        recorded["model"]["encoder_hidden"]
    )  # not the preset's


# --- rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,says",
    [
        (dict(epochs=0), "--epochs must be a positive integer, got 0"),
        (dict(lr=float("nan")), "--lr must be a positive number"),
        (dict(optimizer="lbfgs"), "unknown optimizer 'lbfgs'; choose one of sgd, adam"),
        (
            dict(model=ModelConfig(encoder_hidden=(256, 0))),
            "--encoder-hidden must be positive integers",
        ),
        (dict(cuda_graph="yes"), "--cuda-graph must be true or false"),
        (dict(objective="iwae", beta=0.5), "--beta, --kl-warmup and --free-bits act on the ELBO's KL term"),
    ],
)
def test_python_configs_get_the_command_lines_one_line_errors(changes, says):
    with pytest.raises(VaelabError, match=says):
        RunConfig(**changes).validate()


def test_every_option_of_a_run_has_a_help_text_or_a_default_to_show():
    from vaelab.cli import _help

    for cls in (RunConfig, ModelConfig):
        for f in declared(cls):
            meta = f.metadata["option"]
            assert meta["help"] or _help(f, meta, False), f.name


def test_a_run_and_its_model_share_no_option_name():
    assert not {f.name for f in fields(RunConfig)} & {f.name for f in fields(ModelConfig)}
