"""The VQ-VAE family (vq.py): its codebook's moving averages and restarts, the straight-through
gradient, its terms and bounds, the learned prior over codes, resume, torchrun, the commands."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import (assert_refused_in_one_line, assert_resumes_bit_for_bit, run_vaelab,
                      synthetic_dataset, write_idx_dir)
from benchmarks.lib.digits import classify, digit_classifier, grid_tiles
from test_distributed import torchrun, vaelab
from vaelab.config import ModelConfig, RunConfig
from vaelab.models import build_model
from vaelab.vq import DEAD, EPS, CodePrior, Codebook, bound


def vq_config(**overrides) -> ModelConfig:
    fields = dict(family="vq-vae", architecture="conv", conv_channels=(4,), z_dim=3,
                  codebook_size=6, image_shape=(1, 8, 8))
    return ModelConfig(**{**fields, **overrides})


def test_the_codebook_follows_the_papers_moving_averages():
    torch.manual_seed(0)
    book = Codebook(4, 2, decay=0.9)
    book.cluster_size.fill_(1.0)  # every code alive: no restart
    book.embed_sum.copy_(torch.randn(4, 2))
    flat, index = torch.randn(10, 2), torch.tensor([0, 0, 1, 3, 3, 3, 0, 1, 1, 3])
    size, total = book.cluster_size.clone(), book.embed_sum.clone()
    book.update(flat, index)
    for k in range(4):
        size[k] = 0.9 * size[k] + 0.1 * (index == k).sum()
        total[k] = 0.9 * total[k] + 0.1 * flat[index == k].sum(0)
    n = size.sum()
    expected = total / ((size + EPS) / (n + 4 * EPS) * n)[:, None]
    torch.testing.assert_close(book.cluster_size, size)
    torch.testing.assert_close(book.embedding, expected)
    assert book.usage.tolist() == [3, 3, 0, 4] and book.epoch_usage()["dead_codes"] == 1


def test_dead_codes_restart_at_encoder_outputs_and_the_first_update_places_them_all():
    book = Codebook(5, 3, decay=0.99)
    flat = torch.randn(20, 3)
    book.update(flat, torch.zeros(20, dtype=torch.int64))
    # code 0, chosen by all, moves to their mean; the others were dead and each now sits at one
    # of the batch's vectors (to the smoothing)
    torch.testing.assert_close(book.embedding[0], flat.mean(0), rtol=1e-3, atol=1e-4)
    for code in book.embedding[1:]:
        assert (flat - code).norm(dim=1).min() < 1e-3
    book.cluster_size[2] = DEAD / 2  # unused for a while, and again now
    book.update(flat, torch.zeros(20, dtype=torch.int64))
    assert book.cluster_size[2] >= 1.0 - 1e-6
    assert (flat - book.embedding[2]).norm(dim=1).min() < 1e-3


def test_the_encoder_gets_the_decoders_gradient_straight_through_plus_the_commitment():
    model = build_model(vq_config(), seed=0)
    model.train()
    model(torch.rand(3, 1, 8, 8).round())  # one update: the codes where the outputs are
    model.eval()  # the codebook held still while the gradient is compared
    x = torch.rand(3, 1, 8, 8).round()
    z_e = model.posterior_params(x)[0].detach().requires_grad_(True)
    terms = model(x, posterior=(z_e,))
    (terms.log_px_z.sum() + terms.penalty.sum()).backward()
    grid = model._grid(z_e.detach())
    z_q = model._grid(model.quantised(model.codes(z_e.detach())))
    decoder_input = z_q.clone().requires_grad_(True)
    log_px = model.likelihood.log_prob(model.decoder(decoder_input), x)
    (grad,) = torch.autograd.grad(log_px.sum(), decoder_input)
    expected = grad + 2 * model.config.commitment * (grid - z_q)
    torch.testing.assert_close(model._grid(z_e.grad), expected, rtol=1e-4, atol=1e-5)


def test_the_terms_are_the_uniform_bound_and_the_commitment():
    model = build_model(vq_config(), seed=1).eval()
    x = torch.rand(4, 1, 8, 8).round()
    terms = model(x)
    z_e = model._grid(model.posterior_params(x)[0])
    z_q = model._grid(model.quantised(model.codes(model.posterior_params(x)[0])))
    log_px = model.likelihood.log_prob(model.decoder(z_q), x)
    torch.testing.assert_close(terms.log_px_z[0], log_px)
    torch.testing.assert_close(terms.kl, torch.full((4,), 16 * math.log(6)))  # 4x4 codes
    torch.testing.assert_close(terms.penalty, 0.25 * (z_e - z_q).square().sum((1, 2, 3)))


def test_the_code_prior_is_a_distribution_over_grids_and_causal():
    torch.manual_seed(0)
    prior = CodePrior(3, 2).eval()
    grids = torch.tensor(list(itertools.product(range(3), repeat=2)))
    with torch.no_grad():
        total = prior.log_prob(grids).exp().sum()
        logits = prior.logits(grids)
    torch.testing.assert_close(total, torch.tensor(1.0))
    # the first code's distribution does not depend on the second
    torch.testing.assert_close(logits[0::3, 0].expand(3, -1), logits[:3, 0].expand(3, -1))
    assert torch.allclose(logits[:, 0], logits[0, 0].expand(9, -1))


def test_the_bound_is_the_reconstruction_and_the_priors_codes():
    data = synthetic_dataset(40, 12)
    model = build_model(vq_config(), seed=2).eval()
    r = bound(model, data.test_images)
    assert r["bound"] == "uniform" and r["estimate"] == "bound"
    assert r["nll"] == pytest.approx(r["reconstruction"] + 16 * math.log(6))
    prior = model.second_stage().eval()
    model.attach(prior)
    learned = bound(model, data.test_images)
    assert learned["bounds"]["uniform"]["nats"] == pytest.approx(r["nll"])
    x = model.observe(data.test_images, __import__("vaelab").rng.image_keys(
        1234, "observe", torch.arange(12)))
    with torch.no_grad():
        codes_nll = -prior.log_prob(model.codes(model.posterior_mean(x))).mean().item()
    both = {name: value["nats"] for name, value in learned["bounds"].items()}
    assert both["learned"] == pytest.approx(r["reconstruction"] + codes_nll, rel=1e-6)
    assert learned["nll"] == min(both.values()) and learned["bound"] == min(both, key=both.get)
    np.testing.assert_allclose(-learned["log_px"].mean(), learned["nll"], rtol=1e-9)


def vq_run(**overrides) -> RunConfig:
    fields = dict(model=vq_config(), epochs=2, batch_size=50, device="cpu", optimizer="adam",
                  lr=1e-3)
    return RunConfig(**{**fields, **overrides})


def test_a_vq_run_resumes_bit_for_bit_codebook_included(tmp_path):
    assert_resumes_bit_for_bit(tmp_path, lambda epochs: vq_run(epochs=epochs))


def test_the_epochs_record_the_codebooks_use():
    from vaelab import train

    result = train(vq_run(), data=synthetic_dataset(), progress=False)
    record = result.metrics[-1]
    assert 1 <= record["perplexity"] <= 6 and 0 <= record["dead_codes"] <= 6
    assert "active_units" not in record


@pytest.mark.parametrize("args, says", [
    (["--objective", "iwae"], "--model vq-vae needs --objective elbo"),
    (["--prior", "mog"], "--model vq-vae needs no --prior"),
    (["--conditional"], "--model vq-vae needs no --conditional"),
    (["--beta", "2"], "--model vq-vae needs no --beta"),
    (["--skip-threshold", "100"], "--model vq-vae needs no --skip-threshold"),
    (["--ema", "0.99"], "--model vq-vae needs no --ema"),
])
def test_what_a_vq_vae_cannot_do_is_refused_in_one_line(tmp_path, args, says):
    assert_refused_in_one_line(tmp_path, ["--preset", "vq-vae", *args], says)


def test_train_evaluate_train_prior_sample_and_report(tmp_path):
    data = write_idx_dir(tmp_path / "data", synthetic_dataset(200, 50, shape=(8, 8)))
    run = tmp_path / "run"
    done = run_vaelab("train", "--preset", "vq-vae", "--conv-channels", "4", "--codebook-size", 8,
                      "--data-dir", data, "--epochs", 1, "--batch-size", 50, "--out", run,
                      "--quiet")
    assert done.returncode == 0, done.stderr
    assert not (run / "figures" / "samples.png").exists()
    early = run_vaelab("sample", run, "-o", tmp_path / "early.png")
    assert early.returncode == 2 and "vaelab train-prior RUN" in early.stderr
    assert len(early.stderr.strip().splitlines()) == 1
    for command in ("score", "encode"):
        refused = run_vaelab(command, run, "-o", tmp_path / f"{command}.npz")
        assert refused.returncode == 2 and "vaelab evaluate` bounds" in refused.stderr
    done = run_vaelab("evaluate", run)
    assert done.returncode == 0 and "a bound, not an importance-sampled estimate" in done.stdout
    uniform = json.loads((run / "eval.json").read_text())["nll"]
    done = run_vaelab("train-prior", run, "--epochs", 2, "--batch-size", 50, "--quiet")
    assert done.returncode == 0, done.stderr
    assert (run / "figures" / "samples.png").exists()
    assert len((run / "prior" / "metrics.jsonl").read_text().splitlines()) == 2
    done = run_vaelab("evaluate", run)
    record = json.loads((run / "eval.json").read_text())
    assert record["bound"] == "learned" and record["bounds"]["uniform"]["nats"] == uniform
    assert "with the learned prior" in done.stdout
    assert run_vaelab("sample", run, "-n", 4, "-o", tmp_path / "s.png").returncode == 0
    assert run_vaelab("report", run).returncode == 0
    more = run_vaelab("train-prior", run, "--epochs", 3, "--batch-size", 50, "--quiet")
    assert more.returncode == 0
    assert len((run / "prior" / "metrics.jsonl").read_text().splitlines()) == 3


def test_train_prior_refuses_a_vae_run(tmp_path):
    data = write_idx_dir(tmp_path / "data", synthetic_dataset(100, 20))
    run = tmp_path / "run"
    assert run_vaelab("train", "--data-dir", data, "--epochs", 1, "--out", run,
                      "--quiet").returncode == 0
    done = run_vaelab("train-prior", run)
    assert done.returncode == 2 and "for a run of --model vq-vae" in done.stderr


@pytest.mark.slow
def test_two_processes_keep_one_processs_codebook(tmp_path):
    data = write_idx_dir(tmp_path / "data", synthetic_dataset(600, 100, shape=(8, 8)))
    common = ["train", "--preset", "vq-vae", "--conv-channels", "4", "--codebook-size", 16,
              "--data-dir", data, "--epochs", 1, "--batch-size", 100, "--device", "cpu",
              "--quiet", "--no-plots"]
    one = vaelab(*common, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = torchrun(*common, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    for name in ("embedding", "cluster_size", "embed_sum", "updates"):
        key = f"codebook.{name}"
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    # the bound, shared among two processes, is one process's
    assert vaelab("evaluate", tmp_path / "one", "--quiet").returncode == 0
    alone = json.loads((tmp_path / "one" / "eval.json").read_text())
    assert torchrun("evaluate", tmp_path / "one", "--quiet").returncode == 0
    shared = json.loads((tmp_path / "one" / "eval.json").read_text())
    assert shared["nll"] == pytest.approx(alone["nll"], rel=1e-9)


@pytest.mark.slow
def test_codes_drawn_from_the_learned_prior_decode_to_recognisable_digits(tmp_path, mnist,
                                                                          mnist_dir):
    run = tmp_path / "run"
    done = run_vaelab("train", "--preset", "vq-vae", "--data-dir", mnist_dir, "--train-size",
                      10000, "--test-size", 1000, "--epochs", 3, "--out", run, "--quiet")
    assert done.returncode == 0, done.stderr
    done = run_vaelab("train-prior", run, "--epochs", 3, "--quiet")
    assert done.returncode == 0, done.stderr
    done = run_vaelab("sample", run, "-n", 100, "-o", tmp_path / "s.png")
    assert done.returncode == 0, done.stderr
    classifier = digit_classifier(mnist)
    with torch.no_grad():
        tiles = torch.as_tensor(grid_tiles(tmp_path / "s.png", 100)).reshape(100, 784)
        confidence = classifier(tiles).softmax(-1).max(-1).values.mean().item()
    assert confidence > 0.5  # chance is 0.1
    assert len(set(classify(classifier, grid_tiles(tmp_path / "s.png", 100)).tolist())) >= 5


def test_a_prior_of_codes_the_run_has_moved_on_from_is_not_used_and_is_trained_anew(tmp_path):
    data = write_idx_dir(tmp_path / "data", synthetic_dataset(100, 20, shape=(8, 8)))
    run = tmp_path / "run"
    common = ["--preset", "vq-vae", "--conv-channels", "4", "--codebook-size", 8, "--data-dir",
              data, "--batch-size", 50, "--quiet"]
    assert run_vaelab("train", *common, "--epochs", 1, "--out", run).returncode == 0
    assert run_vaelab("train-prior", run, "--epochs", 1, "--batch-size", 50,
                      "--quiet").returncode == 0
    assert vaelab_load(run).code_prior is not None
    assert run_vaelab("train", "--resume", run, "--epochs", 2, "--quiet").returncode == 0
    assert vaelab_load(run).code_prior is None  # trained on epoch 1's codes
    done = run_vaelab("train-prior", run, "--epochs", 1, "--batch-size", 50)
    assert done.returncode == 0 and "training a new prior" in done.stderr
    record = json.loads((run / "prior" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["run_epochs"] == 2 and vaelab_load(run).code_prior is not None
    too_many = run_vaelab("train-prior", run, "--batch-size", 1000)
    assert too_many.returncode == 2 and "larger than the 100 training images" in too_many.stderr


def vaelab_load(run):
    from vaelab import load_run

    return load_run(run)


def test_a_vq_vae_with_two_channel_codes_draws_no_latent_plane(tmp_path):
    data = write_idx_dir(tmp_path / "data", synthetic_dataset(100, 20, shape=(8, 8)))
    done = run_vaelab("train", "--preset", "vq-vae", "--conv-channels", "4", "--z-dim", 2,
                      "--codebook-size", 1, "--data-dir", data, "--epochs", 1, "--batch-size",
                      50, "--out", tmp_path / "run", "--quiet")
    assert done.returncode == 0, done.stderr
    assert run_vaelab("report", tmp_path / "run").returncode == 0
    assert not (tmp_path / "run" / "figures" / "manifold.png").exists()
