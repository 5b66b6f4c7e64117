"""Train stage: a conditional WGAN-GP on the ingest output, resumable, checkpoint chosen by physics.

``python -m surrogate.train --config C --dataset results/ingest/dataset.h5 --out results/train``
(or ``torchrun --nproc-per-node N -m surrogate.train ...`` for data-parallel training).

Outputs in ``--out``: ``generator.pt`` (EMA generator of the best physics score, everything
needed to generate), ``history.jsonl`` (one JSON line per logged step), ``summary.json``,
``config.yaml`` (the resolved config). Full training state goes to ``OUT/state/checkpoint.pt``
every ``train.checkpoint_every`` steps; Snakemake does not list it as an output, so it survives a
failed job and a rerun resumes.

The loop core, :func:`train_steps`, works on any tensors (data (N, V), conditions (N, C)), so
tests train it on a toy problem. It draws every random number (batches, latents, penalty
interpolation) from one ``torch.Generator`` per rank kept in the state, which makes resume exact.

Data parallel (``WORLD_SIZE > 1``, set by torchrun): every rank draws its own batches (per-rank
seeds), gradients are averaged over ranks after each backward with one all-reduce of a flat
buffer, as DistributedDataParallel does. We do not wrap the critic in DDP itself: DDP's reducer
documents no support for ``torch.autograd.grad``, which the gradient penalty's double backward
relies on. Rank 0 scores, logs and writes every file. Backend gloo on CPU, nccl on CUDA.

Model choices, measured (60k reference showers, 2000 generator steps, 2 cores; score = the physics
score below, lower is better; "response" = generated/real mean E_dep/E_inc - 1 per particle and
energy decade). The earlier defaults (one linear output per voxel, plain EMA 0.999, lr 1e-4,
epsilon 1e-6) scored 124, responses -78% (photons, 1-10 GeV) to -42% (100 GeV-1 TeV). With the
``layered`` output, lr 1e-4, no ramp-up: 85; critic physics inputs at weight 30 and lr 5e-4: 37;
plus the EMA ramp-up: 8.7 (linear output in the same setting: 10.7; linear with only the ramp-up:
65). Epsilon 1e-8 instead of 1e-6 left the score alike (9.0 vs 8.7) and brought the sparsity
separation from 0.19 to 0.15. Learning rates (layered, weight 30, ramp-up): 1e-4 17.1, 5e-4 9.0,
1e-3 7.0 (every response within 4%, E_dep/E_inc separation power 0.06); at equal time (2.5 min)
1e-3 7.9, 2e-3 7.3 (1e-3 kept: the safer of two scores within noise).
The generator symmetry (below, in models.py) then took the centroid separations from up to 0.53
to at most 0.15.

Fidelity ablations (``benchmarks/bench_fidelity.py``: 3000 generator steps, default preset
otherwise, bf16 on 2 cores of an Intel Xeon with AVX512-BF16 and no AMX; the whole validate
stage judges; its real-vs-real floors: AUCs 0.50/0.47, FPD 0.98, coverage 0.97; 13 mode tests):

=========================================  ======  =======  =======  =====  ========  =====  ==========
run                                        failed  AUC hl.  AUC vox  FPD    coverage  modes  resolution
=========================================  ======  =======  =======  =====  ========  =====  ==========
old defaults                               739     0.9998   0.9983   371    0.09      8      0.79-3.96
+ response template (8 knots)              670     0.9994   0.9974   10.6   0.21      6      0.72-1.02
+ template, critic shape (5) + threshold   288     0.9772   0.9961   1.5    0.83      5      0.59-1.05
  ... + physics per condition (8, w 10)    270     0.9729   0.9948   1.6    0.86      6      0.87-0.96
  ... + PacGAN pack 2 (instead)          479     0.9930   0.9964   1.4    0.66      5      0.76-1.07
  ... + Gaussian voxel-share noise        272     0.9728   0.9968   1.1    0.83      5      0.88-0.98
  default, again (AMD EPYC, AVX512-BF16)   273     0.9709   0.9963   1.2    0.87      5      worst 0.89
  ... template_voxels log_mean (EPYC)      255     0.9682   0.9956   1.1    0.88      6      worst 0.88
  ... template_voxels median (EPYC)        307     0.9815   0.9968   1.6    0.83      5      worst 0.87
  default, seed 7 (EPYC)                   262     0.9715   0.9918   1.5    0.86      3      worst 0.87
  ... template_voxels log_mean, seed 7     248     0.9755   0.9972   1.6    0.87      5      worst 0.85
  default + critic minibatch_std (EPYC)    270     0.9626   0.9856   1.5    0.83      7      worst 0.85
=========================================  ======  =======  =======  =====  ========  =====  ==========

The template turns the resolution from one spread at every energy (ratios up to 4) into the
right one; the critic's shape inputs take the centroid/width failures from 524 to 123 and the
coverage from 0.21 to 0.83; standardising its log energies per condition lifts the too-narrow
high-energy resolutions (0.59 -> 0.87). PacGAN packing (2) made everything worse at this budget
(dropped). The largest group of failures left is the per-layer sparsity: generated showers hit too
many voxels of the big layers (a real outer voxel is empty or holds whole deposits). Two fixes that
give the head one more latent per voxel were tried: Gaussian noise on each voxel's share logit at a
learned scale changed nothing (row above; sparsity failures 102 -> 113); a straight-through hit/empty
draw per voxel (P = 1 - exp(-n share), a binary-concrete relaxation) diverged (critic Wasserstein
estimate 270 at step 800 against 14). Both were removed. The minority modes (tile-start pions,
late-converting photons) remain under-produced. The template's mean voxel share lights a rarely hit
voxel a little in every shower, so a template of typical showers (``template_voxels``) was tried as
the cause of the sparsity failures: it is not. The median share (rare voxels start below the
threshold) made everything worse, sparsity failures 104 -> 111; the mean log share gave fewer
failures elsewhere (273 -> 255: centroids, widths, layer energies) but sparsity alike (107); with
another seed 262 -> 248, but both AUCs and the FPD worse (0.9715 -> 0.9755, 0.9918 -> 0.9972, 1.5 ->
1.6). ``mean`` stays the default (for these rows the bench reports the worst resolution ratio only).
The critic's minibatch std (after a fix: its gradient was NaN where a voxel is constant over the batch)
gave the best voxel AUC and mode count so far but a lower coverage and higher FPD: one seed, kept off.

Precision, measured on this machine (2 shared cores of a Xeon with AMX-BF16, torch 2.13, default
model: 533 voxels, 4 conditions, widths 256x3, batch 256, n_critic 5; benchmarks/bench_train.py,
steps include the gradient penalty's double backward):
fp32 7.3-7.5 generator steps/s, bf16 autocast 9.1-9.3 steps/s (1.24x; 1.4-1.7x at batch 1024) with
2 threads on a quiet machine; with the cores shared by other jobs (load ~5): 1 thread fp32 4.3,
bf16 6.5 steps/s (1.5x), 2 threads 1.8 vs 2.6 (OMP_WAIT_POLICY=PASSIVE; spinning threads are far
slower still). With the layered output and physics critic (2.5 minutes each): bf16 1593 steps,
score 7.9; fp32 1338 steps, score 9.4. The toy ring test converges in bf16 too (800 steps, all
checks pass), so
``precision: auto`` picks bf16 on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16), fp32
elsewhere (emulated bf16 is slower).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.distributed as dist

from surrogate import memory
from surrogate.config import dump_config, parse_stage_args, stage_parser
from surrogate.data import ShuffledChunks, read_chunks, read_rows
from surrogate.device import resolve_device, resolve_precision
from surrogate.holdout import HoldoutError, canonical, check_same, region_index, regions_from_config
from surrogate.io import ProgressBar, atomic_path, write_json
from surrogate.losses import critic_loss, drift_penalty, generator_loss, gradient_penalty, wasserstein_estimate
from surrogate.models import FORMAT_VERSION, ModelConfig, build_models, count_parameters, head_info

__all__ = [
    "TrainError",
    "NonFiniteError",
    "LoopSettings",
    "TrainState",
    "model_config_from",
    "model_parts",
    "critic_physics",
    "ema_beta",
    "loop_settings_from",
    "train_steps",
    "physics_score",
    "load_split",
    "run",
    "main",
]

log = logging.getLogger(__name__)

STATE_VERSION = 2
# keys of the train section that may change between a checkpoint and a rerun without
# invalidating it (how long / how often / where / what to do on trouble, not what is trained)
_RESUMABLE_KEYS = (
    "steps",
    "max_minutes",
    "threads",
    "log_every",
    "checkpoint_every",
    "eval_every",
    "eval_events",
    "eval_shape",
    "on_nonfinite",
    "max_rollbacks",
    "on_incompatible_checkpoint",
)


def _save(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` through an open file: given a path, torch names the archive inside after the
    file, and the temporary name of an atomic write would make equal checkpoints differ in bytes."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)


class TrainError(RuntimeError):
    """A dataset, checkpoint or setting the train stage refuses, with a message naming it."""


class NonFiniteError(TrainError):
    """A loss or weight became NaN/inf; the message names the step."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class LoopSettings:
    """What one training step does (from config ``train``)."""

    batch_size: int = 256  # events per critic / generator batch (per rank when data parallel)
    n_critic: int = 5  # critic updates per generator update
    gp_lambda: float = 10.0  # gradient-penalty weight λ
    drift_epsilon: float = 0.0  # ε of the drift term ε·E[D(real)²]; 0 = off
    lr_g: float = 1e-4  # generator Adam learning rate
    lr_d: float = 1e-4  # critic Adam learning rate
    betas: tuple[float, float] = (0.5, 0.9)  # Adam betas of both optimisers
    ema_decay: float = 0.999  # per generator step; EMA G is used for everything downstream
    ema_rampup: float = 0.05  # EMA half-life at most this fraction of the steps so far (0 = off)
    precision: str = "fp32"  # fp32 | bf16 (autocast, fp32 master weights)


def model_config_from(
    train: dict[str, Any], n_voxels: int, cond_dim: int, layer_shapes: Sequence[tuple[int, int]] = ()
) -> ModelConfig:
    """ModelConfig from the config's ``train`` section and the data's sizes (``layer_shapes``: (n_alpha,
    n_r) of every active layer, what a ``per_layer`` structure needs)."""
    g, d = train["generator"], train["critic"]
    structured = {}
    if "per_layer" in (g.get("structure", "dense"), d.get("structure", "dense")):
        structured = {
            "g_structure": g.get("structure", "dense"),
            "d_structure": d.get("structure", "dense"),
            "g_layer_width": int(g.get("layer_width", 64)),
            "d_layer_width": int(d.get("layer_width", 64)),
            "layer_shapes": tuple(layer_shapes),
        }
    return ModelConfig(
        n_voxels=n_voxels,
        cond_dim=cond_dim,
        z_dim=train["z_dim"],
        g_width=g["width"],
        g_depth=g["depth"],
        d_width=d["width"],
        d_depth=d["depth"],
        conditioning=train["conditioning"],
        critic_layernorm=d["layernorm"],
        spectral_norm=d["spectral_norm"],
        minibatch_std=d["minibatch_std"],
        output=g["output"],
        symmetry=g["symmetry"],
        critic_physics_weight=float(d["physics_weight"]),
        critic_shape_weight=float(d["shape_weight"]),
        critic_threshold=bool(d["threshold"]),
        template_knots=int(g["template_knots"]),
        critic_physics_knots=int(d["physics_knots"]),
        critic_pack=int(d["pack"]),
        **structured,
    )


def loop_settings_from(train: dict[str, Any], precision: str) -> LoopSettings:
    """LoopSettings from the config's ``train`` section and a resolved precision (fp32 | bf16)."""
    return LoopSettings(
        batch_size=train["batch_size"],
        n_critic=train["n_critic"],
        gp_lambda=train["gp_lambda"],
        drift_epsilon=train["drift_epsilon"],
        lr_g=train["lr_g"],
        lr_d=train["lr_d"],
        betas=tuple(train["betas"]),
        ema_decay=train["ema_decay"],
        ema_rampup=train["ema_rampup"],
        precision=precision,
    )


def _rank_seed(seed: int, rank: int, attempt: int = 0) -> int:
    """Seed of the loop RNG of one rank (and of one rollback attempt), from the config seed."""
    return int(np.random.SeedSequence([seed, rank, attempt]).generate_state(1, np.uint64)[0] >> 1)


# --------------------------------------------------------------------------- state and loop


class TrainState:
    """G, D, EMA G, both optimisers, the step counter and the one RNG of the loop (of this rank)."""

    def __init__(
        self,
        cfg: ModelConfig,
        settings: LoopSettings,
        device: torch.device,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        head: dict[str, Any] | None = None,
        physics: dict[str, Any] | None = None,
    ) -> None:
        if settings.batch_size % cfg.critic_pack:
            raise TrainError(
                f"train.batch_size {settings.batch_size} is not a multiple of train.critic.pack "
                f"{cfg.critic_pack} (the critic scores whole packs)"
            )
        torch.manual_seed(seed)  # weight initialisation only (same on every rank); the loop uses self.rng
        self.model_config = cfg
        self.settings = settings
        self.device = device
        self.rank, self.world_size = rank, world_size
        G, D = build_models(cfg, head, physics)
        self.G, self.D = G.to(device), D.to(device)
        if world_size > 1:
            for t in [*self.G.state_dict().values(), *self.D.state_dict().values()]:
                dist.broadcast(t, src=0)  # identical start on every rank, whatever the seeding
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=settings.lr_g, betas=settings.betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=settings.lr_d, betas=settings.betas)
        self.step = 0
        self.rng = torch.Generator().manual_seed(_rank_seed(seed, rank))

    def state_dict(self) -> dict[str, Any]:
        """Everything of this rank's training state (tensors and plain data; weights_only-loadable)."""
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "step": self.step,
            "rng": self.rng.get_state(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; ``rng_ranks`` (one RNG state per rank) wins over ``rng``."""
        self.G.load_state_dict(d["G"])
        self.D.load_state_dict(d["D"])
        self.G_ema.load_state_dict(d["G_ema"])
        self.opt_g.load_state_dict(d["opt_g"])
        self.opt_d.load_state_dict(d["opt_d"])
        self.step = int(d["step"])
        self.rng.set_state(d["rng_ranks"][self.rank] if "rng_ranks" in d else d["rng"])


def _autocast(settings: LoopSettings, device: torch.device):
    if settings.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _grad_norm(module: torch.nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _sync(state: TrainState, module: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """Average gradients of ``module`` and the loss over ranks (one all-reduce); returns the loss.

    Single process: the loss unchanged. The loss rides in the same buffer so every rank sees the
    same (possibly non-finite) value and all of them stop at the same step.
    """
    if state.world_size == 1:
        return loss.detach()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().float().reshape(1).to(grads[0].dtype)])
    dist.all_reduce(flat)
    flat /= state.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[-1]


def _batch(state: TrainState, x: torch.Tensor, c: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # indices drawn on the CPU from the loop's RNG (device-independent), with replacement
    idx = torch.randint(len(x), (n,), generator=state.rng).to(x.device)
    return x[idx], c[idx]


def _real(
    state: TrainState, x: torch.Tensor | ShuffledChunks, c: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of real showers and their conditions: drawn from ``x`` in RAM, or the next rows of the reader."""
    return x.take(n) if isinstance(x, ShuffledChunks) else _batch(state, x, c, n)


def _conditions(state: TrainState, x: torch.Tensor | ShuffledChunks, c: torch.Tensor, n: int) -> torch.Tensor:
    """Conditions of a generator batch (the same draw as a real batch's; only its conditions are used)."""
    if isinstance(x, ShuffledChunks):
        return c[torch.randint(len(c), (n,), generator=state.rng).to(c.device)]
    return _batch(state, x, c, n)[1]


def _latent(state: TrainState, n: int) -> torch.Tensor:
    return torch.randn((n, state.model_config.z_dim), generator=state.rng).to(state.device)


def ema_beta(decay: float, rampup: float, step: int) -> float:
    """EMA decay of generator step ``step`` (1-based): ``decay``, with its half-life capped at
    ``rampup * step`` steps when ``rampup > 0``.

    The ramp-up (StyleGAN2-ADA's ``ema_rampup``) keeps the average over the recent part of
    training: a fixed 0.999 (half-life 693 steps) in a run of a few thousand steps averages in
    generators from far back, which are much worse.
    """
    if rampup <= 0 or decay <= 0:
        return decay
    return min(decay, 0.5 ** (1.0 / max(rampup * step, 1e-8)))


def train_steps(
    state: TrainState,
    data_x: torch.Tensor | ShuffledChunks,
    data_c: torch.Tensor,
    steps: int,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    deadline: float | None = None,
) -> dict[str, float]:
    """Run ``steps`` generator steps (each after ``n_critic`` critic steps); returns the last step's scalars.

    data_x: (N, V) float32 network-space showers, data_c: (N, C) conditions, both on
    ``state.device``; or data_x a :class:`~surrogate.data.ShuffledChunks` reader of the showers (the
    critic's batches are its next rows; it is first moved to where this step count left it, so a resume
    continues its stream) with data_c the conditions of all its rows. Stops early, before a step, once
    ``time.perf_counter()`` passes ``deadline`` (``state.step`` tells how far it got; single process
    only, ranks must agree). Raises :class:`NonFiniteError` naming the step when a loss is not finite; the optimiser
    step of that update is not taken.
    """
    s, G, D = state.settings, state.G, state.D
    ac = _autocast(s, state.device)
    metrics: dict[str, float] = {}
    if isinstance(data_x, ShuffledChunks):
        data_x.seek(state.step * s.n_critic * s.batch_size)
    for _ in range(steps):
        if deadline is not None and time.perf_counter() > deadline:
            break
        step = state.step + 1
        loss_d = wdist = gp = torch.zeros(())
        gnorm_d = 0.0
        for i in range(s.n_critic):
            real, c = _real(state, data_x, data_c, s.batch_size)
            z = _latent(state, s.batch_size)
            with ac:
                with torch.no_grad():
                    fake = G(z, c)
                    # the critic's embedding of the showers has no parameters: outside the graph
                    real_a, fake_a = D.embed(real, c), D.embed(fake.float(), c)
                d_real, d_fake = D.score(real_a, c), D.score(fake_a, c)
                gp = (
                    gradient_penalty(
                        D.score,
                        real_a,
                        fake_a.float(),
                        c,
                        s.gp_lambda,
                        generator=state.rng,
                        pack=state.model_config.critic_pack,
                    )
                    if s.gp_lambda
                    else torch.zeros((), device=real.device)
                )
                loss_d = critic_loss(d_real, d_fake) + gp
                if s.drift_epsilon:
                    loss_d = loss_d + drift_penalty(d_real, s.drift_epsilon)
            state.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            loss_d = _sync(state, D, loss_d)
            if not torch.isfinite(loss_d):
                raise NonFiniteError(
                    f"step {step}: critic loss is {float(loss_d)} (lower train.lr_d or raise train.gp_lambda)"
                )
            if i == s.n_critic - 1:  # the norm costs a sync per parameter: only for the logged step
                gnorm_d = _grad_norm(D)
            state.opt_d.step()
            wdist = wasserstein_estimate(d_real.detach(), d_fake.detach())
        c = _conditions(state, data_x, data_c, s.batch_size)
        z = _latent(state, s.batch_size)
        D.requires_grad_(False)  # no critic gradients in the generator step
        with ac:
            loss_g = generator_loss(D(G(z, c), c))
        D.requires_grad_(True)
        state.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        loss_g = _sync(state, G, loss_g)
        if not torch.isfinite(loss_g):
            raise NonFiniteError(f"step {step}: generator loss is {float(loss_g)} (lower train.lr_g)")
        gnorm_g = _grad_norm(G)
        state.opt_g.step()
        beta = ema_beta(s.ema_decay, s.ema_rampup, step)
        with torch.no_grad():
            for p_ema, p in zip(state.G_ema.parameters(), G.parameters(), strict=True):
                p_ema.lerp_(p, 1.0 - beta)
        state.step = step
        metrics = {
            "loss_d": float(loss_d),
            "loss_g": float(loss_g),
            "wasserstein": float(wdist),
            "gp": float(gp.detach()),
            "grad_norm_d": gnorm_d,
            "grad_norm_g": gnorm_g,
        }
        if on_step is not None:
            on_step(step, metrics)
    return metrics


def _weights_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


# --------------------------------------------------------------------------- physics score


def _chi2_ndf(real: np.ndarray, gen: np.ndarray, bins: int) -> float:
    """χ²/ndf between two normalised histograms on the real sample's quantile bins (with overflow)."""
    inner = np.unique(np.quantile(real, np.linspace(0, 1, bins + 1)[1:-1]))
    edges = np.concatenate([[-np.inf], inner, [np.inf]])
    a = np.histogram(real, edges)[0].astype(float)
    b = np.histogram(np.nan_to_num(gen, nan=np.inf), edges)[0].astype(float)
    na, nb = a.sum(), b.sum()
    keep = (a + b) > 0
    pa, pb = a[keep] / na, b[keep] / nb
    chi2 = np.sum((pa - pb) ** 2 / (a[keep] / na**2 + b[keep] / nb**2))
    return float(chi2 / max(int(keep.sum()) - 1, 1))


def physics_score(
    real_showers: np.ndarray,
    gen_showers: np.ndarray,
    energies: np.ndarray,
    geometry: Any,
    groups: np.ndarray | None = None,
    energy_bins: int = 5,
    hist_bins: int = 20,
    shape: bool = False,
    threshold: float = 0.0,
) -> dict[str, float]:
    """Quick validation score of generated vs real showers at the same conditions (lower is better).

    real_showers, gen_showers: (N, V) MeV; energies (N, 1) MeV; groups (N,) e.g. particle codes.
    ``chi2_eratio``: mean over (group, energy quantile bin) of χ²/ndf of E_dep/E_inc histograms;
    ``chi2_frac``: mean over active layers of χ²/ndf of the layer energy-fraction histograms;
    ``chi2_shape``: mean χ²/ndf of the per-layer centroids, widths and sparsities (voxels above
    ``threshold`` MeV) that vary in the real sample; ``score`` = the sum of the first two, plus
    ``chi2_shape`` when ``shape`` (a generator that gets the energies right with collapsed
    shapes or too few hits then does not win the checkpoint).
    """
    from surrogate.features import compute_features

    fr = compute_features(real_showers, energies, geometry, threshold=threshold)
    fg = compute_features(gen_showers, energies, geometry, threshold=threshold)
    e = np.asarray(energies, dtype=np.float64).reshape(-1)
    groups = np.zeros(len(e), dtype=np.int64) if groups is None else np.asarray(groups).reshape(-1)
    chi_e = []
    for g in np.unique(groups):
        sel = groups == g
        edges = np.quantile(np.log(e[sel]), np.linspace(0, 1, energy_bins + 1))
        which = np.clip(np.searchsorted(edges, np.log(e[sel]), side="right") - 1, 0, energy_bins - 1)
        for k in range(energy_bins):
            m = which == k
            if m.sum() >= 2 * hist_bins:  # too few events give a meaningless χ²
                chi_e.append(_chi2_ndf(fr["E_ratio"][sel][m], fg["E_ratio"][sel][m], hist_bins))
    chi_f = [_chi2_ndf(fr[k], fg[k], hist_bins) for k in fr if k.startswith("frac_layer_")]
    ce = float(np.mean(chi_e)) if chi_e else float("nan")
    cf = float(np.mean(chi_f)) if chi_f else float("nan")
    varied = [k for k in fr if k.startswith(("centre_", "width_", "sparsity_")) and np.ptp(fr[k]) > 0]
    cs = float(np.mean([_chi2_ndf(fr[k], fg[k], hist_bins) for k in varied])) if varied else 0.0
    return {"chi2_eratio": ce, "chi2_frac": cf, "chi2_shape": cs, "score": ce + cf + (cs if shape else 0.0)}


def model_parts(
    train: dict[str, Any],
    pre: Any,
    geometry: Any,
    showers: np.ndarray,
    energies: np.ndarray,
    threshold_mev: float | None = None,
    pdg: np.ndarray | None = None,
) -> tuple[ModelConfig, dict[str, Any] | None, dict[str, Any] | None]:
    """(ModelConfig, generator head info, critic physics info) for the config's ``train`` section,
    a fitted Preprocessor, a Geometry and training showers (N, V) MeV with energies (N, 1) MeV
    (the data's readout threshold in MeV, see :func:`critic_physics`, and the particle codes (N,),
    needed by a template when the data hold several particles); the last two are None when the
    config does not use them (arguments of :class:`TrainState`)."""
    shapes = [(layer.n_alpha, layer.n_r) for layer in geometry.active_layers]
    mcfg = model_config_from(train, n_voxels=geometry.n_voxels, cond_dim=len(pre.condition_names), layer_shapes=shapes)
    head = head_info(pre, geometry, mcfg.symmetry) if mcfg.output != "linear" else None
    if head is not None and mcfg.template_knots:
        head["template"] = response_template(
            pre,
            geometry,
            showers,
            energies,
            pdg,
            mcfg.template_knots,
            voxels=str(train["generator"].get("template_voxels", "mean")),
            threshold_mev=threshold_mev,
        )
    wants = mcfg.critic_physics_weight > 0 or mcfg.critic_shape_weight > 0 or mcfg.critic_threshold
    physics = (
        critic_physics(pre, geometry, showers, energies, threshold_mev, pdg, mcfg.critic_physics_knots)
        if wants
        else None
    )
    return mcfg, head, physics


def _knot_groups(
    pre: Any, energies: np.ndarray, pdg: np.ndarray | None, knots: int
) -> tuple[np.ndarray, list[list[np.ndarray]], np.ndarray]:
    """Rows of each (particle, energy knot) of a training sample, for the per-condition tables.

    Per particle (in ``pre.particles`` order; one group when there is one particle), the events
    are cut into ``knots`` quantile bins of log E. Returns the scaled log E of every event (the
    first condition column), the row indices per particle and bin, and the knots (P, K): each
    bin's median scaled log E, made strictly increasing.
    """
    e = np.asarray(energies, dtype=np.float64).reshape(-1)
    lo, hi = (float(np.log(v)) for v in pre.energy_range_mev)
    c0 = 2.0 * (np.log(e) - lo) / max(hi - lo, 1e-12) - 1.0
    particles = list(pre.particles) if len(pre.particles) > 1 else [None]
    codes = np.asarray(pdg).reshape(-1) if pdg is not None else None
    if particles[0] is not None and codes is None:
        raise TrainError("per-condition tables: the data hold several particles; give their codes")
    groups, k_out = [], np.zeros((len(particles), knots), np.float32)
    for p, code in enumerate(particles):
        sel = np.flatnonzero(codes == code) if code is not None else np.arange(len(e))
        if len(sel) < 2 * knots:
            raise TrainError(
                f"per-condition tables: {len(sel)} training events of particle {code}, too few for {knots} knots"
            )
        edges = np.quantile(c0[sel], np.linspace(0, 1, knots + 1))
        which = np.clip(np.searchsorted(edges, c0[sel], side="right") - 1, 0, knots - 1)
        groups.append([sel[which == k] for k in range(knots)])
        k_out[p] = [np.median(c0[rows]) for rows in groups[-1]]
        k_out[p] = np.maximum.accumulate(k_out[p] + np.arange(knots) * 1e-6)
    return c0, groups, k_out


def _readout_threshold(showers: np.ndarray, threshold_mev: float | None) -> float:
    """The data's readout threshold in MeV: the one given, else the smallest positive voxel energy."""
    if threshold_mev is not None:
        return float(threshold_mev)
    positive = np.asarray(showers)[np.asarray(showers) > 0]
    return float(positive.min()) if positive.size else 1e-3


def _layer_member(geometry: Any) -> np.ndarray:
    """(V, L) float32: 1 where voxel v lies in active layer l."""
    layer_index, _, _ = geometry.voxel_centres()
    member = np.zeros((geometry.n_voxels, len(geometry.active_layers)), dtype=np.float32)
    member[np.arange(geometry.n_voxels), layer_index] = 1.0
    return member


def response_template(
    pre: Any,
    geometry: Any,
    showers: np.ndarray,
    energies: np.ndarray,
    pdg: np.ndarray | None,
    knots: int,
    voxels: str = "mean",
    threshold_mev: float | None = None,
) -> dict[str, np.ndarray]:
    """Fit :class:`surrogate.models.ResponseTemplate` on training showers (N, V) MeV, energies (N, 1) MeV.

    Per particle and energy knot (:func:`_knot_groups`): the mean and log standard deviation of
    log(E_dep / E_inc), the log of the mean layer shares of E_dep and, per voxel, the log of its
    typical share of its layer. Returns ``{"knots": (P, K), "values": (P, K, 2 + L + V)}``.

    ``voxels`` picks that typical share. ``mean``: the mean share (floored at 1e-12). A voxel
    that holds a share s in a tenth of the showers then gets s/10 in every shower, enough to
    pass the readout threshold in showers where it should be empty, so the generator starts
    from a shower lit everywhere and must learn to darken it. ``log_mean``: the mean over
    showers of log(max(share, floor)), floor = half the readout threshold over the layer's
    energy in that shower (``threshold_mev``; None: the smallest positive voxel energy), so a
    rarely hit voxel starts dim and a core voxel near its usual share. ``median``: the median of
    that floored log share, so a voxel empty in most showers starts below the threshold: the
    template is the typical shower, and the generator must learn to light the rarer voxels.
    Layers without energy in a shower do not count towards its voxels' shares.
    """
    if voxels not in ("mean", "log_mean", "median"):
        raise TrainError(f"response template: template_voxels {voxels!r}, expected mean, log_mean or median")
    if voxels != "mean":
        threshold_mev = _readout_threshold(showers, threshold_mev)
    member = _layer_member(geometry).astype(np.float64)
    layer_index = np.argmax(member, axis=1)
    e = np.asarray(energies, dtype=np.float64).reshape(-1)
    _, groups, k_out = _knot_groups(pre, energies, pdg, knots)
    v_out = np.zeros((*k_out.shape, 2 + member.shape[1] + geometry.n_voxels), np.float32)
    for p, rows_per_knot in enumerate(groups):
        for k, rows in enumerate(rows_per_knot):
            sh = np.asarray(showers[rows], dtype=np.float64)
            layer = sh @ member
            total = layer.sum(axis=1)
            ok = total > 0
            lt = np.log(total[ok] / e[rows][ok])
            layer_share = (layer[ok] / total[ok, None]).mean(axis=0)
            per_voxel_layer = layer[ok][:, layer_index]
            share = np.where(per_voxel_layer > 0, sh[ok] / np.maximum(per_voxel_layer, 1e-300), 0.0)
            if voxels == "mean":
                log_vox = np.log(np.maximum(share.mean(axis=0), 1e-12))
            else:
                # rows of ok all hold energy, but a layer may be empty in some of them: those rows are left out
                lit = per_voxel_layer > 0
                floor = np.minimum(0.5 * threshold_mev / np.maximum(per_voxel_layer, 1e-300), 1.0)
                logs = np.where(lit, np.log(np.maximum(share, floor)), np.nan)
                with warnings.catch_warnings():  # a voxel whose layer is never lit: all-NaN column, set below
                    warnings.simplefilter("ignore", RuntimeWarning)
                    log_vox = np.nanmean(logs, axis=0) if voxels == "log_mean" else np.nanmedian(logs, axis=0)
                log_vox = np.maximum(np.nan_to_num(log_vox, nan=np.log(1e-12)), np.log(1e-12))
            v_out[p, k, 0] = lt.mean() if ok.any() else 0.0
            v_out[p, k, 1] = np.log(max(lt.std(), 1e-3)) if ok.sum() > 1 else 0.0
            v_out[p, k, 2 : 2 + member.shape[1]] = np.log(np.maximum(layer_share, 1e-12))
            v_out[p, k, 2 + member.shape[1] :] = log_vox
    return {"knots": k_out, "values": v_out}


def _sums_table(pre: Any, feats: np.ndarray, energies: np.ndarray, pdg: np.ndarray | None, knots: int) -> dict:
    """Per-condition mean and log std of the critic's log energies (N, F): ``{"knots", "values" (P, K, 2F)}``."""
    _, groups, k_out = _knot_groups(pre, energies, pdg, knots)
    v_out = np.zeros((*k_out.shape, 2 * feats.shape[1]), np.float32)
    for p, rows_per_knot in enumerate(groups):
        for k, rows in enumerate(rows_per_knot):
            f = feats[rows].astype(np.float64)
            v_out[p, k, : feats.shape[1]] = f.mean(axis=0)
            v_out[p, k, feats.shape[1] :] = np.log(np.maximum(f.std(axis=0), 1e-3))
    return {"knots": k_out, "values": v_out}


def critic_physics(
    pre: Any,
    geometry: Any,
    showers: np.ndarray,
    energies: np.ndarray,
    threshold_mev: float | None = None,
    pdg: np.ndarray | None = None,
    knots: int = 0,
) -> dict[str, Any]:
    """The arrays of the critic's physics inputs (:class:`surrogate.models.ShowerSums`,
    :class:`~surrogate.models.ShowerShape`, :class:`~surrogate.models.ReadoutThreshold`) for this
    preprocessing, geometry and training sample.

    showers (N, V) MeV, energies (N, 1) MeV; the centring of the log layer and total energies and
    the spread of the shape features are fitted on them. ``threshold_mev``: the readout threshold
    the data were written with (the ingest attribute); None: the smallest positive voxel energy.
    ``knots`` > 0: the log energies' per-condition table too (needs ``pdg`` with several particles).
    """
    from surrogate.models import ShowerShape, ShowerSums

    member = _layer_member(geometry)
    e = np.asarray(energies, dtype=np.float32).reshape(-1, 1)
    u = np.asarray(showers, dtype=np.float32) / e
    sums = u @ member
    feats = np.log(np.concatenate([sums, sums.sum(axis=1, keepdims=True)], axis=1) + ShowerSums.DELTA)
    threshold_mev = _readout_threshold(showers, threshold_mev)
    vx, vy = geometry.voxel_xy()
    info = {
        "transform": pre.voxel_transform,
        "epsilon": pre.epsilon,
        "logit_alpha": pre.logit_alpha,
        "shift": pre.mean,
        "scale": pre.std,
        "member": member,
        "feat_mean": feats.mean(axis=0),
        "threshold_mev": float(threshold_mev),
        "log_e_range": [float(np.log(v)) for v in pre.energy_range_mev],
        "vx": vx.astype(np.float32),
        "vy": vy.astype(np.float32),
        "n_particles": max(len(pre.particles), 1),
    }
    if knots:
        info["sums_table"] = _sums_table(pre, feats, energies, pdg, knots)
    # the shape features' spread, through the module itself (unit scaling) on the real showers
    n_out = 5 * member.shape[1]
    probe = ShowerShape({**info, "shape_mean": np.zeros(n_out), "shape_std": np.ones(n_out)}, 1.0)
    lo, hi = info["log_e_range"]
    c0 = torch.from_numpy((2.0 * (np.log(e) - lo) / max(hi - lo, 1e-12) - 1.0).astype(np.float32))
    x = torch.from_numpy(pre.transform_showers(showers, energies))
    # 8192 rows a batch, fewer for wide showers (each of raw's temporaries (rows, V) within 64 MB)
    step = min(8192, max(1, (1 << 24) // geometry.n_voxels))
    with torch.no_grad():
        raw = torch.cat([probe.raw(x[i : i + step], c0[i : i + step]) for i in range(0, len(x), step)]).double()
    std = raw.std(dim=0).numpy() if len(raw) > 1 else np.ones(n_out)
    info["shape_mean"] = raw.mean(dim=0).numpy() if len(raw) else np.zeros(n_out)
    info["shape_std"] = np.where(std > 1e-6, std, 1.0)  # constant features (e.g. y of a one-bin layer) stay 0
    return info


# --------------------------------------------------------------------------- data


def load_split(
    path: str | Path, split: str, rows: np.ndarray | None = None, showers: bool = True
) -> dict[str, np.ndarray]:
    """Read one split of ``dataset.h5`` into RAM: showers (N, V) MeV, incident_energies (N, 1), ...

    ``rows`` (sorted, unique): only those rows, the showers read a chunk at a time
    (:func:`surrogate.data.read_rows`); ``showers=False``: every column but the showers.
    """
    path = Path(path)
    keys = ("showers", "incident_energies", "incident_eta", "incident_pdg", "conditions")
    keys = keys if showers else keys[1:]
    try:
        with h5py.File(path, "r") as f:
            if split not in f:
                raise TrainError(f"{path}: no group '{split}' (is this the ingest output dataset.h5?)")
            missing = [k for k in keys if k not in f[split]]
            if missing:
                raise TrainError(f"{path}: group '{split}' lacks dataset(s) {', '.join(missing)}")
            if rows is None:
                out = {k: f[split][k][()] for k in keys}
            else:
                out = {k: read_rows(f[split][k], rows) for k in keys}
    except OSError as exc:
        raise TrainError(f"{path}: cannot open as HDF5 ({exc})") from exc
    ref = keys[0]
    n = len(out[ref])
    for k, v in out.items():
        if len(v) != n:
            raise TrainError(f"{path}: {split}/{k} has {len(v)} rows but {split}/{ref} has {n}")
        bad = ~np.isfinite(v.reshape(n, -1)).all(axis=1) if v.dtype.kind == "f" else np.zeros(n, bool)
        if bad.any():
            raise TrainError(
                f"{path}: {split}/{k} has non-finite values in {int(bad.sum())} row(s), first row {int(np.argmax(bad))}"
            )
    return out


def eval_rows(n_val: int, eval_events: int, seed: int) -> np.ndarray:
    """The validation rows of the physics score (sorted): ``eval_events`` of ``n_val``, drawn once by seed."""
    n_eval = min(int(eval_events), n_val)
    rng = np.random.default_rng(int(seed))
    return np.sort(rng.choice(n_val, n_eval, replace=False)) if n_eval else np.zeros(0, int)


def _check_holdout(cfg: dict[str, Any], dataset: Path, attrs: dict[str, Any], tr: dict[str, np.ndarray]) -> None:
    """Refuse a dataset ingested with other held-out regions than the config's, or whose train
    split holds an event inside one of the config's regions (a leak, whatever made the file)."""
    try:
        regions = regions_from_config(cfg)
    except HoldoutError as exc:
        raise TrainError(str(exc)) from exc
    check_same(attrs.get("holdout"), canonical(regions), str(dataset), "the config (ingest.holdout)", TrainError)
    where = region_index(regions, tr["incident_energies"], tr["incident_eta"], tr["incident_pdg"])
    inside = np.flatnonzero(where >= 0)
    if inside.size:
        raise TrainError(
            f"{dataset}: train row {inside[0]} lies in held-out region {regions[where[inside[0]]].label} "
            f"({inside.size} train events do): refusing to train on conditions the config holds out"
        )


def _dataset_attrs(path: Path) -> dict[str, Any]:
    try:
        with h5py.File(path, "r") as f:
            out = {k: json.loads(f.attrs[k]) for k in ("geometry", "preprocessing", "condition_names")}
            if "readout_threshold_mev" in f.attrs:  # written by ingest (the data's readout threshold)
                out["readout_threshold_mev"] = float(f.attrs["readout_threshold_mev"])
            if "holdout" in f.attrs:  # written by ingest when it held condition regions out
                out["holdout"] = str(f.attrs["holdout"])
            return out
    except KeyError as exc:
        raise TrainError(f"{path}: missing root attribute {exc} (written by surrogate.ingest)") from exc
    except OSError as exc:
        raise TrainError(f"{path}: cannot open as HDF5 ({exc})") from exc


# --------------------------------------------------------------------------- stage


def _compat(
    cfg: dict[str, Any], model_config: ModelConfig, attrs: dict[str, Any], n_train: int, world_size: int
) -> dict[str, Any]:
    """What a checkpoint must share with a rerun to be resumed (JSON-normalised)."""
    train = {k: v for k, v in cfg["train"].items() if k not in _RESUMABLE_KEYS}
    return json.loads(
        json.dumps(
            {
                "seed": cfg["seed"],
                "train": train,
                "model_config": model_config.to_dict(),
                "preprocessing": attrs["preprocessing"],
                "condition_names": attrs["condition_names"],
                "n_train": n_train,
                "world_size": world_size,
            },
            sort_keys=True,
        )
    )


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]} (checkpoint {str(a)[:60]}, now {str(b)[:60]})"]


def _truncate_history(path: Path, step: int) -> None:
    """Keep the history lines up to ``step`` (later ones are redone after a resume or rollback)."""
    if not path.exists():
        return
    lines = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln)["step"] <= step:
                lines.append(ln)
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill; redone anyway
            continue
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in lines))


def _append_history(path: Path, row: dict[str, Any]) -> None:
    # reopened per line (every log_every steps): a rollback may have replaced the file meanwhile
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _load_state(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise TrainError(f"{path}: unreadable training checkpoint ({why}); rerun with --restart to discard it") from exc
    if not isinstance(ckpt, dict) or ckpt.get("state_version") != STATE_VERSION:
        version = ckpt.get("state_version") if isinstance(ckpt, dict) else None
        raise TrainError(
            f"{path}: checkpoint state_version {version!r}, this code resumes {STATE_VERSION}; "
            "rerun with --restart to discard it"
        )
    return ckpt


def _dist_env() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from torchrun's environment; (1, 0, 0) without it."""
    try:
        return tuple(int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise TrainError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers ({exc})") from exc


def _any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (a collective: all ranks must call it)."""
    if world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)  # nccl reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def run(
    cfg: dict[str, Any],
    dataset: str | Path,
    out: str | Path,
    *,
    threads: int | None = None,
    restart: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train on ``dataset`` (ingest output); write generator.pt, history.jsonl, summary.json, config.yaml in ``out``.

    ``threads``: torch CPU threads (None: ``train.threads``; 0: torch's default), divided among
    the ranks of one node when data parallel. ``restart``: discard ``out/state`` and start at
    step 0. Returns the summary dict (on every rank; only rank 0 writes files).
    """
    world, rank, local_rank = _dist_env()
    tcfg = cfg["train"]
    threads = tcfg["threads"] if threads is None else threads
    previous_threads = torch.get_num_threads()
    created_group = False
    try:
        device = resolve_device(cfg.get("device", "auto"), TrainError, local_rank)
        if world > 1:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            threads = max(1, (threads or os.cpu_count() or 1) // local_world)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
                created_group = True
        if threads:
            torch.set_num_threads(threads)
        return _run(cfg, Path(dataset), Path(out), device, rank, world, restart, progress and rank == 0)
    finally:
        torch.set_num_threads(previous_threads)
        if created_group:
            dist.destroy_process_group()


def _run(
    cfg: dict[str, Any],
    dataset: Path,
    out: Path,
    device: torch.device,
    rank: int,
    world: int,
    restart: bool,
    progress: bool,
) -> dict[str, Any]:
    from surrogate.geometry import Geometry
    from surrogate.preprocess import Preprocessor

    t_start = time.perf_counter()
    tcfg = cfg["train"]
    precision = resolve_precision(tcfg["precision"], device)
    attrs = _dataset_attrs(dataset)
    pre = Preprocessor.from_dict(attrs["preprocessing"])
    geometry = Geometry.from_dict(attrs["geometry"])
    sizes = _split_sizes(dataset)
    whole = memory.fits(memory.train_bytes(sizes["train"], sizes["val"], geometry.n_voxels), cfg, "train split")
    seed = int(cfg["seed"])
    reader = None
    if whole:
        tr = load_split(dataset, "train")
        va = load_split(dataset, "val") if rank == 0 else {}
        if len(tr["showers"]) == 0:
            raise TrainError(f"{dataset}: the train split is empty")
        _check_holdout(cfg, dataset, attrs, tr)
        x = torch.from_numpy(pre.transform_showers(tr["showers"], tr["incident_energies"])).to(device)
        fit = tr
        idx = eval_rows(len(va["showers"]), tcfg["eval_events"], seed) if rank == 0 else np.zeros(0, int)
        ev = {k: v[idx] for k, v in va.items()}
    else:
        tr = load_split(dataset, "train", showers=False)
        if len(tr["conditions"]) == 0:
            raise TrainError(f"{dataset}: the train split is empty")
        _check_holdout(cfg, dataset, attrs, tr)
        fit = _fit_sample(dataset, cfg, geometry.n_voxels)
        row_bytes = 4 * geometry.n_voxels
        window = memory.rows_within(row_bytes, WINDOW_SHARE, cfg) // max(_chunk_rows(dataset, "train"), 1)
        x = reader = ShuffledChunks(dataset, "train", pre, tr["conditions"], window, _rank_seed(seed, rank), device)
        log.info(
            "train split streamed: %d events in %d chunks of %d, windows of %d chunks; fits on %d events",
            len(reader),
            reader.n_chunks,
            reader.step,
            reader.window,
            len(fit["incident_energies"]),
        )
        idx = eval_rows(sizes["val"], tcfg["eval_events"], seed) if rank == 0 else None
        ev = load_split(dataset, "val", rows=idx) if rank == 0 else {}
    c = torch.from_numpy(np.asarray(tr["conditions"], dtype=np.float32)).to(device)
    mcfg, head, physics = model_parts(
        tcfg,
        pre,
        geometry,
        fit["showers"],
        fit["incident_energies"],
        attrs.get("readout_threshold_mev"),
        fit["incident_pdg"],
    )
    del tr, fit
    try:
        state = TrainState(mcfg, loop_settings_from(tcfg, precision), device, seed, rank, world, head, physics)
        compat = _compat(cfg, mcfg, attrs, len(x), world)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, out / "config.yaml")
        trainer = _Trainer(cfg, state, pre, geometry, attrs, ev, out, compat, progress)
        trainer.start(restart)
        stopped_early = trainer.loop(x, c, t_start)
        return trainer.finish(stopped_early, t_start)
    finally:
        if reader is not None:
            reader.close()


#: Share of ``memory_gb`` a training window of the shuffled-chunk reader may take (the window served,
#: the next one read ahead, and their raw and transformed copies: about 6 windows at the peak).
WINDOW_SHARE = 1 / 32
#: Share of ``memory_gb`` the fit sample of a streamed train split may take (the response template and
#: the critic's physics inputs are fitted on it; their copies take about 6 times as much).
FIT_SHARE = 1 / 16


def _split_sizes(dataset: Path) -> dict[str, int]:
    try:
        with h5py.File(dataset, "r") as f:
            return {s: int(f[s]["incident_energies"].shape[0]) for s in ("train", "val") if s in f}
    except (OSError, KeyError) as exc:
        raise TrainError(f"{dataset}: cannot read the split sizes ({exc})") from exc


def _chunk_rows(dataset: Path, split: str) -> int:
    from surrogate.data import chunk_rows

    with h5py.File(dataset, "r") as f:
        return chunk_rows(f[split]["showers"])


def _fit_sample(dataset: Path, cfg: dict[str, Any], n_voxels: int) -> dict[str, np.ndarray]:
    """Whole chunks of the train split, drawn at random by seed, within ``FIT_SHARE`` of the budget:
    what the response template and the critic's physics inputs are fitted on when the split is streamed."""
    want = memory.rows_within(4 * n_voxels, FIT_SHARE, cfg, at_least=1)
    with h5py.File(dataset, "r") as f:
        g = f["train"]
        step = max(_chunk_rows(dataset, "train"), 1)
        n_chunks = -(-g["showers"].shape[0] // step)
        rng = np.random.default_rng(np.random.SeedSequence([int(cfg["seed"]), 0xF17]))
        chunks = np.sort(rng.permutation(n_chunks)[: max(1, want // step)])
        rows, showers = read_chunks(g["showers"], chunks)
        out = {k: g[k][()][rows] for k in ("incident_energies", "incident_eta", "incident_pdg")}
    return {"showers": showers, **out}


class _Trainer:
    """The stage around :func:`train_steps`: resume, scoring, history, checkpoints, outputs."""

    def __init__(
        self,
        cfg,
        state: TrainState,
        pre,
        geometry,
        attrs: dict[str, Any],
        ev: dict[str, np.ndarray],
        out: Path,
        compat: dict[str, Any],
        progress: bool,
    ) -> None:
        self.cfg, self.tcfg, self.state, self.pre, self.geometry = cfg, cfg["train"], state, pre, geometry
        self.attrs, self.progress = attrs, progress
        self.out, self.compat, self.lead = out, compat, state.rank == 0
        self.state_path, self.history_path = out / "state" / "checkpoint.pt", out / "history.jsonl"
        self.best: dict[str, Any] = {"score": math.inf, "step": -1, "weights": None}
        self.wall_before, self.rollbacks, self.start_step = 0.0, 0, 0
        self.ev = ev  # the validation events of the physics score (:func:`eval_rows`; empty off rank 0)

    # ---- resume
    def start(self, restart: bool) -> None:
        """Resume from OUT/state when compatible; refuse (or restart, if configured) otherwise."""
        if restart:
            log.info("--restart: discarding %s and starting at step 0", self.state_path)
        elif self.state_path.exists():
            ckpt = _load_state(self.state_path)
            diffs = _diff(json.loads(ckpt["compat_json"]), self.compat)
            if not diffs:
                self._restore(ckpt)
                self.start_step = self.state.step
                log.info(
                    "resuming from %s at step %d (best score %.4g at step %d)",
                    self.state_path,
                    self.state.step,
                    self.best["score"],
                    self.best["step"],
                )
                return
            if self.tcfg["on_incompatible_checkpoint"] != "restart":
                raise TrainError(
                    f"{self.state_path}: checkpoint at step {ckpt['step']} was made with a different config: "
                    + "; ".join(diffs[:5])
                    + ". Rerun with --restart (or train.on_incompatible_checkpoint=restart)"
                    " to start over (the checkpoint is discarded), or restore the old config to resume."
                )
            log.warning(
                "%s: config changed (%s): train.on_incompatible_checkpoint=restart, starting at step 0",
                self.state_path,
                "; ".join(diffs[:5]),
            )
        if self.lead:
            self.state_path.unlink(missing_ok=True)
            self.history_path.unlink(missing_ok=True)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.state.load_state_dict(ckpt)
        self.best = {
            "score": float(ckpt["best_score"]),
            "step": int(ckpt["best_step"]),
            "weights": ckpt["best_weights"],
        }
        self.wall_before = float(ckpt["wall_seconds"])
        if self.lead:
            _truncate_history(self.history_path, self.state.step)

    def _rollback(self, exc: NonFiniteError) -> None:
        """Back to the last checkpoint with fresh random streams, or re-raise when not allowed."""
        limit = int(self.tcfg["max_rollbacks"])
        if self.tcfg["on_nonfinite"] != "rollback" or self.rollbacks >= limit or not self.state_path.exists():
            if self.tcfg["on_nonfinite"] == "rollback":
                why = "no checkpoint yet" if not self.state_path.exists() else f"{limit} rollbacks used"
                raise NonFiniteError(f"{exc} ({why}; no generator written)") from exc
            raise exc
        self.rollbacks += 1
        ckpt = _load_state(self.state_path)
        log.warning(
            "%s; rolling back to step %d of %s (rollback %d of %d, new random stream)",
            exc,
            ckpt["step"],
            self.state_path,
            self.rollbacks,
            limit,
        )
        wall = self.wall_before  # this run's clock keeps running: only the model goes back
        self._restore(ckpt)
        self.wall_before = wall
        # the same stream would replay the same divergence
        self.state.rng.manual_seed(_rank_seed(int(self.cfg["seed"]), self.state.rank, self.rollbacks))

    # ---- scoring
    def evaluate(self) -> dict[str, float]:
        """Physics score of the EMA generator on the fixed validation subset (rank 0)."""
        from surrogate.models import sample

        if len(self.ev.get("showers", ())) == 0:
            return {"score": float("nan")}
        # a fixed latent seed: scores of different steps differ by the model, not by the noise
        z_seed = int(self.cfg["seed"])
        gen = self.pre.inverse_showers(
            sample(self.state.G_ema, self.ev["conditions"], z_seed).numpy(), self.ev["incident_energies"]
        )
        ev, t = self.ev, self.tcfg
        return physics_score(
            ev["showers"],
            gen,
            ev["incident_energies"],
            self.geometry,
            ev["incident_pdg"],
            t["eval_energy_bins"],
            t["eval_hist_bins"],
            t["eval_shape"],
            float(self.attrs.get("readout_threshold_mev", 0.0)),
        )

    def consider(self, step: int) -> dict[str, float]:
        """Score the EMA generator; keep its weights when it is the best so far."""
        if not _weights_finite(self.state.G_ema):
            raise NonFiniteError(f"step {step}: the EMA generator has non-finite weights")
        sc = self.evaluate()
        better = sc["score"] < self.best["score"] or (math.isnan(self.best["score"]) and not math.isnan(sc["score"]))
        if self.best["weights"] is None or better:
            self.best.update(score=sc["score"], step=step, weights=copy.deepcopy(self.state.G_ema.state_dict()))
        return sc

    def save_state(self, elapsed: float) -> None:
        """Checkpoint (a collective when data parallel: every rank's RNG state is gathered)."""
        rngs = [self.state.rng.get_state()]
        if self.state.world_size > 1:
            rngs = [None] * self.state.world_size
            dist.all_gather_object(rngs, self.state.rng.get_state())
        if not self.lead:
            return
        weights = self.best["weights"] if self.best["weights"] is not None else self.state.G_ema.state_dict()
        with atomic_path(self.state_path) as tmp:
            _save(
                {
                    "state_version": STATE_VERSION,
                    "compat_json": json.dumps(self.compat, sort_keys=True),
                    **self.state.state_dict(),
                    "rng_ranks": rngs,
                    "best_score": self.best["score"],
                    "best_step": self.best["step"],
                    "best_weights": weights,
                    "wall_seconds": self.wall_before + elapsed,
                },
                tmp,
            )

    # ---- loop
    def loop(self, x: torch.Tensor, c: torch.Tensor, t_start: float) -> bool:
        """Train to ``train.steps`` or the wall-clock cap; returns whether the cap stopped it.

        The cap (``train.max_minutes``) counts from the stage's start (data loading included) plus
        the training time before a resume, so it bounds what a person waits for.
        """
        state, tcfg, world = self.state, self.tcfg, self.state.world_size
        steps, cap = int(tcfg["steps"]), float(tcfg["max_minutes"]) * 60.0
        log_every, ckpt_every, eval_every = (int(tcfg[k]) for k in ("log_every", "checkpoint_every", "eval_every"))
        log.info(
            "training G %s / D %s parameters on %s (%s, %d rank(s)), %d events, steps %d -> %d",
            f"{count_parameters(state.G):,}",
            f"{count_parameters(state.D):,}",
            state.device,
            state.settings.precision,
            world,
            len(x),
            state.step,
            steps,
        )
        t0, stopped_early = time.perf_counter(), False
        deadline = t_start + cap - self.wall_before
        self.history_path.parent.mkdir(parents=True, exist_ok=True)
        with ProgressBar(total=steps, initial=state.step, unit="step", desc="train", disable=not self.progress) as bar:
            while state.step < steps:
                nxt = min(steps, (state.step // log_every + 1) * log_every)
                tc, before = time.perf_counter(), state.step
                try:
                    m = train_steps(state, x, c, nxt - state.step, deadline=deadline if world == 1 else None)
                except NonFiniteError as exc:
                    self._rollback(exc)
                    bar.reset(total=steps)
                    bar.update(state.step)
                    continue
                rate = (state.step - before) / max(time.perf_counter() - tc, 1e-9)
                bar.update(state.step - before)
                stopped_early = _any_rank(state.step < nxt or time.perf_counter() > deadline, world, state.device)
                if state.step == before:
                    break
                row: dict[str, Any] = {
                    "step": state.step,
                    **m,
                    "steps_per_s": rate,
                    "wall_seconds": self.wall_before + time.perf_counter() - t0,
                }
                if self.lead and (state.step % eval_every == 0 or state.step == steps or stopped_early):
                    sc = self.consider(state.step)
                    row.update(val_score=sc["score"], **{f"val_{k}": v for k, v in sc.items() if k != "score"})
                    bar.set_postfix(
                        score=f"{sc['score']:.3g}", best=f"{self.best['score']:.3g}", W=f"{m['wasserstein']:.3g}"
                    )
                if self.lead:
                    _append_history(self.history_path, row)
                if state.step % ckpt_every == 0 or state.step == steps or stopped_early:
                    self.save_state(time.perf_counter() - t0)
                if stopped_early:
                    break
        self.elapsed = time.perf_counter() - t0
        stopped_early = state.step < steps
        if stopped_early:
            log.warning(
                "stopped at step %d of %d: train.max_minutes=%s reached (raise it and rerun to continue)",
                state.step,
                steps,
                tcfg["max_minutes"],
            )
        return stopped_early

    # ---- outputs
    def finish(self, stopped_early: bool, t_start: float) -> dict[str, Any]:
        """Write generator.pt (best EMA weights) and summary.json (rank 0); return the summary."""
        state = self.state
        if state.world_size > 1:
            sums = [None] * state.world_size
            dist.all_gather_object(sums, float(sum(p.double().sum() for p in state.G.parameters())))
            if len(set(sums)) != 1:
                raise TrainError(f"data-parallel ranks hold different generator weights ({sums}): gradient sync failed")
        if self.lead and self.best["weights"] is None:
            self.consider(state.step)
        trained = state.step - self.start_step
        summary = {
            "steps": state.step,
            "wall_seconds": self.wall_before + self.elapsed,
            "stage_seconds": time.perf_counter() - t_start,
            "steps_per_second": trained / max(self.elapsed, 1e-9),
            "samples_per_second": trained * state.settings.batch_size * state.world_size / max(self.elapsed, 1e-9),
            "best_step": self.best["step"],
            "best_score": self.best["score"],
            "device": str(state.device),
            "precision": state.settings.precision,
            "threads": torch.get_num_threads(),
            "world_size": state.world_size,
            "stopped_early": stopped_early,
            "resumed_from_step": self.start_step,
            "rollbacks": self.rollbacks,
            "parameters": {"generator": count_parameters(state.G), "critic": count_parameters(state.D)},
        }
        if self.lead:
            gen_path = self.out / "generator.pt"
            with atomic_path(gen_path) as tmp:
                _save(
                    {
                        "format_version": FORMAT_VERSION,
                        "model_config": state.model_config.to_dict(),
                        "ema_state_dict": self.best["weights"],
                        "preprocessing": self.attrs["preprocessing"],
                        "condition_names": list(self.attrs["condition_names"]),
                        "geometry": self.attrs["geometry"],
                        "step": int(self.best["step"]),
                        "score": float(self.best["score"]),
                        "steps_trained": int(state.step),
                        "precision": state.settings.precision,
                        "seed": int(self.cfg["seed"]),
                        # the regions it never saw (absent without a holdout, as before holdouts existed)
                        **({"holdout": self.attrs["holdout"]} if "holdout" in self.attrs else {}),
                    },
                    tmp,
                )
            write_json(self.out / "summary.json", summary)
            log.info(
                "wrote %s: best score %.4g at step %d of %d (%.1f steps/s)",
                gen_path,
                self.best["score"],
                self.best["step"],
                state.step,
                summary["steps_per_second"],
            )
        return summary


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m surrogate.train``: parse arguments, run, exit 1 with one message on a refused input."""
    parser = stage_parser("python -m surrogate.train", "Train the conditional WGAN-GP shower generator.")
    parser.add_argument("--dataset", default="results/ingest/dataset.h5", help="ingest output (default: %(default)s)")
    parser.add_argument("--out", default="results/train", help="output folder (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: train.threads)")
    parser.add_argument("--restart", action="store_true", help="discard OUT/state/ and start from step 0")
    args, cfg = parse_stage_args(parser, argv)
    try:
        run(
            cfg,
            args.dataset,
            args.out,
            threads=args.threads,
            restart=args.restart,
            progress=os.environ.get("SURROGATE_PROGRESS", "1") != "0",
        )
    except TrainError as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
