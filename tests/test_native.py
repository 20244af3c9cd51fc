"""The C kernels (vaelab/kernels.c through native.py) against plain PyTorch."""

import os

import pytest
import torch

from conftest import synthetic_dataset
from vaelab import RunConfig, native, train
from vaelab.errors import VaelabError
from vaelab.manual import contiguous_weights, negative_elbo_backward
from vaelab.models import ModelConfig, build_model

if not native.available():
    if os.environ.get("CI"):  # CI has a compiler: a build failure there is a bug, not a reason to skip
        raise RuntimeError(f"the C kernels did not build: {native.unavailable_reason()}")
    pytest.skip(f"C kernels unavailable: {native.unavailable_reason()}", allow_module_level=True)


def grey_images(n: int = 40, d: int = 13, seed: int = 0) -> torch.Tensor:
    """(n, d) uint8 with plenty of 0s and 255s, as in MNIST, and an odd width."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, d), generator=g, dtype=torch.uint8)
    images[torch.rand(n, d, generator=g) < 0.4] = 0
    images[torch.rand(n, d, generator=g) < 0.1] = 255
    return images


def draw(images: torch.Tensor, idx: torch.Tensor, seed: int = 0) -> native.BinaryBatch:
    return native.BinaryImages(images).batch(idx, torch.Generator().manual_seed(seed))


def test_each_pixel_is_on_with_probability_of_its_grey_level():
    images = torch.arange(256, dtype=torch.uint8).repeat(2, 1)  # every level, twice
    source, idx = native.BinaryImages(images), torch.tensor([0, 1])
    g = torch.Generator().manual_seed(0)
    draws = 4000
    counts = sum(source.batch(idx, g).dense() for _ in range(draws))
    p = images.double() / 255
    assert torch.equal(counts[p == 0], torch.zeros_like(counts[p == 0]))
    assert torch.equal(counts[p == 1], torch.full_like(counts[p == 1], draws))
    middle = (p > 0) & (p < 1)
    z = (counts[middle] / draws - p[middle]) / (p[middle] * (1 - p[middle]) / draws).sqrt()
    assert z.abs().max() < 5  # 508 pixels: a 5-sigma miss has odds of about 1 in 3,500


def test_a_batch_is_repeatable_for_a_seed_and_the_same_for_any_number_of_threads():
    images, idx = grey_images(), torch.tensor([3, 0, 7, 3])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = draw(images, idx).dense()
        torch.set_num_threads(2)
        two = draw(images, idx).dense()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert not torch.equal(draw(images, idx, seed=1).dense(), one)


def test_the_lists_by_row_and_by_pixel_hold_the_same_pixels():
    batch = draw(grey_images(), torch.arange(40))
    by_pixel = torch.zeros(40, 13)
    for p in range(13):
        by_pixel[batch.rows_of[batch.pixel_start[p]:batch.pixel_start[p + 1]].long(), p] = 1
    assert torch.equal(by_pixel, batch.dense())


def test_binary_linear_and_its_update_match_the_dense_products():
    batch = draw(grey_images(), torch.arange(40))
    x = batch.dense()
    g = torch.Generator().manual_seed(1)
    weight_t, bias = torch.randn(13, 24, generator=g), torch.randn(24, generator=g)
    dy = torch.randn(40, 24, generator=g)
    torch.testing.assert_close(native.binary_linear(batch, weight_t, bias), x @ weight_t + bias)
    expected = weight_t - 0.1 * x.t() @ dy
    native.binary_linear_accumulate_(weight_t, batch, dy, -0.1)
    torch.testing.assert_close(weight_t, expected)


@pytest.mark.parametrize("spread", [1.0, 30.0, 200.0])
def test_the_bernoulli_kernel_gives_the_loss_and_its_gradient(spread):
    batch = draw(grey_images(), torch.arange(40))
    x = batch.dense().double()
    logits = torch.randn(3, 40, 13, generator=torch.Generator().manual_seed(2)) * spread
    exact = (torch.nn.functional.softplus(logits.double()) - x * logits).sum().item()
    work = logits.clone()
    loss = native.bernoulli_loss_grad_(work, batch, 0.5)
    assert loss == pytest.approx(exact, rel=1e-6)
    torch.testing.assert_close(work.double(), 0.5 * (torch.sigmoid(logits.double()) - x), rtol=1e-5, atol=1e-7)


def test_a_step_on_a_binary_batch_equals_the_step_on_its_dense_pixels():
    config = ModelConfig(x_dim=13, z_dim=2, encoder_hidden=(16, 8), decoder_hidden=(8, 16))
    batch = draw(grey_images(), torch.arange(40))
    for sgd_lr in (None, 0.05):
        models = [build_model(config, seed=0) for _ in range(2)]
        losses = [negative_elbo_backward(m, x, 2, torch.Generator().manual_seed(3), sgd_lr=sgd_lr)
                  for m, x in zip(models, (batch, batch.dense()))]
        torch.testing.assert_close(losses[0], losses[1])
        contiguous_weights(models[0])
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(p, q)
            if sgd_lr is None:
                torch.testing.assert_close(p.grad, q.grad)


def test_native_and_torch_kernels_train_alike():
    model = ModelConfig(z_dim=2, encoder_hidden=(16,), decoder_hidden=(16,))
    runs = {k: train(RunConfig(model=model, epochs=3, batch_size=50, kernels=k), data=synthetic_dataset(),
                     progress=False) for k in ("native", "torch")}
    native_loss, torch_loss = (runs[k].metrics[-1]["test_loss"] for k in ("native", "torch"))
    assert native_loss == pytest.approx(torch_loss, rel=0.02)  # other random pixels, same statistics


def test_native_kernels_are_refused_where_they_do_not_apply():
    config = RunConfig(model=ModelConfig(z_dim=2, encoder_hidden=(8,), decoder_hidden=(8,)), epochs=1,
                       batch_size=50, kernels="native", optimizer="adam")
    with pytest.raises(VaelabError, match="--kernels native needs .*--optimizer sgd"):
        train(config, data=synthetic_dataset(), progress=False)


def test_a_tensor_of_the_wrong_kind_is_refused_not_read_as_garbage():
    batch = draw(grey_images(), torch.arange(4))
    with pytest.raises(ValueError, match="weight_t must be a contiguous torch.float32"):
        native.binary_linear(batch, torch.zeros(24, 13).t(), torch.zeros(24))
    with pytest.raises(ValueError, match="do not fit"):
        native.binary_linear(batch, torch.zeros(12, 24), torch.zeros(24))
    with pytest.raises(IndexError, match="row indices"):
        native.BinaryImages(grey_images()).batch(torch.tensor([40]))


def test_the_evaluation_gives_the_same_estimates_with_either_kernels():
    from vaelab.evaluate import importance_sampled

    model = build_model(ModelConfig(x_dim=13, z_dim=2, encoder_hidden=(8,), decoder_hidden=(8,)), seed=0)
    runs = [importance_sampled(model, grey_images(), k=100, kernels=k, progress=False) for k in ("native", "torch")]
    assert runs[0]["kernels"] == "native" and runs[1]["kernels"] == "torch"
    assert runs[0]["nll"] == pytest.approx(runs[1]["nll"], abs=1e-4)
    for j in runs[0]["iwae"]:
        assert runs[0]["iwae"][j] == pytest.approx(runs[1]["iwae"][j], abs=1e-4)


def test_from_dense_lists_the_on_pixels_both_ways():
    x = draw(grey_images(), torch.arange(40)).dense()
    batch = native.BinaryBatch.from_dense(x)
    assert torch.equal(batch.dense(), x)
    drawn = draw(grey_images(), torch.arange(40))
    assert torch.equal(batch.pixel_start, drawn.pixel_start)
    assert torch.equal(batch.rows_of[:len(x.nonzero())], drawn.rows_of[:len(x.nonzero())])


def test_an_empty_batch_is_empty():
    batch = native.BinaryImages(grey_images()).batch(torch.empty(0, dtype=torch.int64))
    assert len(batch) == 0 and batch.dense().shape == (0, 13)


def test_a_nan_logit_gives_a_nan_loss_and_gradient_as_in_torch():
    batch = draw(torch.zeros(2, 13, dtype=torch.uint8), torch.arange(2))  # blank images: no on-pixels
    logits = torch.zeros(1, 2, 13)
    logits[0, 1, 5] = float("nan")
    loss = native.bernoulli_loss_grad_(logits, batch, 1.0)
    assert loss != loss and logits[0, 1, 5].isnan() and not logits[0, 0].isnan().any()


def test_a_network_without_hidden_layers_gets_its_usual_weight_layout_back():
    model = build_model(ModelConfig(x_dim=13, z_dim=2, encoder_hidden=(), decoder_hidden=(8,)), seed=0)
    negative_elbo_backward(model, draw(grey_images(), torch.arange(40)), 1, torch.Generator().manual_seed(0),
                           sgd_lr=0.01)
    assert not model.head.weight.is_contiguous()  # input-major for the C kernels
    contiguous_weights(model)
    assert model.head.weight.is_contiguous()


def test_a_run_saved_before_the_kernels_option_resumes_with_torch_kernels():
    saved = RunConfig().to_dict()
    del saved["kernels"]
    assert RunConfig.from_dict(saved).kernels == "torch"


def test_a_run_records_the_kernels_it_used(tmp_path):
    config = RunConfig(model=ModelConfig(z_dim=2, encoder_hidden=(8,), decoder_hidden=(8,)), epochs=1, batch_size=50)
    train(config, tmp_path / "run", synthetic_dataset(), progress=False)
    from vaelab.runs import load_config

    assert load_config(tmp_path / "run").kernels == "native"


def test_an_unusable_cache_folder_falls_back_to_a_private_one(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("VAELAB_KERNEL_DIR", str(blocker / "kernels"))  # under a file: cannot be created
    lib, why = native._load.__wrapped__()
    assert lib is not None and why == ""
    assert lib.bernoulli_loss_grad is not None


def test_without_a_compiler_auto_trains_with_torch_and_native_says_why(monkeypatch):
    monkeypatch.setattr(native, "_load", lambda: (None, "no C compiler (cc) found"))
    model = ModelConfig(z_dim=2, encoder_hidden=(8,), decoder_hidden=(8,))
    config = RunConfig(model=model, epochs=1, batch_size=50)
    train(config, data=synthetic_dataset(), progress=False)
    assert config.kernels == "torch"
    with pytest.raises(VaelabError, match="--kernels native: no C compiler"):
        train(RunConfig(model=model, epochs=1, batch_size=50, kernels="native"), data=synthetic_dataset(),
              progress=False)
