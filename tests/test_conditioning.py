"""Conditioning: a conditional model's labels y reach its networks in training, the test pass,
evaluation, score, encode, the gap and the figures; an unconditional model is never given one.

The toy model's decoder adds a learned embedding of y to its output, and every network records
the y it was called with.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from conftest import synthetic_dataset
from vaelab.config import RunConfig
from vaelab.gap import amortization_gap
from vaelab.models import VAE
from vaelab.plots import reconstruction_images, sample_images
from vaelab.sampling import importance_sampled
from vaelab.score import encode, score
from vaelab.train import build, fit

SHAPE = (1, 8, 8)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh())
        self.embed = nn.Embedding(10, 16)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen.append(y.detach().clone())
        return self.net(x) + self.embed(y)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 64))
        self.embed = nn.Embedding(10, 64)
        self.seen: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen.append(y.detach().clone())
        return self.net(z) + self.embed(y)


class Conditional(VAE):
    conditional = True


def toy() -> Conditional:
    torch.manual_seed(0)
    return Conditional(Encoder(), Decoder(), z_dim=2, image_shape=SHAPE, classes=10)


def seen(model: VAE) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return model.encoder.seen, model.decoder.seen


def clear(model: VAE) -> None:
    for net in (model.encoder, model.decoder):
        net.seen.clear()


def run_config() -> RunConfig:
    return RunConfig(epochs=1, batch_size=20, device="cpu")


@pytest.fixture(scope="module")
def data():
    return synthetic_dataset(n_train=100, n_test=60)


def test_training_steps_read_each_batchs_labels_in_the_epochs_order(data):
    training = build(run_config(), data=data, model=toy(), progress=False)
    step, model = training.step, training.model
    step.begin_epoch(0, 1)
    clear(model)
    step()
    expected = data.train_labels[step.order[:20].cpu()]
    assert torch.equal(model.encoder.seen[0], expected)
    assert torch.equal(model.decoder.seen[0], expected)  # one draw per image: (1, 20) rows


def test_the_test_pass_reads_the_test_labels(data):
    training = build(run_config(), data=data, model=toy(), progress=False)
    model = training.model
    model.train()
    clear(model)
    result = fit(training, progress=False)
    # the epoch's test pass comes after its 5 steps: its calls see the test labels in order
    assert torch.equal(torch.cat(model.encoder.seen[5:]), data.test_labels)
    assert math.isfinite(result.metrics[-1]["test_loss"])


def test_evaluation_and_score_read_each_images_label(data):
    model = toy().eval()
    images, labels = data.test_images[:7], data.test_labels[:7]
    clear(model)
    r = importance_sampled(model, images, k=50, labels=labels, progress=False)
    assert r["nll"] <= r["neg_elbo"]
    first_tile = model.decoder.seen[0].view(-1, 50)[:, :7]  # (samples, padded images)
    assert torch.equal(first_tile, labels.expand(len(first_tile), -1))
    again = score(model, images, k=50, labels=labels)
    assert again["log_px"] == pytest.approx(r["log_px"])
    other = score(model, images, k=50, labels=(labels + 1) % 10)
    assert not (other["log_px"] == pytest.approx(r["log_px"]))


def test_encode_and_the_gap_read_the_labels(data):
    model = toy().eval()
    images, labels = data.test_images[:4], data.test_labels[:4]
    clear(model)
    codes = encode(model, images, labels=labels)
    assert torch.equal(model.encoder.seen[0], labels)
    shifted = encode(model, images, labels=(labels + 1) % 10)
    assert not (codes["mu"] == shifted["mu"]).all()
    gap = amortization_gap(model, images, k=50, steps=3, samples=2, labels=labels,
                           progress=False)
    assert math.isfinite(gap["amortization_gap"]["mean"])


def test_figures_give_a_conditional_model_its_labels(data):
    model = toy().eval()
    clear(model)
    reconstruction_images(model, data.test_images[:3], labels=data.test_labels[:3])
    assert torch.equal(model.decoder.seen[-1], data.test_labels[:3])
    sample_images(model, n=4)
    assert torch.equal(model.decoder.seen[-1], torch.arange(4))
    from vaelab.tensorboard import reconstruction_grid

    reconstruction_grid(model, data.test_images[:3], labels=data.test_labels[:3])
    assert torch.equal(model.decoder.seen[-1], data.test_labels[:3])


def test_a_conditional_model_without_labels_is_refused(data):
    from vaelab.errors import VaelabError

    with pytest.raises(VaelabError, match="conditional"):
        importance_sampled(toy(), data.test_images[:3], k=50, progress=False)
    unlabelled = dataclasses.replace(data, train_labels=None, test_labels=None)
    with pytest.raises(VaelabError, match="labelled images"):
        build(run_config(), data=unlabelled, model=toy(), progress=False)


def test_an_unconditional_model_is_never_given_labels(data):
    from vaelab.models import build_model

    config = toy().config.replace(architecture="mlp", conditional=False, encoder_hidden=(16,),
                                  decoder_hidden=(16,))
    model = build_model(config, seed=0)
    training = build(run_config(), data=data, model=model, progress=False)
    assert training.step.y is None and training.test_set.labels is None
