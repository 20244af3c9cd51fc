import itertools
import math

import pytest
import torch

from conftest import run_vaelab, synthetic_dataset, tinted_rgb
import json

from vaelab import RunConfig, train
from vaelab.likelihoods import LIKELIHOODS
from vaelab.models import ModelConfig, build_model
from vaelab.runs import read_metrics
from vaelab.sampling import TestSet, mean_loss
from vaelab.train import TrainingDiverged, build, fit


def tiny_config(**overrides) -> RunConfig:
    model = ModelConfig(z_dim=2, encoder_hidden=(16,), decoder_hidden=(16,), image_shape=(1, 8, 8))
    return RunConfig(**{"model": model, "epochs": 2, "batch_size": 50, "device": "cpu", **overrides})


@pytest.mark.slow
def test_short_training_on_real_mnist_lowers_the_test_negative_elbo(mnist):
    config = RunConfig(epochs=3, train_size=6000, test_size=1000)
    data = mnist.subset(6000, 1000)
    model = build_model(config.model, seed=config.seed)
    untrained = mean_loss(model, TestSet(data.test_images, seed=config.eval_seed))
    result = train(config, data=mnist, progress=False)
    losses = [m["test_loss"] for m in result.metrics]
    assert losses[-1] < losses[0] < untrained
    assert losses[-1] < 0.5 * untrained  # from ~545 nats to well under 270


@pytest.mark.slow  # 16 short trainings
@pytest.mark.parametrize("likelihood,preset,kind",
                         itertools.product(LIKELIHOODS, ("tutorial", "conv"), ("grey", "rgb")))
def test_the_default_options_train_every_likelihood_and_network_on_grey_and_colour(mnist, likelihood,
                                                                                   preset, kind):
    data = mnist.subset(600, 200)  # 6 steps an epoch
    data = tinted_rgb(data) if kind == "rgb" else data
    config = RunConfig(preset=preset, model=ModelConfig(likelihood=likelihood), epochs=5, device="cpu")
    training = build(config, data, progress=False)
    untrained = mean_loss(training.model, training.test_set)
    metrics = fit(training, progress=False).metrics  # a divergence raises TrainingDiverged
    assert len(metrics) * training.step.steps_per_epoch >= 30
    assert metrics[-1]["test_loss"] < untrained


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
                                                              likelihood="gaussian", sigma=0.3)),
                                       dict(model=ModelConfig(z_dim=2, encoder_hidden=(8,), decoder_hidden=(8,),
                                                              activation="elu"))])
def test_the_other_recipes_train(overrides):
    result = train(tiny_config(**overrides), data=synthetic_dataset(), progress=False)
    assert all(math.isfinite(m["test_loss"]) for m in result.metrics)


def test_a_diverging_run_stops_with_a_message_naming_the_epoch():
    with pytest.raises(TrainingDiverged, match="epoch 1.*lower the learning rate"):
        train(tiny_config(lr=1e6), data=synthetic_dataset(), progress=False)


def test_batch_larger_than_the_training_set_is_refused():
    with pytest.raises(Exception, match="larger than the 300 training images"):
        train(tiny_config(batch_size=500), data=synthetic_dataset(), progress=False)


def test_iwae_objective_trains_and_reports_its_test_bound():
    result = train(tiny_config(objective="iwae", k=5), data=synthetic_dataset(), progress=False)
    for m in result.metrics:
        assert math.isfinite(m["test_iwae"]) and m["test_iwae"] < m["test_loss"]


def test_burda_schedule_lowers_the_rate_by_10_to_the_minus_1_over_7_after_3_to_the_i_epochs():
    config = RunConfig(lr=1e-3, schedule="burda")
    stages = [0] + [1] * 3 + [2] * 9 + [3] * 27
    assert [config.lr_at(e) for e in range(1, 41)] == pytest.approx([1e-3 * 10 ** (-i / 7) for i in stages])
    assert config.lr_at(3280) == pytest.approx(1e-4)
    assert RunConfig(lr=0.1).lr_at(500) == 0.1


def test_the_schedule_reaches_the_step():
    a = train(tiny_config(epochs=2, schedule="burda"), data=synthetic_dataset(), progress=False)
    b = train(tiny_config(epochs=2), data=synthetic_dataset(), progress=False)
    assert a.metrics[0]["test_loss"] == b.metrics[0]["test_loss"]  # the same first epoch
    assert a.metrics[1]["test_loss"] != b.metrics[1]["test_loss"]   # a lower rate in the second


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_step_is_torch_optim_with_a_tensor_learning_rate(optimizer):
    training = build(tiny_config(optimizer=optimizer), data=synthetic_dataset(), progress=False)
    kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
    assert type(training.optimizer) is kind
    assert training.optimizer.param_groups[0]["lr"] is training.lr
    if optimizer == "sgd":
        assert training.optimizer.param_groups[0]["momentum"] == 0  # the tutorial's update


def test_plain_sgd_steps_param_minus_lr_times_grad():
    training = build(tiny_config(lr=0.1), data=synthetic_dataset(), progress=False)
    model, step = training.model, training.step
    step.begin_epoch(0, 1)
    before = [p.detach().clone() for p in model.parameters()]
    x, eps = step.draw()
    from vaelab.objectives import negative_elbo
    grads = torch.autograd.grad(negative_elbo(model(x, eps)).mean(), list(model.parameters()))
    step()
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)


def test_build_leaves_the_callers_config_alone_and_resolves_a_copy():
    config = tiny_config(device="auto")
    before = json.dumps(config.to_dict())
    training = build(config, data=synthetic_dataset(shape=(6, 5)), progress=False)
    assert json.dumps(config.to_dict()) == before
    assert training.config.model.image_shape == (1, 6, 5)


def test_an_epochs_draws_depend_only_on_the_seed_and_the_epoch():
    one = build(tiny_config(), data=synthetic_dataset(), progress=False).step
    other = build(tiny_config(), data=synthetic_dataset(), progress=False).step
    one.begin_epoch(0, 1)
    for _ in range(3):
        one()  # training changes the weights, never the draws
    one.begin_epoch(0, 3)
    other.begin_epoch(0, 3)
    for a, b in zip(one.draw(), other.draw()):
        assert torch.equal(a, b)
    other.begin_epoch(0, 2)
    assert not torch.equal(one.draw()[0], other.draw()[0])


def test_a_slice_of_the_batch_draws_what_the_whole_batch_draws():
    whole = build(tiny_config(batch_size=50), data=synthetic_dataset(), progress=False).step
    half = build(tiny_config(batch_size=25), data=synthetic_dataset(), progress=False).step
    whole.begin_epoch(0, 1)
    half.begin_epoch(0, 1)
    x, eps = whole.draw()
    half.positions.add_(half.batch_size)  # its second batch: the second half of the first 50 images
    x_half, eps_half = half.draw()
    assert torch.equal(x[25:], x_half) and torch.equal(eps[:, 25:], eps_half)


def test_a_kl_weight_trains_while_test_loss_stays_the_true_negative_elbo():
    from torch.distributions import Bernoulli, Normal, kl_divergence

    result = train(tiny_config(beta=4.0, kl_warmup=5, epochs=2), data=synthetic_dataset(), progress=False)
    model, data = result.model, result.data
    test_set = TestSet(data.test_images, seed=tiny_config().eval_seed)
    with torch.no_grad():  # by hand, weight 1, from the same pixels and noise
        x, eps = test_set.draw(model)
        x = x.flatten(1)
        h = model.head(model.encoder(x))
        mu, logvar = h.chunk(2, dim=-1)
        q = Normal(mu, torch.exp(logvar / 2))
        z = mu + torch.exp(logvar / 2) * eps[0]
        log_px = Bernoulli(logits=model.decoder(z)).log_prob(x).sum(-1)
        expected = (kl_divergence(q, Normal(0.0, 1.0)).sum(-1) - log_px).mean().item()
    assert result.metrics[-1]["test_loss"] == pytest.approx(expected, rel=1e-5)


def test_the_kl_weight_rises_step_by_step_over_the_warm_up():
    result = train(tiny_config(beta=2.0, kl_warmup=2, epochs=3), data=synthetic_dataset(), progress=False)
    steps = 300 // 50  # per epoch
    expected = [2.0 * (steps - 1) / (2 * steps), 2.0 * (2 * steps - 1) / (2 * steps), 2.0]
    assert [m["kl_weight"] for m in result.metrics] == pytest.approx(expected)
    assert "kl_weight" not in train(tiny_config(epochs=1), data=synthetic_dataset(), progress=False).metrics[0]


def test_the_training_loss_is_the_weighted_objective():
    from vaelab.objectives import negative_elbo

    training = build(tiny_config(beta=0.0), data=synthetic_dataset(), progress=False)
    training.step.begin_epoch(0, 1)
    x, eps = training.step.draw()
    with torch.no_grad():
        terms = training.model(x, eps)
    reconstruction = -terms.log_px_z.mean(0).mean()  # beta 0: no KL at all
    torch.testing.assert_close(training.step(), reconstruction)
    assert negative_elbo(terms).mean() > reconstruction


def test_a_kl_weight_with_the_iwae_bound_is_refused_in_one_line():
    with pytest.raises(Exception, match="--beta, --kl-warmup and --free-bits act on the ELBO's KL term"):
        tiny_config(objective="iwae", beta=2.0).validate()
    with pytest.raises(Exception, match="--beta must be a number >= 0"):
        tiny_config(beta=-1.0).validate()


def test_the_logistic_likelihood_trains_and_evaluates_in_bits_per_dimension():
    from vaelab.sampling import importance_sampled

    config = tiny_config(model=ModelConfig(z_dim=2, encoder_hidden=(16,), decoder_hidden=(16,), likelihood="logistic"),
                         optimizer="adam", lr=1e-3)
    result = train(config, data=synthetic_dataset(), progress=False)
    assert result.model.decode(torch.zeros(1, 2)).shape == (1, 2, 8, 8)  # a mean and a scale per pixel
    r = importance_sampled(result.model, result.data.test_images, k=100, progress=False)
    assert r["bits_per_dim"] == pytest.approx(r["nll"] / (64 * math.log(2)))
    # uniformly random grey levels carry 8 bits each: no model of them can do better on average
    assert 7.5 < r["bits_per_dim"] < 16


def test_the_learned_gaussian_trains():
    config = tiny_config(model=ModelConfig(z_dim=2, encoder_hidden=(16,), decoder_hidden=(16,),
                                           likelihood="gaussian-learned"), optimizer="adam", lr=1e-3)
    result = train(config, data=synthetic_dataset(), progress=False)
    assert all(math.isfinite(m["test_loss"]) for m in result.metrics)
    assert result.metrics[-1]["test_loss"] < result.metrics[0]["test_loss"]


# --- training health -----------------------------------------------------------------------------


def test_each_epoch_records_the_gradient_norms_median_and_maximum_and_the_active_units():
    result = train(tiny_config(), data=synthetic_dataset(), progress=False)
    for m in result.metrics:
        assert 0 < m["grad_norm_median"] <= m["grad_norm_max"] < math.inf
        assert 0 <= m["active_units"] <= 2


def test_free_bits_train_while_test_loss_stays_the_true_negative_elbo():
    config = tiny_config(free_bits=2.0)
    result = train(config, data=synthetic_dataset(), progress=False)
    plain = train(tiny_config(), data=synthetic_dataset(), progress=False)
    test_set = TestSet(result.data.test_images, seed=config.eval_seed)
    assert result.metrics[-1]["test_loss"] == pytest.approx(mean_loss(result.model, test_set), rel=1e-6)
    assert result.metrics[-1]["train_loss"] != plain.metrics[-1]["train_loss"]


def test_an_epoch_that_skips_most_of_its_updates_stops_the_run_in_one_line(tmp_path):
    result = run_vaelab("train", "--skip-threshold", "1e-9", "--data-dir", _synthetic_npz(tmp_path),
                        "--epochs", "2", "--quiet", "--no-plots", "--out", tmp_path / "run")
    assert result.returncode == 2
    line, = result.stderr.strip().splitlines()
    assert "epoch 1 skipped 1 of its 1 updates" in line and "--skip-threshold" in line


def test_the_skipped_updates_are_counted_in_each_epochs_record():
    result = train(tiny_config(skip_threshold=1e9), data=synthetic_dataset(), progress=False)
    assert [m["skipped"] for m in result.metrics] == [0, 0]
    plain = train(tiny_config(), data=synthetic_dataset(), progress=False)
    assert [m["test_loss"] for m in result.metrics] == [m["test_loss"] for m in plain.metrics]


def test_the_health_options_resume_bit_for_bit(tmp_path):
    from conftest import assert_resumes_bit_for_bit

    assert_resumes_bit_for_bit(tmp_path, lambda epochs: tiny_config(
        epochs=epochs, optimizer="adam", lr=1e-2, free_bits=0.5, grad_clip=20.0, skip_threshold=40.0))


class _FailingDecoder(torch.nn.Module):
    """A decoder whose output turns NaN from its `after`-th call in training mode."""

    def __init__(self, after: int):
        super().__init__()
        self.net = torch.nn.Linear(2, 64)
        self.after, self.calls = after, 0

    def forward(self, z):
        out = self.net(z)
        if self.training:
            self.calls += 1
            if self.calls >= self.after:
                return out * float("nan")
        return out


def test_a_non_finite_decoder_output_is_named_in_the_divergence_error(tmp_path):
    from vaelab.models import VAE

    model = VAE(torch.nn.Flatten(), _FailingDecoder(after=9), z_dim=2, image_shape=(1, 8, 8))
    with pytest.raises(TrainingDiverged) as error:  # 6 steps an epoch: the 9th call is in epoch 2
        train(RunConfig(epochs=2, batch_size=50, device="cpu"), tmp_path / "run", synthetic_dataset(),
              progress=False, model=model)
    message = str(error.value)
    assert "epoch 2" in message and "the output of decoder (_FailingDecoder)" in message and "nan" in message
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()  # epoch 1's, kept


def test_a_collapsed_posterior_is_named_in_one_warning_line(capsys):
    train(tiny_config(beta=50.0, epochs=3, optimizer="adam", lr=1e-2), data=synthetic_dataset())
    warnings = [line for line in capsys.readouterr().err.splitlines() if "collapsed" in line]
    assert len(warnings) == 1 and "--free-bits" in warnings[0] and "--kl-warmup" in warnings[0]


def _synthetic_npz(tmp_path) -> str:
    import numpy as np

    data = synthetic_dataset(n_train=100, n_test=50)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=data.train_images.numpy()[:, 0], x_test=data.test_images.numpy()[:, 0])
    return str(path)


@pytest.mark.slow
def test_one_epoch_of_burda1_keeps_most_decoder_tanh_units_unsaturated(mnist):
    result = train(RunConfig(preset="burda1", train_size=6000, epochs=1, device="cpu"), data=mnist,
                   progress=False)
    model = result.model
    activations = []
    hooks = [m.register_forward_hook(lambda m, i, out: activations.append(out))
             for m in model.decoder if isinstance(m, torch.nn.Tanh)]
    with torch.no_grad():
        x, _ = TestSet(mnist.test_images[:1000], seed=0).draw(model)
        model.decode(model.encode(x)[0])
    for h in hooks:
        h.remove()
    saturated = torch.cat([a.flatten() for a in activations]).abs().gt(0.99).float().mean().item()
    assert saturated < 0.5


def test_callbacks_see_each_epochs_record_and_one_can_stop_the_run_cleanly(tmp_path):
    from conftest import synthetic_dataset
    from vaelab.callbacks import Callback
    from vaelab.runs import read_metrics

    class Log(Callback):
        def __init__(self):
            self.calls = []

        def on_fit_start(self, training, run_dir):
            self.calls.append(("start", run_dir))

        def on_epoch_end(self, record, training):
            self.calls.append(("epoch", record["epoch"]))
            record["epoch"] = -1  # a copy: the run's record stays as it is

        def on_fit_end(self, result):
            self.calls.append(("end", len(result.metrics)))

    log = Log()
    stop_after_two = lambda record, training: record["epoch"] == 2  # noqa: E731
    result = train(tiny_config(epochs=5), tmp_path / "run", data=synthetic_dataset(),
                   progress=False, callbacks=[log, stop_after_two])
    assert log.calls == [("start", tmp_path / "run"), ("epoch", 1), ("epoch", 2), ("end", 2)]
    assert [m["epoch"] for m in result.metrics] == [1, 2]
    assert [m["epoch"] for m in read_metrics(tmp_path / "run")] == [1, 2]


def test_a_callback_that_is_neither_a_callback_nor_a_function_is_refused():
    from conftest import synthetic_dataset

    with pytest.raises(TypeError, match="a callback is"):
        train(tiny_config(epochs=1), data=synthetic_dataset(), progress=False, callbacks=[3])


def test_the_training_loop_names_no_objective_prior_or_posterior():
    import ast
    import re
    from pathlib import Path

    import vaelab
    from vaelab.objectives import OBJECTIVES, ESTIMATORS
    from vaelab.posteriors import POSTERIORS
    from vaelab.priors import PRIORS

    names = {*OBJECTIVES, *ESTIMATORS, *POSTERIORS, *PRIORS} - {"reparam"}
    for module in ("train.py", "step.py"):
        tree = ast.parse((Path(vaelab.__file__).parent / module).read_text())
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        words = set()  # the code's identifiers and strings, not its docstrings
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                words.add(node.id)
            elif isinstance(node, ast.Attribute):
                words.add(node.attr)
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and id(node) not in docstrings):
                words.add(node.value)
        found = sorted(n for n in names for w in words if re.search(rf"\b{n}\b", w.lower()))
        assert not found, f"{module} names {found}"
