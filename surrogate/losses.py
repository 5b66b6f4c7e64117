"""WGAN-GP losses as pure functions of tensors (the training loop only orchestrates them).

Sign conventions: the critic D maximises E[D(real)] - E[D(fake)] (the Wasserstein estimate),
so its loss is the negative of that; the generator minimises -E[D(fake)].
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["critic_loss", "generator_loss", "wasserstein_estimate", "gradient_penalty", "drift_penalty"]


def critic_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """E[D(fake)] - E[D(real)] from critic scores (B,) -> scalar."""
    return d_fake.float().mean() - d_real.float().mean()


def wasserstein_estimate(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """E[D(real)] - E[D(fake)]: the critic's estimate of the Wasserstein-1 distance (scalar)."""
    return d_real.float().mean() - d_fake.float().mean()


def generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z, c))] from critic scores (B,) -> scalar."""
    return -d_fake.float().mean()


def gradient_penalty(
    critic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    conditions: torch.Tensor,
    lam: float = 10.0,
    generator: torch.Generator | None = None,
    pack: int = 1,
) -> torch.Tensor:
    """λ · E[(‖∇ₓ D(x̂, c)‖₂ − 1)²] at x̂ = a·real + (1 − a)·fake, a ~ U(0, 1) per sample.

    real, fake: (B, V); conditions: (B, C), the SAME for both (they are not interpolated: the
    penalty constrains D as a function of x at fixed c). ``generator`` draws ``a`` (on the CPU,
    so runs are reproducible across devices). ``pack`` > 1: the critic scores packs of that many
    consecutive samples (PacGAN); a pack is one point of the critic's input space, so it shares
    one ``a`` and its gradient norm is taken over the whole pack. Returns a scalar with a graph.
    """
    n = real.shape[0] // pack
    a = torch.rand((n, 1), generator=generator).repeat_interleave(pack, dim=0)
    a = a.to(device=real.device, dtype=real.dtype)
    x_hat = (a * real.detach() + (1 - a) * fake.detach()).requires_grad_(True)
    scores = critic(x_hat, conditions)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    norm = grad.float().reshape(n, -1).norm(2, dim=1)
    return lam * ((norm - 1.0) ** 2).mean()


def drift_penalty(d_real: torch.Tensor, epsilon: float = 1e-3) -> torch.Tensor:
    """ε · E[D(real)²]: keeps the critic's output near zero (Karras et al. 2018); scalar."""
    return epsilon * (d_real.float() ** 2).mean()
