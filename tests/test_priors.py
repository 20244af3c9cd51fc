"""Priors (priors.py): each log-density against torch.distributions, the VampPrior's
importance-sampled log p(x) against quadrature, and the learned priors through training,
evaluation, sampling and resume."""

import math

import numpy as np
import pytest
import torch
from torch import distributions as D

from conftest import (assert_refused_in_one_line, assert_resumes_bit_for_bit, synthetic_dataset,
                      train_evaluate_sample_report)
from test_train import tiny_config
from vaelab import train
from vaelab.config import ModelConfig, RunConfig
from vaelab.models import build_model
from vaelab.priors import MixtureOfGaussians, StandardNormal, VampPrior, log_mixture
from vaelab.sampling import importance_sampled

SHAPE = (1, 2, 4)


def test_the_standard_normal_is_torch_distributions_normal():
    z = torch.randn(5, 7, 3)
    expected = D.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(StandardNormal(3).log_prob(z), expected)


def test_a_mixture_is_torch_distributions_mixture_same_family():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    log_w = torch.randn(4, generator=g).log_softmax(-1)
    z = torch.randn(6, 5, 3, generator=g)
    reference = D.MixtureSameFamily(
        D.Categorical(logits=log_w), D.Independent(D.Normal(mu, torch.exp(0.5 * logvar)), 1)
    )
    torch.testing.assert_close(log_mixture(z, mu, logvar, log_w), reference.log_prob(z))


def test_a_mixture_of_narrow_components_stays_accurate_in_float32():
    g = torch.Generator().manual_seed(1)
    mu = 3 * torch.randn(50, 20, generator=g)
    logvar = torch.full((50, 20), -8.0)  # posterior-like widths, where an expanded square cancels
    z = mu[:7] + torch.exp(0.5 * logvar[:7]) * torch.randn(7, 20, generator=g)
    log_w = torch.full((50,), -math.log(50))
    reference = D.MixtureSameFamily(D.Categorical(logits=log_w.double()),
                                    D.Independent(D.Normal(mu.double(), torch.exp(0.5 * logvar.double())), 1))
    torch.testing.assert_close(log_mixture(z, mu, logvar, log_w).double(), reference.log_prob(z.double()),
                               rtol=0, atol=1e-4)


def test_mog_samples_follow_the_mixtures_weights():
    prior = MixtureOfGaussians(1, 2)
    with torch.no_grad():
        prior.mu.copy_(torch.tensor([[-10.0], [10.0]]))
        prior.logits.copy_(torch.tensor([0.0, math.log(3.0)]))  # weights 1/4 and 3/4
    z = prior.sample(20000, torch.Generator().manual_seed(0))
    share = (z > 0).float().mean().item()
    assert abs(share - 0.75) < 5 * math.sqrt(0.75 * 0.25 / 20000)


def test_the_vampprior_is_the_uniform_mixture_of_the_posterior_at_its_pseudo_inputs():
    model = build_model(
        ModelConfig(
            image_shape=SHAPE,
            z_dim=2,
            encoder_hidden=(8,),
            decoder_hidden=(8,),
            prior="vamp",
            prior_components=3,
        ),
        seed=0,
    )
    u = model.prior.inputs()
    assert u.shape == (3, *SHAPE) and u.min() >= 0 and u.max() <= 1
    mu, logvar, log_w = model.prior.components(model.encode_observed)
    torch.testing.assert_close((mu, logvar), model.encode_observed(u))
    torch.testing.assert_close(log_w, torch.full((3,), -math.log(3)))


def test_the_vampprior_pseudo_inputs_start_near_0_05_as_in_the_paper():
    u = VampPrior(2, 500, (1, 28, 28)).inputs()
    assert abs(u.mean().item() - 0.05) < 1e-3 and abs(u.std().item() - 0.01) < 1e-3


def test_a_learned_priors_parameters_register_after_the_networks():
    standard = build_model(ModelConfig(image_shape=SHAPE, encoder_hidden=(8,), decoder_hidden=(8,)))
    mog = build_model(
        ModelConfig(
            image_shape=SHAPE,
            encoder_hidden=(8,),
            decoder_hidden=(8,),
            prior="mog",
            prior_components=4,
        )
    )
    names = [n for n, _ in mog.named_parameters()]
    assert names[: len(list(standard.parameters()))] == [n for n, _ in standard.named_parameters()]
    assert names[-3:] == ["prior.mu", "prior.logvar", "prior.logits"]


# --- against quadrature ---------------------------------------------------------------------


def vamp_model():
    config = ModelConfig(
        image_shape=SHAPE,
        z_dim=1,
        encoder_hidden=(16,),
        decoder_hidden=(16,),
        activation="tanh",
        prior="vamp",
        prior_components=5,
    )
    model = build_model(config, seed=0).double()
    with torch.no_grad():  # a sharper decoder; pseudo-inputs over the pixel range, their posteriors
        model.decoder[-1].weight.mul_(
            4
        )  # spread: log p(x) then differs from N(0, 1)'s by 0.05 nats,
        model.prior.pseudo_inputs.uniform_(0, 1)  # four times the test's tolerance
        model.head.weight.mul_(3)
    return model


def test_the_vampprior_models_importance_sampled_log_px_agrees_with_quadrature():
    from vaelab.likelihoods import Bernoulli

    model = vamp_model()
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(20, *SHAPE, generator=g) < 0.5).to(
        torch.uint8
    ) * 255  # binarization is exact
    x = images.double() / 255
    z = torch.linspace(-12, 12, 24001, dtype=torch.float64).unsqueeze(-1)  # (G, 1)
    with torch.no_grad():
        log_pz = model.prior.log_prob(z, model.prior.components(model.encode_observed))  # (G,)
        log_joint = Bernoulli().log_prob(model.decode(z).unsqueeze(1), x) + log_pz.unsqueeze(1)
    exact_nll = -(torch.logsumexp(log_joint, dim=0) + math.log((z[1] - z[0]).item())).mean().item()
    r = importance_sampled(model.float(), images, k=5000, progress=False)
    assert r["nll_se"] < 0.05
    assert abs(r["nll"] - exact_nll) < 4 * r["nll_se"] + 1e-3, (r["nll"], exact_nll, r["nll_se"])


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_per_image_values_do_not_depend_on_the_chunking(prior):
    config = ModelConfig(
        image_shape=SHAPE,
        z_dim=2,
        encoder_hidden=(16,),
        decoder_hidden=(16,),
        prior=prior,
        prior_components=7,
    )
    model = build_model(config, seed=0)
    images = torch.randint(
        0, 256, (130, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(7)
    )
    whole = importance_sampled(model, images, k=120, progress=False)
    first = importance_sampled(model, images[:57], k=120, chunk=100, batch_size=100, progress=False)
    assert np.array_equal(first["log_px"], whole["log_px"][:57])


# --- through training, evaluation, sampling and resume -----------------------------------------


def tiny(prior: str, **overrides) -> RunConfig:
    """test_train's tiny run with a learned prior of 10 components, trained with Adam."""
    model = tiny_config().model.replace(prior=prior, prior_components=10)
    return tiny_config(model=model, optimizer="adam", lr=1e-3, **overrides)


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_a_learned_prior_trains_and_its_parameters_move(prior):
    result = train(tiny(prior), data=synthetic_dataset(), progress=False)
    fresh = build_model(result.model.config, seed=0)
    assert all(math.isfinite(m["test_loss"]) for m in result.metrics)
    for learned, initial in zip(result.model.prior.parameters(), fresh.prior.parameters(), strict=True):
        assert not torch.equal(learned, initial)


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_a_learned_prior_resumes_bit_for_bit(tmp_path, prior):
    assert_resumes_bit_for_bit(tmp_path, lambda epochs: tiny(prior, epochs=epochs))


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_the_command_line_trains_evaluates_samples_plots_and_reports_a_learned_prior(tmp_path, prior):
    run, _ = train_evaluate_sample_report(tmp_path, "--prior", prior, "--prior-components", 10)
    assert (run / "figures" / "samples.png").is_file()
    assert f"<tr><th>model.prior</th><td>{prior}</td></tr>" in (run / "report.html").read_text()


@pytest.mark.parametrize("args,says", [
    (["--prior", "flat"], "argument --prior: invalid choice"),
    (["--prior", "vamp", "--prior-components", "0"], "--prior-components must be a positive integer, got 0"),
])
def test_a_bad_prior_option_is_one_line_and_status_2(tmp_path, args, says):
    assert_refused_in_one_line(tmp_path, args, says)


def test_the_mixture_prior_starts_within_a_nat_of_the_standard_normal():
    # KL(N(0, I) || mixture) = E_{z ~ N(0, I)}[log N(z) - log mixture(z)], by Monte Carlo
    torch.manual_seed(0)
    prior = MixtureOfGaussians(z_dim=50, k=500)
    z = torch.randn(20000, 50, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gap = StandardNormal(50).log_prob(z) - prior.log_prob(z)
    kl, se = gap.mean().item(), gap.std().item() / math.sqrt(len(gap))
    assert kl + 4 * se < 1.0
