"""The average of the weights (average.py, --ema): its recurrence and warm-up, what uses it, a
skipped update, the checkpoint and resume."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn

from conftest import assert_resumes_bit_for_bit, synthetic_dataset
from vaelab.average import WeightAverage
from vaelab.config import ModelConfig, RunConfig


def test_the_average_follows_its_recurrence_with_the_warm_up():
    net = nn.Linear(3, 2)
    average = WeightAverage(net, rate=0.9)
    expected = [p.detach().clone() for p in net.parameters()]
    g = torch.Generator().manual_seed(0)
    for t in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        average.update()
        d = min(0.9, (1 + t) / (10 + t))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, net.parameters())]
    for got, want in zip(average.tensors, expected):
        torch.testing.assert_close(got, want)
    assert average.updates.item() == 30


def test_applied_swaps_the_average_in_and_the_weights_back():
    net = nn.Linear(3, 2)
    average = WeightAverage(net, rate=0.5)
    own = [p.detach().clone() for p in net.parameters()]
    for t in average.tensors:
        t.fill_(7.0)
    with average.applied():
        assert all(torch.equal(p, torch.full_like(p, 7.0)) for p in net.parameters())
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), own))


def run(**overrides) -> RunConfig:
    fields = dict(model=ModelConfig(image_shape=(1, 8, 8)), epochs=2, batch_size=50,
                  device="cpu", optimizer="adam", lr=1e-3, ema=0.9)
    return RunConfig(**{**fields, **overrides})


def test_a_skipped_update_leaves_the_average_as_it_was():
    from vaelab.train import build

    training = build(run(skip_threshold=1e-9), synthetic_dataset(), progress=False)
    step = training.step
    step.begin_epoch(0, 1)
    step()  # the first step decides on the host, the next ones on the device
    before = [t.clone() for t in training.average.held]
    for _ in range(3):
        step()
        assert bool(step.skipped)
    assert all(torch.equal(a, b) for a, b in zip(training.average.held, before))


def test_the_saved_weights_are_the_average_and_the_checkpoint_holds_both(tmp_path):
    from vaelab import train

    result = train(run(epochs=1), tmp_path / "run", synthetic_dataset(), progress=False)
    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in result.model.state_dict().items())
    checkpoint = load_file(tmp_path / "run" / "checkpoint.safetensors")
    averages = [k for k in checkpoint if k.startswith("average.")]
    assert len(averages) == len(list(result.model.parameters())) + 1  # and the count of updates
    own = [checkpoint[f"model.{k}"] for k, _ in result.model.named_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(own, result.model.parameters()))


def test_a_run_with_an_average_resumes_bit_for_bit(tmp_path):
    assert_resumes_bit_for_bit(tmp_path, lambda epochs: run(epochs=epochs))
