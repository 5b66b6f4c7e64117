"""Preprocessing between MeV showers and the network's space, as a fit/transform/inverse object.

Voxels: u = E_vox / E_inc, then ``log(u + epsilon)`` (or ``logit`` of a squeezed u), then
standardised per voxel with mean and standard deviation fitted on the training split.
Conditions: log E scaled to [-1, 1] over the fitted energy range, η scaled to [-1, 1] over its
range (when the data carry η), and a one-hot particle code (when there is more than one).

Everything is stored with ``to_dict()`` as plain JSON-able data, in ``dataset.h5`` and in
generator checkpoints, so a generator can undo the transform with no other file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["PreprocessError", "Preprocessor"]

_STD_FLOOR = 1e-3  # a voxel that is (almost) constant in training keeps a finite scale


class PreprocessError(ValueError):
    """Data the fitted preprocessing cannot represent (unknown particle, wrong width)."""


@dataclass
class Preprocessor:
    """Fitted transform; build with :meth:`fit` or :meth:`partial_fit` + :meth:`finalize`."""

    voxel_transform: str = "log"
    epsilon: float = 1e-6
    logit_alpha: float = 1e-6
    n_voxels: int = 0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    std: np.ndarray = field(default_factory=lambda: np.zeros(0))
    energy_range_mev: tuple[float, float] = (1.0, 1.0)
    eta_range: tuple[float, float] | None = None
    particles: tuple[int, ...] = ()
    # running sums for streaming fits (not stored)
    _n: int = 0
    _s1: np.ndarray | None = None
    _s2: np.ndarray | None = None

    # --- fitting ---------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> Preprocessor:
        """An unfitted preprocessor with the config's ``preprocess`` section."""
        return cls(
            voxel_transform=settings.get("voxel_transform", "log"),
            epsilon=float(settings.get("epsilon", 1e-6)),
            logit_alpha=float(settings.get("logit_alpha", 1e-6)),
        )

    @classmethod
    def fit(
        cls,
        showers: np.ndarray,
        energies: np.ndarray,
        eta: np.ndarray | None,
        pdg: np.ndarray | None,
        settings: dict[str, Any],
        particles: list[int] | None = None,
    ) -> Preprocessor:
        """Fit on one in-memory sample (showers (N, V) MeV, energies (N, 1) MeV)."""
        pre = cls.from_settings(settings)
        pre.partial_fit(showers, energies, eta, pdg)
        return pre.finalize(particles)

    def partial_fit(
        self,
        showers: np.ndarray,
        energies: np.ndarray,
        eta: np.ndarray | None,
        pdg: np.ndarray | None,
        *,
        overwrite: bool = False,
    ) -> None:
        """Accumulate statistics of one chunk of training rows (showers (n, V) MeV, energies (n, 1) MeV).

        ``overwrite=True`` lets a float32 C-contiguous ``showers`` serve as scratch space (its
        contents are destroyed), saving a copy of the chunk.
        """
        showers = np.asarray(showers)
        if showers.ndim != 2:
            raise PreprocessError(f"showers have shape {showers.shape}, expected (events, voxels)")
        if self._s1 is None:
            self.n_voxels = showers.shape[1]
            self._s1, self._s2 = np.zeros(self.n_voxels), np.zeros(self.n_voxels)
            self._emin, self._emax = np.inf, -np.inf
            self._etamin, self._etamax = np.inf, -np.inf
            self._seen: set[int] = set()
        elif showers.shape[1] != self.n_voxels:
            raise PreprocessError(f"showers have {showers.shape[1]} voxels, earlier chunks had {self.n_voxels}")
        self._has_eta = eta is not None
        if showers.shape[0] == 0:
            return
        # Sums of the transform minus its empty-voxel value: empty voxels (most of a sparse
        # shower) contribute exact zeros, so float32 squares stay accurate and the variance has
        # no cancellation; accumulation is float64. In-place float32 work keeps this cheap
        # (ingest calls it on every training chunk).
        y = self._shifted_voxels(showers, energies, overwrite)
        self._n += y.shape[0]
        s1, s2 = _column_sums(y)
        self._s1 += s1
        self._s2 += s2
        e = np.asarray(energies, dtype=np.float64).reshape(-1)
        self._emin, self._emax = min(self._emin, e.min()), max(self._emax, e.max())
        if eta is not None:
            h = np.asarray(eta, dtype=np.float64).reshape(-1)
            self._etamin, self._etamax = min(self._etamin, h.min()), max(self._etamax, h.max())
        if pdg is not None:
            self._seen.update(int(p) for p in np.unique(pdg))

    def finalize(self, particles: list[int] | None = None) -> Preprocessor:
        """Turn accumulated sums into the fitted parameters; ``particles`` fixes the one-hot order."""
        if not self._n:
            raise PreprocessError("cannot fit preprocessing on zero training rows")
        shifted_mean = self._s1 / self._n
        var = np.maximum(self._s2 / self._n - shifted_mean**2, 0.0)
        self.mean = (shifted_mean + self._floor()).astype(np.float32)
        self.std = np.maximum(np.sqrt(var), _STD_FLOOR).astype(np.float32)
        self.energy_range_mev = (float(self._emin), float(self._emax))
        self.eta_range = (float(self._etamin), float(self._etamax)) if self._has_eta else None
        seen = sorted(self._seen)
        self.particles = tuple(p for p in (particles or seen) if p in self._seen) if seen else ()
        self._s1 = self._s2 = None
        self._n = 0
        return self

    def _shifted_voxels(self, showers: np.ndarray, energies: np.ndarray, overwrite: bool = False) -> np.ndarray:
        """Forward transform minus its value for an empty voxel, (n, V) float32 (``showers`` itself if overwrite)."""
        if self.voxel_transform != "log":
            y = self._forward_voxels(showers, energies)
            y -= np.float32(self._floor())
            return y
        # log(u + eps) - log(eps) = log(u / eps + 1): exactly 0 for an empty voxel
        scale = (np.float32(1.0 / self.epsilon) / np.asarray(energies, dtype=np.float32)).reshape(-1, 1)
        inplace = overwrite and showers.dtype == np.float32 and showers.flags.c_contiguous and showers.flags.writeable
        y = np.multiply(showers, scale, out=showers if inplace else None, dtype=np.float32)
        np.maximum(y, 0.0, out=y)
        y += np.float32(1.0)
        return np.log(y, out=y)

    # --- voxels ---------------------------------------------------------------------------
    def _forward_voxels(self, showers: np.ndarray, energies: np.ndarray) -> np.ndarray:
        u = np.asarray(showers, dtype=np.float32) / np.asarray(energies, dtype=np.float32).reshape(-1, 1)
        if self.voxel_transform == "log":
            return np.log(np.maximum(u, 0.0) + np.float32(self.epsilon))
        a = np.float32(self.logit_alpha)
        s = a + (1 - 2 * a) * np.clip(u, 0.0, 1.0)
        return np.log(s / (1 - s))

    def _floor(self) -> float:
        """Network-space value (before standardising) of an empty voxel."""
        if self.voxel_transform == "log":
            return float(np.log(np.float32(self.epsilon)))
        a = self.logit_alpha
        return float(np.log(a / (1 - a)))

    def transform_showers(self, showers: np.ndarray, energies: np.ndarray) -> np.ndarray:
        """(N, V) MeV -> (N, V) float32 network space."""
        showers = np.asarray(showers)
        if showers.ndim != 2 or showers.shape[1] != self.n_voxels:
            raise PreprocessError(f"showers have shape {showers.shape}, preprocessing expects (N, {self.n_voxels})")
        return ((self._forward_voxels(showers, energies) - self.mean) / self.std).astype(np.float32)

    def inverse_showers(self, x: np.ndarray, energies: np.ndarray) -> np.ndarray:
        """(N, V) network space -> (N, V) float32 MeV, never negative; the empty-voxel floor maps to 0."""
        y = np.asarray(x, dtype=np.float32) * self.std + self.mean
        # clip so a wild generator value cannot overflow exp (float32 overflows above ~88)
        np.clip(y, -80.0, 80.0, out=y)
        if self.voxel_transform == "log":
            u = np.exp(y) - np.float32(self.epsilon)
        else:
            a = np.float32(self.logit_alpha)
            u = (1.0 / (1.0 + np.exp(-y)) - a) / (1 - 2 * a)
        # float32 rounding leaves empty voxels at ~1e-13 instead of 0: anything within a
        # few ulps of the floor is empty
        u = np.where(u > np.float32(self.epsilon) * 1e-3, u, np.float32(0.0))
        return (u * np.asarray(energies, dtype=np.float32).reshape(-1, 1)).astype(np.float32)

    # --- conditions -----------------------------------------------------------------------
    @property
    def condition_names(self) -> list[str]:
        names = ["log_energy"]
        if self.eta_range is not None:
            names.append("eta")
        if len(self.particles) > 1:
            names += [f"pdg_{p}" for p in self.particles]
        return names

    def transform_conditions(
        self, energies: np.ndarray, eta: np.ndarray | None = None, pdg: np.ndarray | None = None
    ) -> np.ndarray:
        """Raw conditions -> (N, C) float32: [log E in [-1, 1], η in [-1, 1], one-hot particle]."""
        e = np.asarray(energies, dtype=np.float64).reshape(-1)
        lo, hi = np.log(self.energy_range_mev[0]), np.log(self.energy_range_mev[1])
        cols = [2.0 * (np.log(e) - lo) / max(hi - lo, 1e-12) - 1.0]
        if self.eta_range is not None:
            if eta is None:
                raise PreprocessError("the generator was trained with eta as a condition; give incident_eta")
            h = np.asarray(eta, dtype=np.float64).reshape(-1)
            a, b = self.eta_range
            cols.append(2.0 * (h - a) / max(b - a, 1e-12) - 1.0)
        if len(self.particles) > 1:
            if pdg is None:
                raise PreprocessError(
                    f"the generator was trained on particles {list(self.particles)}; give incident_pdg"
                )
            p = np.asarray(pdg).reshape(-1)
            unknown = sorted(set(np.unique(p).tolist()) - set(self.particles))
            if unknown:
                raise PreprocessError(f"unknown particle code(s) {unknown}; trained on {list(self.particles)}")
            cols += [(p == code).astype(np.float64) for code in self.particles]
        return np.stack(cols, axis=1).astype(np.float32)

    # --- storage --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (floats and lists), JSON-able and safe for ``torch.load(weights_only=True)``."""
        return {
            "voxel_transform": self.voxel_transform,
            "epsilon": self.epsilon,
            "logit_alpha": self.logit_alpha,
            "n_voxels": self.n_voxels,
            "mean": self.mean.astype(float).tolist(),
            "std": self.std.astype(float).tolist(),
            "energy_range_mev": list(self.energy_range_mev),
            "eta_range": None if self.eta_range is None else list(self.eta_range),
            "particles": list(self.particles),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        return cls(
            voxel_transform=d["voxel_transform"],
            epsilon=float(d["epsilon"]),
            logit_alpha=float(d["logit_alpha"]),
            n_voxels=int(d["n_voxels"]),
            mean=np.asarray(d["mean"], dtype=np.float32),
            std=np.asarray(d["std"], dtype=np.float32),
            energy_range_mev=tuple(float(x) for x in d["energy_range_mev"]),
            eta_range=None if d.get("eta_range") is None else tuple(float(x) for x in d["eta_range"]),
            particles=tuple(int(p) for p in d["particles"]),
        )


_SUM_BLOCK = 256  # rows summed in float32 before float64 accumulation (relative error ~ 256 * 6e-8)


def _column_sums(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column sum and sum of squares of a float32 (n, V) array, as float64 (V,) arrays.

    Blocks of rows are reduced in float32 (vectorised, no float64 copy of the chunk, no
    squared temporary) and the block results are accumulated in float64.
    """
    n, v = y.shape
    full = n - n % _SUM_BLOCK
    s1, s2 = np.zeros(v), np.zeros(v)
    if full:
        blocks = y[:full].reshape(-1, _SUM_BLOCK, v)
        s1 += blocks.sum(axis=1).sum(axis=0, dtype=np.float64)
        s2 += np.einsum("bij,bij->bj", blocks, blocks).sum(axis=0, dtype=np.float64)
    if full < n:
        rest = y[full:]
        s1 += rest.sum(axis=0, dtype=np.float64)
        s2 += np.einsum("ij,ij->j", rest, rest).astype(np.float64)
    return s1, s2
