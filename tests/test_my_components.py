"""Components from outside the package (tests/my_components.py): with each of a new prior,
posterior, likelihood and objective, a run trains, evaluates (NLL <= negative ELBO), resumes bit
for bit and reloads through the public API, from Python and from the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import assert_resumes_bit_for_bit, synthetic_dataset
from vaelab import load_run, train
from vaelab.config import ModelConfig, RunConfig
from vaelab.sampling import importance_sampled

KINDS = {
    "prior": dict(model=dict(prior="scaled")),
    "posterior": dict(model=dict(posterior="shared-variance")),
    "likelihood": dict(model=dict(likelihood="laplace", sigma=0.2), optimizer="adam", lr=1e-3),
    "objective": dict(objective="renyi", k=4),
}


@pytest.fixture(autouse=True, scope="module")
def registered():
    """my_components imported (which registers its four components) for this file's tests, and
    forgotten after them, so that no other test sees the extra names."""
    import importlib
    import sys

    from vaelab import kl, likelihoods, objectives, posteriors, priors

    module = importlib.import_module("my_components")
    yield module
    for registry, name in ((priors.PRIORS, "scaled"), (posteriors.POSTERIORS, "shared-variance"),
                           (likelihoods.LIKELIHOODS, "laplace"), (objectives.OBJECTIVES, "renyi")):
        dict.pop(registry, name)
    kl._REGISTRY.pop((posteriors.Gaussian, module.ScaledNormal))
    del sys.modules["my_components"]


def config(kind: str, epochs: int = 2) -> RunConfig:
    given = dict(KINDS[kind])
    model = ModelConfig(z_dim=2, encoder_hidden=(16,), decoder_hidden=(16,),
                        **given.pop("model", {}))
    return RunConfig(model=model, epochs=epochs, batch_size=50, device="cpu", **given)


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_trains_evaluates_and_reloads_with_the_outside_component(tmp_path, kind):
    data = synthetic_dataset()
    result = train(config(kind, epochs=1), tmp_path / "run", data, progress=False)
    assert all(math.isfinite(m["test_loss"]) for m in result.metrics)
    r = importance_sampled(result.model, data.test_images[:20], k=100, progress=False)
    assert r["nll"] <= r["neg_elbo"]
    loaded = load_run(tmp_path / "run")
    for a, b in zip(loaded.state_dict().values(), result.model.state_dict().values()):
        assert torch.equal(a, b)
    again = importance_sampled(loaded, data.test_images[:20], k=100, progress=False)
    assert again["nll"] == r["nll"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_run_with_the_outside_component_resumes_bit_for_bit(tmp_path, kind):
    assert_resumes_bit_for_bit(tmp_path, lambda epochs: config(kind, epochs))


def test_the_outside_closed_form_kl_is_the_models_kl():
    from vaelab.models import build_model

    model = build_model(config("prior").model.replace(image_shape=(1, 8, 8)), seed=0)
    with torch.no_grad():
        model.prior.log_scale.fill_(0.3)
    x = torch.rand(5, 1, 8, 8).round()
    analytic = model(x, torch.randn(1, 5, 2)).kl
    drawn = model(x, torch.randn(20_000, 5, 2), fixed_q=True).kl  # the KL from the draws
    torch.testing.assert_close(analytic, drawn, rtol=0, atol=0.05)


@pytest.mark.slow
def test_the_command_line_trains_evaluates_and_resumes_with_a_plugin(tmp_path, monkeypatch):
    from vaelab.cli import main

    monkeypatch.chdir(tmp_path)
    np = pytest.importorskip("numpy")
    data = synthetic_dataset()
    channels_last = lambda images: images.permute(0, 2, 3, 1).numpy()  # noqa: E731
    np.savez(tmp_path / "tiny.npz", x_train=channels_last(data.train_images),
             x_test=channels_last(data.test_images))
    run = tmp_path / "run"
    common = ["--data-dir", str(tmp_path / "tiny.npz"), "--z-dim", "2", "--encoder-hidden", "16",
              "--decoder-hidden", "16", "--batch-size", "50", "--quiet", "--no-plots"]
    assert main(["train", "--plugin", "my_components", "--prior", "scaled", "--posterior",
                 "shared-variance", "--likelihood", "laplace", "--sigma", "0.2", "--objective",
                 "renyi", "--k", "4", "--epochs", "1", "--out", str(run), *common]) == 0
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["plugins"] == ["my_components"] and recorded["model"]["prior"] == "scaled"
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet", "--no-plots"]) == 0
    assert main(["evaluate", str(run), "--k", "50", "--quiet"]) == 0
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["nll"] <= evaluation["neg_elbo"]
