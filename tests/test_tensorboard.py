"""vaelab.tensorboard: what a Board and the TensorBoard callback write, read back with
TensorBoard's own reader."""

from __future__ import annotations

import importlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelab.config import ModelConfig
from vaelab.errors import VaelabError
from vaelab.models import VAE, build_model
from vaelab.tensorboard import RECONSTRUCTIONS, SAMPLES, Board, TensorBoard, reconstruction_grid

RECORDS = [
    {"epoch": 1, "train_loss": 160.5, "test_loss": 158.25, "test_kl": 12.5, "kl_weight": 0.5,
     "test_iwae": 155.0, "seconds": 1.2},
    {"epoch": 2, "train_loss": 150.25, "test_loss": 149.75, "test_kl": 14.0, "kl_weight": 1.0,
     "test_iwae": 147.5, "seconds": 1.1},
]
LRS = [1e-3, 5e-4]
TAGS = {"train_loss": "loss/train", "test_loss": "loss/test", "test_kl": "kl/test",
        "kl_weight": "kl_weight", "test_iwae": "loss/test_iwae"}


def _need_tensorboard() -> None:
    """Skip without the tensorboard package, except in CI, whose test extra has it."""
    if os.environ.get("CI") == "true":
        importlib.import_module("tensorboard")  # CI must run these tests: fail, never skip
    else:
        pytest.importorskip("tensorboard")


def _read(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def _model(shape: tuple[int, int, int]) -> VAE:
    likelihood = "bernoulli" if shape[0] == 1 else "gaussian"
    config = ModelConfig(z_dim=2, encoder_hidden=(16,), decoder_hidden=(16,), image_shape=shape,
                         likelihood=likelihood)
    return build_model(config, seed=0).eval()


def _images(shape: tuple[int, int, int], n: int = 20) -> torch.Tensor:
    """(n, C, H, W) uint8 random grey levels."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)


def _write(log_dir: Path, shape: tuple[int, int, int], epochs: int = 2) -> tuple[VAE, torch.Tensor]:
    model, images = _model(shape), _images(shape)
    with Board(log_dir) as board:
        for record, lr in zip(RECORDS[:epochs], LRS):
            board.write_epoch(record["epoch"], record, lr=lr, model=model, images=images)
    return model, images


def _pixels(event) -> np.ndarray:
    """An image event's PNG, decoded: (H, W, 3) uint8 (torch writes grey as 3 equal channels)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def test_each_epochs_scalars_are_its_record_and_learning_rate(tmp_path):
    _need_tensorboard()
    _write(tmp_path / "tb", (1, 28, 28))
    events = _read(tmp_path / "tb")
    assert set(events.Tags()["scalars"]) == {*TAGS.values(), "lr"}  # no epoch, no seconds
    for key, tag in TAGS.items():
        written = events.Scalars(tag)
        assert [e.step for e in written] == [1, 2]
        assert [e.value for e in written] == pytest.approx([r[key] for r in RECORDS], rel=1e-6)
    assert [e.value for e in events.Scalars("lr")] == pytest.approx(LRS, rel=1e-6)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_each_epoch_has_reconstructions_and_samples_the_size_of_their_grids(tmp_path, shape):
    _need_tensorboard()
    _write(tmp_path / "tb", shape)
    events = _read(tmp_path / "tb")
    c, h, w = shape
    sizes = {"reconstructions": (2 * (h + 2) + 2, RECONSTRUCTIONS * (w + 2) + 2),
             "samples": (8 * (h + 2) + 2, 8 * (w + 2) + 2)}  # SAMPLES = 64 in 8 rows of 8
    assert SAMPLES == 64 and set(events.Tags()["images"]) == set(sizes)
    for tag, (height, width) in sizes.items():
        written = events.Images(tag)
        assert [e.step for e in written] == [1, 2]
        for event in written:
            assert (event.height, event.width) == _pixels(event).shape[:2] == (height, width)


def test_the_reconstructions_image_is_the_data_row_above_the_models_reconstructions(tmp_path):
    _need_tensorboard()
    model, images = _write(tmp_path / "tb", (1, 28, 28), epochs=1)
    written = _pixels(_read(tmp_path / "tb").Images("reconstructions")[0])
    assert (written == written[..., :1]).all()  # grey
    written = written[..., 0]
    expected = reconstruction_grid(model, images[:RECONSTRUCTIONS])
    assert np.abs(written.astype(float) - expected * 255).max() <= 1  # 8-bit rounding
    # The data row is the binarized test images: only black and white inside the cells.
    assert set(np.unique(written[2:30, 2:30])) <= {0, 255}


def test_the_same_epoch_writes_the_same_images_and_leaves_the_global_rng_alone(tmp_path):
    _need_tensorboard()
    state = torch.random.get_rng_state()
    _write(tmp_path / "a", (1, 28, 28), epochs=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # training's draws are unchanged
    _write(tmp_path / "b", (1, 28, 28), epochs=1)
    a, b = _read(tmp_path / "a"), _read(tmp_path / "b")
    for tag in ("reconstructions", "samples"):
        assert a.Images(tag)[0].encoded_image_string == b.Images(tag)[0].encoded_image_string


def test_without_tensorboard_a_board_is_refused_in_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import then fails
    for make in (Board, TensorBoard):  # the callback: when it is made, before fit starts
        with pytest.raises(VaelabError) as refused:
            make(tmp_path / "tb")
        message = str(refused.value)
        assert "pip install 'vaelab[tensorboard]'" in message and "\n" not in message
    assert not (tmp_path / "tb").exists()


def test_a_file_in_the_way_of_the_log_folder_is_refused(tmp_path):
    _need_tensorboard()
    (tmp_path / "tb").write_text("")
    with pytest.raises(VaelabError, match="cannot write"):
        Board(tmp_path / "tb")


def _training():
    """A Training of the tiny config, built, not trained."""
    from conftest import synthetic_dataset
    from vaelab import RunConfig
    from vaelab.train import build

    config = RunConfig(model=ModelConfig(z_dim=2, encoder_hidden=(16,), decoder_hidden=(16,)),
                       epochs=2, batch_size=50, lr=1e-3, schedule="burda", device="cpu")
    return build(config, synthetic_dataset(), progress=False)


def _callback_writes(log_dir: Path, training, records: list[dict], run_dir: Path | None = None):
    board = TensorBoard(log_dir)
    board.on_fit_start(training, run_dir)
    for record in records:
        assert board.on_epoch_end(dict(record), training) is None  # never stops the run
    board.on_fit_end(None)


def test_the_callback_writes_each_record_with_its_learning_rate_and_images(tmp_path):
    _need_tensorboard()
    training = _training()
    _callback_writes(tmp_path / "tb", training, RECORDS)
    events = _read(tmp_path / "tb")
    for key, tag in TAGS.items():
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [
            (r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in RECORDS]
    lrs = [training.config.lr_at(r["epoch"]) for r in RECORDS]  # the schedule's, per epoch
    assert lrs[0] != lrs[1]
    assert [e.value for e in events.Scalars("lr")] == pytest.approx(lrs, rel=1e-6)
    assert [e.step for e in events.Images("reconstructions")] == [1, 2]
    assert [e.step for e in events.Images("samples")] == [1, 2]


def test_after_a_resume_the_callback_writes_each_epoch_once(tmp_path):
    _need_tensorboard()
    from vaelab.runs import save_checkpoint

    training = _training()
    _callback_writes(tmp_path / "tb", training, RECORDS)  # epoch 2 written, then the run stopped
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, training.model, training.optimizer, RECORDS[:1])  # its checkpoint: epoch 1
    again = {**RECORDS[1], "test_loss": 140.5}
    _callback_writes(tmp_path / "tb", training, [again], run_dir=run)
    written = _read(tmp_path / "tb").Scalars("loss/test")
    assert [(e.step, e.value) for e in written] == [(1, RECORDS[0]["test_loss"]), (2, 140.5)]


def _config(epochs: int = 2):
    from vaelab import RunConfig

    return RunConfig(model=ModelConfig(z_dim=2, encoder_hidden=(16,), decoder_hidden=(16,)),
                     epochs=epochs, batch_size=50, device="cpu")


def _train(config, run_dir: Path, callbacks: list, resume: bool = False):
    from conftest import synthetic_dataset
    from vaelab import train

    return train(config, run_dir, synthetic_dataset(), progress=False, resume=resume,
                 callbacks=callbacks)


@pytest.mark.slow  # trains
def test_training_with_tensorboard_writes_one_record_per_epoch(tmp_path):
    _need_tensorboard()
    result = _train(_config(), tmp_path / "run", [TensorBoard(tmp_path / "tb")])
    events = _read(tmp_path / "tb")
    for key, tag in (("train_loss", "loss/train"), ("test_loss", "loss/test"),
                     ("test_kl", "kl/test")):
        assert [e.value for e in events.Scalars(tag)] == pytest.approx(
            [m[key] for m in result.metrics], rel=1e-6)
    assert [e.step for e in events.Images("samples")] == [1, 2]


@pytest.mark.slow  # trains
def test_a_resumed_run_writes_each_epoch_once(tmp_path):
    _need_tensorboard()
    board = tmp_path / "tb"
    _train(_config(2), tmp_path / "run", [TensorBoard(board)])
    _train(_config(3), tmp_path / "run", [TensorBoard(board)], resume=True)
    assert [e.step for e in _read(board).Scalars("loss/test")] == [1, 2, 3]


def test_a_vq_vaes_codebook_use_is_written_and_it_has_no_samples_before_its_prior(tmp_path):
    _need_tensorboard()
    config = ModelConfig(family="vq-vae", architecture="conv", conv_channels=(4,), z_dim=3,
                         codebook_size=6, image_shape=(1, 8, 8))
    model, images = build_model(config, seed=0).eval(), _images((1, 8, 8))
    record = {"epoch": 1, "train_loss": 90.0, "test_loss": 80.0, "test_kl": 28.7,
              "perplexity": 4.5, "dead_codes": 1, "seconds": 1.0}
    with Board(tmp_path / "tb") as board:
        board.write_epoch(1, record, lr=1e-3, model=model, images=images)
    events = _read(tmp_path / "tb")
    assert [e.value for e in events.Scalars("perplexity")] == [4.5]
    assert [e.value for e in events.Scalars("dead_codes")] == [1.0]
    assert set(events.Tags()["images"]) == {"reconstructions"}
