"""Figures for any data: grey or RGB, square or not, with or without labels, tiny test sets."""

from pathlib import Path

import torch

from conftest import synthetic_dataset
from vaelab.data import Dataset
from vaelab.models import ModelConfig, build_model
from vaelab.plots import draw_figures, image_grid


def _rgb(n_train: int, n_test: int, shape=(8, 12), names=None) -> Dataset:
    g = torch.Generator().manual_seed(0)
    images = lambda n: torch.randint(0, 256, (n, 3, *shape), generator=g, dtype=torch.uint8)
    labels = lambda n: torch.randint(0, 3, (n,), generator=g)
    return Dataset(images(n_train), labels(n_train), images(n_test), labels(n_test), Path("."), False,
                   names, "folder")


def test_an_image_grid_keeps_colour_channels():
    grid = image_grid(torch.rand(5, 4, 6, 3).numpy(), nrow=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 7 + 1, 3)


def test_rgb_non_square_images_with_named_labels_draw_every_figure(tmp_path):
    data = _rgb(40, 30, names=("a", "price $1 to $2", "c"))  # a folder name is text, not mathtext
    model = build_model(ModelConfig(z_dim=2, encoder_hidden=(8,), decoder_hidden=(8,), image_shape=(3, 8, 12)))
    names = {p.name for p in draw_figures(tmp_path, model, data, [])}
    assert names == {"data.png", "reconstructions.png", "samples.png", "manifold.png", "latent.png"}


def test_a_test_set_too_small_for_a_t_sne_draws_the_rest(tmp_path):
    data = _rgb(40, 2)
    model = build_model(ModelConfig(z_dim=3, encoder_hidden=(8,), decoder_hidden=(8,), image_shape=(3, 8, 12)))
    names = {p.name for p in draw_figures(tmp_path, model, data, [])}
    assert names == {"data.png", "reconstructions.png", "samples.png"}


def test_data_without_labels_draws_one_colour(tmp_path):
    grey = synthetic_dataset(shape=(8, 8))
    data = Dataset(grey.train_images, None, grey.test_images, None, Path("."), False, None, "npz")
    model = build_model(ModelConfig(z_dim=2, encoder_hidden=(8,), decoder_hidden=(8,), image_shape=(1, 8, 8)))
    assert (tmp_path / "figures" / "latent.png") in draw_figures(tmp_path, model, data, [])
