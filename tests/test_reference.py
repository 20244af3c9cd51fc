"""The package's default path against its frozen copy (tests/reference/vae.py): trained side by
side in one process from the same seed, the weights after training and every batch's loss are
equal bit for bit. A refactor of the models, objectives, likelihoods, nets or step that keeps
the default path must keep these passing without touching the reference."""

import numpy as np
import pytest
import torch

from vaelab import ModelConfig, RunConfig, build_model, train

from conftest import synthetic_dataset
from reference import vae as reference

EPOCHS, BATCH = 2, 50


@pytest.fixture(scope="module")
def images():
    """300 training images 8x8 (and 100 test images for the package's test loss)."""
    return synthetic_dataset(n_train=300, n_test=100, shape=(8, 8), seed=0)


def assert_trains_like_the_reference(data, **options):
    """Train the package and the reference with `options`; compare weights and batch losses."""
    config = RunConfig(model=ModelConfig(), epochs=EPOCHS, batch_size=BATCH, device="cpu",
                       **options)
    result = train(config, data=data, progress=False)
    train_images = data.train_images[:options.get("train_size")]
    model, losses = reference.train(train_images, epochs=EPOCHS, batch_size=BATCH, **{
        k: v for k, v in options.items() if k not in ("train_size", "test_size")})

    assert len(result.batch_losses) == len(losses) == EPOCHS
    for epoch, (theirs, ours) in enumerate(zip(result.batch_losses, losses), 1):
        assert len(ours) == len(train_images) // BATCH
        assert np.array_equal(theirs, ours.numpy()), f"epoch {epoch}: {theirs} != {ours.numpy()}"
    # By position, the order the weights are drawn in and optimizers list them (names may change)
    trained = list(result.model.parameters())
    start = list(reference.build_model(model.image_shape, options.get("seed", 0)).parameters())
    assert len(trained) == len(start)
    for (name, p), theirs, p0 in zip(model.named_parameters(), trained, start):
        assert not torch.equal(p, p0), f"{name} did not train"
        assert torch.equal(theirs, p), f"{name} differs after training"


def test_the_reference_starts_from_the_packages_initial_weights_for_the_same_seed():
    shape = (1, 8, 8)
    package = build_model(ModelConfig(image_shape=shape), seed=5)
    ours = reference.build_model(shape, seed=5)
    theirs, mine = list(package.parameters()), list(ours.parameters())
    assert len(theirs) == len(mine)
    assert all(torch.equal(a, b) for a, b in zip(theirs, mine))


def test_the_default_elbo_with_plain_sgd_trains_bit_for_bit_like_the_reference(images):
    assert_trains_like_the_reference(images)


def test_adam_trains_bit_for_bit_like_the_reference(images):
    assert_trains_like_the_reference(images, optimizer="adam", lr=1e-3, seed=1)


def test_two_samples_of_z_per_image_train_bit_for_bit_like_the_reference(images):
    assert_trains_like_the_reference(images, samples=2)


def test_the_iwae_bound_with_k_5_trains_bit_for_bit_like_the_reference(images):
    assert_trains_like_the_reference(images, objective="iwae", k=5)


def test_beta_one_half_after_a_one_epoch_kl_warm_up_trains_bit_for_bit_like_the_reference(images):
    assert_trains_like_the_reference(images, beta=0.5, kl_warmup=1)


def test_a_slice_of_real_mnist_trains_bit_for_bit_like_the_reference(mnist):
    # 320 images: six batches of 50 an epoch, the last 20 images dropped
    assert_trains_like_the_reference(mnist, train_size=320, test_size=100, seed=2)


def test_the_default_forward_and_loss_run_the_references_operations_and_no_more():
    """No label, no log-density unasked: the unconditional default model's forward and backward
    launch the reference's kernels, and no other (views aside, which launch none)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from vaelab.objectives import negative_elbo

    class Operations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:  # a view is metadata, not a kernel
                self.seen[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    shape = (1, 8, 8)
    package = build_model(ModelConfig(image_shape=shape), seed=5)
    ours = reference.build_model(shape, seed=5)
    x, eps = torch.rand(4, *shape).round(), torch.randn(1, 4, package.noise_dim)
    with Operations() as theirs:
        negative_elbo(package(x, eps)).mean().backward()
    with Operations() as mine:
        reference.negative_elbo(ours(x, eps)).mean().backward()
    assert theirs.seen == mine.seen
