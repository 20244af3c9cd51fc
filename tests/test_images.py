"""vaelab.images: one convention for the images handed to vaelab, uint8 or floats in [0, 1]."""

import numpy as np
import pytest
import torch

from vaelab.errors import VaelabError
from vaelab.images import stored


def test_floats_in_0_1_become_the_stored_levels_they_stand_for():
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(stored(levels.float() / 255), levels)
    assert torch.equal(stored(levels.double() / 255), levels)


def test_uint8_images_come_back_as_they_are():
    images = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    assert stored(images) is images


@pytest.mark.parametrize("low, high", [(-0.1, 0.5), (0.0, 255.0), (0.2, 1.01)])
def test_floats_outside_0_1_are_refused_in_one_line(low, high):
    images = torch.tensor([low, high]).view(1, 1, 1, 2)
    with pytest.raises(VaelabError, match=r"must lie in \[0, 1\]") as refused:
        stored(images)
    assert "\n" not in str(refused.value) and f"{high:g}" in str(refused.value)


def test_nan_is_refused():
    with pytest.raises(VaelabError, match="NaN"):
        stored(torch.tensor([0.5, float("nan")]).view(1, 1, 1, 2))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.int8])
def test_other_types_are_refused_naming_the_type(dtype):
    with pytest.raises(VaelabError, match=f"got {str(dtype).removeprefix('torch.')}"):
        stored(torch.zeros(2, 1, 2, 2, dtype=dtype))


def test_numpy_arrays_are_read_like_tensors():
    images = np.arange(4, dtype=np.uint8).reshape(1, 1, 2, 2)
    assert torch.equal(stored(images.astype(np.float32) / 255), torch.from_numpy(images))


def test_flat_images_take_the_shape_asked_for_and_others_are_refused():
    images = torch.zeros(5, 12, dtype=torch.uint8)
    assert stored(images, (3, 2, 2)).shape == (5, 3, 2, 2)
    with pytest.raises(VaelabError, match=r"do not fit the model, which takes \(N, 1, 4, 4\)"):
        stored(torch.zeros(5, 1, 28, 28, dtype=torch.uint8), (1, 4, 4))
