"""Figures for any data: grey or RGB, square or not, with or without labels, tiny test sets."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import synthetic_dataset
from vaelab.data import Dataset
from vaelab.models import ModelConfig, build_model
from vaelab.plots import draw_figures, image_grid, interpolation, interpolation_pairs, linear_path
from vaelab.rng import image_keys


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
    assert names == {"data.png", "reconstructions.png", "samples.png", "interpolation.png",
                     "manifold.png", "latent.png"}


def test_a_test_set_too_small_for_a_t_sne_draws_the_rest(tmp_path):
    data = _rgb(40, 2)
    model = build_model(ModelConfig(z_dim=3, encoder_hidden=(8,), decoder_hidden=(8,), image_shape=(3, 8, 12)))
    names = {p.name for p in draw_figures(tmp_path, model, data, [])}
    assert names == {"data.png", "reconstructions.png", "samples.png", "interpolation.png"}  # 1 pair


def test_data_without_labels_draws_one_colour(tmp_path):
    grey = synthetic_dataset(shape=(8, 8))
    data = Dataset(grey.train_images, None, grey.test_images, None, Path("."), False, None, "npz")
    model = build_model(ModelConfig(z_dim=2, encoder_hidden=(8,), decoder_hidden=(8,), image_shape=(1, 8, 8)))
    assert (tmp_path / "figures" / "latent.png") in draw_figures(tmp_path, model, data, [])


# --- interpolation ----------------------------------------------------------------------------

def _tiny(architecture: str = "mlp", image_shape=(1, 8, 8), **options) -> ModelConfig:
    conv = dict(architecture="conv", conv_channels=(4, 8)) if architecture == "conv" else {}
    return ModelConfig(encoder_hidden=(8,), decoder_hidden=(8,), image_shape=image_shape, **conv,
                       **{"z_dim": 2, **options})


def _means(model, data, index: list[int]) -> torch.Tensor:
    """(len(index), z_dim) posterior means of test images `index`, observed as the figures do."""
    index = torch.tensor(index)
    with torch.no_grad():
        x = model.observe(data.test_images[index], image_keys(0, "observe", index))
        return model.posterior_mean(x)


def _decoded(model, z: torch.Tensor) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) decoder means at codes z (N, z_dim)."""
    with torch.no_grad():
        x = model.decode_mean(z)
    return x[:, 0].numpy() if x.shape[1] == 1 else x.permute(0, 2, 3, 1).numpy()


def test_pairs_join_test_images_in_order_each_to_the_next_of_another_label():
    grey = synthetic_dataset(n_test=6)
    labelled = Dataset(grey.train_images, grey.train_labels, grey.test_images,
                       torch.tensor([0, 0, 1, 2, 2, 2]), Path("."), False)
    # 4 finds no other label left: the next image
    assert interpolation_pairs(labelled, 3).tolist() == [[0, 2], [1, 3], [4, 5]]
    unlabelled = Dataset(grey.train_images, None, grey.test_images, None, Path("."), False)
    assert interpolation_pairs(unlabelled, 5).tolist() == [[0, 1], [2, 3], [4, 5]]  # 6 images


@pytest.mark.parametrize("config", [
    _tiny(),
    _tiny(z_dim=5, likelihood="gaussian-learned"),
    _tiny(posterior="iaf", flow_steps=1),
    _tiny(upper_z_dims=(2,), upper_hidden=(8,)),  # the path runs through z_1
    _tiny("conv", image_shape=(3, 8, 8), likelihood="logistic"),
], ids=["mlp", "gaussian-learned", "iaf", "hierarchy", "conv-rgb"])
def test_a_path_begins_and_ends_at_the_decoded_posterior_means(config):
    grey = synthetic_dataset(n_test=8)
    data = grey if config.image_shape[0] == 1 else _rgb(8, 8, shape=(8, 8))
    model = build_model(config, seed=0)
    paths = interpolation(model, data, pairs=[(0, 5), (3, 2)], steps=4)
    assert paths.shape == (2, 4, *_decoded(model, torch.zeros(1, config.z_dim)).shape[1:])
    first, last = (_decoded(model, _means(model, data, index)) for index in ([0, 3], [5, 2]))
    np.testing.assert_allclose(paths[:, 0], first, atol=1e-6)
    np.testing.assert_allclose(paths[:, -1], last, atol=1e-6)


def test_the_codes_between_are_the_linear_mix_of_the_two_means():
    data = synthetic_dataset(n_test=4)
    model = build_model(_tiny(z_dim=3), seed=0)
    paths = interpolation(model, data, pairs=[(1, 2)], steps=5)
    a, b = _means(model, data, [1, 2])
    for k, t in enumerate([0.0, 0.25, 0.5, 0.75, 1.0]):
        mix = ((1 - t) * a + t * b)[None]
        np.testing.assert_allclose(paths[0, k], _decoded(model, mix)[0], atol=1e-6)
    torch.testing.assert_close(linear_path(a[None], b[None], 3)[0], torch.stack([a, (a + b) / 2, b]))


@pytest.mark.parametrize("architecture,image_shape", [
    pytest.param(a, s, id=f"{'grey' if s[0] == 1 else 'rgb'}-{a}",
                 marks=() if (a, s[0]) == ("conv", 3) else pytest.mark.slow)
    for a in ("mlp", "conv") for s in ((1, 28, 28), (3, 32, 32))])
def test_interpolation_png_is_drawn_for_mlp_and_conv_models_grey_and_rgb(tmp_path, architecture,
                                                                         image_shape):
    c, h, w = image_shape
    data = synthetic_dataset(n_train=4, n_test=4, shape=(h, w)) if c == 1 else _rgb(4, 4, (h, w))
    # z_dim 3 and 4 test images: no manifold, no t-SNE, so a quick run of draw_figures
    model = build_model(_tiny(architecture, image_shape, z_dim=3), seed=0)
    path = tmp_path / "figures" / "interpolation.png"
    assert path in draw_figures(tmp_path, model, data, [])
    with Image.open(path) as image:
        grey = np.asarray(image.convert("L"))
    assert grey.shape[0] > 100 and grey.shape[1] > 300 and grey.min() < grey.max()


def test_the_figures_count_latent_dimensions_from_0_as_the_csv_columns_do():
    from vaelab.plots import kl_figure, latent_figure, manifold_figure

    model = build_model(_tiny(), seed=0)
    data = synthetic_dataset(100, 50)
    axes = latent_figure(model, data).axes[0]
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("mu_0", "mu_1")  # encode's CSV: mu_0, mu_1
    axes = manifold_figure(model, n=3).axes[0]
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("z_0", "z_1")
    ticks = [t.get_text() for t in kl_figure([0.5, 2.0]).axes[0].get_xticklabels()]
    assert ticks == ["1", "0"]  # largest first


def test_an_iwae_runs_figure_plots_the_bound_train_and_test_and_the_test_elbo():
    from vaelab.plots import elbo_figure

    metrics = [{"epoch": e, "train_loss": 100.0 - e, "test_loss": 110.0 - e, "test_iwae": 104.0 - e}
               for e in (1, 2)]
    labels = [line.get_label() for line in elbo_figure(metrics).axes[0].get_lines()]
    assert labels == ["IWAE bound, train", "IWAE bound, test", "ELBO, test"]
