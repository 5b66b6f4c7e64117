"""Networks of the conditional WGAN-GP: generator G(z, c) and critic D(x, c), built from a dataclass.

Input and output sizes come from the data (``n_voxels``, ``cond_dim``); latent size, widths and
depths from config. Each network keeps the :class:`ModelConfig` it was built with, and the
generator exposes ``z_dim`` so sampling code never hard-codes a latent size.

The generator's output is linear: the preprocessing maps voxels to a standardised log scale,
which is unbounded on both sides. The critic has no BatchNorm (the gradient penalty is per
sample); LayerNorm, spectral normalisation and a minibatch standard-deviation feature are options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "FORMAT_VERSION",
    "ModelError",
    "ModelConfig",
    "Generator",
    "Critic",
    "build_models",
    "count_parameters",
    "load_generator",
    "sample",
]

FORMAT_VERSION = 1  # of results/train/generator.pt


class ModelError(ValueError):
    """A model configuration or checkpoint that cannot be used, with a message naming it."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild G and D (stored in every checkpoint)."""

    n_voxels: int  # V, output width of G and input width of D (from the data)
    cond_dim: int  # C, width of the preprocessed condition vector (from the data)
    z_dim: int = 64  # latent size
    g_width: int = 256  # hidden units per generator layer
    g_depth: int = 3  # hidden layers of the generator
    d_width: int = 256  # hidden units per critic layer
    d_depth: int = 3  # hidden layers of the critic
    conditioning: str = "concat"  # concat: c joins the input; film: c also scales/shifts every hidden layer
    critic_layernorm: bool = True  # LayerNorm after each critic hidden layer (never BatchNorm)
    spectral_norm: bool = False  # spectral normalisation of the critic's linear layers
    minibatch_std: bool = False  # append the batch's mean per-voxel std as a critic feature

    def __post_init__(self) -> None:
        for name in ("n_voxels", "cond_dim", "z_dim", "g_width", "g_depth", "d_width", "d_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "cond_dim" else 1):
                raise ModelError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.conditioning not in ("concat", "film"):
            raise ModelError(f"model config: conditioning must be 'concat' or 'film', got {self.conditioning!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelError(f"model config: unknown key(s) {', '.join(unknown)}")
        return cls(**d)


class _FiLMBlock(nn.Module):
    """Linear -> LeakyReLU, then h * (1 + gamma(c)) + beta(c) (identity at initialisation)."""

    def __init__(self, n_in: int, n_out: int, cond_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.film = nn.Linear(cond_dim, 2 * n_out)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = nn.functional.leaky_relu(self.linear(h), 0.2)
        gamma, beta = self.film(c).chunk(2, dim=1)
        return h * (1 + gamma) + beta


class Generator(nn.Module):
    """G(z (B, z_dim), c (B, C)) -> (B, V) preprocessed voxels (linear output)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.z_dim = cfg.z_dim
        widths = [cfg.z_dim + cfg.cond_dim] + [cfg.g_width] * cfg.g_depth
        if cfg.conditioning == "film" and cfg.cond_dim > 0:
            self.blocks = nn.ModuleList(_FiLMBlock(a, b, cfg.cond_dim) for a, b in zip(widths[:-1], widths[1:]))
        else:
            self.blocks = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(widths[-1], cfg.n_voxels)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, c], dim=1)
        for block in self.blocks:
            h = block(h, c) if isinstance(block, _FiLMBlock) else nn.functional.leaky_relu(block(h), 0.2)
        return self.out(h)


class Critic(nn.Module):
    """D(x (B, V), c (B, C)) -> (B,) unbounded Wasserstein score. No BatchNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        wrap = nn.utils.parametrizations.spectral_norm if cfg.spectral_norm else (lambda m: m)
        n_in = cfg.n_voxels + cfg.cond_dim + (1 if cfg.minibatch_std else 0)
        layers: list[nn.Module] = []
        for _ in range(cfg.d_depth):
            layers.append(wrap(nn.Linear(n_in, cfg.d_width)))
            if cfg.critic_layernorm:
                layers.append(nn.LayerNorm(cfg.d_width))
            layers.append(nn.LeakyReLU(0.2))
            n_in = cfg.d_width
        layers.append(wrap(nn.Linear(n_in, 1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        parts = [x, c]
        if self.cfg.minibatch_std:
            # a collapsed generator has a small spread across the batch: let the critic see it
            std = x.float().std(dim=0, unbiased=False).mean() if len(x) > 1 else x.new_zeros(())
            parts.append(std.to(x.dtype).expand(len(x), 1))
        return self.net(torch.cat(parts, dim=1)).squeeze(1)


def build_models(cfg: ModelConfig) -> tuple[Generator, Critic]:
    """A fresh (generator, critic) pair with PyTorch's default initialisation (seed torch beforehand)."""
    return Generator(cfg), Critic(cfg)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[Generator, dict[str, Any]]:
    """Load ``generator.pt`` (EMA weights) -> (generator in eval mode on ``device``, metadata dict).

    The metadata holds every key of the checkpoint except the weights: ``format_version``,
    ``model_config``, ``preprocessing``, ``condition_names``, ``geometry``, ``step``, ``score``, ...
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: generator checkpoint not found (run the train stage)") from exc
    except Exception as exc:  # unpickling errors come in many types
        raise ModelError(f"{path}: not a readable generator checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "ema_state_dict" not in ckpt or "model_config" not in ckpt:
        raise ModelError(f"{path}: not a generator checkpoint (needs 'model_config' and 'ema_state_dict')")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelError(f"{path}: checkpoint format_version {version!r}, this code reads {FORMAT_VERSION}")
    G = Generator(ModelConfig.from_dict(ckpt["model_config"]))
    try:
        G.load_state_dict(ckpt["ema_state_dict"])
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not match the stored model_config ({exc})") from exc
    meta = {k: v for k, v in ckpt.items() if k != "ema_state_dict"}
    return G.to(device).eval(), meta


def sample(
    G: nn.Module,
    conditions: torch.Tensor | np.ndarray,
    seed: int | torch.Generator = 0,
    batch_size: int = 4096,
) -> torch.Tensor:
    """Draw one sample per condition row: conditions (N, C) -> (N, V) float32 on the CPU, network space.

    Latents come from ``seed`` (an int, or a CPU ``torch.Generator`` that is advanced), drawn on
    the CPU in one piece, so the result depends on neither the device nor ``batch_size``.
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    c_all = torch.as_tensor(np.asarray(conditions, dtype=np.float32) if isinstance(conditions, np.ndarray)
                            else conditions).float()  # fmt: skip
    if c_all.ndim != 2:
        raise ModelError(f"conditions have shape {tuple(c_all.shape)}, expected (N, C)")
    device = next(G.parameters()).device
    # all latents in one draw (N x z_dim floats): torch's CPU normal sampler orders its stream
    # differently for small and large draws, so per-batch draws would depend on batch_size
    z_all = torch.randn((len(c_all), int(G.z_dim)), generator=gen)
    out = []
    with torch.no_grad():
        for start in range(0, len(c_all), batch_size):
            c, z = c_all[start : start + batch_size], z_all[start : start + batch_size]
            out.append(G(z.to(device), c.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, G.cfg.n_voxels))
