"""The training step and evaluation on a CUDA GPU: captured against eager, CUDA against
the CPU, and an exact resume. Skipped where there is no GPU."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import synthetic_dataset
from vaelab import RunConfig, rng
from vaelab.models import ModelConfig, build_model, preset
from vaelab.sampling import importance_sampled
from vaelab.train import build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_config(**overrides) -> RunConfig:
    model = ModelConfig(z_dim=3, encoder_hidden=(32,), decoder_hidden=(32,), image_shape=(1, 8, 8))
    return RunConfig(**{"model": model, "batch_size": 20, "device": "cuda", **overrides})


RECIPES = {
    "sgd-elbo-bernoulli": {},
    "sgd-beta4-kl-warmup": dict(beta=4.0, kl_warmup=1),
    "adam-logistic": dict(optimizer="adam", lr=1e-3, model=ModelConfig(
        z_dim=3, encoder_hidden=(32,), decoder_hidden=(32,), image_shape=(1, 8, 8), likelihood="logistic")),
    "adam-gaussian-learned": dict(optimizer="adam", lr=1e-3, model=ModelConfig(
        z_dim=3, encoder_hidden=(32,), decoder_hidden=(32,), image_shape=(1, 8, 8), likelihood="gaussian-learned")),
    "adam-iwae5": dict(optimizer="adam", lr=1e-3, objective="iwae", k=5),
    "adam-elbo-L3-gaussian": dict(optimizer="adam", lr=1e-3, samples=3,
                                  model=ModelConfig(z_dim=3, encoder_hidden=(32,), decoder_hidden=(32,),
                                                    image_shape=(1, 8, 8), likelihood="gaussian", sigma=0.2)),
    "conv-adam-logistic": dict(model=preset("conv", conv_channels=(8, 16), encoder_hidden=(32,), decoder_hidden=(32,),
                                            z_dim=3, image_shape=(1, 8, 8), likelihood="logistic"),
                               preset="conv", optimizer="adam", lr=1e-3),
    "conv-sgd-bernoulli-iwae5": dict(model=preset("conv", conv_channels=(8, 16), encoder_hidden=(32,),
                                                  decoder_hidden=(32,), z_dim=3, image_shape=(1, 8, 8)),
                                     preset="conv", optimizer="sgd", lr=5e-3, objective="iwae", k=5),
    "burda1-adam-iwae50": dict(model=preset("burda1", image_shape=(1, 8, 8)), preset="burda1", optimizer="adam",
                               lr=1e-3, objective="iwae", k=50),
    "adam-mog-prior": dict(optimizer="adam", lr=1e-3, model=ModelConfig(
        z_dim=3, encoder_hidden=(32,), decoder_hidden=(32,), image_shape=(1, 8, 8), prior="mog", prior_components=10)),
    "adam-iaf-2-steps": dict(optimizer="adam", lr=1e-3, model=ModelConfig(
        z_dim=3, encoder_hidden=(32,), decoder_hidden=(32,), image_shape=(1, 8, 8), posterior="iaf", flow_steps=2)),
    "adam-vamp-prior-iwae5": dict(optimizer="adam", lr=1e-3, objective="iwae", k=5, model=ModelConfig(
        z_dim=3, encoder_hidden=(32,), decoder_hidden=(32,), image_shape=(1, 8, 8), prior="vamp", prior_components=50)),
    "adam-iwae10-dreg": dict(optimizer="adam", lr=1e-3, objective="iwae", k=10, estimator="dreg"),
    "adam-two-layers-iwae5-dreg": dict(optimizer="adam", lr=1e-3, objective="iwae", k=5, estimator="dreg",
                                       model=ModelConfig(z_dim=3, encoder_hidden=(32,), decoder_hidden=(32,),
                                                         image_shape=(1, 8, 8), upper_z_dims=(2,), upper_hidden=(16,))),
    "adam-two-layers-elbo-mog": dict(optimizer="adam", lr=1e-3, model=ModelConfig(
        z_dim=3, encoder_hidden=(32,), decoder_hidden=(32,), image_shape=(1, 8, 8), upper_z_dims=(2,),
        upper_hidden=(16,), prior="mog", prior_components=5)),
    "adam-health": dict(optimizer="adam", lr=1e-3, free_bits=0.2, grad_clip=5.0, skip_threshold=50.0),
    "adam-skip-every-update": dict(optimizer="adam", lr=1e-3, skip_threshold=1e-9),
    "adam-elbo-stl-vamp": dict(optimizer="adam", lr=1e-3, estimator="stl", model=ModelConfig(
        z_dim=3, encoder_hidden=(32,), decoder_hidden=(32,), image_shape=(1, 8, 8), prior="vamp", prior_components=20)),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_captured_and_eager_steps_compute_the_same_losses(recipe):
    runs = []
    for graph in (False, True):
        training = build(gpu_config(cuda_graph=graph, **RECIPES[recipe]), data=synthetic_dataset(), progress=False)
        training.step.begin_epoch(0, 1)
        losses = torch.stack([training.step().clone() for _ in range(training.step.steps_per_epoch)])
        runs.append((training, losses.cpu()))
    (eager, eager_losses), (captured, captured_losses) = runs
    assert captured.step.graph is not None and eager.step.graph is None
    torch.testing.assert_close(captured_losses, eager_losses, rtol=1e-4, atol=1e-4)
    for p, q in zip(captured.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_the_learning_rate_changes_under_capture():
    training = build(gpu_config(), data=synthetic_dataset(), progress=False)
    step = training.step
    step.begin_epoch(0, 1)
    for _ in range(step.WARMUP + 1):
        step()
    assert step.graph is not None
    training.lr.fill_(0.0)
    before = [p.detach().clone() for p in training.model.parameters()]
    step()
    assert all(torch.equal(p, b) for p, b in zip(training.model.parameters(), before))
    training.lr.fill_(0.1)
    step()
    assert not all(torch.equal(p, b) for p, b in zip(training.model.parameters(), before))


def test_keyed_random_bits_are_the_same_on_the_gpu_and_the_cpu():
    keys = rng.row_keys(rng.key(3, "observe", 1), torch.arange(100))
    assert torch.equal(rng.bits(keys.cuda(), 77).cpu(), rng.bits(keys, 77))
    assert torch.equal(rng.permutation(5, 1000, "cuda").cpu(), rng.permutation(5, 1000))


def small_model():
    config = ModelConfig(image_shape=(1, 2, 4), z_dim=2, encoder_hidden=(16,), decoder_hidden=(16,),
                         activation="tanh")
    return build_model(config, seed=0)


def test_conv_cuda_evaluation_agrees_with_the_cpu_per_image():
    config = preset("conv", conv_channels=(8, 16), encoder_hidden=(32,), decoder_hidden=(32,), z_dim=3,
                    image_shape=(3, 8, 8), likelihood="logistic")
    images = torch.randint(0, 256, (60, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    cpu = importance_sampled(build_model(config, seed=0), images, k=200, precision="fp32", progress=False)
    gpu = importance_sampled(build_model(config, seed=0).cuda(), images, k=200, precision="fp32", progress=False)
    np.testing.assert_allclose(gpu["log_px"], cpu["log_px"], rtol=1e-5)


def test_cuda_evaluation_agrees_with_the_cpu_within_monte_carlo_error():
    images = torch.randint(0, 256, (120, 1, 2, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cpu = importance_sampled(small_model(), images, k=1000, precision="fp32", progress=False)
    gpu = importance_sampled(small_model().cuda(), images, k=1000, precision="fp32", progress=False)
    assert abs(cpu["nll"] - gpu["nll"]) < 3 * (cpu["nll_se"] ** 2 + gpu["nll_se"] ** 2) ** 0.5
    # the same keyed pixels and noise: the per-image values differ by rounding alone
    np.testing.assert_allclose(gpu["log_px"], cpu["log_px"], rtol=1e-5)


def test_cuda_per_image_values_agree_across_launch_sizes():
    images = torch.randint(0, 256, (130, 1, 2, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    model = small_model().cuda()
    a = importance_sampled(model, images, k=500, precision="fp32", batch_size=50, chunk=50, progress=False)
    b = importance_sampled(model, images, k=500, precision="fp32", batch_size=150, chunk=500, progress=False)
    c = importance_sampled(model, images[:57], k=500, precision="fp32", progress=False)
    np.testing.assert_allclose(a["log_px"], b["log_px"], rtol=1e-6)
    np.testing.assert_allclose(c["log_px"], b["log_px"][:57], rtol=1e-6)


def vaelab(*args):
    return subprocess.run([sys.executable, "-m", "vaelab", *map(str, args)], capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["on", "off"])
def test_a_deterministic_cuda_run_killed_mid_epoch_resumes_bitwise(tmp_path, graph):
    from safetensors.torch import load_file

    args = ["--train-size", "30000", "--test-size", "1000", "--quiet", "--no-plots", "--seed", "3", "--epochs", 4,
            "--device", "cuda", "--deterministic", "--cuda-graph", graph, "--optimizer", "adam", "--lr", 1e-3]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = vaelab("train", *args, "--out", whole)
    assert done.returncode == 0, done.stderr
    assert json.loads((whole / "config.json").read_text())["deterministic"] is True
    proc = subprocess.Popen([sys.executable, "-m", "vaelab", "train", *map(str, args), "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill after epoch 2 is saved
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len((killed / "metrics.jsonl").read_text().splitlines()) < 4, "the kill did not land mid-run"
    resumed = vaelab("train", "--resume", killed, "--quiet", "--no-plots")
    assert resumed.returncode == 0, resumed.stderr
    strip = lambda run: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                         for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert strip(killed) == strip(whole)
    wa, wb = load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_conditional_models_captured_step_reads_each_batchs_labels_as_the_eager_one():
    from test_conditioning import toy

    runs = []
    for graph in (False, True):
        config = RunConfig(batch_size=20, device="cuda", cuda_graph=graph, optimizer="adam", lr=1e-3)
        training = build(config, data=synthetic_dataset(shape=(8, 8)), model=toy(), progress=False)
        training.step.begin_epoch(0, 1)
        losses = torch.stack([training.step().clone() for _ in range(training.step.steps_per_epoch)])
        runs.append((training, losses.cpu()))
    (eager, eager_losses), (captured, captured_losses) = runs
    assert captured.step.graph is not None and eager.step.y is not None
    torch.testing.assert_close(captured_losses, eager_losses, rtol=1e-4, atol=1e-4)
