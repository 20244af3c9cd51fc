"""The option declarations (config.py): one declaration gives a flag, a rule, a resume policy and
a JSON round trip; one precedence rule resolves a run's effective options, from Python and from
the command line alike."""

import json
import sys
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


def test_the_constructor_and_replace_mark_what_the_caller_set():
    config = RunConfig(preset="conv", epochs=1)
    assert explicit(config) == {"preset", "epochs"} and explicit(config.model) == set()
    config = config.replace(lr=0.1)  # the options are frozen values: a change is a copy
    assert explicit(config) == {"preset", "epochs", "lr"}


def test_an_option_cannot_be_assigned_behind_the_records_back():
    from dataclasses import FrozenInstanceError

    with pytest.raises(FrozenInstanceError):
        RunConfig().lr = 0.1


def test_replace_sets_its_changes_and_keeps_what_was_set():
    config = RunConfig(preset="conv")
    twin = config.replace(seed=3)
    assert twin.seed == 3 and explicit(twin) == {"preset", "seed"}
    assert config.seed == 0 and explicit(config) == {"preset"}  # the original is untouched


def test_a_copy_keeps_its_own_record_of_what_was_set():
    import copy

    config = RunConfig(preset="conv")
    twin = copy.copy(config).replace(lr=0.1)
    assert explicit(twin) == {"preset", "lr"} and explicit(config) == {"preset"}
    assert explicit(copy.deepcopy(config)) == {"preset"}


def test_a_given_value_takes_its_stored_form():
    # as JSON gives it; as runs saved before (C, H, W) give it
    model = ModelConfig().replace(encoder_hidden=[64], image_shape=[28, 28])
    assert model.encoder_hidden == (64,) and model.image_shape == (1, 28, 28)


def test_an_option_class_made_with_a_plain_dataclass_is_refused():
    from dataclasses import dataclass

    # a mutable subclass would let an assignment escape the record of what was set
    with pytest.raises(TypeError, match="frozen"):
        @dataclass
        class Plain(RunConfig):
            pass


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


def test_resolve_takes_the_images_shape_and_records_it():
    config = RunConfig(epochs=1)
    resolved = resolve(config, (3, 32, 32))  # more than 784 values: the Bernoulli recommends Adam
    assert resolved.model.image_shape == (3, 32, 32) and (resolved.optimizer, resolved.lr) == (
        "adam",
        1e-3,
    )
    assert config.model.image_shape == (1, 28, 28) and explicit(config) == {"epochs"}
    assert resolve(resolved, (3, 32, 32)) == resolved


def test_a_loaded_config_counts_every_field_as_set():
    config = RunConfig.from_dict({"preset": "conv", "model": {"z_dim": 3}})
    assert explicit(config) == {f.name for f in fields(RunConfig)}
    assert explicit(config.model) == {f.name for f in fields(ModelConfig)}
    assert config.model.z_dim == 3 and config.model.architecture == "mlp"  # not re-preset


def test_a_preset_may_not_set_where_the_data_is_or_how_it_is_read(monkeypatch):
    monkeypatch.setitem(PRESETS, "odd", {"z_dim": 3, "data_dir": "/elsewhere"})
    with pytest.raises(VaelabError, match="preset 'odd' sets data_dir; a preset or a likelihood"):
        resolve(RunConfig(preset="odd"))
    monkeypatch.setitem(PRESETS, "odd", {"z_dim": 3, "zdim": 4})
    with pytest.raises(VaelabError, match="preset 'odd' sets zdim"):
        resolve(RunConfig(preset="odd"))


def test_an_unknown_preset_is_one_line():
    with pytest.raises(
        VaelabError, match="unknown preset 'huge'; choose one of burda1, burda2, conv, topdown-mnist"
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


# --- registries and plugins -------------------------------------------------------------------


@pytest.mark.parametrize("registry,name,says", [
    ("vaelab.likelihoods.LIKELIHOODS", "poisson", "unknown likelihood 'poisson'; choose one of "
                                                  "bernoulli, gaussian, gaussian-learned, logistic"),
    ("vaelab.presets.PRESETS", "huge", "unknown preset 'huge'; choose one of burda1, burda2, conv"),
    ("vaelab.nets.ACTIVATIONS", "swish", "unknown activation 'swish'; choose one of elu, gelu"),
])
def test_an_unknown_name_in_a_registry_is_one_line(registry, name, says):
    import importlib

    module, _, attribute = registry.rpartition(".")
    with pytest.raises(VaelabError, match=says):
        getattr(importlib.import_module(module), attribute)[name]


def test_a_registry_refuses_a_second_component_under_a_taken_name():
    with pytest.raises(VaelabError, match="a preset named 'conv' is registered already"):
        PRESETS.register("conv", {"z_dim": 3})


def test_a_name_registered_later_is_a_choice_of_its_option(monkeypatch):
    from torch import nn

    from vaelab.cli import build_parser
    from vaelab.nets import ACTIVATIONS

    monkeypatch.setitem(ACTIVATIONS, "silu", (nn.SiLU, lambda h: h.copy_(nn.functional.silu(h))))
    RunConfig(model=ModelConfig(activation="silu")).validate()
    assert build_parser().parse_args(["train", "--activation", "silu"]).activation == "silu"


PLUGIN = """
from vaelab.presets import PRESETS

PRESETS.register("tiny", dict(encoder_hidden=(8,), decoder_hidden=(8,), z_dim=3))
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A plugin module in the current folder, registering the preset "tiny"; unregistered after."""
    (tmp_path / "vaelab_test_plugin.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # import_plugins adds the current folder
    yield "vaelab_test_plugin"
    PRESETS.pop("tiny", None)
    sys.modules.pop("vaelab_test_plugin", None)


def test_a_plugin_named_on_the_command_line_registers_before_the_options_are_read(
    plugin, capsys, tmp_path
):
    code, out, _ = run_cli(capsys, "train", "--plugin", plugin, "--help")
    assert code == 0 and "tiny" in out.split("--preset")[1].split("]")[0]
    data = write_idx_dir(tmp_path / "data", synthetic_dataset())
    code, _, err = _train(capsys, data, tmp_path / "run", f"--plugin={plugin}", "--preset", "tiny")
    assert code == 0, err
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["plugins"] == [plugin] and recorded["model"]["z_dim"] == 3


def test_plugins_are_repeated_or_separated_by_commas(plugin):
    from vaelab.cli import build_parser, given

    args = build_parser().parse_args(["train", "--plugin", "a,b", "--plugin", "c"])
    assert RunConfig.from_options(given(args, RunConfig)).plugins == ("a", "b", "c")


def test_a_plugin_that_fails_to_import_is_one_line_and_status_2(capsys, tmp_path, monkeypatch):
    (tmp_path / "vaelab_broken_plugin.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name, says in (("vaelab_broken_plugin", "RuntimeError: no GPU here"),
                       ("vaelab_no_such_plugin", "No module named 'vaelab_no_such_plugin'")):
        code, _, err = run_cli(capsys, "train", "--plugin", name, "--epochs", 1)
        assert code == 2 and one_line(err), err
        assert f"vaelab: error: plugin {name!r} failed to import" in err and says in err


def test_every_command_on_a_run_declares_the_options_they_share_alike():
    from vaelab import config

    commands = (config.EvaluateOptions, config.GapOptions, config.EncodeOptions,
                config.ScoreOptions, config.PlotOptions, config.ReportOptions)
    for name in ("run", "data_dir", "device", "seed", "quiet"):
        metas = [cls.__dataclass_fields__[name] for cls in commands
                 if name in cls.__dataclass_fields__]
        assert len(metas) >= 4, name
        assert all(f.metadata == metas[0].metadata and f.default == metas[0].default
                   for f in metas), name
    assert RunConfig.__dataclass_fields__["seed"].default == 0  # a run's weights and batches
    assert config.EvaluateOptions.__dataclass_fields__["seed"].default == config.EVAL_SEED
