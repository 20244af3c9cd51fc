"""The closed-form KL registry (kl.py): by (posterior, prior) pair, found through the classes'
MROs, and None where a pair has none."""

from __future__ import annotations

import torch
from torch.distributions import Independent, Normal, kl_divergence

from vaelab import kl, posteriors, priors


def test_the_gaussian_and_standard_normal_pair_is_torch_distributions_kl_per_dimension():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    fn = kl.closed_form(posteriors.Gaussian(3), priors.StandardNormal(3))
    per_dim = fn(posteriors.Gaussian(3), priors.StandardNormal(3), (mu, logvar))
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    torch.testing.assert_close(per_dim, expected)
    torch.testing.assert_close(per_dim.sum(-1), kl_divergence(
        Independent(Normal(mu, torch.exp(0.5 * logvar)), 1),
        Independent(Normal(torch.zeros(3), torch.ones(3)), 1)))


def test_the_gaussian_and_class_gaussian_pair_is_torch_distributions_kl_at_each_label():
    g = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    prior = priors.ClassGaussian(3, 5)
    with torch.no_grad():
        prior.mu.normal_(generator=g)
        prior.logvar.normal_(generator=g)
    y = torch.tensor([4, 0, 4, 2])
    posterior = posteriors.Gaussian(3)
    per_dim = kl.closed_form(posterior, prior)(posterior, prior, (mu, logvar), None, y)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)),
                             Normal(prior.mu[y], torch.exp(0.5 * prior.logvar[y])))
    torch.testing.assert_close(per_dim, expected)


def test_pairs_without_a_closed_form_have_none():
    assert kl.closed_form(posteriors.IAF(3, 1), priors.StandardNormal(3)) is None
    assert kl.closed_form(posteriors.Gaussian(3), priors.MixtureOfGaussians(3, 4)) is None


def test_a_subclass_uses_its_parents_entry_until_it_registers_its_own():
    class Narrow(posteriors.Gaussian):
        pass

    inherited = kl.closed_form(Narrow(3), priors.StandardNormal(3))
    assert inherited is kl.closed_form(posteriors.Gaussian(3), priors.StandardNormal(3))

    @kl.register_kl(Narrow, priors.StandardNormal)
    def _(posterior, prior, params, components=None, y=None):
        return torch.zeros_like(params[0])

    assert kl.closed_form(Narrow(3), priors.StandardNormal(3)) is _
