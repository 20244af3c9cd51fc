"""The likelihood objects: what the model sees of an image, and log p(x|z)."""

import math

import pytest
import torch
import torch.nn.functional as F

from vaelab import rng
from vaelab.likelihoods import Bernoulli, Gaussian, make, softplus_sum


def keys(n: int, seed: int = 0) -> torch.Tensor:
    return rng.row_keys(rng.key(seed, "test"), torch.arange(n))


def test_binarization_draws_each_pixel_from_bernoulli_of_its_intensity():
    n = 40_000
    levels = torch.arange(256, dtype=torch.uint8).repeat(n, 1).view(n, 1, 16, 16)
    x = Bernoulli().observe(levels, keys(n)).view(n, 256)
    assert x.dtype == torch.float32 and set(x.unique().tolist()) <= {0.0, 1.0}
    p = torch.arange(256, dtype=torch.float64) / 255
    se = (p * (1 - p) / n).sqrt()
    z = (x.double().mean(0) - p)[1:-1] / se[1:-1]
    assert z.abs().max() < 5, f"a grey level's frequency is {z.abs().max():.1f} standard errors off"
    assert x[:, 0].max() == 0 and x[:, 255].min() == 1  # exact at both ends


def test_binarization_handles_any_number_of_pixels():
    images = torch.full((3, 1, 1, 7), 255, dtype=torch.uint8)  # 7 pixels: not a whole number of draws
    assert torch.equal(Bernoulli().observe(images, keys(3)), torch.ones(3, 1, 1, 7))


def test_binarization_is_a_function_of_the_keys():
    images = torch.randint(0, 256, (10, 1, 5, 6), dtype=torch.uint8)
    a, b = Bernoulli().observe(images, keys(10)), Bernoulli().observe(images, keys(10))
    assert torch.equal(a, b)
    assert not torch.equal(a, Bernoulli().observe(images, keys(10, seed=1)))
    assert torch.equal(a[4:7], Bernoulli().observe(images[4:7], keys(10)[4:7]))  # by slice


def test_binarization_needs_keys():
    with pytest.raises(ValueError, match="needs one key per image"):
        Bernoulli().observe(torch.zeros(2, 1, 2, 2, dtype=torch.uint8))


def test_gaussian_observes_grey_levels_in_the_unit_interval():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    torch.testing.assert_close(Gaussian(0.1).observe(images), torch.tensor([0.0, 0.2, 1.0]).view(1, 1, 1, 3))


def test_bernoulli_log_prob_matches_bce_with_logits():
    logits = torch.randn(3, 4, 1, 2, 5, dtype=torch.float64) * 5
    x = (torch.rand(4, 1, 2, 5) < 0.5).double()
    expected = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum((-1, -2, -3))
    torch.testing.assert_close(Bernoulli().log_prob(logits, x), expected)


def test_bernoulli_log_prob_is_stable_for_large_logits():
    logits = torch.tensor([[200.0, -200.0]]).view(1, 1, 1, 2)
    x = torch.tensor([[1.0, 0.0]]).view(1, 1, 1, 2)
    assert Bernoulli().log_prob(logits, x).item() == pytest.approx(0.0, abs=1e-6)


def test_the_fast_softplus_sum_agrees_with_softplus():
    logits = torch.randn(7, 784) * 6
    torch.testing.assert_close(softplus_sum(logits), F.softplus(logits.double()).sum(-1).float(), rtol=1e-6, atol=1e-3)


def test_gaussian_log_prob_is_the_normal_density_around_the_sigmoid_mean():
    out = torch.randn(2, 3, 1, 2, 2, dtype=torch.float64)
    x = torch.rand(3, 1, 2, 2, dtype=torch.float64)
    expected = torch.distributions.Normal(torch.sigmoid(out), 0.3).log_prob(x).sum((-1, -2, -3))
    torch.testing.assert_close(Gaussian(0.3).log_prob(out, x), expected)


def test_mean_is_the_sigmoid_of_the_output():
    out = torch.randn(2, 1, 3, 3)
    for likelihood in (Bernoulli(), Gaussian(0.1)):
        torch.testing.assert_close(likelihood.mean(out), torch.sigmoid(out))


def test_an_unknown_likelihood_or_sigma_is_refused_in_one_line():
    from vaelab.errors import VaelabError

    with pytest.raises(VaelabError, match="unknown likelihood 'poisson'"):
        make("poisson")
    with pytest.raises(VaelabError, match="--sigma must be a positive number"):
        make("gaussian", sigma=-1.0)
    assert make("gaussian", 0.5).sigma == 0.5 and math.isclose(make("gaussian").sigma, 0.1)


def test_a_likelihood_registered_later_is_made_by_name(monkeypatch):
    from vaelab.likelihoods import LIKELIHOODS

    class Sharp(Bernoulli):
        pass

    monkeypatch.setitem(LIKELIHOODS, "sharp", Sharp)
    assert type(make("sharp", sigma=0.5)) is Sharp and list(LIKELIHOODS)[-1] == "sharp"


@pytest.mark.parametrize("mean,log_scale", [(0.0, -2.0), (3.0, -5.0), (-4.0, -7.0), (0.5, 1.0), (8.0, -9.0)])
def test_the_discretized_logistic_gives_the_256_levels_probabilities_that_sum_to_one(mean, log_scale):
    from vaelab.likelihoods import DiscretizedLogistic

    out = torch.tensor([mean, log_scale]).view(2, 1, 1).expand(256, 2, 1, 1)
    levels = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1)
    log_p = DiscretizedLogistic().log_prob(out, DiscretizedLogistic().observe(levels))
    assert torch.isfinite(log_p).all()
    assert log_p.double().exp().sum().item() == pytest.approx(1.0, abs=1e-5)


def test_the_discretized_logistic_is_the_logistic_cdf_over_each_bin():
    from vaelab.likelihoods import DiscretizedLogistic

    mu, s = 0.3, 0.05
    out = torch.tensor([math.log(mu / (1 - mu)), math.log(s)], dtype=torch.float64).view(2, 1, 1)
    cdf = lambda v: 1 / (1 + math.exp(-(v - mu) / s))
    for k in (0, 1, 77, 254, 255):
        x = torch.full((1, 1, 1, 1), k / 255, dtype=torch.float64)
        upper = 1.0 if k == 255 else cdf((k + 0.5) / 255)
        lower = 0.0 if k == 0 else cdf((k - 0.5) / 255)
        assert DiscretizedLogistic().log_prob(out.unsqueeze(0), x).item() == pytest.approx(math.log(upper - lower))
    mean = DiscretizedLogistic().mean(out.unsqueeze(0))
    assert mean.shape == (1, 1, 1, 1) and mean.item() == pytest.approx(mu)


def test_the_discretized_logistic_in_float32_keeps_every_bins_log_mass_of_float64():
    from vaelab.likelihoods import DiscretizedLogistic

    grid = torch.cartesian_prod(torch.linspace(-9, 9, 19), torch.linspace(-7, 3, 11))  # mean logit, log-scale
    out = grid.view(-1, 1, 2, 1, 1).expand(-1, 256, 2, 1, 1)  # (S, 256, 2C, 1, 1): every level under each
    x = DiscretizedLogistic().observe(torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1))
    log_p32 = DiscretizedLogistic().log_prob(out, x).double()
    log_p64 = DiscretizedLogistic().log_prob(out.double(), x.double())
    assert torch.isfinite(log_p32).all()
    assert ((log_p32 - log_p64).abs() / log_p64.abs().clamp(min=1)).max() < 3e-4


def test_the_learned_gaussian_is_the_normal_density_with_the_decoders_sigma():
    from vaelab.likelihoods import GaussianLearned

    out = torch.randn(3, 4, 2, 2, 2, dtype=torch.float64)  # (S, N, 2C, H, W), C = 1
    x = torch.rand(4, 1, 2, 2, dtype=torch.float64)
    expected = torch.distributions.Normal(torch.sigmoid(out[:, :, :1]), out[:, :, 1:].exp()).log_prob(x)
    torch.testing.assert_close(GaussianLearned().log_prob(out, x), expected.sum((-1, -2, -3)))
    assert GaussianLearned().mean(out).shape == (3, 4, 1, 2, 2)


def test_the_learned_gaussian_sees_dequantized_grey_levels_inside_their_bins():
    from vaelab.likelihoods import GaussianLearned

    levels = torch.arange(256, dtype=torch.uint8).repeat(50, 1).view(50, 1, 16, 16)
    x = GaussianLearned().observe(levels, keys(50)).view(50, 256)
    k = torch.arange(256, dtype=torch.float32)
    assert ((x >= k / 256) & (x < (k + 1) / 256)).all()
    assert x.std(0).min() > 0  # noise, not the level itself
    assert torch.equal(x.view(50, 1, 16, 16), GaussianLearned().observe(levels, keys(50)))  # keyed


@pytest.mark.parametrize("name", ["bernoulli", "gaussian", "gaussian-learned", "logistic"])
def test_the_output_bias_puts_each_likelihoods_mean_at_the_pixels_mean(name):
    likelihood = make(name)
    mean = torch.tensor([[[0.0, 0.2], [0.5, 1.0]]])
    std = torch.tensor([[[0.0, 0.1], [0.3, 0.0]]])
    out = likelihood.output_bias(mean, std)
    assert out.shape == (likelihood.channels, 2, 2)
    torch.testing.assert_close(likelihood.mean(out), mean.clamp(1e-3, 1 - 1e-3))


def test_the_logistics_starting_scale_has_the_pixels_spread_floored_at_one_grey_level():
    out = make("logistic").output_bias(torch.full((1, 1, 2), 0.5), torch.tensor([[[0.3, 0.0]]]))
    std = out[1].exp() * math.pi / math.sqrt(3)  # a logistic's standard deviation from its scale
    torch.testing.assert_close(std, torch.tensor([[0.3, 1 / 255]]))


# --- the mixture of discretized logistics (PixelCNN++) ------------------------------------------

def _mixture_out(k: int, c: int, seed: int = 0, coupled: bool = True) -> torch.Tensor:
    likelihood = make("logistic-mixture")
    likelihood.k = k
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(1, likelihood.out_channels(c), 1, 1, generator=g)
    if not coupled:
        out[:, k + 2 * c * k:] = 0
    return likelihood, out


def test_the_mixtures_probabilities_of_a_grey_pixels_256_levels_sum_to_one():
    likelihood, out = _mixture_out(k=4, c=1)
    x = (torch.arange(256, dtype=torch.float32) / 255).view(256, 1, 1, 1)
    total = torch.logsumexp(likelihood.log_prob(out, x), 0)
    assert abs(total.item()) < 1e-5


@pytest.mark.slow
def test_the_mixtures_probabilities_of_an_rgb_pixels_256_cubed_colours_sum_to_one():
    likelihood, out = _mixture_out(k=2, c=3, seed=1)
    levels = torch.arange(256, dtype=torch.float32) / 255
    gb = torch.cartesian_prod(levels, levels)                           # (65536, 2)
    totals = []
    for r in levels:  # one red level at a time: 65,536 colours
        x = torch.cat([r.expand(len(gb), 1), gb], 1).view(-1, 3, 1, 1)
        totals.append(torch.logsumexp(likelihood.log_prob(out, x).double(), 0))
    assert abs(torch.logsumexp(torch.stack(totals), 0).item()) < 1e-4


@pytest.mark.parametrize("c", [1, 3])
def test_one_component_without_coupling_is_the_discretized_logistic(c):
    likelihood, out = _mixture_out(k=1, c=c, seed=2, coupled=False)
    out = out.expand(5, -1, 4, 4).contiguous()
    x = torch.randint(0, 256, (5, c, 4, 4)).float() / 255
    single = make("logistic").log_prob(out[:, 1:1 + 2 * c], x)
    torch.testing.assert_close(likelihood.log_prob(out, x), single)


def test_the_mixtures_mean_is_its_weighted_component_means_with_the_coupling():
    likelihood, out = _mixture_out(k=3, c=3, seed=3)
    log_pi, m, _, a = likelihood._split(out, 3)
    pi, mu = log_pi.exp()[0, :, 0, 0], torch.sigmoid(m)[0, :, :, 0, 0]   # (K,), (C, K)
    a = a[0, :, :, 0, 0]                                                 # (pairs, K)
    red = mu[0]
    green = mu[1] + a[0] * red
    blue = mu[2] + a[1] * red + a[2] * green
    expected = torch.stack([(pi * v).sum() for v in (red, green, blue)]).clamp(0, 1)
    torch.testing.assert_close(likelihood.mean(out)[0, :, 0, 0], expected)


@pytest.mark.parametrize("preset", ["tutorial", "conv"])
def test_a_logistic_mixture_model_trains_evaluates_in_bits_samples_and_reports(tmp_path, preset):
    from conftest import train_evaluate_sample_report

    extra = ["--conv-channels", "4,8"] if preset == "conv" else []
    run, r = train_evaluate_sample_report(tmp_path, "--preset", preset, "--likelihood",
                                          "logistic-mixture", "--mixture-components", 3, *extra)
    assert r["bits_per_dim"] == pytest.approx(r["nll"] / (64 * math.log(2)))
    assert "logistic" in (run / "report.html").read_text()
