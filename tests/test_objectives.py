import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

from vaelab.likelihoods import Bernoulli as BernoulliLikelihood
from vaelab.likelihoods import Gaussian as GaussianLikelihood
from vaelab.likelihoods import softplus_sum
from vaelab.models import ModelConfig, build_model
from vaelab.objectives import Terms, kl_normal, negative_elbo, negative_iwae, reparametrize


def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The likelihood object on flat (..., N, D) tensors, as one-row images."""
    return BernoulliLikelihood().log_prob(logits.unsqueeze(-2).unsqueeze(-2), x.unsqueeze(-2).unsqueeze(-2))


def gaussian_log_likelihood(x: torch.Tensor, logits: torch.Tensor, sigma: float) -> torch.Tensor:
    return GaussianLikelihood(sigma).log_prob(logits.unsqueeze(-2).unsqueeze(-2), x.unsqueeze(-2).unsqueeze(-2))


def test_kl_normal_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(32, 5, generator=g) * 2
    logvar = torch.randn(32, 5, generator=g) * 1.5
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(kl_normal(mu, logvar), expected, rtol=1e-5, atol=1e-5)


def test_kl_normal_is_zero_for_the_prior_itself():
    assert kl_normal(torch.zeros(3, 4), torch.zeros(3, 4)).abs().max() == 0


def test_reparametrized_samples_have_the_right_mean_and_variance():
    mu = torch.tensor([[1.5, -2.0]])
    logvar = torch.tensor([[math.log(0.25), math.log(4.0)]])
    eps = torch.randn(200_000, 1, 2, generator=torch.Generator().manual_seed(1))
    z = reparametrize(mu, logvar, eps)[:, 0]
    torch.testing.assert_close(z.mean(0), mu[0], atol=0.02, rtol=0)
    torch.testing.assert_close(z.var(0), logvar[0].exp(), atol=0.0, rtol=0.02)


def test_reparametrization_carries_gradients_to_mu_and_logvar():
    mu = torch.tensor([[0.3, -0.7]], requires_grad=True)
    logvar = torch.tensor([[0.2, -1.0]], requires_grad=True)
    eps = torch.tensor([[0.5, -1.5]])
    reparametrize(mu, logvar, eps).sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones_like(mu))
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


def test_bernoulli_term_equals_the_tutorials_sigmoid_then_bce_where_that_is_stable():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 784, generator=g) * 3  # |logits| < ~12: sigmoid-then-log is fine
    x = (torch.rand(16, 784, generator=g) < 0.3).float()
    tutorial = -F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="none").sum(-1)
    torch.testing.assert_close(bernoulli_log_likelihood(x, logits), tutorial, rtol=1e-5, atol=1e-3)


def test_bernoulli_term_stays_exact_for_extreme_logits():
    logits = torch.tensor([[-200.0, 200.0, -40.0, 40.0]])
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # log sigmoid(-200) = -200 (to float precision), log(1 - sigmoid(200)) = -200, the rest ~ -4e-18
    out = bernoulli_log_likelihood(x, logits)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([-400.0]), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("d", [784, 37])
def test_fast_softplus_sum_matches_float64_softplus(d):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 50, d, generator=g) * 20  # many far beyond where sigmoid saturates
    exact = F.softplus(logits.double()).sum(-1)
    with torch.no_grad():
        fast = softplus_sum(logits)
    assert fast.shape == (2, 50)
    torch.testing.assert_close(fast.double(), exact, rtol=1e-6, atol=2e-3)


def test_softplus_sum_under_autograd_has_the_sigmoid_as_gradient():
    logits = torch.randn(4, 784, requires_grad=True)
    softplus_sum(logits).sum().backward()
    torch.testing.assert_close(logits.grad, torch.sigmoid(logits.detach()))


def test_gaussian_term_matches_torch_distributions():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 20, generator=g)
    x = torch.rand(8, 20, generator=g)
    expected = Normal(torch.sigmoid(logits), 0.1).log_prob(x).sum(-1)
    torch.testing.assert_close(gaussian_log_likelihood(x, logits, 0.1), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("samples", [1, 3])
def test_negative_elbo_equals_a_hand_computation(samples):
    model = build_model(ModelConfig(image_shape=(1, 3, 4), z_dim=3, encoder_hidden=(7,), decoder_hidden=(5,)), seed=0)
    x = (torch.rand(4, 1, 3, 4, generator=torch.Generator().manual_seed(4)) < 0.5).float()
    eps = torch.randn(samples, 4, 3, generator=torch.Generator().manual_seed(9))

    loss = negative_elbo(model(x, eps))

    # By hand, with the same noise: -(1/L) sum_l log Bern(x | decoder(z_l)) + KL
    x = x.view(4, 12)
    h = model.head(model.encoder(x))
    mu, logvar = h[:, :3], h[:, 3:]
    z = mu + torch.exp(logvar / 2) * eps
    log_px = torch.stack([Bernoulli(logits=model.decoder(z[l])).log_prob(x).sum(-1) for l in range(samples)])
    q, p = Normal(mu, torch.exp(logvar / 2)), Normal(0.0, 1.0)
    expected = kl_divergence(q, p).sum(-1) - log_px.mean(0)
    assert loss.shape == (4,)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)


def test_negative_elbo_uses_the_gaussian_likelihood_when_configured():
    config = ModelConfig(image_shape=(1, 2, 3), z_dim=2, encoder_hidden=(4,), decoder_hidden=(4,),
                         likelihood="gaussian", sigma=0.5)
    model = build_model(config, seed=1)
    x = torch.rand(3, 1, 2, 3, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(1, 3, 2, generator=torch.Generator().manual_seed(6))
    loss = negative_elbo(model(x, eps))
    mu, logvar = model.encode_observed(x)
    logits = model.decoder(mu + torch.exp(logvar / 2) * eps)[0]
    expected = kl_normal(mu, logvar) - Normal(torch.sigmoid(logits), 0.5).log_prob(x.view(3, 6)).sum(-1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)


def test_objectives_are_functions_of_the_terms_alone():
    log_px_z = torch.tensor([[-3.0, -1.0], [-5.0, -2.0]])
    z = torch.randn(2, 2, 3)  # drawn from the prior itself (mu 0, logvar 0): log p(z) = log q(z|x)
    from vaelab.objectives import log_standard_normal

    log_q = log_standard_normal(z)
    terms = Terms(log_px_z=log_px_z, kl=torch.tensor([0.5, 1.0]), z=z, log_qz=log_q, log_pz=log_q)
    torch.testing.assert_close(negative_elbo(terms), torch.tensor([4.5, 2.5]))
    expected = math.log(2) - torch.logsumexp(log_px_z, 0)
    torch.testing.assert_close(negative_iwae(terms), expected)


def test_the_model_returns_its_terms_for_each_sample_and_example():
    model = build_model(ModelConfig(image_shape=(1, 2, 2), z_dim=3, encoder_hidden=(5,), decoder_hidden=(5,)), seed=0)
    terms = model(torch.rand(4, 1, 2, 2).round(), torch.randn(6, 4, 3))
    assert [t.shape for t in (terms.log_px_z, terms.log_pz, terms.log_qz, terms.kl)] == [(6, 4), (6, 4), (6, 4), (4,)]


# --- gradient estimators ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_iwae(mnist):
    """A tiny MNIST model trained a while with the IWAE bound (k=10), and 20 test images."""
    from vaelab import RunConfig, train

    config = RunConfig(model=ModelConfig(z_dim=2, encoder_hidden=(32,), decoder_hidden=(32,)), objective="iwae",
                       k=10, optimizer="adam", lr=1e-3, epochs=2, train_size=3000, test_size=100, device="cpu")
    result = train(config, data=mnist, progress=False)
    x = result.model.observe(result.data.test_images[:20], torch.arange(20))
    return result.model, x


def gradients(model, x, objective: str, estimator: str, k: int, draws: int, part: str = "head") -> torch.Tensor:
    """(draws, P): the gradient of the batch's objective for `part`'s parameters, one row per
    keyed draw of the noise (draw r is the same for every estimator)."""
    from vaelab import rng
    from vaelab.objectives import BOUNDS, estimated

    params = list(model.get_submodule(part).parameters())
    rows = []
    for r in range(draws):
        d = model.noise_dim
        eps = rng.normal(rng.row_keys(rng.key(7, "draw", r), torch.arange(len(x))), k * d).view(len(x), k, d)
        terms = estimated(model, x, eps.transpose(0, 1), estimator)
        grads = torch.autograd.grad(BOUNDS[objective](terms).sum(), params)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


def assert_same_mean(a: torch.Tensor, b: torch.Tensor) -> None:
    """Paired draws: the mean difference of each coordinate is within 4.5 standard errors of 0."""
    d = (a - b).double()
    z = d.mean(0) / (d.std(0) / math.sqrt(len(d))).clamp_min(1e-12)
    assert z.abs().max() < 4.5, z.abs().max()


@pytest.mark.slow
def test_dreg_is_unbiased_for_the_iwae_gradient_and_has_less_variance(trained_iwae):
    model, x = trained_iwae
    iwae = gradients(model, x, "iwae", "reparam", k=20, draws=400)
    dreg = gradients(model, x, "iwae", "dreg", k=20, draws=400)
    assert_same_mean(dreg, iwae)
    assert dreg.var(0).sum() < 0.9 * iwae.var(0).sum()  # a quarter lower at k=20; room for the noise


@pytest.mark.slow
def test_stl_is_unbiased_for_the_elbo_gradient(trained_iwae):
    model, x = trained_iwae
    elbo = gradients(model, x, "elbo", "reparam", k=1, draws=400)  # the analytic KL's gradient
    stl = gradients(model, x, "elbo", "stl", k=1, draws=400)       # the KL from the draw
    assert_same_mean(stl, elbo)


@pytest.mark.parametrize("objective, estimator", [("iwae", "dreg"), ("iwae", "stl"), ("elbo", "stl")])
def test_the_estimators_leave_the_decoders_gradient_and_the_loss(trained_iwae, objective, estimator):
    from vaelab.objectives import BOUNDS, estimated

    model, x = trained_iwae
    eps = torch.randn(10, len(x), 2, generator=torch.Generator().manual_seed(0))
    plain, ours = model(x, eps), estimated(model, x, eps, estimator)
    loss = BOUNDS[objective]
    stl = estimated(model, x, eps, "stl")
    torch.testing.assert_close(loss(ours), loss(plain if objective == "iwae" else stl))
    decoder = list(model.decoder.parameters())
    expected = torch.autograd.grad(loss(plain.replace(kl=ours.kl)).sum(), decoder)
    for g, e in zip(torch.autograd.grad(loss(ours).sum(), decoder), expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective, estimator", [("iwae", "dreg"), ("elbo", "stl")])
def test_a_run_trains_with_each_estimator_and_it_changes_the_encoders_updates(objective, estimator):
    from conftest import synthetic_dataset
    from test_train import tiny_config
    from vaelab import train

    runs = [train(tiny_config(objective=objective, estimator=e, optimizer="adam", lr=1e-3), data=synthetic_dataset(),
                  progress=False) for e in ("reparam", estimator)]
    assert all(math.isfinite(m["test_loss"]) for r in runs for m in r.metrics)
    assert not torch.equal(runs[0].model.head.weight, runs[1].model.head.weight)


@pytest.mark.parametrize("args, says", [
    (["--estimator", "dreg"], "--estimator dreg is the gradient of the iwae bound"),
    (["--estimator", "stl", "--posterior", "iaf"], "needs the inverse of --posterior iaf"),
    (["--estimator", "score"], "--estimator"),
])
def test_estimators_that_do_not_apply_are_refused_in_one_line(tmp_path, args, says):
    from conftest import assert_refused_in_one_line

    assert_refused_in_one_line(tmp_path, args, says)


def test_the_terms_kl_per_dim_averages_to_the_kl_from_the_draws_per_dimension():
    from vaelab.objectives import log_normal_from_eps, log_standard_normal

    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    eps = torch.randn(200_000, 3, 4, generator=g, dtype=torch.float64).float()
    z = reparametrize(mu, logvar, eps)
    model = build_model(ModelConfig(image_shape=(1, 2, 2), z_dim=4, encoder_hidden=(5,),
                                    decoder_hidden=(5,)), seed=0)
    per_dim = model.kl_per_dim((mu, logvar))
    drawn = torch.stack([(log_normal_from_eps(eps[..., d:d + 1], logvar[:, d:d + 1])
                          - log_standard_normal(z[..., d:d + 1])).mean(0) for d in range(4)], -1)
    torch.testing.assert_close(per_dim, drawn, atol=0.02, rtol=0)


def test_free_bits_charge_each_dimension_at_least_lambda_over_the_batch():
    from vaelab.objectives import free_bits_negative_elbo, kl_normal_per_dim

    mu = torch.tensor([[0.0, 2.0], [0.0, 1.0]])  # dimension 0 has no KL, dimension 1 some
    logvar = torch.zeros(2, 2)
    log_px_z = torch.tensor([[-10.0, -20.0]])
    terms = Terms(log_px_z=log_px_z, kl=kl_normal(mu, logvar), z=mu[None], log_qz=None,
                  log_pz=None, kl_per_dim=kl_normal_per_dim(mu, logvar))
    per_dim = kl_normal_per_dim(mu, logvar).mean(0)  # (0, 1.25)
    expected = 15.0 + max(0.5, per_dim[0].item()) + max(0.5, per_dim[1].item())
    assert free_bits_negative_elbo(terms, 0.5).item() == pytest.approx(expected)
    assert free_bits_negative_elbo(terms, 0.0).item() == pytest.approx(negative_elbo(terms).mean().item())
