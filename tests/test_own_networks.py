"""Your own encoder and decoder modules: assembled by VAE, trained by build and fit, evaluated,
drawn, reported and reloaded by load_run; refused by the command line, which cannot build them."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_vaelab, synthetic_dataset
from vaelab import RunConfig, VAE, VaelabError, build, fit, load_run
from vaelab import sampling
from vaelab.models import ModelConfig
from vaelab.plots import draw_figures
from vaelab.report import build_report
from vaelab.runs import load_config
from vaelab.sampling import importance_sampled

SHAPE = (1, 8, 8)


def networks(seed: int = 0, z_dim: int = 2, out_channels: int = 1) -> tuple[nn.Module, nn.Module]:
    """A conv encoder (it needs (N, C, H, W)) and a plain MLP decoder, both nn.Sequential."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 24), nn.Tanh()
    )
    decoder = nn.Sequential(
        nn.Linear(z_dim, 32),
        nn.ReLU(),
        nn.Linear(32, out_channels * 64),
        nn.Unflatten(1, (out_channels, 8, 8)),
    )
    return encoder, decoder


def own_model(**options) -> VAE:
    return VAE(*networks(), **{"z_dim": 2, "image_shape": SHAPE, **options})


def config(**overrides) -> RunConfig:
    return RunConfig(
        **{
            "epochs": 2,
            "batch_size": 50,
            "device": "cpu",
            "optimizer": "adam",
            "lr": 1e-3,
            **overrides,
        }
    )


def test_the_head_reads_the_feature_size_from_one_dry_run():
    model = own_model()
    assert (model.head.in_features, model.head.out_features) == (24, 4)
    assert model.config.architecture == "custom" and model.config.encoder_hidden == (24,)


def test_encode_and_decode_keep_their_shapes_around_your_modules():
    model = own_model()
    mu, logvar = model.encode(torch.rand(5, *SHAPE))
    assert mu.shape == logvar.shape == (5, 2)
    assert model.decode(torch.randn(3, 5, 2)).shape == (3, 5, *SHAPE)  # leading dimensions restored


def test_a_decoder_may_return_flat_outputs():
    encoder, _ = networks()
    model = VAE(encoder, nn.Linear(2, 64), z_dim=2, image_shape=SHAPE)
    assert model.decode(torch.randn(7, 2)).shape == (7, *SHAPE)


def test_the_learned_gaussian_needs_two_channels_and_says_so():
    with pytest.raises(VaelabError, match=r"gaussian-learned likelihood needs \(1, 2, 8, 8\)"):
        own_model(likelihood="gaussian-learned")
    VAE(*networks(out_channels=2), z_dim=2, image_shape=SHAPE, likelihood="gaussian-learned")


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda: VAE(*networks(), image_shape=SHAPE), "give z_dim"),
        (
            lambda: own_model(activation="tanh"),
            "'activation' is not an option of a VAE from your own networks",
        ),
        (
            lambda: VAE(nn.Linear(64, 3), networks()[1], z_dim=2, image_shape=SHAPE),
            "the encoder failed on an input",
        ),
        (
            lambda: VAE(nn.Identity(), networks()[1], z_dim=2, image_shape=SHAPE),
            "it must give features (1, F)",
        ),
        (
            lambda: VAE(networks()[0], nn.Linear(2, 10), z_dim=2, image_shape=SHAPE),
            "the decoder maps z (1, 2)",
        ),
        (lambda: own_model(prior="nope"), "unknown prior 'nope'"),
    ],
)
def test_modules_that_do_not_fit_are_refused_in_one_line(make, says):
    with pytest.raises(VaelabError) as caught:
        make()
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_the_dry_runs_leave_the_modules_mode_and_the_rng_alone():
    encoder, decoder = networks()
    encoder.train()
    torch.manual_seed(3)
    model = VAE(encoder, decoder, z_dim=2, image_shape=SHAPE)
    torch.manual_seed(3)
    head = nn.Linear(24, 4)  # the first draws after the seed are the head's
    assert encoder.training and torch.equal(model.head.weight, head.weight)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs of a model of your own, with a VampPrior and an IAF, in a run folder."""
    run = tmp_path_factory.mktemp("own") / "run"
    model = own_model(prior="vamp", prior_components=10, posterior="iaf")
    before = [p.clone() for p in model.parameters()]
    result = fit(
        build(config(), synthetic_dataset(), progress=False, model=model), run, progress=False
    )
    return run, model, before, result


def test_build_and_fit_train_a_copy_and_leave_your_model_alone(trained):
    _, model, before, result = trained
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert result.model is not model
    assert not all(torch.equal(p, q) for p, q in zip(result.model.parameters(), before))
    assert result.metrics[-1]["test_loss"] < result.metrics[0]["test_loss"]


def test_the_run_records_the_components_and_the_custom_architecture(trained):
    run, model, _, _ = trained
    saved = load_config(run).model
    assert saved == model.config and saved.architecture == "custom" and saved.prior == "vamp"


def test_load_run_rebuilds_it_from_fresh_modules_and_leaves_them_alone(trained):
    run, _, _, result = trained
    encoder, decoder = networks(seed=1)
    fresh = [p.clone() for p in encoder.parameters()]
    reloaded = load_run(run, encoder=encoder, decoder=decoder)
    assert all(torch.equal(p, q) for p, q in zip(reloaded.parameters(), result.model.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(encoder.parameters(), fresh))


def test_load_run_needs_both_modules_and_only_for_such_a_run(trained, tmp_path):
    run, *_ = trained
    with pytest.raises(VaelabError, match="both the encoder and the decoder"):
        load_run(run, encoder=networks()[0])
    with pytest.raises(VaelabError, match="vaelab.load_run"):
        load_run(run)
    fit(
        build(config(epochs=1), synthetic_dataset(), progress=False),
        tmp_path / "mlp",
        progress=False,
    )
    with pytest.raises(VaelabError, match="load it without encoder and decoder"):
        load_run(tmp_path / "mlp", encoder=networks()[0], decoder=networks()[1])


def test_evaluation_bounds_are_ordered_and_independent_of_the_chunking(trained, monkeypatch):
    _, _, _, result = trained
    images = result.data.test_images
    whole = importance_sampled(result.model, images, k=100, progress=False)
    assert whole["precision"] == "fp32"  # auto: your decoder runs in float32
    assert whole["nll"] <= whole["iwae"]["50"] <= whole["iwae"]["5"] <= whole["iwae"]["1"]
    monkeypatch.setattr(sampling, "CPU_CALL_BYTES", 1)  # one sample per call
    some = importance_sampled(result.model, images[:30], k=100, progress=False)
    assert np.array_equal(some["log_px"], whole["log_px"][:30])


def test_bf16_decoding_is_refused_for_your_decoder(trained):
    _, _, _, result = trained
    with pytest.raises(VaelabError, match="needs one of vaelab's own decoders"):
        importance_sampled(
            result.model, result.data.test_images[:5], k=10, precision="bf16", progress=False
        )


def test_figures_are_drawn_and_the_report_says_it_has_no_explorer(trained):
    run, _, _, result = trained
    assert len(draw_figures(run, result.model, result.data, result.metrics)) >= 4
    page = build_report(run, result.model, result.data)
    assert '"decoder": null' in page and "which the page cannot run: no explorer" in page
    assert page.count("data:image/png;base64,") >= 4


def test_a_resumed_run_of_your_model_is_the_uninterrupted_one(tmp_path):
    data = synthetic_dataset()
    whole = fit(
        build(config(epochs=3), data, progress=False, model=own_model()),
        tmp_path / "a",
        progress=False,
    )
    fit(
        build(config(epochs=1), data, progress=False, model=own_model()),
        tmp_path / "b",
        progress=False,
    )
    resumed = fit(
        build(config(epochs=3), data, progress=False, model=own_model()),
        tmp_path / "b",
        progress=False,
        resume=True,
    )
    assert [m["test_loss"] for m in resumed.metrics] == [m["test_loss"] for m in whole.metrics]
    assert all(
        torch.equal(p, q) for p, q in zip(resumed.model.parameters(), whole.model.parameters())
    )


def test_build_refuses_model_options_given_twice_and_images_that_do_not_fit():
    with pytest.raises(VaelabError, match="come from the model given"):
        build(
            config(model=ModelConfig(z_dim=3)),
            synthetic_dataset(),
            progress=False,
            model=own_model(),
        )
    with pytest.raises(VaelabError, match=r"takes images of shape \(1, 8, 8\)"):
        build(config(), synthetic_dataset(shape=(4, 4)), progress=False, model=own_model())


@pytest.mark.parametrize(
    "command",
    [
        ["evaluate", "RUN"],
        ["plot", "RUN"],
        ["sample", "RUN", "-o", "s.png"],
        ["report", "RUN"],
        ["train", "--resume", "RUN"],
    ],
)
def test_the_command_line_refuses_such_a_run_naming_the_python_way(trained, tmp_path, command):
    run, *_ = trained
    args = [
        str(run) if a == "RUN" else str(tmp_path / a) if a.endswith(".png") else a for a in command
    ]
    done = run_vaelab(*args)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "your own encoder and decoder" in done.stderr and "vaelab." in done.stderr
    assert not (tmp_path / "s.png").exists()
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2


def test_a_given_model_is_recorded_as_it_is_whatever_the_preset():
    from vaelab.models import build_model

    model = build_model(ModelConfig(z_dim=2, image_shape=SHAPE), seed=0)
    training = build(config(preset="burda2"), synthetic_dataset(), progress=False, model=model)
    assert training.config.model == model.config and training.config.model.upper_z_dims == ()


def test_load_run_says_when_the_encoder_is_not_the_one_trained(trained):
    run, *_ = trained
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(VaelabError, match="the encoder gives 10 features, but the model's config records 24"):
        load_run(run, encoder=encoder, decoder=networks()[1])


def test_a_decoder_output_of_another_layout_is_refused():
    encoder, _ = networks()
    decoder = nn.Sequential(nn.Linear(2, 64), nn.Unflatten(1, (8, 8, 1)))  # (M, H, W, C)
    with pytest.raises(VaelabError, match="the decoder maps z"):
        VAE(encoder, decoder, z_dim=2, image_shape=SHAPE)
