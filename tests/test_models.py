import math

import pytest
import torch

from vaelab.errors import VaelabError
from vaelab.models import PRESETS, ModelConfig, build_model, preset


def test_tutorial_preset_is_the_notebooks_network():
    model = build_model(preset("tutorial"))
    linear = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear == [(784, 256), (256, 128), (128, 4), (2, 128), (128, 256), (256, 784)]


def test_encode_and_decode_have_the_documented_shapes():
    model = build_model(ModelConfig(z_dim=5))
    mu, logvar = model.encode(torch.rand(7, 1, 28, 28))
    assert mu.shape == logvar.shape == (7, 5)
    assert model.decode(torch.randn(7, 5)).shape == (7, 1, 28, 28)
    mean = model.decode_mean(torch.randn(3, 7, 5))
    assert mean.shape == (3, 7, 1, 28, 28) and mean.min() >= 0 and mean.max() <= 1


def test_an_mlp_encodes_flat_images_as_well():
    model = build_model(ModelConfig(z_dim=3), seed=0)
    x = torch.rand(4, 1, 28, 28)
    for a, b in zip(model.encode(x), model.encode(x.view(4, 784))):
        assert torch.equal(a, b)


def test_configs_saved_with_flat_images_load_with_a_channel():
    old = {"x_dim": 784, "z_dim": 2, "encoder_hidden": [256, 128], "decoder_hidden": [128, 256],
           "activation": "relu", "likelihood": "bernoulli", "sigma": 0.1, "image_shape": [28, 28]}
    config = ModelConfig.from_dict(old)
    assert config.image_shape == (1, 28, 28) and config.x_dim == 784


def test_the_decoder_writes_into_a_workspace_with_the_same_result():
    from vaelab.nets import Workspace

    model = build_model(ModelConfig(z_dim=3, activation="tanh"), seed=0)
    z, workspace = torch.randn(2, 5, 3), Workspace()
    with torch.no_grad():
        plain = model.decode(z)
        kept = model.decode(z, workspace)
        torch.testing.assert_close(kept, plain)
        assert model.decode(z, workspace).data_ptr() == kept.data_ptr()  # the same buffer again


def test_a_seed_gives_the_same_weights_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(ModelConfig(), seed=7)
    after = torch.rand(1)
    b = build_model(ModelConfig(), seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(before, after)


def test_burda1_preset_is_one_stochastic_layer_with_tanh():
    config = preset("burda1")
    assert (config.encoder_hidden, config.decoder_hidden, config.z_dim, config.activation) == \
        ((200, 200), (200, 200), 50, "tanh")
    assert set(PRESETS) >= {"tutorial", "burda1"}


@pytest.mark.parametrize("field,value,message", [
    ("z_dim", 0, "--z-dim must be a positive integer"),
    ("likelihood", "poisson", "unknown likelihood"),
    ("activation", "gelu6", "unknown activation"),
    ("sigma", float("nan"), "--sigma must be a positive number"),
])
def test_nonsensical_model_options_are_refused(field, value, message):
    with pytest.raises(VaelabError, match=message):
        ModelConfig(**{field: value}).validate()


def test_unknown_preset_is_refused():
    with pytest.raises(VaelabError, match="unknown preset 'huge'"):
        preset("huge")


# --- the conv networks ----------------------------------------------------------------

@pytest.mark.parametrize("shape,likelihood", [((1, 28, 28), "bernoulli"), ((3, 32, 32), "logistic"),
                                              ((3, 28, 28), "gaussian-learned")])
def test_conv_preset_takes_28_and_32_pixel_images_with_one_or_three_channels(shape, likelihood):
    model = build_model(preset("conv", image_shape=shape, likelihood=likelihood), seed=0)
    mu, logvar = model.encode(torch.rand(5, *shape))
    assert mu.shape == logvar.shape == (5, 16)
    channels = shape[0] * model.likelihood.channels
    assert model.decode(torch.randn(2, 5, 16)).shape == (2, 5, channels, *shape[1:])
    assert model.decode_mean(torch.randn(4, 16)).shape == (4, *shape)


def test_conv_preset_layers_are_the_documented_ones():
    model = build_model(preset("conv"))
    convs = [(type(m).__name__, m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert convs == [("Conv2d", 1, 32, (4, 4), (2, 2), (1, 1)), ("Conv2d", 32, 64, (4, 4), (2, 2), (1, 1)),
                     ("ConvTranspose2d", 64, 32, (4, 4), (2, 2), (1, 1)),
                     ("ConvTranspose2d", 32, 1, (4, 4), (2, 2), (1, 1))]
    linear = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear == [(64 * 7 * 7, 256), (256, 32), (16, 256), (256, 64 * 7 * 7)]


def test_a_conv_encoder_takes_flat_images_as_well():
    model = build_model(preset("conv", image_shape=(3, 32, 32)), seed=0)
    x = torch.rand(4, 3, 32, 32)
    for a, b in zip(model.encode(x), model.encode(x.flatten(1))):
        assert torch.equal(a, b)


def test_conv_decoder_gives_the_same_with_a_workspace():
    from vaelab.nets import Workspace

    model = build_model(preset("conv", conv_channels=(4, 8), decoder_hidden=(16,)), seed=0)
    z = torch.randn(3, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z, Workspace()), model.decode(z))


def test_conv_refuses_sides_it_cannot_halve_naming_the_fix():
    with pytest.raises(VaelabError, match=r"multiples of 4, but they are 32x30; .*--image-size \(e.g. 32\)"):
        build_model(preset("conv", image_shape=(1, 30, 32)))


def test_three_conv_layers_take_16_pixel_images():
    model = build_model(preset("conv", conv_channels=(4, 8, 8), image_shape=(3, 16, 16)))
    assert model.decode(torch.randn(2, 16)).shape == (2, 3, 16, 16)


def test_the_architecture_round_trips_through_the_saved_config():
    config = preset("conv", conv_channels=(8, 16), image_shape=(3, 32, 32))
    again = ModelConfig.from_dict(config.to_dict())
    assert again == config and again.architecture == "conv" and again.conv_channels == (8, 16)


def test_build_sets_a_burda1_output_bias_at_the_clamped_logit_of_the_training_pixel_means(mnist):
    from vaelab import RunConfig
    from vaelab.train import build

    training = build(RunConfig(preset="burda1", train_size=6000, device="cpu"), mnist, progress=False)
    means = training.data.train_images.double().div(255).mean(0).flatten()
    expected = torch.logit(means.clamp(1e-3, 1 - 1e-3)).float()
    torch.testing.assert_close(training.model.decoder[-1].bias.detach(), expected)
    assert training.config.output_init == "data" and training.config.init == "glorot"


def test_glorot_draws_uniform_weights_of_the_right_width_and_zero_biases():
    from vaelab.models import initialise

    model = build_model(preset("burda1"), seed=0)
    initialise(model, "glorot", "none", torch.zeros(1, 1, 28, 28, dtype=torch.uint8), seed=0)
    layer = model.encoder[0]  # 784 -> 200
    bound = math.sqrt(6 / (784 + 200))
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.99 * bound
    assert not layer.bias.any()


def test_a_conv_decoders_output_bias_is_set_per_channel():
    from vaelab.models import initialise

    model = build_model(preset("conv", image_shape=(3, 8, 8), conv_channels=(4,)), seed=0)
    images = torch.zeros(10, 3, 8, 8, dtype=torch.uint8)
    images[:, 0] = 255  # the red channel always on, the others always off
    assert initialise(model, "torch", "data", images, seed=0) is None
    torch.testing.assert_close(model.decoder.convs[-1].bias.detach(),
                               torch.logit(torch.tensor([1 - 1e-3, 1e-3, 1e-3])))


def test_an_output_bias_that_cannot_be_set_says_why():
    from torch import nn

    from vaelab.models import VAE

    decoder = _Squared(nn.Linear(2, 16, bias=False))
    model = VAE(nn.Flatten(), decoder, z_dim=2, image_shape=(1, 4, 4))
    assert "not a linear layer with 16 outputs" in model.set_output_bias(torch.zeros(3, 1, 4, 4, dtype=torch.uint8))


class _Squared(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, z):
        return self.layer(z).square()


SMALL = ModelConfig(image_shape=(1, 4, 4), encoder_hidden=(8,), decoder_hidden=(8,))


def test_encode_takes_stored_uint8_images_and_the_same_as_floats_with_one_meaning():
    model = build_model(SMALL, seed=0)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        for a, b in zip(model.encode(images), model.encode(images.float() / 255)):
            assert torch.equal(a, b)


def test_encode_refuses_grey_levels_given_as_floats():
    model = build_model(SMALL, seed=0)
    with pytest.raises(VaelabError, match=r"must lie in \[0, 1\]"):
        model.encode(torch.full((2, 1, 4, 4), 200.0))


def test_sample_prior_draws_without_a_generator():
    model = build_model(SMALL, seed=0)
    assert model.sample_prior(16).shape == (16, 2)


@pytest.mark.parametrize("component, renamed", [
    (dict(posterior="iaf"), {"posterior.": "flow."}),
    (dict(upper_z_dims=(2,), upper_hidden=(4,), prior="mog", prior_components=3),
     {"posterior.layers.": "hierarchy.", "prior.top.": "prior."}),
])
def test_weights_saved_before_the_posterior_was_a_component_load_by_their_old_names(
        component, renamed):
    config = ModelConfig(image_shape=(1, 2, 2), z_dim=3, encoder_hidden=(5,), decoder_hidden=(5,),
                         **component)
    model, fresh = build_model(config, seed=0), build_model(config, seed=1)
    old = {}
    for key, value in model.state_dict().items():
        for new, before in renamed.items():
            if key.startswith(new):
                key = before + key[len(new):]
                break
        old[key] = value
    assert set(old) != set(model.state_dict())
    fresh.load_state_dict(old)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
