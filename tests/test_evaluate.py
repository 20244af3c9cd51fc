"""Importance-sampled log-likelihood and IWAE bounds against exact answers."""

import math

import pytest
import torch

import numpy as np

from vaelab import sampling
from vaelab.diagnostics import compare
from vaelab.errors import VaelabError
from vaelab.likelihoods import Bernoulli
from vaelab.models import ModelConfig, build_model
from vaelab.objectives import (kl_normal, log_normal_from_eps, log_standard_normal, negative_elbo, negative_iwae,
                               reparametrize)
from vaelab.sampling import TestSet, importance_sampled, mean_loss

D = 8
SHAPE = (1, 2, 4)


def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return Bernoulli().log_prob(logits, x)


def small_model(z_dim: int = 1, seed: int = 0):
    config = ModelConfig(image_shape=SHAPE, z_dim=z_dim, encoder_hidden=(16,), decoder_hidden=(16,),
                         activation="tanh")
    model = build_model(config, seed=seed).double()
    with torch.no_grad():  # a sharper decoder than at initialisation: a posterior worth finding
        model.decoder[-1].weight.mul_(4)
    return model


def binary_images(n: int = 20, seed: int = 0) -> torch.Tensor:
    """Pixels of 0 or 255, so that binarization is deterministic."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, *SHAPE, generator=g) < 0.5).to(torch.uint8) * 255


def exact_log_px(model, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log int p(x|z) N(z; 0, 1) dz for a 1-D latent, on a fine grid."""
    z = torch.linspace(-12, 12, 24001, dtype=torch.float64).unsqueeze(-1)  # (G, 1)
    with torch.no_grad():
        log_joint = bernoulli_log_likelihood(x, model.decode(z).unsqueeze(1)) \
            + log_standard_normal(z).unsqueeze(1)                         # (G, N)
    dz = (z[1] - z[0]).item()
    return torch.logsumexp(log_joint, dim=0) + math.log(dz)


def test_importance_sampled_log_px_agrees_with_exact_quadrature():
    model = small_model()
    images = binary_images()
    exact_nll = -exact_log_px(model, images.double() / 255).mean().item()
    r = importance_sampled(model.float(), images, k=5000, progress=False)
    assert r["nll_se"] < 0.05
    assert abs(r["nll"] - exact_nll) < 4 * r["nll_se"] + 1e-3, (r["nll"], exact_nll, r["nll_se"])


def test_iwae_bounds_tighten_with_k_and_stay_above_the_exact_nll():
    model = small_model()
    images = binary_images()
    exact_nll = -exact_log_px(model, images.double() / 255).mean().item()
    r = importance_sampled(model.float(), images, k=5000, progress=False)
    neg = [r["iwae"][k] for k in ("1", "5", "50")]
    assert neg[0] > neg[1] > neg[2] > exact_nll - 1e-3
    assert neg[0] - exact_nll > 0.05  # the ELBO is a strictly looser bound


def test_the_estimate_with_large_k_is_several_standard_errors_tighter_than_the_elbo():
    r = importance_sampled(small_model().float(), binary_images(), k=2000, progress=False)
    assert r["neg_elbo"] - r["nll"] > 10 * r["nll_se"]


def test_chunked_evaluation_gives_the_same_estimate_as_unchunked():
    model, images = small_model().float(), binary_images(30)
    a = importance_sampled(model, images, k=1000, chunk=50, batch_size=30, progress=False)
    b = importance_sampled(model, images, k=1000, chunk=1000, batch_size=30, progress=False)
    for key in ("nll", "nll_se", "neg_elbo"):
        assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-9)
    assert a["iwae"] == pytest.approx(b["iwae"], rel=1e-9)


def test_per_image_values_of_a_shorter_test_set_are_bitwise_those_of_the_whole():
    model = small_model(z_dim=2).float()
    images = torch.randint(0, 256, (130, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    whole = importance_sampled(model, images, k=120, progress=False)  # 3 image tiles, the last padded
    first = importance_sampled(model, images[:57], k=120, chunk=100, batch_size=100, progress=False)
    assert whole["log_px"].dtype == np.float64 and whole["log_px"].shape == (130,)
    assert np.array_equal(first["log_px"], whole["log_px"][:57])
    again = importance_sampled(model, images, k=120, chunk=250, batch_size=150, progress=False)
    assert np.array_equal(again["log_px"], whole["log_px"])


def test_the_fingerprint_tells_test_sets_apart():
    model, images = small_model().float(), binary_images(20)
    a = importance_sampled(model, images, k=50, progress=False)
    b = importance_sampled(model, images[:19], k=50, progress=False)
    c = importance_sampled(model, 255 - images, k=50, progress=False)
    assert len({a["test_set_sha256"], b["test_set_sha256"], c["test_set_sha256"]}) == 3


def test_compare_pairs_the_per_image_values():
    record = {"k": 10, "seed": 1, "precision": "fp32", "test_set_sha256": "x", "nll": 5.0, "nll_se": 0.01}
    a = np.array([-1.0, -2.0, -3.0, -4.0])
    b = a - np.array([0.1, 0.3, 0.2, 0.2])  # b's NLL is higher by 0.2 on average
    r = compare(record, a, {**record, "nll": 5.2}, b)
    assert r["difference"] == pytest.approx(-0.2)
    assert r["se"] == pytest.approx(np.std([0.1, 0.3, 0.2, 0.2], ddof=1) / 2)
    assert r["images"] == 4


@pytest.mark.parametrize("key", ["seed", "test_set_sha256"])
def test_compare_refuses_evaluations_that_differ_in_what_fixes_them(key):
    record = {"k": 10, "seed": 1, "precision": "fp32", "test_set_sha256": "x", "nll": 5.0, "nll_se": 0.01}
    with pytest.raises(VaelabError, match="evaluated with different"):
        compare(record, np.zeros(3), {**record, key: "other"}, np.zeros(3))


def test_compare_pairs_estimates_with_different_k_and_names_them():
    record = {"k": 10, "seed": 1, "precision": "fp32", "test_set_sha256": "x", "nll": 5.0, "nll_se": 0.01}
    r = compare(record, np.zeros(3), {**record, "k": 5000}, np.ones(3))
    assert r["ks"] == (10, 5000) and r["difference"] == pytest.approx(1.0)
    assert compare(record, np.zeros(3), record, np.zeros(3))["ks"] is None


def test_compare_pairs_evaluations_at_two_precisions_and_names_them():
    record = {"k": 10, "seed": 1, "precision": "fp32", "test_set_sha256": "x", "nll": 5.0, "nll_se": 0.01}
    r = compare(record, np.zeros(3), {**record, "precision": "bf16"}, np.zeros(3))
    assert r["precisions"] == ("fp32", "bf16") and compare(record, np.zeros(3), record, np.zeros(3))["precisions"] is None


def test_two_evaluations_of_one_model_agree_exactly():
    model = small_model().float()
    images = torch.randint(0, 256, (25, *SHAPE), dtype=torch.uint8)  # grey levels: binarization is random
    a, b = importance_sampled(model, images, k=200, progress=False), importance_sampled(model, images, k=200,
                                                                                         progress=False)
    assert np.array_equal(a.pop("log_px"), b.pop("log_px"))
    pa, pb = a.pop("per_image"), b.pop("per_image")
    assert all(np.array_equal(pa[key], pb[key]) for key in pa) and a == b


def test_iwae_with_k1_is_the_single_sample_elbo_with_the_same_random_numbers():
    model = small_model(z_dim=3, seed=2)
    x = binary_images(10).double() / 255
    eps = torch.randn(1, 10, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    loss = negative_iwae(model(x, eps))

    mu, logvar = model.encode_observed(x)
    z = reparametrize(mu, logvar, eps)[0]
    log_q = torch.distributions.Normal(mu, torch.exp(logvar / 2)).log_prob(z).sum(-1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    expected = -(bernoulli_log_likelihood(x, model.decode(z)) + log_p - log_q)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)


def test_iwae_with_k1_and_the_elbo_agree_in_expectation():
    model = small_model(z_dim=3, seed=2)
    x = binary_images(10).double() / 255
    x_many = x.repeat(20000, 1, 1, 1)
    noise = lambda seed: torch.randn(1, len(x_many), 3, generator=torch.Generator().manual_seed(seed),
                                     dtype=torch.float64)
    iwae = negative_iwae(model(x_many, noise(0))).view(20000, 10).mean(0)
    elbo = negative_elbo(model(x_many, noise(1))).view(20000, 10).mean(0)
    torch.testing.assert_close(iwae, elbo, atol=0.05, rtol=0)


def test_iwae_objective_is_tighter_than_the_elbo_on_average():
    model = small_model(z_dim=2, seed=3)
    x = binary_images(10).double().repeat(500, 1, 1, 1) / 255
    g = torch.Generator().manual_seed(0)
    eps = lambda k: torch.randn(k, len(x), 2, generator=g, dtype=torch.float64)
    assert negative_iwae(model(x, eps(10))).mean() < negative_iwae(model(x, eps(1))).mean()


def test_a_test_batch_draws_what_the_whole_test_set_draws_for_its_images():
    model = small_model(z_dim=2).float()
    images = torch.randint(0, 256, (7, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    test_set = TestSet(images, seed=5)
    x, eps = test_set.draw(model, samples=3)
    part_x, part_eps = test_set.draw(model, slice(2, 5), samples=2)
    assert torch.equal(part_x, x[2:5]) and torch.equal(part_eps, eps[:2, 2:5])


def test_a_test_pass_holds_at_most_test_rows_images_times_samples_per_call(monkeypatch):
    model = small_model(z_dim=2).float()
    images = torch.randint(0, 256, (23, *SHAPE), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(3))
    test_set = TestSet(images, seed=0)
    whole = mean_loss(model, test_set, "iwae", samples=10)
    calls, forward = [], model.forward

    def counted(x, eps, **kw):
        calls.append(eps.shape[:2])  # (samples, images)
        return forward(x, eps, **kw)

    monkeypatch.setattr(model, "forward", counted)
    monkeypatch.setattr(sampling, "TEST_ROWS", 40)
    assert mean_loss(model, test_set, "iwae", samples=10) == pytest.approx(whole, rel=1e-6)
    assert max(s * n for s, n in calls) <= 40 and sum(n for _, n in calls) == 23


def test_mean_negative_elbo_uses_the_analytic_kl():
    model = small_model(z_dim=2).float()
    images = torch.randint(0, 256, (5, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    test_set = TestSet(images, seed=0)
    value = mean_loss(model, test_set, "elbo", samples=1)

    x, eps = test_set.draw(model)  # the same draws
    mu, logvar = model.encode_observed(x)
    z = reparametrize(mu, logvar, eps)[0]
    log_lik = bernoulli_log_likelihood(x, model.decode(z))
    analytic = (kl_normal(mu, logvar) - log_lik).mean().item()
    sampled = (log_normal_from_eps((z - mu) / torch.exp(logvar / 2), logvar) - log_standard_normal(z)
               - log_lik).mean().item()
    assert value == pytest.approx(analytic, rel=1e-6)
    assert abs(sampled - analytic) > 1e-3  # the two KL estimates differ here, so the check above means something


def test_iwae_bounds_must_fit_the_noise_blocks():
    with pytest.raises(ValueError, match="divides 50 or is a multiple of it"):
        importance_sampled(small_model().float(), binary_images(5), k=100, iwae_ks=(1, 70), progress=False)


def test_bf16_decoding_moves_the_estimate_by_far_less_than_its_error():
    model = small_model(z_dim=2).float()
    images = torch.randint(0, 256, (40, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    fp32 = importance_sampled(model, images, k=500, precision="fp32", progress=False)
    bf16 = importance_sampled(model, images, k=500, precision="bf16", progress=False)
    assert bf16["precision"] == "bf16" and fp32["precision"] == "fp32"
    assert abs(bf16["nll"] - fp32["nll"]) < 0.02
    assert bf16["nll"] != fp32["nll"]  # it really did run in another precision


def test_a_wide_decoder_or_likelihood_takes_a_tiles_samples_in_several_cpu_calls_with_the_same_values(
        monkeypatch):
    from vaelab.models import preset
    from vaelab.sampling import _samples_per_call

    assert _samples_per_call(build_model(preset("tutorial")), 50) == 50  # the MLPs decode a tile at once
    assert _samples_per_call(build_model(preset("conv")), 50) < 50       # the conv preset's layers are wider
    assert _samples_per_call(build_model(preset("tutorial", likelihood="logistic")), 50) < 50  # its temporaries
    model = build_model(preset("conv", image_shape=(1, 8, 8), z_dim=3), seed=0)
    images = torch.randint(0, 256, (60, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    whole = importance_sampled(model, images, k=100, progress=False)
    monkeypatch.setattr(sampling, "CPU_CALL_BYTES", 7 * sampling.TILE_IMAGES * model.decoder.row_floats * 4)
    assert _samples_per_call(model, 50) == 5  # the largest divisor of the tile's samples that fits
    split = importance_sampled(model, images, k=100, progress=False)["log_px"]
    np.testing.assert_allclose(split, whole["log_px"], rtol=1e-6)  # bitwise here; row counts may steer a BLAS


# --- diagnostics ----------------------------------------------------------------------------------

def test_active_units_count_the_dimensions_whose_posterior_mean_varies_over_images():
    model = small_model(z_dim=4).float()
    with torch.no_grad():  # dimensions 3 and 4: a mean that ignores the image
        model.head.weight[2:4].zero_()
    images = binary_images(60)
    r = importance_sampled(model, images, k=50, progress=False)
    mu, _ = model.encode_observed(model.observe(images, torch.arange(len(images))))
    variance = mu.double().var(0)
    assert r["active_units"] == [int((variance > 0.01).sum())] and r["active_units"][0] <= 2
    torch.testing.assert_close(torch.tensor(r["latent_variance"][0], dtype=torch.float64), variance)


def test_the_kl_per_dimension_is_each_dimensions_mean_kl_over_images():
    from torch.distributions import Normal, kl_divergence

    model = small_model(z_dim=3).float()
    images = binary_images(40)
    r = importance_sampled(model, images, k=50, progress=False)
    mu, logvar = model.encode_observed(model.observe(images, torch.arange(len(images))))
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).mean(0)
    torch.testing.assert_close(torch.tensor(r["kl_per_dim"]), expected.double().float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("component, says", [(dict(prior="mog", prior_components=3), "the mog prior"),
                                             (dict(posterior="iaf"), "an IAF posterior")])
def test_the_kl_per_dimension_is_left_out_where_it_is_not_defined_saying_why(component, says):
    config = ModelConfig(image_shape=SHAPE, z_dim=2, encoder_hidden=(16,), decoder_hidden=(16,), **component)
    r = importance_sampled(build_model(config, seed=0), binary_images(10), k=50, progress=False)
    assert "kl_per_dim" not in r and says in r["kl_per_dim_note"]


def test_a_flows_posterior_mean_is_the_mean_of_its_keyed_draws():
    from vaelab.objectives import reparametrize
    from vaelab.rng import image_keys
    from vaelab.sampling import draw_noise

    config = ModelConfig(image_shape=SHAPE, z_dim=2, encoder_hidden=(16,), decoder_hidden=(16,), posterior="iaf")
    model = build_model(config, seed=0)
    images = binary_images(20)
    r = importance_sampled(model, images, k=100, seed=3, progress=False)
    mu, logvar, h = model.posterior_params(model.observe(images, torch.arange(len(images))))
    eps = draw_noise(image_keys(3, "noise", torch.arange(20)), 2, 100)
    z, _ = model.posterior.flow(reparametrize(mu, logvar, eps), h)
    assert "K=100 importance samples" in r["posterior_mean"]
    torch.testing.assert_close(torch.tensor(r["latent_variance"][0], dtype=torch.float64), z.mean(0).double().var(0), rtol=1e-4,
                               atol=1e-7)
