"""The real command line, end to end, on a slice of real MNIST."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

FIGURES_2D = {"elbo.png", "data.png", "reconstructions.png", "samples.png", "manifold.png", "latent.png"}


def vaelab(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vaelab", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def assert_readable_png(path, min_size=(100, 100)):
    with Image.open(path) as image:
        image.load()
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        assert image.convert("L").getextrema()[0] < image.convert("L").getextrema()[1]  # not blank


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    result = vaelab("train", "--epochs", 2, "--train-size", 3000, "--test-size", 500, "--out", run, "--quiet")
    assert result.returncode == 0, result.stderr
    return run, result


def test_train_writes_every_artifact(cli_run):
    run, result = cli_run
    assert {p.name for p in run.iterdir()} >= {"config.json", "model.safetensors", "metrics.jsonl", "figures"}
    assert json.loads((run / "config.json").read_text())["model"]["z_dim"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all({"epoch", "train_loss", "test_loss", "seconds"} <= set(r) for r in records)
    assert {p.name for p in (run / "figures").iterdir()} == FIGURES_2D
    for name in FIGURES_2D:
        assert_readable_png(run / "figures" / name)
    assert "test negative ELBO after 2 epochs" in result.stdout


def test_evaluate_prints_and_writes_eval_json(cli_run):
    run, _ = cli_run
    result = vaelab("evaluate", run, "--k", 100, "--test-size", 300, "--quiet")
    assert result.returncode == 0, result.stderr
    record = json.loads((run / "eval.json").read_text())
    assert {"k", "nll", "nll_se", "neg_elbo", "iwae"} <= set(record)
    assert record["k"] == 100 and record["test_images"] == 300 and set(record["iwae"]) == {"1", "5", "50"}
    assert 100 < record["nll"] < record["neg_elbo"] < 400
    assert f"{record['nll']:.3f}" in result.stdout
    (run / "eval.json").unlink()
    again = vaelab("evaluate", run, "--k", 100, "--test-size", 300, "--quiet")  # a fixed seed: the same numbers
    assert again.returncode == 0, again.stderr
    timeless = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert timeless(json.loads((run / "eval.json").read_text())) == timeless(record)
    assert np.load(run / "log_px.npy").shape == (300,)


def test_compare_prints_the_paired_difference_of_two_evaluated_runs(cli_run, tmp_path):
    import shutil

    run, _ = cli_run
    other = tmp_path / "other"
    shutil.copytree(run, other)
    for r in (run, other):
        assert vaelab("evaluate", r, "--k", 50, "--test-size", 200, "--quiet").returncode == 0
    result = vaelab("compare", run, other)
    assert result.returncode == 0, result.stderr
    assert "paired difference (first minus second): +0.0000 nats per image" in result.stdout


def test_compare_refuses_runs_evaluated_differently_or_not_at_all(cli_run, tmp_path):
    import shutil

    run, _ = cli_run
    other = tmp_path / "other"
    shutil.copytree(run, other)
    assert vaelab("evaluate", run, "--k", 50, "--test-size", 200, "--quiet").returncode == 0
    assert vaelab("evaluate", other, "--k", 100, "--test-size", 200, "--quiet").returncode == 0
    result = vaelab("compare", run, other)
    assert result.returncode == 2 and "evaluated with different k (50 and 100)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    (other / "log_px.npy").unlink()
    result = vaelab("compare", run, other)
    assert result.returncode == 2 and "has no log_px.npy: run `vaelab evaluate" in result.stderr


def test_train_help_lists_no_retired_options():
    result = vaelab("train", "--help")
    assert "--backward" not in result.stdout and "--kernels" not in result.stdout
    assert "--cuda-graph" in result.stdout


def test_plot_redraws_the_figures(cli_run):
    run, _ = cli_run
    (run / "figures" / "samples.png").unlink()
    result = vaelab("plot", run)
    assert result.returncode == 0, result.stderr
    assert_readable_png(run / "figures" / "samples.png")


def test_sample_writes_a_png_and_never_overwrites_without_force(cli_run, tmp_path):
    run, _ = cli_run
    out = tmp_path / "s.png"
    assert vaelab("sample", run, "-n", 16, "-o", out).returncode == 0
    assert_readable_png(out, (50, 50))
    before = out.read_bytes()
    refused = vaelab("sample", run, "-n", 9, "-o", out)
    assert refused.returncode == 2 and "--force" in refused.stderr and out.read_bytes() == before
    assert vaelab("sample", run, "-n", 9, "-o", out, "--force").returncode == 0


def test_data_says_where_mnist_is_and_that_it_is_verified():
    result = vaelab("data")
    assert result.returncode == 0, result.stderr
    assert "MNIST, verified by SHA-256" in result.stdout and "60000 training" in result.stdout


def test_larger_latent_gets_a_tsne_instead_of_the_2d_figures(tmp_path):
    run = tmp_path / "z5"
    result = vaelab("train", "--z-dim", 5, "--optimizer", "adam", "--lr", "1e-3", "--epochs", 1,
                    "--train-size", 2000, "--test-size", 400, "--out", run, "--quiet")
    assert result.returncode == 0, result.stderr
    names = {p.name for p in (run / "figures").iterdir()}
    assert "tsne.png" in names and not names & {"manifold.png", "latent.png"}
    assert_readable_png(run / "figures" / "tsne.png")


def test_every_command_has_help():
    for command in ["train", "evaluate", "plot", "sample", "report", "data"]:
        result = vaelab(command, "--help")
        assert result.returncode == 0 and "usage: vaelab" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["train", "--epochs", "0"], "--epochs must be a positive integer"),
    (["train", "--lr", "nan"], "--lr must be a positive number"),
    (["train", "--likelihood", "poisson"], "invalid choice"),
    (["train", "--data-dir", "/nonexistent/mnist"], "does not exist"),
    (["evaluate", "/nonexistent/run"], "does not exist"),
])
def test_user_mistakes_get_one_line_and_status_2(args, message):
    result = vaelab(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_run_directory_is_never_overwritten(cli_run):
    run, _ = cli_run
    before = (run / "model.safetensors").read_bytes()
    result = vaelab("train", "--epochs", 1, "--out", run, "--quiet")
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (run / "model.safetensors").read_bytes() == before
