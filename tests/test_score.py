"""vaelab.score: the codes and scores of any images a run's model fits."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from conftest import run_vaelab
from vaelab import RunConfig, train
from vaelab.config import EncodeOptions, EvaluateOptions, ModelConfig, ScoreOptions
from vaelab.evaluate import evaluate_run, image_keys
from vaelab.runs import load_run, read_log_px
from vaelab.score import encode, encode_run, score_run

SHAPE = (8, 8)


def write_npz(path, n_train=200, n_test=60, shape=SHAPE, seed=0, labels=True):
    g = np.random.default_rng(seed)
    arrays = {"x_train": g.integers(0, 256, (n_train, *shape), dtype=np.uint8),
              "x_test": g.integers(0, 256, (n_test, *shape), dtype=np.uint8)}
    if labels:
        arrays |= {"y_train": g.integers(0, 10, n_train), "y_test": g.integers(0, 10, n_test)}
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run trained on an .npz of 8x8 images (recorded in its config.json)."""
    folder = tmp_path_factory.mktemp("score")
    model = ModelConfig(z_dim=2, encoder_hidden=(16,), decoder_hidden=(16,))
    config = RunConfig(model=model, epochs=1, batch_size=50, device="cpu",
                       data_dir=str(write_npz(folder / "data.npz")))
    train(config, folder / "run", progress=False)
    return folder / "run"


def read_csv(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    return rows[0], np.array(rows[1:], dtype=np.float64)


def test_scoring_the_runs_test_set_gives_evaluates_per_image_values_bitwise(run, tmp_path):
    evaluate_run(EvaluateOptions(run=str(run), k=100, test_size=40, device="cpu", quiet=True))
    path, _, scores = score_run(ScoreOptions(run=str(run), output=str(tmp_path / "s.npz"), k=100,
                                             images=40, device="cpu", quiet=True))
    assert np.array_equal(np.load(path)["log_px"], read_log_px(run))
    assert np.array_equal(scores["log_px"], read_log_px(run))


def test_scores_hold_index_label_log_px_its_error_elbo_and_bits_per_dim(run, tmp_path):
    path, csv_path, _ = score_run(ScoreOptions(run=str(run), output=str(tmp_path / "s.npz"), k=50,
                                               device="cpu", quiet=True))
    arrays = np.load(path)
    assert set(arrays.files) == {"index", "label", "log_px", "log_px_se", "elbo", "bits_per_dim"}
    assert np.array_equal(arrays["index"], np.arange(60))
    assert (arrays["elbo"] <= arrays["log_px"] + 1e-9).all() and (arrays["log_px_se"] >= 0).all()
    assert np.allclose(arrays["bits_per_dim"], -arrays["log_px"] / (64 * np.log(2)))
    names, values = read_csv(csv_path)
    assert names == ["index", "label", "log_px", "log_px_se", "elbo", "bits_per_dim"]
    assert all(np.array_equal(values[:, i], arrays[name]) for i, name in enumerate(names))


def test_codes_are_the_encoders_mu_and_logvar_of_the_keyed_observations(run, tmp_path):
    path, csv_path, n = encode_run(EncodeOptions(run=str(run), output=str(tmp_path / "c.npz"),
                                                 split="train", images=30, device="cpu", quiet=True))
    model, arrays = load_run(run), np.load(path)
    images = torch.from_numpy(np.load(run.parent / "data.npz")["x_train"][:30, None])
    with torch.no_grad():
        mu, logvar = model.encode(model.observe(images, image_keys(1234, "observe", torch.arange(30))))
    assert n == 30 and set(arrays.files) == {"index", "label", "mu", "logvar"}  # no z_mean: it is mu
    assert np.array_equal(arrays["mu"], mu.numpy()) and np.array_equal(arrays["logvar"], logvar.numpy())
    names, values = read_csv(csv_path)
    assert names == ["index", "label", "mu_0", "mu_1", "logvar_0", "logvar_1"]
    assert np.array_equal(values[:, 2:4], arrays["mu"].astype(np.float64))


@pytest.mark.parametrize("options", [dict(posterior="iaf", flow_steps=1), dict(upper_z_dims=(3,))])
def test_a_flow_or_a_hierarchy_also_gets_the_mean_of_z_over_draws_for_every_layer(options):
    from vaelab.models import build_model

    model = build_model(ModelConfig(z_dim=2, encoder_hidden=(16,), decoder_hidden=(16,),
                                    upper_hidden=(8,), image_shape=(1, *SHAPE), **options), seed=0)
    images = torch.randint(0, 256, (7, 1, *SHAPE), dtype=torch.uint8)
    few, many = encode(model, images, draws=4), encode(model, images, draws=4000)
    assert many["z_mean"].shape == (7, model.noise_dim) and few["mu"].shape == (7, 2)
    assert np.array_equal(encode(model, images, draws=4000)["z_mean"], many["z_mean"])  # keyed
    assert not np.array_equal(few["z_mean"], many["z_mean"])  # a mean over the draws


def test_images_the_model_does_not_fit_are_refused_in_one_line(run, tmp_path):
    other = write_npz(tmp_path / "rgb.npz", shape=(8, 8, 3))
    result = run_vaelab("score", run, "--data-dir", other, "-o", tmp_path / "s.npz", "--k", 10)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "expects 1x8x8" in result.stderr and not (tmp_path / "s.npz").exists()


def test_the_commands_write_both_files_and_refuse_to_overwrite_them(run, tmp_path):
    for command in (("encode",), ("score", "--k", "10")):
        result = run_vaelab(*command, run, "-o", tmp_path / "out.npz", "--quiet")
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "out.npz").exists() and (tmp_path / "out.csv").exists()
        again = run_vaelab(*command, run, "-o", tmp_path / "out.npz", "--quiet")
        assert again.returncode == 2 and "exists; pass --force" in again.stderr
        (tmp_path / "out.npz").unlink(), (tmp_path / "out.csv").unlink()
