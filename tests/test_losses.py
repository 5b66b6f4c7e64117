"""Known answers of the WGAN-GP losses."""

import pytest
import torch

from surrogate.losses import critic_loss, drift_penalty, generator_loss, gradient_penalty, wasserstein_estimate


def test_linear_critic_penalty_is_norm_minus_one_squared():
    gen = torch.Generator().manual_seed(0)
    w = torch.tensor([3.0, -1.0, 2.0])
    real, fake = torch.randn((64, 3), generator=gen), torch.randn((64, 3), generator=gen)
    c = torch.randn((64, 2), generator=gen)
    penalty = gradient_penalty(lambda x, c: x @ w, real, fake, c, lam=1.0, generator=gen)
    assert penalty.item() == pytest.approx((w.norm().item() - 1.0) ** 2, rel=1e-6)
    # lambda scales it; the default is 10
    again = gradient_penalty(lambda x, c: x @ w, real, fake, c, generator=gen)
    assert again.item() == pytest.approx(10 * (w.norm().item() - 1.0) ** 2, rel=1e-6)


def test_penalty_is_taken_at_the_given_conditions():
    # a critic whose gradient in x depends on c: the penalty must use c as given, not interpolated
    real, fake = torch.zeros((4, 2)), torch.ones((4, 2))
    c = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    penalty = gradient_penalty(lambda x, c: (x * c).sum(1), real, fake, c, lam=1.0)
    expected = ((c[:, 0] * 2**0.5 - 1) ** 2).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)


def test_penalty_is_differentiable_in_the_critic_parameters():
    lin = torch.nn.Linear(3, 1)
    gp = gradient_penalty(lambda x, c: lin(x).squeeze(1), torch.randn(8, 3), torch.randn(8, 3), torch.zeros(8, 0))
    gp.backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_wasserstein_losses_and_drift():
    d_real, d_fake = torch.tensor([1.0, 3.0]), torch.tensor([0.0, -2.0])
    assert critic_loss(d_real, d_fake).item() == pytest.approx(-3.0)
    assert wasserstein_estimate(d_real, d_fake).item() == pytest.approx(3.0)
    assert generator_loss(d_fake).item() == pytest.approx(1.0)
    assert drift_penalty(d_real, 0.5).item() == pytest.approx(0.5 * 5.0)
