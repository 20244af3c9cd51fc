"""Reading a user's own images: folders of PNG and JPEG files, and .npz arrays."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_vaelab, synthetic_dataset, write_idx_dir, write_png_dir
from vaelab.data import Dataset, load_data
from vaelab.data import folders
from vaelab.errors import DataError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """The folder cache, inside tmp_path: no test touches the real home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "vaelab" / "folders"


def pixels(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """n random uint8 images of shape (H, W) or (H, W, C)."""
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def save(path: Path, image: np.ndarray | Image.Image, **options) -> Path:
    """Save an image, or an (H, W) or (H, W, C) uint8 array as one, making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path, **options)
    return path


def save_all(folder: Path, images: np.ndarray, suffix: str = ".png") -> list[Path]:
    return [save(folder / f"{i:03d}{suffix}", image) for i, image in enumerate(images)]


def labelled(n_train: int, n_test: int, names: tuple[str, ...], shape=(8, 8), seed: int = 0) -> Dataset:
    """A synthetic Dataset whose labels index names."""
    data = synthetic_dataset(n_train, n_test, shape=shape, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return dataclasses.replace(data, train_labels=torch.randint(0, len(names), (n_train,), generator=g),
                               test_labels=torch.randint(0, len(names), (n_test,), generator=g),
                               label_names=names)


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# --- layouts ----------------------------------------------------------------------------

def test_train_and_test_folders_with_classes_read_to_the_written_pixels_and_labels(tmp_path):
    data = labelled(30, 12, ("cat", "dog", "emu"))
    folder = write_png_dir(tmp_path / "pets", data)
    got = load_data(folder, progress=False)
    assert got.source == "folder" and not got.verified and got.directory == folder
    assert got.label_names == ("cat", "dog", "emu")
    for images, labels, want_images, want_labels in (
            (got.train_images, got.train_labels, data.train_images, data.train_labels),
            (got.test_images, got.test_labels, data.test_images, data.test_labels)):
        assert images.dtype == torch.uint8 and images.shape == want_images.shape
        assert labels.dtype == torch.int64 and pairs(images, labels) == pairs(want_images, want_labels)


def pairs(images: torch.Tensor, labels: torch.Tensor) -> list[tuple[bytes, int]]:
    """(pixels, label) of every image, in a fixed order: the same set read in any order."""
    return sorted((image.numpy().tobytes(), int(label)) for image, label in zip(images, labels))


def test_train_and_test_folders_come_in_a_seeded_order_not_class_by_class(tmp_path):
    data = labelled(60, 30, ("a", "b", "c"))
    folder = write_png_dir(tmp_path / "d", data)
    first, again = load_data(folder, progress=False), load_data(folder, progress=False)
    other = load_data(folder, split_seed=1, progress=False)
    assert torch.equal(first.test_labels, again.test_labels)
    assert not torch.equal(first.test_labels, torch.sort(first.test_labels).values)
    assert not torch.equal(first.test_images, other.test_images)
    assert pairs(first.test_images, first.test_labels) == pairs(other.test_images, other.test_labels)


def test_labels_index_the_union_of_both_splits_class_names(tmp_path):
    save_all(tmp_path / "d" / "train" / "b", pixels(2, (8, 8)))
    save_all(tmp_path / "d" / "train" / "c", pixels(2, (8, 8)))
    save_all(tmp_path / "d" / "test" / "a", pixels(1, (8, 8)))
    save_all(tmp_path / "d" / "test" / "c", pixels(1, (8, 8)))
    got = load_data(tmp_path / "d", progress=False)
    assert got.label_names == ("a", "b", "c")
    assert sorted(got.train_labels.tolist()) == [1, 1, 2, 2] and sorted(got.test_labels.tolist()) == [0, 2]


def test_a_flat_folder_is_split_at_random_by_test_fraction_and_split_seed_without_labels(tmp_path):
    images = pixels(40, (8, 8))
    save_all(tmp_path / "flat", images)
    got = load_data(tmp_path / "flat", test_fraction=0.25, split_seed=0, progress=False)
    assert got.train_labels is None and got.test_labels is None and got.label_names is None
    assert len(got.train_images) == 30 and len(got.test_images) == 10  # round(0.25 * 40)
    together = torch.cat([got.train_images, got.test_images])[:, 0].numpy()
    assert sorted(map(bytes, together)) == sorted(map(bytes, images))  # every image once

    again = load_data(tmp_path / "flat", test_fraction=0.25, split_seed=0, progress=False)
    other = load_data(tmp_path / "flat", test_fraction=0.25, split_seed=1, progress=False)
    assert torch.equal(again.test_images, got.test_images)
    assert not torch.equal(other.test_images, got.test_images)


def test_class_folders_without_train_and_test_are_split_at_random_and_keep_their_labels(tmp_path):
    data = labelled(20, 0, ("one", "two"))
    folder = write_png_dir(tmp_path / "d", data, split=False)
    got = load_data(folder, test_fraction=0.1, progress=False)
    assert got.label_names == ("one", "two") and len(got.test_images) == 2
    written = {bytes(image.numpy()): int(label) for image, label in zip(data.train_images, data.train_labels)}
    for images, labels in ((got.train_images, got.train_labels), (got.test_images, got.test_labels)):
        assert [written[bytes(image.numpy())] for image in images] == labels.tolist()


def test_hidden_and_non_image_files_are_skipped(tmp_path):
    save_all(tmp_path / "d", pixels(4, (8, 8)))
    (tmp_path / "d" / ".junk.png").write_bytes(b"not an image")
    (tmp_path / "d" / ".thumbnails").mkdir()
    (tmp_path / "d" / ".thumbnails" / "x.png").write_bytes(b"not an image")
    (tmp_path / "d" / "notes.txt").write_text("hello")
    got = load_data(tmp_path / "d", progress=False)
    assert len(got.train_images) + len(got.test_images) == 4


# --- kinds of image ----------------------------------------------------------------------

def test_rgb_pngs_give_three_channels_with_their_pixels(tmp_path):
    images = pixels(6, (8, 8, 3))
    save_all(tmp_path / "d" / "train", images[:4])
    save_all(tmp_path / "d" / "test", images[4:])
    got = load_data(tmp_path / "d", progress=False)
    assert got.image_shape == (3, 8, 8) and got.train_labels is None
    want = torch.from_numpy(images[:4]).permute(0, 3, 1, 2)
    assert pairs(got.train_images, torch.zeros(4)) == pairs(want, torch.zeros(4))


def test_jpegs_read_close_to_what_was_written(tmp_path):
    y, x = np.mgrid[0:16, 0:16]
    smooth = np.stack([(x * 16), (y * 16), ((x + y) * 8)], axis=-1).astype(np.uint8)  # JPEG keeps smooth images well
    for i in range(3):
        save(tmp_path / "d" / f"{i}.JPG", smooth, quality=95)
    got = load_data(tmp_path / "d", test_fraction=0.34, progress=False)
    assert got.image_shape == (3, 16, 16)
    error = (got.train_images[0].permute(1, 2, 0).float() - torch.from_numpy(smooth).float()).abs().mean()
    assert error < 4


def test_palette_images_become_grey_or_rgb_by_their_palette(tmp_path):
    grey = pixels(3, (8, 8))
    for i, image in enumerate(grey):
        Image.fromarray(image).convert("P").save(tmp_path / f"grey{i}.png")  # L -> P: a grey palette
    (tmp_path / "g").mkdir()
    for i in range(3):
        (tmp_path / f"grey{i}.png").rename(tmp_path / "g" / f"{i}.png")
    got = load_data(tmp_path / "g", test_fraction=0.34, progress=False)
    assert got.image_shape == (1, 8, 8)
    assert sorted(map(bytes, torch.cat([got.train_images, got.test_images])[:, 0].numpy())) == \
        sorted(map(bytes, grey))

    colour = pixels(3, (8, 8, 3))
    (tmp_path / "c").mkdir()
    for i, image in enumerate(colour):
        Image.fromarray(image).quantize(16).save(tmp_path / "c" / f"{i}.png")
    assert load_data(tmp_path / "c", test_fraction=0.34, progress=False).image_shape == (3, 8, 8)


def test_bilevel_and_cmyk_images_become_grey_and_rgb(tmp_path):
    for i, image in enumerate(pixels(2, (8, 8))):
        bits = Image.fromarray(image).convert("1", dither=Image.Dither.NONE)
        save(tmp_path / "bits" / f"{i}.png", bits)
        assert Image.open(tmp_path / "bits" / f"{i}.png").mode == "1"
    got = load_data(tmp_path / "bits", test_fraction=0.5, progress=False)
    values = torch.cat([got.train_images, got.test_images])
    assert got.image_shape == (1, 8, 8) and set(values.unique().tolist()) <= {0, 255}

    for i, image in enumerate(pixels(2, (8, 8, 3))):
        save(tmp_path / "cmyk" / f"{i}.jpg", Image.fromarray(image).convert("CMYK"))
    assert load_data(tmp_path / "cmyk", test_fraction=0.5, progress=False).image_shape == (3, 8, 8)


def test_image_size_resizes_images_of_different_sizes(tmp_path):
    for i, (h, w) in enumerate([(8, 8), (12, 10), (40, 30), (3, 5)]):
        save(tmp_path / "d" / f"{i}.png", np.full((h, w), 10 * (i + 1), dtype=np.uint8))
    got = load_data(tmp_path / "d", image_size=6, test_fraction=0.25, progress=False)
    assert got.image_shape == (1, 6, 6)
    # A flat image stays flat: resized, not cropped or padded.
    values = {int(image.unique().item()) for image in torch.cat([got.train_images, got.test_images])}
    assert values == {10, 20, 30, 40}


def test_threaded_decoding_reads_the_same_as_one_thread(tmp_path, monkeypatch):
    data = labelled(50, 20, ("a", "b", "c"))
    folder = write_png_dir(tmp_path / "d", data)
    one = load_data(folder, progress=False)
    monkeypatch.setattr(folders, "_workers", lambda files: 4)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another-cache"))
    many = load_data(folder, progress=False)
    assert torch.equal(one.train_images, many.train_images) and torch.equal(one.test_images, many.test_images)
    assert torch.equal(one.train_labels, many.train_labels)

    (folder / "train" / "b" / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="zz.png: cannot be read as an image"):
        load_data(folder, progress=False)


# --- the cache ----------------------------------------------------------------------------

def entries(cache: Path) -> list[Path]:
    """The cache's image files (one per folder, options and split), not their rows files."""
    return sorted(p for p in cache.glob("*.npy") if not p.name.endswith(".rows.npy"))


def counting_opens(monkeypatch) -> list:
    """From now on, every file Pillow opens is appended to the list returned."""
    original_open, opened = Image.open, []

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return original_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return opened


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory map holds all of tensor's bytes, or None (Linux's /proc/self/maps)."""
    first, last = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes - 1
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if start <= first and last < end:
            return fields[5] if len(fields) == 6 else None
    return None


needs_proc_maps = pytest.mark.skipif(not Path("/proc/self/maps").exists(),
                                     reason="reads the process's memory maps from /proc")


def test_a_second_read_comes_from_the_cache_and_a_changed_file_invalidates_it(tmp_path, cache,
                                                                               monkeypatch):
    folder = write_png_dir(tmp_path / "d", labelled(10, 4, ("x", "y")))
    first = load_data(folder, progress=False)
    assert len(entries(cache)) == 1

    opened = counting_opens(monkeypatch)
    second = load_data(folder, progress=False)
    assert opened == []  # no image was decoded: the cache held them
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_images, second.test_images)
    assert torch.equal(first.test_labels, second.test_labels) and second.label_names == ("x", "y")

    changed = next((folder / "train").rglob("*.png"))
    stat = changed.stat()
    save(changed, np.full((8, 8), 7, dtype=np.uint8))
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    third = load_data(folder, progress=False)
    assert len(opened) == 14  # read again, every image
    assert (third.train_images == 7).all(dim=(1, 2, 3)).any()
    assert len(entries(cache)) == 1  # the folder's entry was replaced, not added to


@needs_proc_maps
def test_the_images_are_a_memory_map_of_the_cache_file_when_built_and_when_read(tmp_path, cache):
    folder = write_png_dir(tmp_path / "d", labelled(10, 4, ("x", "y")))
    built = load_data(folder, progress=False)
    (entry,) = entries(cache)
    read = load_data(folder, progress=False)
    for data in (built, read):
        assert mapped_file(data.train_images) == str(entry)
        assert mapped_file(data.test_images) == str(entry)


@needs_proc_maps
def test_train_and_test_images_are_consecutive_slices_of_one_map_not_copies(tmp_path, cache):
    save_all(tmp_path / "flat", pixels(20, (8, 8)))
    for split_seed in (0, 0, 1):  # built, read, laid out for another split
        got = load_data(tmp_path / "flat", split_seed=split_seed, progress=False)
        train, test = got.train_images, got.test_images
        assert test.data_ptr() == train.data_ptr() + train.nbytes
        assert mapped_file(train) == mapped_file(test) == str(entries(cache)[0])


def test_another_split_is_laid_out_from_the_cache_without_decoding(tmp_path, cache, monkeypatch):
    save_all(tmp_path / "flat", pixels(30, (8, 8)))
    load_data(tmp_path / "flat", split_seed=0, progress=False)
    opened = counting_opens(monkeypatch)
    other = load_data(tmp_path / "flat", split_seed=1, test_fraction=0.2, progress=False)
    assert opened == [] and len(entries(cache)) == 1
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another-cache"))
    decoded = load_data(tmp_path / "flat", split_seed=1, test_fraction=0.2, progress=False)
    assert len(opened) == 30
    assert torch.equal(other.train_images, decoded.train_images)
    assert torch.equal(other.test_images, decoded.test_images)


def test_an_npz_cache_of_an_earlier_version_is_removed_and_rebuilt(tmp_path, cache, monkeypatch):
    data = labelled(10, 4, ("x", "y"))
    folder = write_png_dir(tmp_path / "d", data)
    # Where the .npz cache kept this folder, with a fingerprint that version would have matched.
    key = hashlib.sha256(f"vaelab folders v3\0{folder.resolve()}\0{(None,)!r}".encode())
    old = cache / f"{key.hexdigest()}.npz"
    with monkeypatch.context() as m:
        m.setattr(folders, "CACHE_VERSION", 3)
        fingerprint = folders._fingerprint(folder, folders._scan(folder), (None,))
    cache.mkdir(parents=True)
    np.savez(old, images=np.zeros((14, 1, 8, 8), np.uint8), fingerprint=np.array(fingerprint))

    opened = counting_opens(monkeypatch)
    got = load_data(folder, progress=False)
    assert len(opened) == 14 and not old.exists() and len(entries(cache)) == 1
    assert pairs(got.train_images, got.train_labels) == pairs(data.train_images, data.train_labels)


def test_the_temporary_file_of_a_killed_build_is_not_trusted_and_is_removed(tmp_path, cache,
                                                                            monkeypatch):
    folder = write_png_dir(tmp_path / "d", labelled(10, 4, ("x", "y")))
    first = load_data(folder, progress=False)
    (entry,) = entries(cache)
    # A build killed just before its rename leaves a full-looking file under its temporary name.
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    leftover = cache / f".{entry.name}.{folders._HOST}-{int(ended.stdout)}-0123abcd.tmp"
    entry.rename(leftover)

    opened = counting_opens(monkeypatch)
    again = load_data(folder, progress=False)
    assert len(opened) == 14  # decoded again, not read from the leftover
    assert not leftover.exists() and entries(cache) == [entry]
    assert torch.equal(first.train_images, again.train_images)


def test_the_temporary_file_of_a_build_still_running_is_left_alone(tmp_path, cache):
    folder = write_png_dir(tmp_path / "d", labelled(10, 4, ("x", "y")))
    load_data(folder, progress=False)
    (entry,) = entries(cache)
    running = cache / f".{entry.name}.{folders._HOST}-{os.getpid()}-0123abcd.tmp"
    running.write_bytes(b"half an entry")
    other = cache / f".{entry.name}.not-this-machine-1-0123abcd.tmp"
    other.write_bytes(b"half an entry")
    entry.unlink()
    load_data(folder, progress=False)
    assert running.exists() and other.exists() and entries(cache) == [entry]


def test_a_damaged_cache_entry_is_ignored_and_rewritten(tmp_path, cache):
    folder = write_png_dir(tmp_path / "d", labelled(10, 4, ("x", "y")))
    want = load_data(folder, progress=False).train_images.clone()  # a map sees the damage done
    (entry,) = entries(cache)
    entry.write_bytes(entry.read_bytes()[:300])  # the header and some rows
    second = load_data(folder, progress=False)
    assert torch.equal(want, second.train_images)
    assert np.load(entry, allow_pickle=False).shape == (14, 1, 8, 8)


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    folder = write_png_dir(tmp_path / "d", labelled(10, 4, ("x", "y")))
    assert len(load_data(folder, progress=False).train_images) == 10
    assert blocker.read_text().startswith("a file")


# --- what is refused ----------------------------------------------------------------------

def _good(folder: Path, n: int = 3, shape=(8, 8)) -> None:
    save_all(folder, pixels(n, shape, seed=1))


def _not_an_image(d: Path) -> Path:
    _good(d)
    bad = d / "zz.png"
    bad.write_bytes(b"these bytes are not a PNG")
    return bad


def _truncated_png(d: Path) -> Path:
    _good(d, shape=(64, 64))
    bad = save(d / "zz.png", pixels(1, (64, 64), seed=2)[0])  # noise: its pixel data fills the file
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return bad


def _rgba(d: Path) -> Path:
    _good(d)
    return save(d / "zz.png", pixels(1, (8, 8, 4))[0])


def _la(d: Path) -> Path:
    _good(d)
    return save(d / "zz.png", pixels(1, (8, 8, 2))[0])


def _palette_with_transparency(d: Path) -> Path:
    _good(d)
    return save(d / "zz.png", Image.fromarray(pixels(1, (8, 8))[0]).convert("P"), transparency=0)


def _grey_with_transparency(d: Path) -> Path:
    _good(d)
    return save(d / "zz.png", pixels(1, (8, 8))[0], transparency=0)


def _sixteen_bit(d: Path) -> Path:
    _good(d)
    return save(d / "zz.png", pixels(1, (8, 8))[0].astype(np.uint16) * 257)  # mode I;16


def _mixed_sizes(d: Path) -> Path:
    _good(d)
    return save(d / "zz.png", pixels(1, (9, 8))[0])


def _mixed_channels(d: Path) -> Path:
    _good(d)
    return save(d / "zz.png", pixels(1, (8, 8, 3))[0])


def _empty(d: Path) -> Path:
    d.mkdir()
    (d / "notes.txt").write_text("no images here")
    return d


def _loose_beside_classes(d: Path) -> Path:
    _good(d / "cats")
    _good(d / "dogs")
    return save(d / "stray.png", pixels(1, (8, 8))[0])


def _test_without_images(d: Path) -> Path:
    _good(d / "train" / "cats")
    (d / "test" / "cats").mkdir(parents=True)
    return d / "test"


def _train_without_test(d: Path) -> Path:
    _good(d / "train")
    return d


def _outside_the_splits(d: Path) -> Path:
    _good(d / "train")
    _good(d / "test")
    return save(d / "extra" / "zz.png", pixels(1, (8, 8))[0])


def _labelled_train_loose_test(d: Path) -> Path:
    _good(d / "train" / "cats")
    _good(d / "test")
    return d / "test" / "000.png"


def _one_image_cannot_be_split(d: Path) -> Path:
    _good(d, n=1)
    return d


# The bad-image corpus: a builder that damages a folder and returns the culprit, and what the error says.
BAD_FOLDERS = [
    (_not_an_image, "cannot be read as an image (not a PNG or JPEG file)"),
    (_truncated_png, "cannot be read as an image"),
    (_rgba, "transparency (mode RGBA)"),
    (_la, "transparency (mode LA)"),
    (_palette_with_transparency, "transparency (mode P)"),
    (_grey_with_transparency, "transparency (mode L)"),
    (_sixteen_bit, "(mode I;16)"),
    (_mixed_sizes, "is 8x9 but"),
    (_mixed_channels, "is RGB but"),
    (_empty, "no PNG or JPEG images"),
    (_loose_beside_classes, "class folders"),
    (_test_without_images, "no PNG or JPEG images"),
    (_train_without_test, "has train/ but no test/"),
    (_outside_the_splits, "outside train/ and test/"),
    (_labelled_train_loose_test, "has class folders"),
    (_one_image_cannot_be_split, "leave 0 for training"),
]


@pytest.mark.parametrize("build,says", BAD_FOLDERS)
def test_bad_image_folders_are_refused_in_one_line_naming_the_culprit_and_write_nothing(
        tmp_path, cache, build, says):
    folder = tmp_path / "data"
    culprit = build(folder)
    before = snapshot(folder)
    with pytest.raises(DataError) as excinfo:
        load_data(folder, progress=False)
    message = one_line_error(excinfo)
    assert says in message and str(culprit) in message, message
    assert snapshot(folder) == before
    assert not cache.exists() or not any(cache.iterdir())


def test_mixed_sizes_suggest_image_size_and_read_with_it(tmp_path):
    culprit = _mixed_sizes(tmp_path / "d")
    with pytest.raises(DataError, match="pass --image-size S to resize all to SxS"):
        load_data(tmp_path / "d", progress=False)
    assert load_data(tmp_path / "d", image_size=8, progress=False).image_shape == (1, 8, 8)
    assert culprit.exists()


@pytest.mark.parametrize("options,says", [
    ({"image_size": 0}, "--image-size"), ({"image_size": -3}, "--image-size"),
    ({"image_size": 2.5}, "--image-size"), ({"image_size": True}, "--image-size"),
    ({"test_fraction": 0}, "--test-fraction"), ({"test_fraction": 1}, "--test-fraction"),
    ({"test_fraction": 1.5}, "--test-fraction"), ({"test_fraction": float("nan")}, "--test-fraction"),
    ({"split_seed": -1}, "--split-seed"), ({"split_seed": 1.5}, "--split-seed"),
])
def test_nonsensical_folder_options_are_refused(tmp_path, options, says):
    _good(tmp_path / "d")
    with pytest.raises(DataError, match=says) as excinfo:
        load_data(tmp_path / "d", progress=False, **options)
    one_line_error(excinfo)


def test_image_size_with_idx_data_is_refused(tmp_path):
    directory = write_idx_dir(tmp_path / "idx", synthetic_dataset())
    with pytest.raises(DataError, match="--image-size resizes image folders only") as excinfo:
        load_data(directory, image_size=16)
    assert str(directory) in one_line_error(excinfo)


def test_image_size_with_the_mnist_cache_is_refused_before_fetching(tmp_path, monkeypatch):
    monkeypatch.delenv("VAELAB_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="--image-size resizes image folders only"):
        load_data(image_size=16)
    assert not (tmp_path / "xdg" / "vaelab" / "mnist").exists()


# --- .npz -------------------------------------------------------------------------------

def test_an_npz_of_grey_images_with_labels_reads_as_written(tmp_path):
    x_train, x_test = pixels(12, (8, 9)), pixels(5, (8, 9), seed=1)
    y_train, y_test = np.arange(12, dtype=np.uint8) % 3, np.arange(5, dtype=np.int32)
    np.savez(tmp_path / "d.npz", x_train=x_train, x_test=x_test, y_train=y_train, y_test=y_test)
    got = load_data(tmp_path / "d.npz")
    assert got.source == "npz" and got.directory == tmp_path / "d.npz" and got.label_names is None
    assert got.image_shape == (1, 8, 9) and torch.equal(got.test_images[:, 0], torch.from_numpy(x_test))
    assert got.train_labels.dtype == torch.int64 and got.train_labels.tolist() == y_train.tolist()
    assert got.test_labels.tolist() == y_test.tolist()


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_an_npz_of_rgb_images_reads_channels_first(tmp_path, save):
    x = pixels(4, (8, 8, 3))
    save(tmp_path / "d.npz", x_train=x, x_test=x[:2], y_train=np.zeros(4, int), y_test=np.ones(2, int))
    got = load_data(tmp_path / "d.npz")
    assert got.image_shape == (3, 8, 8)
    assert torch.equal(got.train_images, torch.from_numpy(x).permute(0, 3, 1, 2))


def test_rgb_images_are_read_from_the_archive_block_by_block_and_others_by_numpy(tmp_path):
    import zipfile

    from vaelab.data.arrays import _colour_images

    x = pixels(5, (8, 8, 3))
    np.savez(tmp_path / "d.npz", x_train=x, x_test=pixels(2, (8, 8)))
    with zipfile.ZipFile(tmp_path / "d.npz") as archive:
        assert np.array_equal(_colour_images(archive, "x_train"), x.transpose(0, 3, 1, 2))
        assert _colour_images(archive, "x_test") is None  # grey: numpy's own read needs no copy


def test_an_npz_without_labels_has_none(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=pixels(4, (8, 8, 1)), x_test=pixels(2, (8, 8, 1)))
    got = load_data(tmp_path / "d.npz")
    assert got.image_shape == (1, 8, 8) and got.train_labels is None and got.test_labels is None
    assert got.subset(2, 1).train_labels is None


def _npz(path: Path, **arrays) -> None:
    defaults = {"x_train": pixels(4, (8, 8)), "x_test": pixels(2, (8, 8))}
    np.savez(path, **{**defaults, **arrays})


@pytest.mark.parametrize("write,says", [
    (lambda p: np.savez(p, x_train=pixels(4, (8, 8))), "no array named x_test"),
    (lambda p: _npz(p, x_train=pixels(4, (8, 8)).astype(np.float32)),
     "x_train is float32; vaelab needs uint8 grey levels 0-255"),
    (lambda p: _npz(p, x_train=pixels(4, (8, 8, 2))), "2 channels"),
    (lambda p: _npz(p, x_test=pixels(2, (8,))), "must be (N, H, W) or (N, H, W, C)"),
    (lambda p: _npz(p, x_train=np.array([None, 1], dtype=object)), "x_train holds Python objects"),
    (lambda p: _npz(p, y_train=np.zeros(4, int)), "has y_train but no y_test"),
    (lambda p: _npz(p, y_train=np.zeros(3, int), y_test=np.zeros(2, int)), "one label per image"),
    (lambda p: _npz(p, y_train=np.zeros(4), y_test=np.zeros(2)), "labels must be integers"),
    (lambda p: _npz(p, y_train=-np.ones(4, int), y_test=np.zeros(2, int)), "negative label"),
    (lambda p: _npz(p, x_test=pixels(2, (8, 9))), "x_train images are 1x8x8 but x_test images are 1x8x9"),
    (lambda p: p.write_bytes(b"not an npz at all"), "not an .npz file"),
    (lambda p: _npz(p) or p.write_bytes(p.read_bytes()[:200]), "cannot be read as an .npz file"),
    (lambda p: np.save(open(p, "wb"), pixels(2, (8, 8))), "single .npy array"),
])
def test_bad_npz_files_are_refused_in_one_line_naming_the_file(tmp_path, write, says):
    path = tmp_path / "data.npz"
    write(path)
    with pytest.raises(DataError) as excinfo:
        load_data(path)
    message = one_line_error(excinfo)
    assert says in message and str(path) in message, message


def test_image_size_with_an_npz_is_refused(tmp_path):
    _npz(tmp_path / "d.npz")
    with pytest.raises(DataError, match="--image-size resizes image folders only; .*d.npz is an .npz file"):
        load_data(tmp_path / "d.npz", image_size=8)


def test_a_missing_npz_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "nowhere.npz")


def test_a_jpeg_with_an_exif_rotation_is_turned_upright(tmp_path):
    upright = np.zeros((8, 16), np.uint8)
    upright[:, :8] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: stored rotated, to be turned 90 degrees clockwise
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.rot90(upright)).save(folder / f"{i}.jpg", exif=exif, quality=100)
    got = load_data(folder, test_fraction=0.34, progress=False)
    assert got.image_shape == (1, 8, 16)
    image = got.train_images[0, 0].float()
    assert image[:, :8].mean() > 200 and image[:, 8:].mean() < 50


def test_other_splits_of_one_folder_share_one_cache_entry(tmp_path, cache):
    save_all(tmp_path / "flat", pixels(20, (8, 8)))
    a = load_data(tmp_path / "flat", split_seed=0, progress=False)
    b = load_data(tmp_path / "flat", split_seed=1, test_fraction=0.3, progress=False)
    assert len(entries(cache)) == 1 and len(list(cache.glob("*.rows.npy"))) == 1
    assert len(b.test_images) == 6 and not torch.equal(a.test_images[:2], b.test_images[:2])


# --- forgiving on request ----------------------------------------------------------------

def test_a_folder_mixing_grey_and_rgb_reads_as_one_kind_with_channels(tmp_path):
    folder = tmp_path / "mixed"
    _mixed_channels(folder)
    with pytest.raises(DataError, match="convert them to one kind") as refused:
        load_data(folder, progress=False)
    assert "--channels" in one_line_error(refused)
    rgb = pixels(1, (8, 8, 3))[0]
    grey = load_data(folder, progress=False, channels="grey")
    assert grey.image_shape == (1, 8, 8)
    images = torch.cat([grey.train_images, grey.test_images])
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    assert any(np.array_equal(image[0].numpy(), expected) for image in images)
    assert load_data(folder, progress=False, channels="rgb").image_shape == (3, 8, 8)


@pytest.mark.parametrize("background, level", [("white", 255), ("black", 0)])
def test_transparent_images_are_flattened_onto_the_background_asked_for(tmp_path, background,
                                                                        level):
    folder = tmp_path / "alpha"
    save_all(folder, pixels(3, (8, 8, 3), seed=1))
    see_through = np.zeros((8, 8, 4), np.uint8)
    see_through[..., 1] = 200  # green, fully transparent but for one opaque pixel
    see_through[0, 0, 3] = 255
    save(folder / "zz.png", see_through)
    data = load_data(folder, progress=False, background=background, test_fraction=0.25)
    assert data.image_shape == (3, 8, 8)  # the opaque pixel is green: RGB
    images = torch.cat([data.train_images, data.test_images])
    names = data.train_files + data.test_files
    flat = images[names.index("zz.png")].permute(1, 2, 0).numpy()
    assert flat[0, 0].tolist() == [0, 200, 0] and (flat.reshape(-1, 3)[1:] == level).all()


def test_a_grey_image_with_alpha_flattens_to_grey(tmp_path):
    folder = tmp_path / "alpha"
    _la(folder)
    assert load_data(folder, progress=False, background="white").image_shape == (1, 8, 8)


def broken_folder(folder: Path) -> list[str]:
    """Good 8x8 grey images and four bad files; returns the bad files' names."""
    save_all(folder, pixels(20, (8, 8), seed=3))
    (folder / "garbage.png").write_bytes(b"not a png at all")
    save(folder / "larger.png", pixels(1, (9, 9))[0])
    save(folder / "colour.png", pixels(1, (8, 8, 3))[0])
    save(folder / "see-through.png", pixels(1, (8, 8, 4))[0])
    return ["colour.png", "garbage.png", "larger.png", "see-through.png"]


def test_skip_bad_leaves_out_every_unfit_file_and_lists_them_all_with_why(tmp_path):
    folder = tmp_path / "broken"
    bad = broken_folder(folder)
    with pytest.raises(DataError):
        load_data(folder, progress=False)  # strict by default: the first bad file stops the read
    data = load_data(folder, progress=False, skip_bad=True)
    assert [name for name, _ in data.skipped] == bad
    reasons = dict(data.skipped)
    assert "not a PNG or JPEG" in reasons["garbage.png"] and "9x9" in reasons["larger.png"]
    assert "RGB" in reasons["colour.png"] and "transparency" in reasons["see-through.png"]
    assert len(data.train_images) + len(data.test_images) == 20
    report = data.skipped_report().splitlines()
    assert report[0] == f"{folder}: skipped 4 of 24 files:" and len(report) == 5


def test_skip_bad_reads_the_other_files_as_a_folder_without_the_bad_ones(tmp_path):
    bad = broken_folder(tmp_path / "broken")
    save_all(tmp_path / "clean", pixels(20, (8, 8), seed=3))
    skipped = load_data(tmp_path / "broken", progress=False, skip_bad=True)
    clean = load_data(tmp_path / "clean", progress=False)
    assert torch.equal(skipped.train_images, clean.train_images)
    assert torch.equal(skipped.test_images, clean.test_images)
    assert skipped.test_files == clean.test_files and not set(bad) & set(skipped.train_files)


def test_a_second_read_with_skip_bad_decodes_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "broken"
    broken_folder(folder)
    first = load_data(folder, progress=False, skip_bad=True)
    opened = counting_opens(monkeypatch)
    again = load_data(folder, progress=False, skip_bad=True)
    assert opened == [] and again.skipped == first.skipped
    assert torch.equal(again.train_images, first.train_images)


def test_the_skip_report_is_printed_once_and_quiet_prints_nothing(tmp_path):
    folder = tmp_path / "broken"
    broken_folder(folder)
    described = run_vaelab("data", "--data-dir", folder, "--skip-bad")
    assert described.returncode == 0, described.stderr
    assert described.stderr.count("skipped 4 of 24 files") == 1
    assert all(name in described.stderr for name in ("garbage.png", "larger.png", "colour.png"))
    assert "4 files skipped" in described.stdout
    trained = run_vaelab("train", "--data-dir", folder, "--skip-bad", "--epochs", 1, "--batch-size", 10,
                         "--no-plots", "--out", tmp_path / "run", "--quiet")
    assert trained.returncode == 0 and trained.stdout == "" and trained.stderr == "", trained.stderr
