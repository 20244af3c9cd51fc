"""Shared fixtures.

Tests that need real MNIST read $VAELAB_DATA_DIR; when it is unset they use
../shared/mnist beside the checkout if it exists, else the user cache
(fetched on first use).
"""

from __future__ import annotations

import contextlib
import io
import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from vaelab.data import Dataset, encode_idx, FILES

REPO = Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO.parent / "shared" / "mnist"

if "VAELAB_DATA_DIR" not in os.environ and SHARED_MNIST.is_dir():
    os.environ["VAELAB_DATA_DIR"] = str(SHARED_MNIST)


@pytest.fixture(scope="session")
def mnist() -> Dataset:
    """The real MNIST data set, loaded once per test session."""
    from vaelab.data import load_data

    return load_data(progress=False)


@pytest.fixture(scope="session")
def mnist_dir(mnist) -> Path:
    return mnist.directory


def run_vaelab(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`vaelab ARGS` run in this process (cli.main), with env added to the environment meanwhile;
    its status and output as subprocess.run would give them, without a fresh torch import."""
    from vaelab.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's own exits: --help and its errors
                code = e.code
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def synthetic_dataset(n_train: int = 300, n_test: int = 100, shape=(8, 8), seed: int = 0) -> Dataset:
    """Random grey-level images (N, 1, H, W) with random labels: tiny and fast."""
    g = torch.Generator().manual_seed(seed)
    images = lambda n: torch.randint(0, 256, (n, 1, *shape), generator=g, dtype=torch.uint8)
    labels = lambda n: torch.randint(0, 10, (n,), generator=g)
    return Dataset(images(n_train), labels(n_train), images(n_test), labels(n_test), Path("."), verified=False)


# Ten colours, one per digit, each with a full channel so that a digit keeps its contrast.
PALETTE = torch.tensor([[1, .2, .2], [.2, 1, .2], [.2, .2, 1], [1, 1, .2], [1, .2, 1], [.2, 1, 1],
                        [1, .6, .2], [.6, .2, 1], [1, 1, 1], [.2, .6, 1]])


def tinted_rgb(data: Dataset) -> Dataset:
    """Grey 28x28 images as colour 32x32 ones: each image's grey levels scale the colour of its
    label (of its index where there are no labels), with two black pixels of padding each side:
    (N, 1, 28, 28) -> (N, 3, 32, 32) uint8."""

    def tint(images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        which = labels if labels is not None else torch.arange(len(images))
        colours = PALETTE[which % len(PALETTE)][:, :, None, None]
        rgb = (images.float() * colours).round().to(torch.uint8)
        return torch.nn.functional.pad(rgb, (2, 2, 2, 2))

    return dataclasses.replace(data, train_images=tint(data.train_images, data.train_labels),
                               test_images=tint(data.test_images, data.test_labels))


def network_available(host: str = "pypi.org", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host can be opened (the network tests need PyPI)."""
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def write_idx_dir(directory: Path, data: Dataset, gz: bool = False) -> Path:
    """Write a Dataset as the four IDX files into directory."""
    import gzip

    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": data.train_images.reshape(-1, *data.image_shape[1:]),
        "train_labels": data.train_labels.to(torch.uint8),
        "test_images": data.test_images.reshape(-1, *data.image_shape[1:]),
        "test_labels": data.test_labels.to(torch.uint8),
    }
    for key, tensor in arrays.items():
        content = encode_idx(tensor.numpy())
        if gz:
            (directory / f"{FILES[key]}.gz").write_bytes(gzip.compress(content))
        else:
            (directory / FILES[key]).write_bytes(content)
    return directory


def write_png_dir(directory: Path, data: Dataset, split: bool = True) -> Path:
    """Write a Dataset's images as PNG files, greyscale or RGB by its channels.

    split=True: train/<label>/<i>.png and test/<label>/<i>.png, i counting
    within each split; split=False: <label>/<i>.png for all images, the
    training images first (a folder for load_data to split at random). Label
    folders are named by label_names, else by the label's number; without
    labels the files sit directly in train/ and test/ (or in directory). i is
    zero-padded so that the reader's order (by path) is the order written.
    """
    from PIL import Image

    width = len(str(len(data.train_images) + len(data.test_images)))
    index = 0
    for name, images, labels in (("train", data.train_images, data.train_labels),
                                 ("test", data.test_images, data.test_labels)):
        if split:
            index = 0
        for j, image in enumerate(images.numpy()):  # image: (C, H, W)
            folder = directory / name if split else directory
            if labels is not None:
                label = int(labels[j])
                folder = folder / (data.label_names[label] if data.label_names else str(label))
            folder.mkdir(parents=True, exist_ok=True)
            pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)  # (H, W) or (H, W, 3)
            Image.fromarray(pixels).save(folder / f"{index:0{width}d}.png")
            index += 1
    return directory


# --- checks every model component passes ----------------------------------------------------

def train_evaluate_sample_report(tmp_path: Path, *options) -> tuple[Path, dict]:
    """`vaelab train OPTIONS` for one epoch on 300 synthetic 8x8 images (Adam), then evaluate
    (K=100), sample and report, each required to succeed, the bounds ordered as they must be.
    Returns the run folder and its eval.json."""
    import json

    data = write_idx_dir(tmp_path / "data", synthetic_dataset(shape=(8, 8)))
    run = tmp_path / "run"
    for args in (["train", "--data-dir", data, *options, "--epochs", 1, "--batch-size", 50, "--optimizer",
                  "adam", "--lr", 1e-3, "--out", run, "--quiet"],
                 ["evaluate", run, "--k", 100, "--quiet"], ["sample", run, "-n", 9, "-o", tmp_path / "s.png"],
                 ["report", run]):
        done = run_vaelab(*args)
        assert done.returncode == 0, done.stderr
    r = json.loads((run / "eval.json").read_text())
    assert r["nll"] <= r["iwae"]["50"] <= r["iwae"]["5"] <= r["iwae"]["1"]
    assert r["iwae"]["1"] == pytest.approx(r["neg_elbo"])
    return run, r


def assert_refused_in_one_line(tmp_path: Path, args: list, says: str) -> None:
    """`vaelab train ARGS` exits 2 with one line holding `says`, and writes no run."""
    result = run_vaelab("train", *args, "--out", tmp_path / "run")
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def assert_resumes_bit_for_bit(tmp_path: Path, config) -> None:
    """config(epochs) trained 3 epochs at once equals 1 epoch then a resume to 3, bit for bit."""
    from vaelab import train

    whole = train(config(3), tmp_path / "a", synthetic_dataset(), progress=False)
    train(config(1), tmp_path / "b", synthetic_dataset(), progress=False)
    resumed = train(config(3), tmp_path / "b", synthetic_dataset(), progress=False, resume=True)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert strip(resumed.metrics) == strip(whole.metrics)
    assert all(torch.equal(p, q) for p, q in zip(resumed.model.parameters(), whole.model.parameters()))


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def chromium_browser(tmp_path: Path):
    """Headless Chromium through selenium (Debian's chromium and chromium-driver): skipped without
    them, except under CI=true, where .ci/run installs them."""
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    if webdriver is None or not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs chromium, chromium-driver and selenium: .ci/run installs them")
        pytest.skip("needs chromium, chromium-driver (Debian) and selenium (pip)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,1000", f"--user-data-dir={tmp_path / 'chrome'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
