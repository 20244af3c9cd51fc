"""The command line, end to end, on a slice of real MNIST: in this process (cli.main), apart from
the tests of the process boundary itself."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

FIGURES_2D = {"elbo.png", "data.png", "reconstructions.png", "samples.png", "interpolation.png", "manifold.png", "latent.png"}


from conftest import run_vaelab as vaelab


def vaelab_process(*args):
    return subprocess.run([sys.executable, "-m", "vaelab", *map(str, args)], capture_output=True, text=True)


def assert_readable_png(path, min_size=(100, 100)):
    with Image.open(path) as image:
        image.load()
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        assert image.convert("L").getextrema()[0] < image.convert("L").getextrema()[1]  # not blank


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    result = vaelab("train", "--epochs", 2, "--train-size", 3000, "--test-size", 500, "--out", run)
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
    result = vaelab("evaluate", run, "--k", 100, "--test-size", 300)
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


@pytest.mark.slow  # bf16 is emulated on many CPUs
def test_compare_pairs_one_run_evaluated_in_fp32_and_in_bf16_with_a_one_line_note(cli_run, tmp_path):
    import shutil

    run, _ = cli_run
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    for copy, precision in ((fp32, "fp32"), (bf16, "bf16")):
        shutil.copytree(run, copy)
        evaluated = vaelab("evaluate", copy, "--k", 50, "--test-size", 50, "--precision", precision, "--quiet")
        assert evaluated.returncode == 0, evaluated.stderr
    result = vaelab("compare", fp32, bf16)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if "precisions" in line]
    assert notes == ["note: the decoders ran at different precisions (fp32 and bf16), the draws were the same"]
    difference = float(result.stdout.split("second): ")[1].split()[0])
    assert abs(difference) < 0.05  # the same draws: only the decoder's rounding differs


def test_compare_refuses_runs_evaluated_differently_or_not_at_all(cli_run, tmp_path):
    import shutil

    run, _ = cli_run
    other = tmp_path / "other"
    shutil.copytree(run, other)
    assert vaelab("evaluate", run, "--k", 50, "--test-size", 200, "--quiet").returncode == 0
    assert vaelab("evaluate", other, "--k", 50, "--test-size", 200, "--seed", 7,
                  "--quiet").returncode == 0
    result = vaelab("compare", run, other)
    assert result.returncode == 2 and "evaluated with different seed (1234 and 7)" in result.stderr
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


@pytest.mark.slow
def test_larger_latent_gets_a_tsne_instead_of_the_2d_figures(tmp_path):
    run = tmp_path / "z5"
    result = vaelab("train", "--z-dim", 5, "--optimizer", "adam", "--lr", "1e-3", "--epochs", 1,
                    "--train-size", 2000, "--test-size", 400, "--out", run, "--quiet")
    assert result.returncode == 0, result.stderr
    names = {p.name for p in (run / "figures").iterdir()}
    assert "tsne.png" in names and not names & {"manifold.png", "latent.png"}
    assert_readable_png(run / "figures" / "tsne.png")


def test_every_command_has_help():
    for command in ["train", "evaluate", "compare", "plot", "sample", "report", "data"]:
        result = vaelab(command, "--help")
        assert result.returncode == 0 and "usage: vaelab" in result.stdout


# Every flag each command's --help listed before the options were declared in one place.
FLAGS = {
    "train": "--preset --z-dim --encoder-hidden --decoder-hidden --conv-channels --activation --likelihood "
             "--sigma --objective --beta --kl-warmup --samples --k --optimizer --lr --schedule --batch-size "
             "--epochs --seed --device --cuda-graph --deterministic --data-dir --image-size --test-fraction "
             "--split-seed --train-size --test-size --out --resume --no-plots --quiet"
             " --plugin --mlflow",  # added since
    "evaluate": "--k --seed --test-size --data-dir --device --precision --quiet --mlflow",
    "compare": "",
    "plot": "--data-dir",
    "sample": "-n -o --output --seed --force",
    "report": "-o --output --data-dir",
    "data": "--data-dir --image-size --test-fraction --split-seed",
}
POSITIONALS = {"evaluate": ["run"], "compare": ["RUN_A", "RUN_B"], "plot": ["run"], "sample": ["run"],
               "report": ["run"]}


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_each_commands_help_lists_every_flag_it_listed_before(command):
    import re

    result = vaelab(command, "--help")
    listed = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", result.stdout.split("options:")[1]))
    assert set(FLAGS[command].split()) | {"-h", "--help"} <= listed
    usage = result.stdout.split("\n\n")[0].split()
    assert usage[-len(POSITIONALS.get(command, [])) or len(usage):] == POSITIONALS.get(command, [])


def test_python_m_vaelab_is_the_command_line_and_exits_with_its_status():
    helped = vaelab_process("--help")
    assert helped.returncode == 0 and "usage: vaelab" in helped.stdout
    refused = vaelab_process("train", "--epochs", "0")
    assert refused.returncode == 2 and refused.stderr.strip() == \
        "vaelab: error: --epochs must be a positive integer, got 0"


@pytest.mark.parametrize("args,message", [
    (["train", "--epochs", "0"], "--epochs must be a positive integer"),
    (["train", "--lr", "nan"], "--lr must be a positive number"),
    (["train", "--likelihood", "poisson"], "invalid choice"),
    (["train", "--data-dir", "/nonexistent/mnist"], "does not exist"),
    (["evaluate", "/nonexistent/run"], "does not exist"),
    (["train", "--plugin", "vaelab_no_such_plugin"], "plugin 'vaelab_no_such_plugin' failed to import"),
    (["train", "--activation", "swish"], "invalid choice"),
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


# --- your own images ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_pngs(tmp_path_factory, mnist):
    """1,000 training and 200 test MNIST digits as PNGs in train/<digit>/ and test/<digit>/."""
    from conftest import write_png_dir

    return write_png_dir(tmp_path_factory.mktemp("pngs") / "digits", mnist.subset(1000, 200))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return {"XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}  # decoded folders go there, not ~/.cache


def vaelab_env(env, *args):
    return vaelab(*args, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("likelihood", ["logistic", "bernoulli"])
def test_a_conv_run_on_a_folder_of_pngs_trains_evaluates_plots_and_reports(tmp_path, mnist_pngs, cache,
                                                                            likelihood):
    run = tmp_path / "run"
    trained = vaelab_env(cache, "train", "--data-dir", mnist_pngs, "--preset", "conv", "--conv-channels", "8,16",
                         "--likelihood", likelihood, "--epochs", 1, "--out", run, "--quiet")
    assert trained.returncode == 0, trained.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["architecture"] == "conv" and config["model"]["image_shape"] == [1, 28, 28]
    assert config["data_dir"] == str(mnist_pngs.resolve())
    assert {p.name for p in (run / "figures").iterdir()} == FIGURES_2D - {"manifold.png", "latent.png"} | {"tsne.png"}

    evaluated = vaelab_env(cache, "evaluate", run, "--k", 20)
    assert evaluated.returncode == 0, evaluated.stderr
    record = json.loads((run / "eval.json").read_text())
    assert record["test_images"] == 200
    assert record["bits_per_dim"] == pytest.approx(record["nll"] / (784 * np.log(2)))
    assert "nats per image" in evaluated.stdout and "bits per dimension" in evaluated.stdout

    for command in (["plot", run], ["report", run]):
        done = vaelab_env(cache, *command)
        assert done.returncode == 0, done.stderr
    assert "deconv" in (run / "report.html").read_text()  # the browser decodes the conv decoder itself


@pytest.mark.slow
def test_an_mlp_trains_on_rgb_32_pixel_images_and_draws_them_in_colour(tmp_path, cache):
    import torch

    from conftest import write_png_dir
    from vaelab.data import Dataset

    g = torch.Generator().manual_seed(0)
    smooth = lambda n: torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bilinear")
    images = lambda n: (smooth(n) * 255).to(torch.uint8)
    labels = lambda n: torch.randint(0, 3, (n,), generator=g)
    folder = write_png_dir(tmp_path / "colour", Dataset(images(200), labels(200), images(50), labels(50),
                                                         tmp_path, False, ("red", "green", "blue"), "folder"))
    run = tmp_path / "run"
    trained = vaelab_env(cache, "train", "--data-dir", folder, "--likelihood", "logistic", "--optimizer", "adam",
                         "--lr", 1e-3, "--epochs", 1, "--batch-size", 50, "--out", run, "--quiet")
    assert trained.returncode == 0, trained.stderr
    assert json.loads((run / "config.json").read_text())["model"]["image_shape"] == [3, 32, 32]
    with Image.open(run / "figures" / "samples.png") as samples:
        assert samples.mode == "RGBA" and len(samples.convert("RGB").getcolors(1 << 20)) > 256  # colours, not greys
    assert vaelab_env(cache, "evaluate", run, "--k", 10, "--quiet").returncode == 0
    assert vaelab_env(cache, "report", run).returncode == 0


def test_a_folder_split_at_random_is_recorded_and_reread_alike(tmp_path, mnist, cache):
    from conftest import write_png_dir

    folder = write_png_dir(tmp_path / "flat", mnist.subset(300, 100), split=False)
    run = tmp_path / "run"
    trained = vaelab_env(cache, "train", "--data-dir", folder, "--test-fraction", 0.25, "--split-seed", 7,
                         "--epochs", 1, "--out", run, "--quiet", "--no-plots")
    assert trained.returncode == 0, trained.stderr
    config = json.loads((run / "config.json").read_text())
    assert (config["test_fraction"], config["split_seed"]) == (0.25, 7)
    evaluated = vaelab_env(cache, "evaluate", run, "--k", 10, "--quiet")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((run / "eval.json").read_text())["test_images"] == 100  # a quarter of 400, as trained


def test_vaelab_data_describes_a_folder(mnist_pngs, cache):
    described = vaelab_env(cache, "data", "--data-dir", mnist_pngs)
    assert described.returncode == 0, described.stderr
    assert "a folder of images; 1000 training and 200 test images of 28x28 pixels, greyscale, 10 classes" \
        in described.stdout


def small_npz(path, n_train=200, n_test=50):
    g = np.random.default_rng(0)
    np.savez(path, x_train=g.integers(0, 256, (n_train, 8, 8), dtype=np.uint8),
             x_test=g.integers(0, 256, (n_test, 8, 8), dtype=np.uint8))
    return path


SMALL = ["--z-dim", 2, "--encoder-hidden", 16, "--decoder-hidden", 16, "--batch-size", 50,
         "--no-plots", "--device", "cpu"]


def test_an_iwae_runs_lines_show_train_and_test_of_the_same_bound_and_the_elbo_labelled(tmp_path):
    run = tmp_path / "run"
    result = vaelab("train", "--data-dir", small_npz(tmp_path / "d.npz"), *SMALL,
                    "--objective", "iwae", "--k", 5, "--epochs", 2, "--out", run)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    for line, r in zip(lines, records, strict=True):
        assert (f"negative IWAE bound (k=5): train {r['train_loss']:8.3f}  test"
                f" {r['test_iwae']:8.3f};  test negative ELBO {r['test_loss']:8.3f} nats") in line
    assert result.stdout.splitlines()[-1].startswith(
        f"test negative IWAE bound (k=5) after 2 epochs: {records[-1]['test_iwae']:.2f} nats per"
        f" image (negative ELBO {records[-1]['test_loss']:.2f}); run saved in {run}")


def test_the_final_line_counts_one_epoch_in_the_singular(tmp_path):
    result = vaelab("train", "--data-dir", small_npz(tmp_path / "d.npz"), *SMALL, "--epochs", 1,
                    "--out", tmp_path / "run")
    assert "test negative ELBO after 1 epoch: " in result.stdout


def test_quiet_prints_nothing_but_errors(tmp_path):
    data = small_npz(tmp_path / "d.npz")
    trained = vaelab("train", "--data-dir", data, *SMALL, "--epochs", 1, "--out", tmp_path / "run",
                     "--quiet")
    assert trained.returncode == 0 and (trained.stdout, trained.stderr) == ("", "")
    evaluated = vaelab("evaluate", tmp_path / "run", "--k", 10, "--quiet")
    assert evaluated.returncode == 0 and (evaluated.stdout, evaluated.stderr) == ("", "")


def test_out_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = vaelab("train", "--out", tmp_path, "--quiet")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"--out {tmp_path} is a folder of other files (notes.txt), not a run" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_version_prints_vaelabs_version():
    import vaelab as package

    result = vaelab("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"vaelab {package.__version__}"
