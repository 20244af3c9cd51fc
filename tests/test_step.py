"""One optimizer step (step.py): the epoch's keyed draws, the batch each step takes, and the update
it makes, against a reference computed with plain autograd."""

import copy

import pytest
import torch

from vaelab import rng
from vaelab.distributed import World
from vaelab.models import ModelConfig, build_model
from vaelab.objectives import negative_elbo, negative_iwae
from vaelab.config import RunConfig
from vaelab.objectives import OBJECTIVES
from vaelab.step import TrainStep

N_IMAGES = 130  # batches of 20: six whole ones, the last ten images dropped


@pytest.fixture
def images():
    return torch.randint(
        0, 256, (N_IMAGES, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )


def make_step(images, *, lr=0.1, objective="elbo", samples=1, batch_size=20, **kwargs):
    model = build_model(
        ModelConfig(z_dim=2, encoder_hidden=(8,), decoder_hidden=(8,), image_shape=(1, 4, 4)),
        seed=0,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    # the objective's own options, as a run's config gives them
    own = {name: kwargs.pop(name) for name in ("estimator", "free_bits") if name in kwargs}
    config = RunConfig(objective=objective, samples=samples, k=samples, **own)
    return TrainStep(
        model,
        optimizer,
        images,
        OBJECTIVES[objective](config),
        batch_size=batch_size,
        **kwargs,
    )


def test_an_epoch_has_whole_batches_only(images):
    assert make_step(images).steps_per_epoch == N_IMAGES // 20


def test_the_epochs_draws_depend_on_seed_and_epoch_only(images):
    step = make_step(images)
    step.begin_epoch(seed=0, epoch=3)
    first = step.order.clone(), step.x.clone(), step.eps.clone()
    step.begin_epoch(seed=0, epoch=4)
    assert not torch.equal(step.order, first[0]) and not torch.equal(step.eps, first[2])
    step.begin_epoch(seed=0, epoch=3)
    assert all(torch.equal(a, b) for a, b in zip((step.order, step.x, step.eps), first))


def test_a_batch_is_the_images_at_its_positions_of_the_epochs_order_with_their_keyed_draws(images):
    step = make_step(images)
    step.begin_epoch(seed=7, epoch=2)
    x, eps = step.draw()
    order = rng.permutation(rng.key(7, "order", 2), N_IMAGES)
    positions = torch.arange(20)
    expected_x = step.model.observe(
        images[order[:20]], rng.row_keys(rng.key(7, "observe", 2), positions)
    )
    expected_eps = rng.normal(rng.row_keys(rng.key(7, "noise", 2), positions), 2)
    assert torch.equal(x, expected_x)
    assert eps.shape == (1, 20, 2) and torch.equal(eps[0], expected_eps)


def test_what_a_position_draws_does_not_depend_on_the_batch_size(images):
    small, large = make_step(images, batch_size=10), make_step(images, batch_size=65)
    for step in (small, large):
        step.begin_epoch(seed=0, epoch=1)
    rows = min(len(small.x), len(large.x))
    assert torch.equal(small.x[:rows], large.x[:rows]) and torch.equal(
        small.eps[:rows], large.eps[:rows]
    )


def test_a_step_is_one_sgd_update_on_the_batchs_mean_negative_elbo(images):
    step = make_step(images, samples=2)
    step.begin_epoch(seed=0, epoch=1)
    x, eps = step.draw()
    reference = copy.deepcopy(step.model)
    expected = negative_elbo(reference(x, eps)).mean()
    expected.backward()
    loss = step()
    assert torch.allclose(loss, expected.detach(), rtol=0, atol=1e-6)
    for p, q in zip(step.model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q.detach() - 0.1 * q.grad, rtol=0, atol=1e-6)


def test_the_iwae_objective_takes_the_negative_iwae_bound(images):
    step = make_step(images, objective="iwae", samples=5)
    step.begin_epoch(seed=0, epoch=1)
    x, eps = step.draw()
    expected = negative_iwae(copy.deepcopy(step.model)(x, eps)).mean()
    assert torch.allclose(step(), expected.detach(), rtol=0, atol=1e-6)


def test_each_step_takes_the_next_batch_and_an_epoch_uses_each_position_once(images):
    step = make_step(images)
    step.begin_epoch(seed=0, epoch=1)
    seen = []
    for _ in range(step.steps_per_epoch):
        seen.append(step.positions.clone())
        step()
    assert torch.equal(torch.cat(seen), torch.arange(step.steps_per_epoch * 20))
    step.begin_epoch(seed=0, epoch=2)
    assert torch.equal(step.positions, torch.arange(20))  # a new epoch starts at its first batch


def test_an_epoch_drawn_in_chunks_of_steps_trains_bitwise_as_one_drawn_whole(images, monkeypatch):
    whole = make_step(images)
    row_bytes = 4 * (16 + 2)  # a 4x4 image and z_dim 2
    monkeypatch.setattr(TrainStep, "CHUNK_BYTES", 2 * 20 * row_bytes + 1)  # two steps a chunk
    chunked = make_step(images)
    assert (whole.chunk_steps, chunked.chunk_steps, len(chunked.x)) == (6, 2, 40)
    losses = {id(whole): [], id(chunked): []}
    for step in (whole, chunked):
        for epoch in (1, 2):
            step.begin_epoch(seed=0, epoch=epoch)
            losses[id(step)] += [step() for _ in range(step.steps_per_epoch)]
    assert torch.equal(torch.stack(losses[id(whole)]), torch.stack(losses[id(chunked)]))
    for p, q in zip(whole.model.parameters(), chunked.model.parameters()):
        assert torch.equal(p, q)


def test_kl_warmup_raises_the_weight_linearly_step_by_step_to_beta(images):
    step = make_step(images, beta=0.5, kl_warmup_epochs=2)
    warmup = 2 * step.steps_per_epoch
    weights = []
    for epoch in (1, 2, 3):
        step.begin_epoch(seed=0, epoch=epoch)
        for _ in range(step.steps_per_epoch):
            step()
            weights.append(step.kl_weight.item())
    expected = [0.5 * min(i / warmup, 1.0) for i in range(len(weights))]
    assert weights == pytest.approx(expected, abs=1e-7)


def test_a_resumed_epoch_continues_the_warmup_where_the_run_was(images):
    step = make_step(images, kl_warmup_epochs=4)
    step.begin_epoch(seed=0, epoch=3)
    step()
    assert step.kl_weight.item() == pytest.approx(
        2 / 4
    )  # two epochs of four done, whatever ran before


def test_a_rank_trains_on_its_share_of_every_global_batch(images):
    whole = make_step(images)
    second = make_step(images, world=World(rank=1, size=2))
    for step in (whole, second):
        step.begin_epoch(seed=0, epoch=1)
    x, eps = whole.draw()
    x1, eps1 = second.draw()
    assert torch.equal(x1, x[10:]) and torch.equal(eps1, eps[:, 10:])


def test_off_cuda_the_step_is_never_captured(images):
    step = make_step(images, cuda_graph=True)
    step.begin_epoch(seed=0, epoch=1)
    step()
    assert not step.capture and step.graph is None


def adam_step(images, **kwargs):
    step = make_step(images, **kwargs)
    step.optimizer = torch.optim.Adam(step.model.parameters(), lr=1e-2)
    step.begin_epoch(seed=0, epoch=1)
    return step


def state_of(step) -> list[torch.Tensor]:
    """Copies of every weight and every tensor of the optimizer's state."""
    state = [v for s in step.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return [t.detach().clone() for t in (*step.model.parameters(), *state)]


@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_a_step_whose_gradient_norm_is_above_the_skip_threshold_changes_nothing(images, first):
    step = adam_step(images, skip_threshold=1e9)
    if not first:
        step()  # the optimizer has its state now
    step.skip_threshold = 1e-9  # every gradient is above it
    before = state_of(step)
    step()
    assert step.skipped.item() and step.grad_norm.item() > 1e-9
    assert all(torch.equal(a, b) for a, b in zip(before, state_of(step), strict=True))


def test_a_step_under_the_skip_threshold_is_the_plain_step_bit_for_bit(images):
    plain, guarded = adam_step(images), adam_step(images, skip_threshold=1e9)
    for _ in range(3):
        assert torch.equal(plain(), guarded())
        assert not guarded.skipped.item()
    assert all(torch.equal(a, b) for a, b in zip(state_of(plain), state_of(guarded), strict=True))


def test_a_non_finite_gradient_is_skipped_whatever_the_threshold(images):
    step = adam_step(images, skip_threshold=1e9)
    step()
    before = state_of(step)
    step.eps.fill_(float("nan"))  # every later draw of z is NaN, and so is the gradient
    step()
    assert step.skipped.item()
    assert all(torch.equal(a, b) for a, b in zip(before, state_of(step), strict=True))


def test_grad_clip_scales_the_gradient_to_the_norm_and_reports_the_norm_before(images):
    clipped = make_step(images, grad_clip=1e-3)
    clipped.begin_epoch(seed=0, epoch=1)
    weights = [p.detach().clone() for p in clipped.model.parameters()]
    clipped()
    moved = torch.cat([(p.detach() - w).flatten() for p, w in zip(clipped.model.parameters(), weights)])
    assert clipped.grad_norm.item() > 1e-3
    assert moved.norm().item() == pytest.approx(0.1 * 1e-3, rel=1e-3)  # SGD at lr 0.1
