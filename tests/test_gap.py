"""The amortization gap against a model whose log p(x) and posterior are known exactly: a linear
decoder with orthogonal columns under a Gaussian likelihood whose mean is the decoder's output."""

import json
import math

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal

from conftest import run_vaelab, synthetic_dataset
from vaelab import RunConfig, VAE, train
from vaelab.gap import amortization_gap
from vaelab.likelihoods import Likelihood, normal_log_prob

SHAPE, Z_DIM, SIGMA = (1, 2, 4), 2, 0.3


class IdentityGaussian(Likelihood):
    """x ~ N(out, SIGMA^2 I) on grey levels in [0, 1]: a linear-Gaussian model, solvable exactly."""

    name = "identity-gaussian"

    def observe(self, images, keys=None):
        return images.float() / 255

    def log_prob(self, out, x, workspace=None):
        return normal_log_prob(x, out, math.log(SIGMA))

    def mean(self, out):
        return out


def linear_gaussian(perturb: float = 0.0) -> tuple[VAE, torch.Tensor, torch.Tensor]:
    """The model, with the encoder that gives the exact posterior (its weights moved by `perturb`
    times noise), and the decoder's (W, b)."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, Z_DIM, generator=g))
    w, b = q * torch.tensor([0.8, 0.5]), torch.rand(8, generator=g)  # orthogonal columns
    decoder = nn.Linear(Z_DIM, 8)
    encoder = nn.Flatten()
    model = VAE(encoder, decoder, z_dim=Z_DIM, image_shape=SHAPE, likelihood="gaussian")
    model.likelihood = IdentityGaussian()
    var = 1 / (1 + w.square().sum(0) / SIGMA**2)  # the posterior's variances: diagonal, as W'W is
    with torch.no_grad():
        decoder.weight.copy_(w)
        decoder.bias.copy_(b)
        model.head.weight.zero_()
        model.head.weight[:Z_DIM] = var[:, None] * w.T / SIGMA**2
        model.head.bias[:Z_DIM] = -(var[:, None] * w.T / SIGMA**2) @ b
        model.head.bias[Z_DIM:] = var.log()
        model.head.weight.add_(perturb * torch.randn(model.head.weight.shape, generator=g))
    return model, w, b


def exact_log_px(images: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x = images.flatten(1).double() / 255
    covariance = (w @ w.T).double() + SIGMA**2 * torch.eye(8, dtype=torch.float64)
    return MultivariateNormal(b.double(), covariance).log_prob(x)


def images(n: int = 100) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, *SHAPE), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )


def test_the_exact_encoder_has_no_gap_and_log_px_is_the_closed_form():
    model, w, b = linear_gaussian()
    r = amortization_gap(model, images(), k=100, steps=50, progress=False)
    assert r["log_px"]["mean"] == pytest.approx(
        exact_log_px(images(), w, b).mean().item(), abs=1e-3
    )
    assert abs(r["amortization_gap"]["mean"]) < 1e-3 and abs(r["approximation_gap"]["mean"]) < 1e-3


@pytest.mark.slow
def test_a_perturbed_encoder_has_an_amortization_gap_and_the_fit_closes_the_approximation_gap():
    model, w, b = linear_gaussian(perturb=0.5)
    r = amortization_gap(model, images(), k=1000, steps=400, progress=False)
    gap, approx = r["amortization_gap"], r["approximation_gap"]
    assert gap["mean"] > 10 * gap["se"] and gap["mean"] > 0.05
    assert (
        abs(approx["mean"]) < 4 * approx["se"] + 1e-3
    ), approx  # the family holds the true posterior
    assert r["log_px"]["mean"] == pytest.approx(
        exact_log_px(images(), w, b).mean().item(), abs=1e-3
    )
    assert r["fit"]["rise_over_last_tenth"] < 0.01  # the fixed budget sufficed


def test_each_images_fit_is_its_own_so_a_subset_gives_the_same_posteriors():
    from vaelab.gap import fit_posteriors

    model, _, _ = linear_gaussian(perturb=0.5)
    x = model.observe(images(), None)
    index = torch.arange(len(x))
    whole, _ = fit_posteriors(model, x, index, steps=20, samples=5, lr=1e-2, seed=0)
    part, _ = fit_posteriors(model, x[1::3], index[1::3], steps=20, samples=5, lr=1e-2, seed=0)
    for a, b in zip(whole, part):
        torch.testing.assert_close(a[1::3], b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def gapped(tmp_path_factory):
    """A tiny tutorial run on 8x8 synthetic images, and what `vaelab gap` did with it."""
    from conftest import write_idx_dir

    root = tmp_path_factory.mktemp("gap")
    config = RunConfig(
        epochs=1,
        batch_size=50,
        device="cpu",
        model=RunConfig().model.replace(image_shape=(1, 8, 8)),
    )
    result = train(config, root / "run", synthetic_dataset(), progress=False)
    data = write_idx_dir(root / "data", synthetic_dataset())
    args = ["--images", 20, "--k", 50, "--steps", 10, "--data-dir", data]
    return root / "run", result.model, run_vaelab("gap", root / "run", *args)


def test_vaelab_gap_writes_gap_json_and_prints_both_gaps(gapped):
    run, _, done = gapped
    assert done.returncode == 0, done.stderr
    assert "approximation gap" in done.stdout and "amortization gap" in done.stdout
    r = json.loads((run / "gap.json").read_text())
    assert r["images"] == 20 and r["fit"]["steps"] == 10


@pytest.mark.parametrize(
    "args, says",
    [(["--images", "0"], "--images"), (["--steps", "-1"], "--steps"), (["--lr", "0"], "--lr")],
)
def test_bad_values_are_refused_in_one_line(tmp_path, args, says):
    done = run_vaelab("gap", tmp_path, *args)
    assert (
        done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1
    )


def test_the_report_shows_the_gaps(gapped):
    from vaelab.report import build_report

    run, model, _ = gapped
    page = build_report(run, model)
    assert "Approximation and amortization gaps" in page and "amortization gap, L[q*] - L[q]" in page


def test_a_rerun_gives_the_same_numbers():
    model, _, _ = linear_gaussian(perturb=0.5)
    a, b = (amortization_gap(model, images(30), k=50, steps=10, progress=False) for _ in range(2))
    assert a == b
