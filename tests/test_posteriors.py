"""The inverse autoregressive flow (posteriors.py): autoregressive by construction, its
log-determinant against autograd's Jacobian, its model's log p(x) against quadrature, and the
flow through training, evaluation, sampling and resume."""

import math

import numpy as np
import pytest
import torch

from conftest import (assert_refused_in_one_line, assert_resumes_bit_for_bit, synthetic_dataset,
                      train_evaluate_sample_report)
from test_train import tiny_config
from vaelab.config import ModelConfig, RunConfig
from vaelab.models import build_model
from vaelab.objectives import log_normal_from_eps
from vaelab.posteriors import IAF, MADE
from vaelab.sampling import importance_sampled
from vaelab.train import TrainingDiverged, build, fit

SHAPE = (1, 2, 4)


@pytest.mark.parametrize(
    "order", [torch.arange(5), torch.arange(5).flip(0), torch.tensor([2, 0, 4, 1, 3])]
)
def test_each_made_output_depends_only_on_the_variables_before_it(order):
    torch.manual_seed(0)
    made = MADE(5, 3, 64, order)
    h = torch.randn(3)
    for out in (0, 1):  # m and s
        jacobian = torch.autograd.functional.jacobian(lambda z: made(z, h)[out], torch.randn(5))
        rank = torch.empty_like(order)
        rank[order] = torch.arange(5)
        allowed = rank[:, None] > rank[None, :]  # output i may see input j when j comes first
        assert torch.all(jacobian[~allowed] == 0)
        assert torch.any(jacobian[allowed] != 0)


def test_the_first_variables_step_depends_on_the_context():
    torch.manual_seed(0)
    made = MADE(3, 2, 64, torch.arange(3))
    z = torch.randn(3)
    jacobian = torch.autograd.functional.jacobian(lambda h: made(z, h)[0], torch.randn(2))
    assert torch.all(jacobian[0] != 0)


def test_the_log_determinant_is_autograds():
    torch.manual_seed(0)
    flow = IAF(4, 3)
    z0, h = torch.randn(2, 3, 4), torch.randn(3, 4)
    _, log_det = flow(z0, h)
    for s in range(2):
        for n in range(3):
            jacobian = torch.autograd.functional.jacobian(
                lambda v: flow(v.view(1, 1, 4), h[n : n + 1])[0].view(4), z0[s, n]
            )
            sign, log_abs = torch.linalg.slogdet(jacobian)
            assert sign > 0 and math.isclose(log_abs.item(), log_det[s, n].item(), abs_tol=1e-5)


def iaf_model(z_dim=1, steps=2, **fields):
    config = ModelConfig(
        image_shape=SHAPE,
        z_dim=z_dim,
        encoder_hidden=(16,),
        decoder_hidden=(16,),
        activation="tanh",
        posterior="iaf",
        flow_steps=steps,
        **fields,
    )
    return build_model(config, seed=0)


def test_log_q_is_the_base_gaussians_minus_the_log_determinant():
    model = iaf_model(z_dim=3)
    x = torch.rand(4, *SHAPE).round()
    eps = torch.randn(2, 4, 3)
    terms = model(x, eps)
    mu, logvar, h = model.posterior_params(x)
    z, log_det = model.posterior.flow(mu + torch.exp(0.5 * logvar) * eps, h)
    torch.testing.assert_close(terms.z, z)
    torch.testing.assert_close(terms.log_qz, log_normal_from_eps(eps, logvar) - log_det)
    torch.testing.assert_close(terms.kl, (terms.log_qz - terms.log_pz).mean(0))


def test_the_iaf_models_importance_sampled_log_px_agrees_with_quadrature():
    from vaelab.likelihoods import Bernoulli
    from vaelab.objectives import log_standard_normal

    model = iaf_model().double()
    with torch.no_grad():  # a sharper decoder, and a flow that shrinks and shifts z: log q must
        model.decoder[-1].weight.mul_(4)  # count its log-determinant, here -0.40 nats a draw
        for made in model.posterior.steps:  # (the proposal stays wide enough for K = 5000 to find p(x))
            made.m.bias.fill_(0.5)
            made.s.bias.fill_(1.5)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(20, *SHAPE, generator=g) < 0.5).to(torch.uint8) * 255
    z = torch.linspace(-12, 12, 24001, dtype=torch.float64).unsqueeze(-1)
    with torch.no_grad():
        log_joint = Bernoulli().log_prob(
            model.decode(z).unsqueeze(1), images.double() / 255
        ) + log_standard_normal(z).unsqueeze(1)
    exact_nll = -(torch.logsumexp(log_joint, dim=0) + math.log((z[1] - z[0]).item())).mean().item()
    r = importance_sampled(model.float(), images, k=5000, progress=False)
    assert r["nll_se"] < 0.05
    assert abs(r["nll"] - exact_nll) < 4 * r["nll_se"] + 1e-3, (r["nll"], exact_nll, r["nll_se"])
    assert r["nll"] <= r["neg_elbo"]


def test_on_a_2d_latent_the_iaf_models_log_px_agrees_with_quadrature():
    from vaelab.likelihoods import Bernoulli
    from vaelab.objectives import log_standard_normal

    model = iaf_model(z_dim=2).double()
    with torch.no_grad():  # steps that depend on z (their log-determinant is -0.9 nats a draw),
        model.decoder[-1].weight.mul_(3)  # and a base Gaussian wide enough for K = 5000
        for made in model.posterior.steps:
            made.m.weight.mul_(3)
            made.s.weight.mul_(3)
        model.head.bias[2:4].fill_(1.0)  # the head gives mu, logvar, context: logvar + 1
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(20, *SHAPE, generator=g) < 0.5).to(torch.uint8) * 255
    axis = torch.linspace(-7, 7, 701, dtype=torch.float64)
    z = torch.cartesian_prod(axis, axis)  # (G, 2)
    with torch.no_grad():
        log_joint = Bernoulli().log_prob(model.decode(z).unsqueeze(1), images.double() / 255) \
            + log_standard_normal(z).unsqueeze(1)
    cell = math.log((axis[1] - axis[0]).item() ** 2)
    exact_nll = -(torch.logsumexp(log_joint, dim=0) + cell).mean().item()
    r = importance_sampled(model.float(), images, k=5000, progress=False)
    assert abs(r["nll"] - exact_nll) < 4 * r["nll_se"] + 1e-3, (r["nll"], exact_nll, r["nll_se"])


@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_per_image_values_do_not_depend_on_the_chunking(prior):
    model = iaf_model(z_dim=2, prior=prior, prior_components=7)
    images = torch.randint(
        0, 256, (130, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(7)
    )
    whole = importance_sampled(model, images, k=120, progress=False)
    first = importance_sampled(model, images[:57], k=120, chunk=100, batch_size=100, progress=False)
    assert np.array_equal(first["log_px"], whole["log_px"][:57])


def test_the_flow_registers_after_the_networks_and_the_prior():
    names = [n for n, _ in iaf_model(z_dim=2, prior="mog", prior_components=3).named_parameters()]
    first_flow = next(i for i, n in enumerate(names) if n.startswith("posterior."))
    assert names.index("prior.logits") < first_flow and all(
        n.startswith("posterior.") for n in names[first_flow:]
    )


# --- through training, evaluation, sampling and resume -----------------------------------------


def tiny(**overrides) -> RunConfig:
    """test_train's tiny run with a 2-step IAF posterior, trained with Adam."""
    model = tiny_config().model.replace(posterior="iaf", flow_steps=2)
    return tiny_config(model=model, optimizer="adam", lr=1e-3, **overrides)


def test_an_iaf_posterior_resumes_bit_for_bit(tmp_path):
    assert_resumes_bit_for_bit(tmp_path, lambda epochs: tiny(epochs=epochs))


def test_a_flow_that_breaks_is_caught_by_the_divergence_guard():
    training = build(tiny(epochs=1), synthetic_dataset(), progress=False)
    with torch.no_grad():
        training.model.posterior.steps[0].s.bias.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="training diverged"):
        fit(training, progress=False)


@pytest.mark.parametrize("extra", [[], ["--prior", "vamp", "--prior-components", "10"]], ids=["iaf", "iaf-vamp"])
def test_the_command_line_trains_evaluates_samples_plots_and_reports_an_iaf(tmp_path, extra):
    run, _ = train_evaluate_sample_report(tmp_path, "--posterior", "iaf", "--flow-steps", 2, *extra)
    figures = {p.name for p in (run / "figures").iterdir()}
    assert {"samples.png", "reconstructions.png", "latent.png"} <= figures


@pytest.mark.parametrize("args,says", [
    (["--posterior", "planar"], "argument --posterior: invalid choice"),
    (["--posterior", "iaf", "--flow-steps", "0"], "--flow-steps must be a positive integer, got 0"),
])
def test_a_bad_posterior_option_is_one_line_and_status_2(tmp_path, args, says):
    assert_refused_in_one_line(tmp_path, args, says)


@pytest.mark.slow
def test_the_vampprior_with_an_iaf_posterior_keeps_its_kl_on_burda1(mnist):
    from vaelab import preset, train

    model = preset("burda1").replace(prior="vamp", posterior="iaf")
    config = RunConfig(preset="burda1", model=model, train_size=30000, test_size=2000, epochs=2,
                       batch_size=100, optimizer="adam", lr=1e-3, schedule="constant", device="cpu")
    result = train(config, data=mnist, progress=False)  # 600 steps
    assert result.metrics[-1]["test_kl"] > 3.0
