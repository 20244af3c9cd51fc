import math

import pytest
import torch

from conftest import synthetic_dataset
from vaelab import RunConfig, train
from vaelab.evaluate import mean_negative_elbo
from vaelab.models import ModelConfig, build_model
from vaelab.runs import read_metrics
from vaelab.train import PlainSGD, TrainingDiverged


def tiny_config(**overrides) -> RunConfig:
    model = ModelConfig(z_dim=2, encoder_hidden=(16,), decoder_hidden=(16,))
    return RunConfig(**{"model": model, "epochs": 2, "batch_size": 50, **overrides})


@pytest.mark.slow
def test_short_training_on_real_mnist_lowers_the_test_negative_elbo(mnist):
    config = RunConfig(epochs=3, train_size=6000, test_size=1000)
    data = mnist.subset(6000, 1000)
    untrained = mean_negative_elbo(build_model(config.model, seed=config.seed), data.test_images,
                                   seed=config.eval_seed)
    result = train(config, data=mnist, progress=False)
    losses = [m["test_loss"] for m in result.metrics]
    assert losses[-1] < losses[0] < untrained
    assert losses[-1] < 0.5 * untrained  # from ~545 nats to well under 270


def test_metrics_have_one_record_per_epoch_with_the_documented_keys(tmp_path):
    result = train(tiny_config(epochs=3), tmp_path, synthetic_dataset(), progress=False)
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3]
    for m in result.metrics:
        assert {"epoch", "train_loss", "test_loss", "seconds"} <= set(m)
        assert math.isfinite(m["train_loss"]) and math.isfinite(m["test_loss"]) and m["seconds"] > 0
    assert read_metrics(tmp_path) == result.metrics


def test_a_cpu_run_is_repeatable_for_a_seed():
    a = train(tiny_config(), data=synthetic_dataset(), progress=False)
    b = train(tiny_config(), data=synthetic_dataset(), progress=False)
    c = train(tiny_config(seed=1), data=synthetic_dataset(), progress=False)
    assert [m["test_loss"] for m in a.metrics] == [m["test_loss"] for m in b.metrics]
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert a.metrics[-1]["test_loss"] != c.metrics[-1]["test_loss"]


@pytest.mark.parametrize("overrides", [dict(optimizer="adam", lr=1e-3), dict(samples=3),
                                       dict(model=ModelConfig(z_dim=3, encoder_hidden=(16,), decoder_hidden=(16,),
                                                              likelihood="gaussian", sigma=0.3))])
def test_the_other_recipes_train(overrides):
    result = train(tiny_config(**overrides), data=synthetic_dataset(), progress=False)
    assert all(math.isfinite(m["test_loss"]) for m in result.metrics)


def test_a_diverging_run_stops_with_a_message_naming_the_epoch():
    with pytest.raises(TrainingDiverged, match="epoch 1.*lower the learning rate"):
        train(tiny_config(lr=1e6), data=synthetic_dataset(), progress=False)


def test_batch_larger_than_the_training_set_is_refused():
    with pytest.raises(Exception, match="larger than the 300 training images"):
        train(tiny_config(batch_size=500), data=synthetic_dataset(), progress=False)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_manual_and_autograd_backward_train_the_same_model(optimizer):
    lr = 5e-3 if optimizer == "sgd" else 1e-3
    # torch kernels: the native ones draw other random pixels (tests/test_native.py compares those)
    runs = [train(tiny_config(backward=b, optimizer=optimizer, lr=lr, kernels="torch"), data=synthetic_dataset(),
                  progress=False) for b in ("manual", "autograd")]
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert runs[0].metrics[-1]["test_loss"] == pytest.approx(runs[1].metrics[-1]["test_loss"], rel=1e-5)


def test_manual_backward_refuses_an_activation_it_cannot_differentiate():
    config = tiny_config(backward="manual", model=ModelConfig(z_dim=2, encoder_hidden=(8,), decoder_hidden=(8,),
                                                              activation="elu"))
    with pytest.raises(Exception, match="--backward manual does not support the elu"):
        train(config, data=synthetic_dataset(), progress=False)


def test_iwae_objective_trains_and_reports_its_test_bound():
    result = train(tiny_config(objective="iwae", k=5), data=synthetic_dataset(), progress=False)
    for m in result.metrics:
        assert math.isfinite(m["test_iwae"]) and m["test_iwae"] < m["test_loss"]


def test_manual_backward_refuses_the_iwae_objective():
    with pytest.raises(Exception, match="does not support the iwae objective"):
        train(tiny_config(objective="iwae", backward="manual"), data=synthetic_dataset(), progress=False)


def test_burda_schedule_lowers_the_rate_by_10_to_the_minus_1_over_7_after_3_to_the_i_epochs():
    config = RunConfig(lr=1e-3, schedule="burda")
    stages = [0] + [1] * 3 + [2] * 9 + [3] * 27
    assert [config.lr_at(e) for e in range(1, 41)] == pytest.approx([1e-3 * 10 ** (-i / 7) for i in stages])
    assert config.lr_at(3280) == pytest.approx(1e-4)
    assert RunConfig(lr=0.1).lr_at(500) == 0.1


def test_the_schedule_reaches_the_fused_sgd_step():
    a = train(tiny_config(epochs=2, schedule="burda"), data=synthetic_dataset(), progress=False)
    b = train(tiny_config(epochs=2), data=synthetic_dataset(), progress=False)
    assert a.metrics[0]["test_loss"] == b.metrics[0]["test_loss"]  # the same first epoch
    assert a.metrics[1]["test_loss"] != b.metrics[1]["test_loss"]   # a lower rate in the second


def test_plain_sgd_steps_like_torch_sgd_and_restores_its_learning_rate():
    a, b = build_model(ModelConfig(), seed=0), build_model(ModelConfig(), seed=0)
    ours, theirs = PlainSGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    x = torch.rand(8, 784)
    for model, opt in ((a, ours), (b, theirs)):
        opt.zero_grad()
        model.encode(x)[0].square().sum().backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    saved = ours.state_dict()
    fresh = PlainSGD(a.parameters(), lr=0.5)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == 0.1
    with pytest.raises(ValueError):
        fresh.load_state_dict(theirs.state_dict() | {"state": {0: {"momentum_buffer": None}}})
