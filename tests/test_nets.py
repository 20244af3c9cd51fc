"""vaelab.nets: the MLP and conv networks, the activation table, Workspace and conv_check."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaelab.nets import ACTIVATIONS, MLP, ConvDecoder, ConvEncoder, Workspace, conv_check

FUNCTIONAL = {"relu": F.relu, "tanh": torch.tanh, "elu": F.elu, "softplus": F.softplus,
              "gelu": F.gelu}


def seeded(module, seed=0):
    """module with weights and biases drawn from a fixed generator (nonzero biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def assert_close(actual, expected, rtol=1e-6, atol=1e-6):
    """torch.testing.assert_close's check, without the second its first call costs to import."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (actual - expected).abs().max()


def kinds(module):
    return [type(m).__name__ for m in module]


# ---------------------------------------------------------------- activations

def test_the_activation_table_has_the_five_documented_names():
    assert set(ACTIVATIONS) == set(FUNCTIONAL)


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_each_activations_module_applies_its_function(name):
    x = torch.linspace(-30, 30, 601)  # past softplus's threshold of 20 on both sides
    module = ACTIVATIONS[name][0]()
    assert isinstance(module, nn.Module)
    assert torch.equal(module(x), FUNCTIONAL[name](x))


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_each_activations_in_place_function_overwrites_its_argument(name):
    x = torch.linspace(-30, 30, 603).view(3, 201)
    h = x.clone()
    ACTIVATIONS[name][1](h)
    assert_close(h, FUNCTIONAL[name](x), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- MLP

def test_mlp_puts_a_linear_layer_between_each_pair_of_sizes_and_activations_between_them():
    mlp = MLP([5, 4, 3, 2], "tanh")
    assert kinds(mlp) == ["Linear", "Tanh", "Linear", "Tanh", "Linear"]
    shapes = [(m.in_features, m.out_features) for m in mlp if isinstance(m, nn.Linear)]
    assert shapes == [(5, 4), (4, 3), (3, 2)]
    assert mlp.activation == "tanh"


def test_mlp_with_final_activation_ends_in_the_activation_too():
    assert kinds(MLP([5, 4, 3, 2], "elu", final_activation=True)) == [
        "Linear", "ELU", "Linear", "ELU", "Linear", "ELU"]


def test_a_one_layer_mlp_has_an_activation_only_with_final_activation():
    assert kinds(MLP([3, 2], "relu")) == ["Linear"]
    assert kinds(MLP([3, 2], "relu", final_activation=True)) == ["Linear", "ReLU"]


@pytest.mark.parametrize("final_activation", [False, True])
@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_mlp_forward_is_linear_layers_and_the_activation_by_hand(name, final_activation):
    mlp = seeded(MLP([6, 5, 4], name, final_activation))
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))
    (w1, b1), (w2, b2) = [(m.weight, m.bias) for m in mlp if isinstance(m, nn.Linear)]
    expected = FUNCTIONAL[name](x @ w1.T + b1) @ w2.T + b2
    if final_activation:
        expected = FUNCTIONAL[name](expected)
    with torch.no_grad():
        out = mlp(x)
    assert out.shape == (2, 3, 4)
    assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("final_activation", [False, True])
@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_mlp_forward_into_a_workspace_gives_the_same_values(name, final_activation):
    mlp = seeded(MLP([6, 5, 3, 4], name, final_activation))
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = mlp(x)
        kept = mlp(x, workspace=Workspace())
    assert kept.shape == plain.shape == (2, 3, 4)
    assert_close(kept, plain, rtol=1e-6, atol=1e-6)


def test_mlp_forward_into_a_workspace_leaves_its_input_alone():
    mlp = seeded(MLP([4, 4, 4], "relu", final_activation=True))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    before = x.clone()
    with torch.no_grad():
        mlp(x, workspace=Workspace())
    assert torch.equal(x, before)


def test_mlp_forward_reuses_the_workspaces_buffers_for_the_same_batch_size():
    mlp = seeded(MLP([6, 5, 4], "relu"))
    g = torch.Generator().manual_seed(4)
    x, y, workspace = torch.randn(7, 6, generator=g), torch.randn(7, 6, generator=g), Workspace()
    with torch.no_grad():
        first = mlp(x, workspace=workspace)
        first_values = first.clone()
        second = mlp(y, workspace=workspace)
        assert second.data_ptr() == first.data_ptr()  # the same buffer: first now holds y's output
        assert_close(second, mlp(y))
        assert_close(first_values, mlp(x))
        assert len(workspace._buffers) == 2  # one per linear layer
        other = mlp(torch.randn(3, 6, generator=g), workspace=workspace)
    assert other.shape == (3, 4) and other.data_ptr() != first.data_ptr()
    assert len(workspace._buffers) == 4  # a new batch size gets its own buffers


def test_two_mlps_sharing_a_workspace_do_not_share_buffers():
    a, b = seeded(MLP([4, 3], "tanh"), seed=0), seeded(MLP([4, 3], "tanh"), seed=1)
    x, workspace = torch.randn(2, 4, generator=torch.Generator().manual_seed(5)), Workspace()
    with torch.no_grad():
        out_a, out_b = a(x, workspace=workspace), b(x, workspace=workspace)
        assert out_a.data_ptr() != out_b.data_ptr()
        assert_close(out_a, a(x))
        assert_close(out_b, b(x))


def test_workspace_keeps_one_buffer_per_name_shape_and_dtype():
    workspace, like = Workspace(), torch.zeros(1)
    buffer = workspace.get("h", (3, 4), like)
    assert buffer.shape == (3, 4) and buffer.dtype == torch.float32
    assert workspace.get("h", (3, 4), like) is buffer
    assert workspace.get("h", [3, 4], like) is buffer  # a list names the same shape
    assert workspace.get("g", (3, 4), like) is not buffer
    assert workspace.get("h", (4, 3), like) is not buffer
    doubles = workspace.get("h", (3, 4), like.double())
    assert doubles is not buffer and doubles.dtype == torch.float64


def test_mlp_row_floats_is_the_sum_of_its_layer_widths():
    assert MLP([784, 256, 128, 4], "relu").row_floats == 256 + 128 + 4
    assert MLP([2, 3], "relu", final_activation=True).row_floats == 3


# ---------------------------------------------------------------- conv_check

@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 28, 28), (1, 32, 32), (3, 32, 32), (1, 28, 32)])
def test_conv_check_accepts_sides_divisible_by_four_for_two_layers(shape):
    assert conv_check(shape, (32, 64)) is None


@pytest.mark.parametrize("shape, channels, scale", [
    ((1, 30, 30), (32, 64), 4), ((3, 28, 30), (32, 64), 4), ((1, 27, 28), (32,), 2),
    ((1, 28, 28), (8, 16, 32), 8), ((3, 36, 36), (8, 16, 32), 8)])
def test_conv_check_rejects_sides_not_divisible_and_says_why(shape, channels, scale):
    message = conv_check(shape, channels)
    assert isinstance(message, str)
    _, h, w = shape
    assert f"multiples of {scale}" in message and f"{w}x{h}" in message
    assert f"{len(channels)} times" in message
    suggested = int(re.search(r"e\.g\. (\d+)", message).group(1))
    assert suggested % scale == 0 and suggested > 0


def test_conv_check_accepts_32_by_32_with_three_layers_but_not_28():
    assert conv_check((3, 32, 32), (8, 16, 32)) is None
    assert conv_check((1, 28, 28), (8, 16, 32)) is not None


# ---------------------------------------------------------------- conv networks

@pytest.mark.parametrize("image_shape", [(1, 28, 28), (3, 32, 32), (3, 28, 32)])
def test_conv_encoder_maps_images_to_features(image_shape):
    encoder = seeded(ConvEncoder(image_shape, (4, 6), (10, 7), "relu"))
    x = torch.rand(5, *image_shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        features = encoder(x)
        flat = encoder(x.flatten(1))
        after_convs = encoder.convs(x)
    assert features.shape == (5, 7)
    assert torch.equal(flat, features)  # flat images are the same images
    assert after_convs.shape == (5, 6, image_shape[1] // 4, image_shape[2] // 4)
    assert features.min() >= 0  # the dense layers end in the activation


def test_conv_encoder_has_an_activation_after_every_convolution():
    encoder = ConvEncoder((1, 28, 28), (4, 6), (10,), "tanh")
    assert kinds(encoder.convs) == ["Conv2d", "Tanh", "Conv2d", "Tanh"]
    assert [(m.kernel_size, m.stride, m.padding) for m in encoder.convs[::2]] == [
        ((4, 4), (2, 2), (1, 1))] * 2
    assert kinds(encoder.dense) == ["Linear", "Tanh"]
    assert encoder.dense[0].in_features == 6 * 7 * 7


@pytest.mark.parametrize("image_shape, out_channels", [((1, 28, 28), 1), ((3, 32, 32), 3),
                                                       ((3, 32, 32), 6), ((1, 28, 32), 2)])
def test_conv_decoder_maps_latents_to_images_of_the_right_shape(image_shape, out_channels):
    decoder = seeded(ConvDecoder(3, image_shape, (4, 6), (10,), "relu", out_channels))
    z = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = decoder(z)
    assert out.shape == (10, out_channels, *image_shape[1:])


def test_conv_decoder_has_no_activation_after_its_last_layer():
    decoder = ConvDecoder(3, (1, 28, 28), (4, 6), (10,), "relu", 1)
    assert kinds(decoder.convs) == ["ConvTranspose2d", "ReLU", "ConvTranspose2d"]
    assert [(m.in_channels, m.out_channels) for m in decoder.convs[::2]] == [(6, 4), (4, 1)]
    assert kinds(decoder.dense) == ["Linear", "ReLU", "Linear", "ReLU"]
    assert decoder.dense[-2].out_features == 6 * 7 * 7 and decoder.start == (6, 7, 7)
    with torch.no_grad():
        out = seeded(decoder)(torch.randn(4, 3, generator=torch.Generator().manual_seed(8)))
    assert out.min() < 0  # logits, not activations


@pytest.mark.parametrize("image_shape", [(1, 28, 28), (3, 32, 32)])
def test_conv_decoder_into_a_workspace_gives_the_same_values(image_shape):
    decoder = seeded(ConvDecoder(3, image_shape, (4, 6), (10,), "elu", image_shape[0]))
    z, workspace = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(9)), Workspace()
    with torch.no_grad():
        plain = decoder(z)
        kept = decoder(z, workspace=workspace)
        again = decoder(z, workspace=workspace)
    assert_close(kept, plain, rtol=1e-5, atol=1e-6)
    assert torch.equal(again, kept)
    assert len(workspace._buffers) == 2  # the dense layers' outputs


@pytest.mark.parametrize("image_shape, channels", [((1, 28, 28), (4, 6)), ((3, 32, 32), (4, 6)),
                                                   ((3, 32, 32), (2, 4, 6)), ((1, 28, 32), (5,))])
def test_conv_decoder_row_floats_counts_every_layers_output_per_row(image_shape, channels):
    decoder = ConvDecoder(3, image_shape, channels, (10, 9), "relu", 2)
    counted = []
    for m in decoder.modules():
        if isinstance(m, (nn.Linear, nn.ConvTranspose2d)):
            m.register_forward_hook(lambda m, i, out: counted.append(out[0].numel()))
    with torch.no_grad():
        decoder(torch.zeros(2, 3))
    assert len(counted) == 3 + len(channels)
    assert decoder.row_floats == sum(counted)
