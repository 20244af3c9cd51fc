"""The hand-derived gradient must agree with autograd's on the same objective."""

import pytest
import torch

from vaelab.manual import negative_elbo_backward
from vaelab.models import ModelConfig, build_model
from vaelab.objectives import negative_elbo


def batch(likelihood: str, n: int = 6, d: int = 20) -> torch.Tensor:
    x = torch.rand(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (x < 0.4).double() if likelihood == "bernoulli" else x


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("samples", [1, 3])
def test_manual_gradients_equal_autograds(activation, likelihood, samples):
    config = ModelConfig(x_dim=20, z_dim=3, encoder_hidden=(9, 7), decoder_hidden=(8,),
                         activation=activation, likelihood=likelihood, sigma=0.3)
    model = build_model(config, seed=0).double()
    x = batch(likelihood)

    loss = negative_elbo(model, x, samples, torch.Generator().manual_seed(5)).mean()
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    manual_loss = negative_elbo_backward(model, x, samples, torch.Generator().manual_seed(5))
    torch.testing.assert_close(manual_loss, loss.detach(), rtol=1e-10, atol=1e-10)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-11, msg=name)


def test_fused_sgd_update_equals_a_gradient_step():
    config = ModelConfig(x_dim=20, z_dim=2, encoder_hidden=(9,), decoder_hidden=(8, 5))
    model = build_model(config, seed=1).double()
    fused = build_model(config, seed=1).double()
    x = batch("bernoulli")

    negative_elbo_backward(model, x, 2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    negative_elbo_backward(fused, x, 2, torch.Generator().manual_seed(3), sgd_lr=0.1)
    for a, b in zip(model.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
