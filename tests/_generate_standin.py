"""Stand-ins for ``surrogate.models`` / ``surrogate.preprocess`` used by tests/test_generate.py
only while those modules are not in the tree (they are written by other issues).

``install()`` registers them in ``sys.modules`` when the real modules cannot be imported and
returns whether it did. The stand-in checkpoint is a real ``torch.save`` dict in the contract's
layout (format_version, model_config, ema_state_dict, preprocessing, condition_names, geometry,
step), loaded with ``weights_only=True``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn


class Preprocessor:
    """log(E_vox / E_inc + eps) standardised per voxel; conditions [scaled log E, eta, one-hot pdg]."""

    def __init__(self, d: dict) -> None:
        self.d = d
        self.particles = list(d["particles"])
        self.energy_range_mev = tuple(d["energy_range_mev"])
        self.eta_range = tuple(d["eta_range"])
        self.mean = np.asarray(d["mean"], dtype=np.float32)
        self.std = np.asarray(d["std"], dtype=np.float32)
        self.eps = float(d["epsilon"])
        self.condition_names = ["log_energy", "eta"] + [f"pdg_{p}" for p in self.particles]

    @classmethod
    def fit(cls, showers, energies, eta, pdg, settings, particles=None) -> Preprocessor:
        eps = float(settings["epsilon"])
        y = np.log(showers / energies + eps)
        return cls({
            "particles": sorted(set(int(p) for p in pdg[:, 0])) if particles is None else list(particles),
            "energy_range_mev": [float(energies.min()), float(energies.max())],
            "eta_range": [float(eta.min()), float(eta.max())],
            "mean": y.mean(0).tolist(), "std": (y.std(0) + 1e-3).tolist(), "epsilon": eps,
        })  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessor:
        return cls(d)

    def to_dict(self) -> dict:
        return dict(self.d)

    def transform_conditions(self, energies, eta, pdg) -> np.ndarray:
        lo, hi = np.log(self.energy_range_mev)
        le = 2 * (np.log(energies) - lo) / (hi - lo) - 1
        onehot = (pdg == np.asarray(self.particles)[None, :]).astype(np.float32)
        return np.concatenate([le, eta, onehot], axis=1).astype(np.float32)

    def inverse_showers(self, x, energies) -> np.ndarray:
        out = (np.exp(x * self.std + self.mean) - self.eps) * energies
        return np.maximum(out, 0, out=out).astype(np.float32, copy=False)


class Generator(nn.Module):
    def __init__(self, z_dim: int, c_dim: int, n_voxels: int, width: int) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.net = nn.Sequential(nn.Linear(z_dim + c_dim, width), nn.LeakyReLU(0.2), nn.Linear(width, n_voxels))

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, c], dim=1))


def save_checkpoint(path: Path, pre: Preprocessor, geometry: dict, n_voxels: int, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model_config = {"z_dim": 8, "c_dim": len(pre.condition_names), "n_voxels": n_voxels, "width": 32}
    G = Generator(**model_config)
    torch.save({
        "format_version": 1, "model_config": model_config, "ema_state_dict": G.state_dict(),
        "preprocessing": pre.to_dict(), "condition_names": pre.condition_names, "geometry": geometry, "step": 0,
    }, path)  # fmt: skip
    return path


def load_generator(path, device):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    G = Generator(**ckpt["model_config"])
    G.load_state_dict(ckpt["ema_state_dict"])
    meta = {k: v for k, v in ckpt.items() if k not in ("ema_state_dict",)}
    return G.to(device).eval(), meta


def install() -> bool:
    """Register a stand-in for each real module that is missing; True if any was installed."""
    installed = False
    if importlib.util.find_spec("surrogate.models") is None:
        models = types.ModuleType("surrogate.models")
        models.load_generator = load_generator
        sys.modules["surrogate.models"] = models
        installed = True
    if importlib.util.find_spec("surrogate.preprocess") is None:
        preprocess = types.ModuleType("surrogate.preprocess")
        preprocess.Preprocessor = Preprocessor
        sys.modules["surrogate.preprocess"] = preprocess
        installed = True
    return installed
