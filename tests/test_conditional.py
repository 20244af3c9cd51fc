"""The conditional VAE (models.ConditionalVAE) with vaelab's networks: its classes from the data,
the class prior p(z|y), log p(x|y) against quadrature, the command line's --conditional and
--label, and samples of a class that a classifier recognises."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Normal

from conftest import (assert_refused_in_one_line, assert_resumes_bit_for_bit, run_vaelab,
                      synthetic_dataset, write_idx_dir, write_png_dir)
from benchmarks.lib.digits import classify, digit_classifier, grid_tiles
from test_train import tiny_config
from vaelab.config import ModelConfig, RunConfig
from vaelab.errors import VaelabError
from vaelab.models import ConditionalVAE, VAE, build_model, model_class
from vaelab.plots import class_samples
from vaelab.sampling import importance_sampled
from vaelab.train import build, class_names

THREE = ("cat", "dog", "eel")


def conditional_config(**overrides) -> ModelConfig:
    fields = dict(z_dim=2, encoder_hidden=(16,), decoder_hidden=(16,), image_shape=(1, 8, 8),
                  conditional=True, classes=THREE, prior="per-class")
    return ModelConfig(**{**fields, **overrides})


def labelled(n_train: int = 200, n_test: int = 60, classes: int = 3):
    data = synthetic_dataset(n_train, n_test)
    return dataclasses.replace(data, train_labels=data.train_labels % classes,
                               test_labels=data.test_labels % classes)


def test_a_conditional_config_builds_a_conditional_vae_and_a_plain_one_a_vae():
    assert model_class(conditional_config()) is ConditionalVAE
    assert type(build_model(conditional_config(), seed=0)) is ConditionalVAE
    assert type(build_model(conditional_config(conditional=False, classes=(), prior="standard"),
                            seed=0)) is VAE


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
def test_the_networks_outputs_depend_on_the_label(architecture):
    extra = dict(architecture="conv", conv_channels=(4, 4)) if architecture == "conv" else {}
    model = build_model(conditional_config(**extra), seed=0)
    x = torch.rand(2, 1, 8, 8)
    mu_a = model.encode_observed(x, torch.tensor([0, 0]))[0]
    mu_b = model.encode_observed(x, torch.tensor([1, 2]))[0]
    assert not torch.allclose(mu_a, mu_b)
    z = torch.zeros(2, 2)
    assert not torch.allclose(model.decode(z, y=torch.tensor([0, 0])),
                              model.decode(z, y=torch.tensor([1, 2])))


def test_the_class_prior_is_each_classs_gaussian():
    model = build_model(conditional_config(), seed=0)
    with torch.no_grad():
        model.prior.mu.copy_(torch.tensor([[0.0, 0.0], [3.0, -1.0], [-2.0, 5.0]]))
        model.prior.logvar.copy_(torch.tensor([[0.0, 0.0], [-1.0, 0.5], [1.0, -2.0]]))
    y = torch.tensor([2, 1])
    z = torch.randn(5, 2, 2)
    expected = Normal(model.prior.mu[y], (0.5 * model.prior.logvar[y]).exp()).log_prob(z).sum(-1)
    torch.testing.assert_close(model.prior.log_prob(z, None, y), expected)
    draws = model.sample_prior(4000, torch.Generator().manual_seed(0), torch.full((4000,), 2))
    torch.testing.assert_close(draws.mean(0), torch.tensor([-2.0, 5.0]), atol=0.1, rtol=0)


@torch.no_grad()
def test_log_p_x_given_y_matches_quadrature_on_a_one_dimensional_latent():
    config = conditional_config(z_dim=1, image_shape=(1, 2, 3), encoder_hidden=(8,),
                                decoder_hidden=(8,), activation="tanh")
    model = build_model(config, seed=3).eval()
    with torch.no_grad():  # classes apart in z, so that p(z|y) matters
        model.prior.mu.copy_(torch.tensor([[-1.5], [0.5], [2.0]]))
        model.prior.logvar.copy_(torch.tensor([[0.2], [-0.5], [-1.0]]))
    images = torch.tensor([[0, 255, 0, 255, 255, 0], [255, 255, 255, 0, 0, 0],
                           [0, 0, 255, 0, 255, 255]], dtype=torch.uint8).view(3, 1, 2, 3)
    labels = torch.tensor([0, 2, 1])
    r = importance_sampled(model, images, k=20000, labels=labels, progress=False)
    z = torch.linspace(-12, 12, 48001, dtype=torch.float64)[:, None]  # (G, 1)
    for i in range(3):
        y = labels[i:i + 1].expand(len(z))
        logits = model.decode(z.float(), y=y).double().flatten(1)           # (G, 6)
        log_px_z = Bernoulli(logits=logits).log_prob(images[i].flatten().double() / 255).sum(-1)
        mu, logvar = model.prior.mu[labels[i]].double(), model.prior.logvar[labels[i]].double()
        log_pz = Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
        exact = torch.logsumexp(log_px_z + log_pz, 0) + math.log(z[1, 0] - z[0, 0])
        se = math.sqrt(r["per_image"]["log_px_variance"][i])
        assert abs(r["log_px"][i] - exact.item()) < 4 * se + 1e-3, (i, r["log_px"][i], exact)


def test_the_classes_are_the_datas_names_else_its_numbers():
    data = labelled()
    assert class_names(data) == ("0", "1", "2")
    named = dataclasses.replace(data, label_names=THREE)
    assert class_names(named) == THREE
    with pytest.raises(VaelabError, match="the label 2, but the model knows 2 classes"):
        class_names(data, ("a", "b"))


def test_build_records_the_classes_and_trains_under_the_elbo_and_the_iwae_bound():
    data = labelled()
    for objective in ("elbo", "iwae"):
        config = tiny_config(model=conditional_config(classes=()), objective=objective,
                             optimizer="adam", lr=1e-3)
        training = build(config, data=data, progress=False)
        assert training.config.model.classes == ("0", "1", "2")
        assert type(training.model) is ConditionalVAE and training.step.y is not None


def test_a_conditional_run_resumes_bit_for_bit(tmp_path):
    config = lambda epochs: tiny_config(model=conditional_config(classes=tuple("0123456789")),
                                        epochs=epochs, optimizer="adam", lr=1e-3)
    assert_resumes_bit_for_bit(tmp_path, config)


def test_labels_by_name_or_number_and_the_errors():
    model = build_model(conditional_config(), seed=0)
    assert model.label_number("dog") == 1 and model.label_number("2") == 2
    with pytest.raises(VaelabError, match="unknown label 'fox'"):
        model.label_number("fox")
    with pytest.raises(VaelabError, match="model knows 3 classes"):
        model.checked_labels(torch.tensor([0, 3]))
    with pytest.raises(VaelabError, match="have no labels"):
        model.checked_labels(None)
    plain = build_model(conditional_config(conditional=False, classes=(), prior="standard"))
    with pytest.raises(VaelabError, match="not conditional"):
        plain.label_number(1)


def test_class_samples_give_one_row_per_class():
    images = class_samples(build_model(conditional_config(), seed=0).eval(), samples=4)
    assert images.shape == (3, 4, 8, 8)


@pytest.mark.parametrize("args, says", [
    (["--conditional", "--prior", "vamp"], "--prior vamp does not go with --conditional"),
    (["--prior", "per-class"], "--prior per-class is p(z|y), for a --conditional model"),
    (["--conditional", "--upper-z-dims", "4"], "--conditional does not go with --upper-z-dims"),
])
def test_combinations_that_make_no_sense_are_refused_in_one_line(tmp_path, args, says):
    assert_refused_in_one_line(tmp_path, args, says)


def test_unlabelled_data_is_refused_for_a_conditional_run(tmp_path):
    data = synthetic_dataset(100, 20)
    np.savez(tmp_path / "d.npz", x_train=data.train_images[:, 0].numpy(),
             x_test=data.test_images[:, 0].numpy())
    assert_refused_in_one_line(tmp_path, ["--conditional", "--data-dir", tmp_path / "d.npz"],
                               "trains on labelled images")


def train_cli(tmp_path, data_dir, *extra) -> "Path":
    run = tmp_path / "run"
    done = run_vaelab("train", "--conditional", "--prior", "per-class", "--data-dir", data_dir,
                      "--epochs", 1, "--batch-size", 50, "--optimizer", "adam", "--lr", 1e-3,
                      "--out", run, "--quiet", *extra)
    assert done.returncode == 0, done.stderr
    return run


def test_a_class_folder_names_the_classes_and_sample_takes_a_name(tmp_path):
    data = dataclasses.replace(labelled(), label_names=THREE)
    run = train_cli(tmp_path, write_png_dir(tmp_path / "png", data))
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["classes"] == list(THREE)
    assert (run / "figures" / "classes.png").exists()
    done = run_vaelab("sample", run, "--label", "eel", "-n", 4, "-o", tmp_path / "eel.png")
    assert done.returncode == 0 and "of class eel" in done.stdout, done.stderr
    done = run_vaelab("sample", run, "--label", "fox", "-o", tmp_path / "fox.png")
    assert done.returncode == 2 and "unknown label 'fox'" in done.stderr
    assert not (tmp_path / "fox.png").exists()


def test_an_npz_with_labels_trains_and_evaluate_reports_log_p_x_given_y(tmp_path):
    data = labelled()
    np.savez(tmp_path / "d.npz", x_train=data.train_images[:, 0].numpy(),
             y_train=data.train_labels.numpy(), x_test=data.test_images[:, 0].numpy(),
             y_test=data.test_labels.numpy())
    run = train_cli(tmp_path, tmp_path / "d.npz")
    done = run_vaelab("evaluate", run, "--k", 50)
    assert done.returncode == 0, done.stderr
    assert "test NLL -log p(x|y)" in done.stdout
    assert json.loads((run / "eval.json").read_text())["quantity"] == "log p(x|y)"
    assert run_vaelab("report", run).returncode == 0
    assert "classes.png" in (run / "report.html").read_text()


def test_encode_and_score_take_the_datas_labels_or_one_label(tmp_path):
    data = labelled()
    run = train_cli(tmp_path, write_idx_dir(tmp_path / "idx", data))
    for label in ((), ("--label", "1")):
        out = tmp_path / f"score{len(label)}.npz"
        done = run_vaelab("score", run, "-o", out, "--k", 20, "--images", 6, "--quiet", *label)
        assert done.returncode == 0, done.stderr
    given, one = np.load(tmp_path / "score0.npz"), np.load(tmp_path / "score2.npz")
    assert not np.allclose(given["log_px"], one["log_px"])
    done = run_vaelab("encode", run, "-o", tmp_path / "codes.npz", "--label", "1", "--quiet")
    assert done.returncode == 0, done.stderr


def test_your_own_networks_receive_the_labels_themselves(tmp_path):
    # --8<-- [start:own]
    from torch import nn

    import vaelab
    from vaelab.models import ConditionalVAE

    class Encoder(nn.Module):  # x (N, 1, 8, 8), y (N,) int64 -> features (N, 32)
        def __init__(self, classes: int):
            super().__init__()
            self.image = nn.Sequential(nn.Flatten(), nn.Linear(64, 32))
            self.label = nn.Embedding(classes, 32)

        def forward(self, x, y):
            return torch.relu(self.image(x) + self.label(y))

    class Decoder(nn.Module):  # z (M, 4), y (M,) int64 -> logits (M, 64)
        def __init__(self, classes: int):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4 + 8, 32), nn.ReLU(), nn.Linear(32, 64))
            self.label = nn.Embedding(classes, 8)

        def forward(self, z, y):
            return self.net(torch.cat([z, self.label(y)], dim=-1))

    model = ConditionalVAE(Encoder(10), Decoder(10), z_dim=4, image_shape=(1, 8, 8),
                           classes=10, prior="per-class")
    config = vaelab.RunConfig(epochs=1, batch_size=50, optimizer="adam", lr=1e-3)
    # --8<-- [end:own]
    result = vaelab.train(config, tmp_path / "run", data=synthetic_dataset(), model=model,
                          progress=False)
    again = vaelab.load_run(tmp_path / "run", encoder=Encoder(10), decoder=Decoder(10))
    assert type(again) is ConditionalVAE and again.config.classes == tuple("0123456789")
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(),
                                                  result.model.cpu().parameters()))


@pytest.mark.slow
def test_samples_of_a_class_are_recognised_as_that_class(tmp_path, mnist, mnist_dir):
    """A conditional VAE trained briefly on MNIST draws a 3 where asked for one: a classifier
    trained here labels most of its samples of each class as that class."""
    run = tmp_path / "run"
    done = run_vaelab("train", "--conditional", "--data-dir", mnist_dir, "--epochs", 3,
                      "--optimizer", "adam", "--lr", 1e-3, "--out", run, "--quiet")
    assert done.returncode == 0, done.stderr
    classifier = digit_classifier(mnist)
    for digit in range(10):
        path = tmp_path / f"{digit}.png"
        done = run_vaelab("sample", run, "--label", digit, "-n", 100, "-o", path)
        assert done.returncode == 0, done.stderr
        share = (classify(classifier, grid_tiles(path, 100)) == digit).float().mean().item()
        assert share > 0.5, (digit, share)
