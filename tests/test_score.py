"""vaelab.score: the codes and scores of any images a run's model fits."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from conftest import run_vaelab
from vaelab import RunConfig, train
from vaelab.config import EncodeOptions, EvaluateOptions, ModelConfig, ScoreOptions
from vaelab.evaluate import evaluate_run
from vaelab.runs import load_run, read_log_px
from vaelab.errors import VaelabError
from vaelab.score import encode, encode_run, score, score_run

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
    """The header and the columns by name (text as written)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], {name: [row[i] for row in rows[1:]] for i, name in enumerate(rows[0])}


def floats(column):
    return np.array(column, dtype=np.float64)


def test_scoring_the_runs_test_set_gives_evaluates_per_image_values_bitwise(run, tmp_path):
    evaluate_run(EvaluateOptions(run=str(run), k=100, images=40, device="cpu", quiet=True))
    path, _, scores = score_run(ScoreOptions(run=str(run), output=str(tmp_path / "s.npz"), k=100,
                                             images=40, device="cpu", quiet=True))
    assert np.array_equal(np.load(path)["log_px"], read_log_px(run))
    assert np.array_equal(scores["log_px"], read_log_px(run))


def test_scores_hold_index_split_label_log_px_its_error_elbo_and_bits_per_dim(run, tmp_path):
    path, csv_path, _ = score_run(ScoreOptions(run=str(run), output=str(tmp_path / "s.npz"), k=50,
                                               split="test", device="cpu", quiet=True))
    arrays = np.load(path)
    names = ["index", "split", "label", "log_px", "log_px_se", "elbo", "bits_per_dim"]
    assert arrays.files == names
    assert np.array_equal(arrays["index"], np.arange(60)) and set(arrays["split"]) == {"test"}
    assert (arrays["elbo"] <= arrays["log_px"] + 1e-9).all() and (arrays["log_px_se"] >= 0).all()
    assert np.allclose(arrays["bits_per_dim"], -arrays["log_px"] / (64 * np.log(2)))
    header, columns = read_csv(csv_path)
    assert header == names and columns["split"] == ["test"] * 60
    assert all(np.array_equal(floats(columns[name]), arrays[name])
               for name in names if name != "split")


def test_an_npz_is_scored_whole_by_default_its_test_images_first_keeping_their_values(run,
                                                                                     tmp_path):
    _, _, whole = score_run(ScoreOptions(run=str(run), output=str(tmp_path / "all.npz"), k=50,
                                         device="cpu", quiet=True))
    _, _, test = score_run(ScoreOptions(run=str(run), output=str(tmp_path / "test.npz"), k=50,
                                        split="test", device="cpu", quiet=True))
    assert list(whole["split"]) == ["test"] * 60 + ["train"] * 200
    assert np.array_equal(whole["log_px"][:60], test["log_px"])
    labels = np.load(run.parent / "data.npz")
    assert np.array_equal(whole["label"], np.concatenate([labels["y_test"], labels["y_train"]]))


def test_codes_are_the_encoders_mu_and_logvar_of_the_keyed_observations(run, tmp_path):
    options = EncodeOptions(run=str(run), output=str(tmp_path / "c.npz"), split="train", images=30,
                            device="cpu", quiet=True)
    path, csv_path, table = encode_run(options)
    model, arrays = load_run(run), np.load(path)
    images = torch.from_numpy(np.load(run.parent / "data.npz")["x_train"][:30, None])
    with torch.no_grad():
        mu, logvar = model.encode(images)  # keyed by (1234, i), as encode_run
    assert len(table["index"]) == 30  # no z_mean: it is mu
    assert arrays.files == ["index", "split", "label", "mu", "logvar"]
    assert np.array_equal(arrays["mu"], mu.numpy()) and np.array_equal(arrays["logvar"], logvar.numpy())
    header, columns = read_csv(csv_path)
    assert header == ["index", "split", "label", "mu_0", "mu_1", "logvar_0", "logvar_1"]
    assert np.array_equal(floats(columns["mu_0"]), arrays["mu"][:, 0].astype(np.float64))


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


def test_the_same_images_as_uint8_and_as_floats_get_the_same_scores_and_codes(run):
    model = load_run(run)
    images = torch.from_numpy(np.load(run.parent / "data.npz")["x_test"][:12, None])
    floats = images.float() / 255
    for a, b in zip(score(model, images, k=60).values(), score(model, floats, k=60).values()):
        assert np.array_equal(a, b)
    codes, again = encode(model, images), encode(model, floats)
    assert np.array_equal(codes["mu"], again["mu"])
    assert np.array_equal(codes["logvar"], again["logvar"])
    assert len(np.unique(codes["mu"], axis=0)) == 12  # twelve images, twelve codes


def test_floats_outside_0_1_are_refused_by_score_and_encode(run):
    model = load_run(run)
    levels = torch.from_numpy(np.load(run.parent / "data.npz")["x_test"][:4, None]).float()
    for function in (score, encode):
        with pytest.raises(VaelabError, match=r"must lie in \[0, 1\]"):
            function(model, levels)  # grey levels 0..255 as floats: the silent wrong scale


def grey_folder(folder, n=12, size=8, seed=0):
    """n distinct 8x8 grey PNGs in two class folders, one name with a comma."""
    from PIL import Image

    g = np.random.default_rng(seed)
    for i in range(n):
        file = f"img {i:02d}, copy.png" if i == 3 else f"img{i:02d}.png"
        name = folder / ("a" if i % 2 else "b") / file
        name.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 256, (size, size), dtype=np.uint8)).save(name)
    return folder


def test_each_listed_image_is_the_one_in_the_file_it_names(tmp_path):
    from PIL import Image

    from vaelab.data import load_data
    from vaelab.score import listing

    folder = grey_folder(tmp_path / "pictures")
    images, identity = listing(load_data(folder, progress=False))
    assert sorted(identity["file"]) == sorted(str(p.relative_to(folder).as_posix())
                                              for p in folder.rglob("*.png"))
    for row, name in enumerate(identity["file"]):
        assert np.array_equal(images[row, 0].numpy(), np.asarray(Image.open(folder / name)))


def test_a_scored_folders_csv_maps_every_file_to_its_score(run, tmp_path):
    folder = grey_folder(tmp_path / "pictures")
    result = run_vaelab("score", run, "--data-dir", folder, "-o", tmp_path / "s.npz", "--k", 10)
    assert result.returncode == 0, result.stderr
    assert "log p(x) of 12 images (1 test, 11 train)" in result.stdout
    header, columns = read_csv(tmp_path / "s.csv")
    assert header[:4] == ["index", "split", "file", "label"] and "log_px" in header
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    assert sorted(columns["file"]) == files
    assert np.isfinite(floats(columns["log_px"])).all()


def test_score_and_encode_take_the_folder_options_their_errors_suggest(run, tmp_path):
    from PIL import Image

    folder = grey_folder(tmp_path / "pictures")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "a" / "larger.png")
    refused = run_vaelab("score", run, "--data-dir", folder, "-o", tmp_path / "s.npz", "--k", 10)
    assert refused.returncode == 2 and "pass --image-size S" in refused.stderr
    for command in (("score", "--k", "10"), ("encode",)):
        done = run_vaelab(*command, run, "--data-dir", folder, "--image-size", 8, "-o",
                          tmp_path / f"{command[0]}.npz", "--quiet")
        assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr


def test_a_folder_of_another_kind_and_size_is_told_the_options_that_fit_it_to_the_model(run,
                                                                                        tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    refused = run_vaelab("score", run, "--data-dir", folder, "-o", tmp_path / "s.npz", "--k", 10)
    assert refused.returncode == 2
    assert "read the folder with --channels grey --image-size 8" in refused.stderr
    done = run_vaelab("score", run, "--data-dir", folder, "-o", tmp_path / "s.npz", "--k", 10,
                      "--channels", "grey", "--image-size", 8, "--test-fraction", 0.5, "--quiet")
    assert done.returncode == 0, done.stderr
    assert len(np.load(tmp_path / "s.npz")["log_px"]) == 5
