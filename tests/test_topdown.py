"""The top-down hierarchy (topdown.py): its ELBO against a pass computed here, the noise layout,
the posterior equal to the prior, its refusals, and the commands on its MNIST preset."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import distributions as D

from conftest import (assert_refused_in_one_line, assert_resumes_bit_for_bit, run_vaelab,
                      synthetic_dataset, write_idx_dir)
from vaelab.config import ModelConfig, RunConfig
from vaelab.errors import VaelabError
from vaelab.models import build_model
from vaelab.objectives import negative_elbo
from vaelab.rng import image_keys
from vaelab.sampling import importance_sampled
from vaelab.topdown import resolutions


def tiny(**overrides) -> ModelConfig:
    """8x8 images: resolutions 1, 4, 8, a layer at each, width 8, z of 2 channels."""
    fields = dict(family="topdown", width=8, z_dim=2, blocks=(1, 1, 1), activation="gelu",
                  image_shape=(1, 8, 8))
    return ModelConfig(**{**fields, **overrides})


def trained_looking(config: ModelConfig, seed: int = 0):
    """A model whose every weight is drawn afresh (the zero-started prior convolutions too), so
    that each layer's prior and posterior differ."""
    model = build_model(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_resolutions_halve_to_the_last_even_size_then_jump_to_one():
    assert resolutions(28, 28) == [(28, 28), (14, 14), (7, 7), (1, 1)]
    assert resolutions(32, 32) == [(32, 32), (16, 16), (8, 8), (4, 4), (1, 1)]
    assert resolutions(8, 8) == [(8, 8), (4, 4), (1, 1)]


def test_the_elbo_is_the_layers_kls_and_the_reconstruction_computed_here():
    model = trained_looking(tiny())
    x = (torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    eps = torch.randn(1, 5, model.noise_dim, generator=torch.Generator().manual_seed(3))
    terms = model(x, eps)
    # the pass as the module docstring says it, with torch.distributions for every density
    dec, acts = model.decoder, model.encoder(x)
    by_size = {a.shape[-2:]: a for a in acts}
    starts = {p.shape[-2:]: p for p in dec.starts}
    h, column, kls = None, 0, []
    for layer in dec.layers:
        h = (starts[layer.size].expand(5, -1, -1, -1) if h is None
             else starts[layer.size] + F.interpolate(h, size=layer.size, mode="nearest"))
        feats = layer.prior(h)
        c = layer.z_dim
        p = D.Normal(feats[:, :c], torch.exp(0.5 * feats[:, c:2 * c]))
        mu, logvar = layer.posterior(torch.cat([h, by_size[layer.size]], 1)).chunk(2, 1)
        q = D.Normal(mu, torch.exp(0.5 * logvar))
        z = q.loc + q.scale * eps[0, :, column:column + layer.noise_size].reshape(mu.shape)
        column += layer.noise_size
        kls.append(D.kl_divergence(q, p).flatten(1).sum(1))
        h = layer.resnet(h + feats[:, 2 * c:] + layer.project(z))
    logits = dec.out(h * dec.gain + dec.bias)
    reconstruction = D.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    expected = sum(kls) - reconstruction
    torch.testing.assert_close(negative_elbo(terms), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(terms.kl_per_dim, torch.stack(kls, 1), rtol=1e-5, atol=1e-5)
    # and from the draws: log q - log p summed over the layers has the KLs' expectation
    torch.testing.assert_close(terms.log_px_z[0], reconstruction, rtol=1e-5, atol=1e-4)


def test_a_draw_decodes_to_the_output_it_was_scored_with():
    model = trained_looking(tiny())
    x = (torch.rand(4, 1, 8, 8) > 0.5).float()
    terms = model(x, torch.randn(3, 4, model.noise_dim))
    assert terms.z.shape == (3, 4, model.noise_dim) == (3, 4, sum(model.sizes))
    assert model.sizes == (2 * 1, 2 * 16, 2 * 64)  # the top first
    again = model.likelihood.log_prob(model.decode(terms.z), x)
    torch.testing.assert_close(again, terms.log_px_z, rtol=1e-5, atol=1e-4)


class PriorAsPosterior(torch.nn.Module):
    """A layer's posterior replaced by its prior: reads [h, a] and gives the prior's mu, logvar."""

    def __init__(self, layer, width: int):
        super().__init__()
        self.prior, self.width, self.z_dim = layer.prior, width, layer.z_dim

    def forward(self, h_and_a: torch.Tensor) -> torch.Tensor:
        return self.prior(h_and_a[:, :self.width])[:, :2 * self.z_dim]


def test_with_the_posterior_equal_to_the_prior_the_kls_vanish_and_is_is_prior_sampling():
    config = tiny()
    model = trained_looking(config)
    for layer in model.decoder.layers:
        layer.posterior = PriorAsPosterior(layer, config.width)
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(4))
    x = model.observe(images, image_keys(1234, "observe", torch.arange(6)))
    terms = model(x, torch.randn(2, 6, model.noise_dim))
    torch.testing.assert_close(terms.kl, torch.zeros(6), rtol=0, atol=1e-5)  # up to rounding
    torch.testing.assert_close(terms.log_qz, terms.log_pz)
    k = 500
    r = importance_sampled(model, images, k=k, progress=False)
    # log p(x) from draws of the prior, decoded, on the same binarization of each image
    z = model.sample_prior(6 * k, torch.Generator().manual_seed(5))
    log_px_z = model.likelihood.log_prob(model.decode(z.view(k, 6, -1)), x).double()
    log_px = torch.logsumexp(log_px_z, 0) - math.log(k)
    w = (log_px_z - log_px_z.max(0).values).exp()
    se = (w.std(0) / math.sqrt(k) / w.mean(0)).pow(2).sum().sqrt() / 6  # delta method, the mean's
    difference = -r["nll"] - log_px.mean().item()
    assert abs(difference) < 4 * math.hypot(se.item(), r["nll_se"]) + 1e-3, (difference, se)


@pytest.mark.parametrize("args, says", [
    (["--prior", "mog"], "--model topdown needs no --prior"),
    (["--posterior", "iaf"], "--model topdown needs no --posterior"),
    (["--conditional"], "--model topdown needs no --conditional"),
    (["--objective", "iwae", "--estimator", "dreg"], "--model topdown needs --estimator reparam"),
])
def test_what_the_hierarchy_cannot_do_is_refused_in_one_line(tmp_path, args, says):
    assert_refused_in_one_line(tmp_path, ["--preset", "topdown-mnist", *args], says)


def test_blocks_that_miss_a_resolution_are_refused_naming_them():
    with pytest.raises(VaelabError, match=r"--blocks gives 2 resolutions, but 8x8 images have 3"
                                          r" \(1x1, 4x4, 8x8\)"):
        build_model(tiny(blocks=(1, 1)))


def test_the_kl_per_layer_is_evaluated_from_the_draws():
    model = trained_looking(tiny())
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    r = importance_sampled(model, images, k=100, progress=False)
    assert len(r["kl_per_layer"]) == 3 and all(v > 0 for v in r["kl_per_layer"])
    assert len(r["active_units"]) == 3 and r["posterior_mean"].startswith("every layer's mu")
    # the mean over draws of each layer's analytic KL: what other draws of the terms give
    x = model.observe(images, image_keys(1234, "observe", torch.arange(4)))
    with torch.no_grad():
        terms = model(x, torch.randn(400, 4, model.noise_dim))
    expected = terms.kl_per_dim.mean(0).tolist()
    assert r["kl_per_layer"] == pytest.approx(expected, rel=0.05)


def topdown_run(**overrides) -> RunConfig:
    fields = dict(model=tiny(), epochs=2, batch_size=50, device="cpu", optimizer="adam", lr=1e-3,
                  ema=0.9, skip_threshold=1e6, grad_clip=100.0)
    return RunConfig(**{**fields, **overrides})


@pytest.mark.slow
def test_a_hierarchy_with_an_average_resumes_bit_for_bit(tmp_path):
    assert_resumes_bit_for_bit(tmp_path, lambda epochs: topdown_run(epochs=epochs))


@pytest.mark.slow
def test_the_mnist_preset_trains_evaluates_samples_reports_and_resumes(tmp_path, mnist):
    run = tmp_path / "run"
    common = ["--preset", "topdown-mnist", "--train-size", 200, "--test-size", 50, "--batch-size",
              100, "--quiet"]
    done = run_vaelab("train", *common, "--epochs", 1, "--out", run)
    assert done.returncode == 0, done.stderr
    assert run_vaelab("train", "--resume", run, "--epochs", 2, "--quiet").returncode == 0
    whole = tmp_path / "whole"
    assert run_vaelab("train", *common, "--epochs", 2, "--out", whole).returncode == 0
    assert (run / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    done = run_vaelab("evaluate", run, "--k", 50, "--images", 50)
    assert done.returncode == 0, done.stderr
    assert "KL per layer, the top first" in done.stdout
    record = json.loads((run / "eval.json").read_text())
    assert len(record["kl_per_layer"]) == 6 and math.isfinite(record["nll"])
    assert run_vaelab("sample", run, "-n", 4, "--temperature", 0.8,
                      "-o", tmp_path / "s.png").returncode == 0
    assert (run / "figures" / "layers.png").exists()
    assert (run / "figures" / "temperatures.png").exists()
    assert run_vaelab("report", run).returncode == 0


def test_encode_gives_every_layers_gaussian_along_the_mean_pass():
    from vaelab.score import encode

    model = trained_looking(tiny())
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    codes = encode(model, images)
    assert codes["mu"].shape == codes["logvar"].shape == (3, model.noise_dim)
    assert "z_mean" not in codes  # a pass per draw: the mean pass's mu is the code
    x = model.observe(images, image_keys(1234, "observe", torch.arange(3)))
    torch.testing.assert_close(torch.from_numpy(codes["mu"]), model.posterior_mean(x))


def test_gap_is_refused_in_one_line_and_score_takes_the_models_k(tmp_path):
    from vaelab import train

    data = write_idx_dir(tmp_path / "data", synthetic_dataset(100, 50))
    run = tmp_path / "run"
    train(topdown_run(epochs=1, data_dir=str(data)), run, progress=False)
    refused = run_vaelab("gap", run)
    assert refused.returncode == 2 and "a chain of layers" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    done = run_vaelab("score", run, "-o", tmp_path / "s.npz", "--split", "test")
    assert done.returncode == 0 and "the model's default K" in done.stdout, done.stderr
