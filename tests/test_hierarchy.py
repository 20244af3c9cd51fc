"""Stochastic layers above z_1 (hierarchy.py): the burda2 preset, each density against
torch.distributions, importance-sampled log p(x) against quadrature on a two-layer model, the
estimators' fixed parameters, and the whole path through training, evaluation and resume."""

import math

import numpy as np
import pytest
import torch
from torch import distributions as D

from conftest import (
    assert_refused_in_one_line,
    assert_resumes_bit_for_bit,
    synthetic_dataset,
    train_evaluate_sample_report,
)
from test_train import tiny_config
from vaelab.config import ModelConfig
from vaelab.likelihoods import Bernoulli
from vaelab.models import build_model, preset
from vaelab.objectives import estimated
from vaelab.sampling import importance_sampled

SHAPE = (1, 2, 4)


def two_layers(**overrides) -> ModelConfig:
    return ModelConfig(
        **{
            "image_shape": SHAPE,
            "z_dim": 3,
            "upper_z_dims": (2,),
            "upper_hidden": (8,),
            "encoder_hidden": (16,),
            "decoder_hidden": (16,),
            "activation": "tanh",
            **overrides,
        }
    )


def linear_sizes(module) -> list[tuple[int, int]]:
    return [
        (m.in_features, m.out_features) for m in module.modules() if isinstance(m, torch.nn.Linear)
    ]


def test_burda2_is_the_papers_two_stochastic_layer_network():
    model = build_model(preset("burda2"))
    assert model.noise_dim == 150 and model.config.activation == "tanh"
    assert linear_sizes(model.encoder) + linear_sizes(model.head) == [
        (784, 200),
        (200, 200),
        (200, 200),
    ]
    assert linear_sizes(model.posterior.layers.up) == [
        (100, 100),
        (100, 100),
        (100, 100),
    ]  # q(z2|z1): mu, logvar of 50
    assert linear_sizes(model.posterior.layers.down) == [
        (50, 100),
        (100, 100),
        (100, 200),
    ]  # p(z1|z2): of 100
    assert linear_sizes(model.decoder) == [(100, 200), (200, 200), (200, 784)]
    assert model.prior.z_dim == 50


def test_the_terms_are_the_layers_densities_from_torch_distributions():
    model = build_model(two_layers(), seed=0)
    x = (torch.rand(4, *SHAPE) < 0.5).float()
    eps = torch.randn(6, 4, 5)
    terms = model(x, eps)
    mu1, logvar1 = model.encode_observed(x)
    z1 = mu1 + torch.exp(0.5 * logvar1) * eps[..., :3]
    mu2, logvar2 = model.posterior.layers.up[0](z1)
    z2 = mu2 + torch.exp(0.5 * logvar2) * eps[..., 3:]
    normal = lambda mu, logvar: D.Independent(D.Normal(mu, torch.exp(0.5 * logvar)), 1)
    torch.testing.assert_close(terms.z, torch.cat([z1, z2], -1))
    torch.testing.assert_close(
        terms.log_qz, normal(mu1, logvar1).log_prob(z1) + normal(mu2, logvar2).log_prob(z2)
    )
    mu_p, logvar_p = model.posterior.layers.down[0](z2)
    expected_pz = D.Independent(D.Normal(0.0, torch.ones(2)), 1).log_prob(z2) + normal(
        mu_p, logvar_p
    ).log_prob(z1)
    torch.testing.assert_close(terms.log_pz, expected_pz)
    torch.testing.assert_close(terms.log_px_z, Bernoulli().log_prob(model.decode(z1), x))


def test_with_fixed_parameters_log_q_has_the_same_value_and_no_gradient_to_q_but_through_z():
    model = build_model(two_layers(), seed=0)
    x = (torch.rand(4, *SHAPE) < 0.5).float()
    eps = torch.randn(6, 4, 5)
    terms = model(x, eps)
    fixed = estimated(model, x, eps, "stl")
    torch.testing.assert_close(fixed.log_qz, terms.log_qz, rtol=1e-5, atol=1e-5)
    up = list(model.posterior.layers.up.parameters())
    # Held fixed, q(z2|z1)'s weights get from log q only what flows back through the draws they
    # made; the plain log q also depends on them directly.
    for terms, through_z_alone in ((fixed, True), (terms, False)):
        log_q = terms.log_qz.sum()
        at_z = torch.autograd.grad(log_q, terms.z, retain_graph=True, allow_unused=True)[0]
        at_z = (
            torch.zeros_like(terms.z) if at_z is None else at_z
        )  # the plain log q is written in eps
        path = torch.autograd.grad(terms.z, up, grad_outputs=at_z, retain_graph=True)
        total = torch.autograd.grad(log_q, up, retain_graph=True)
        same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(total, path))
        assert same == through_z_alone


def test_the_two_layer_models_importance_sampled_log_px_agrees_with_quadrature():
    model = build_model(two_layers(z_dim=1, upper_z_dims=(1,)), seed=0).double()
    with torch.no_grad():
        model.decoder[-1].weight.mul_(4)  # a decoder and a conditional that matter
        model.posterior.layers.down[0].head.weight.mul_(3)
    images = (torch.rand(20, *SHAPE, generator=torch.Generator().manual_seed(0)) < 0.5).to(
        torch.uint8
    ) * 255
    x = images.double() / 255
    z1 = torch.linspace(-10, 10, 2001, dtype=torch.float64).unsqueeze(-1)  # (G1, 1)
    z2 = torch.linspace(-8, 8, 1601, dtype=torch.float64).unsqueeze(-1)  # (G2, 1)
    with torch.no_grad():
        log_px_z1 = Bernoulli().log_prob(model.decode(z1).unsqueeze(1), x)  # (G1, N)
        mu, logvar = model.posterior.layers.down[0](z2)  # (G2, 1)
        log_p_z1_z2 = D.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z1.T)  # (G2, G1)
        log_p_z2 = D.Normal(0.0, 1.0).log_prob(z2)  # (G2, 1)
        log_pz1 = torch.logsumexp(log_p_z1_z2 + log_p_z2, 0) + math.log(
            z2[1, 0] - z2[0, 0]
        )  # (G1,)
        log_px = torch.logsumexp(log_px_z1 + log_pz1[:, None], 0) + math.log(z1[1, 0] - z1[0, 0])
    r = importance_sampled(model.float(), images, k=5000, progress=False)
    assert r["nll_se"] < 0.05
    assert abs(r["nll"] + log_px.mean().item()) < 4 * r["nll_se"] + 1e-3, (
        r["nll"],
        -log_px.mean().item(),
    )


def test_per_image_values_do_not_depend_on_the_chunking():
    model = build_model(two_layers(), seed=0)
    images = torch.randint(
        0, 256, (130, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(7)
    )
    whole = importance_sampled(model, images, k=120, progress=False)
    first = importance_sampled(model, images[:57], k=120, progress=False)
    assert np.array_equal(first["log_px"], whole["log_px"][:57])


def test_evaluation_reports_active_units_for_each_layer():
    model = build_model(two_layers(), seed=0)
    images = torch.randint(
        0, 256, (60, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    r = importance_sampled(model, images, k=50, progress=False)
    assert [len(v) for v in r["latent_variance"]] == [3, 2] and len(r["active_units"]) == 2
    assert "layers of a hierarchy" in r["kl_per_dim_note"]


def test_prior_samples_come_down_the_layers_to_z1():
    model = build_model(two_layers(prior="mog", prior_components=4), seed=0)
    assert model.sample_prior(7, torch.Generator().manual_seed(0)).shape == (7, 3)


def tiny_two_layers(epochs, **overrides):
    model = tiny_config().model.replace(upper_z_dims=(2,), upper_hidden=(8,))
    return tiny_config(model=model, epochs=epochs, optimizer="adam", lr=1e-3, **overrides)


@pytest.mark.parametrize(
    "overrides", [{}, dict(objective="iwae", k=5, estimator="dreg")], ids=["elbo", "iwae-dreg"]
)
def test_a_two_layer_run_resumes_bit_for_bit(tmp_path, overrides):
    assert_resumes_bit_for_bit(tmp_path, lambda epochs: tiny_two_layers(epochs, **overrides))


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [[], ["--objective", "iwae", "--estimator", "dreg", "--k", "5"]],
    ids=["elbo", "iwae-dreg"],
)
def test_burda2_trains_evaluates_samples_and_reports(tmp_path, extra):
    run, r = train_evaluate_sample_report(tmp_path, "--preset", "burda2", *extra)
    assert len(r["active_units"]) == 2 and (run / "figures" / "samples.png").is_file()


@pytest.mark.parametrize(
    "args, says",
    [
        (
            ["--upper-z-dims", "2", "--prior", "vamp"],
            "--prior vamp does not go with --upper-z-dims",
        ),
        (
            ["--upper-z-dims", "2", "--posterior", "iaf"],
            "--posterior iaf does not go with --upper-z-dims",
        ),
        (["--upper-z-dims", "0"], "--upper-z-dims must be positive integers"),
    ],
)
def test_combinations_that_do_not_apply_are_refused_in_one_line(tmp_path, args, says):
    assert_refused_in_one_line(tmp_path, args, says)


@pytest.mark.slow
@pytest.mark.parametrize("part", ["head", "posterior.layers.up"])  # q(z1|x)'s and q(z2|z1)'s
def test_dreg_is_unbiased_for_the_iwae_gradient_of_both_layers_inference(part):
    from test_objectives import assert_same_mean, gradients

    model = build_model(two_layers(), seed=0)
    with torch.no_grad():
        model.decoder[-1].weight.mul_(3)
    x = (torch.rand(10, *SHAPE, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    iwae = gradients(model, x, "iwae", "reparam", k=10, draws=300, part=part)
    dreg = gradients(model, x, "iwae", "dreg", k=10, draws=300, part=part)
    assert_same_mean(dreg, iwae)
