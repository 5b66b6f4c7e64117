"""Condition bins of the validate stage: energy bins x |eta| bins x particle."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Binning"]


@dataclass(frozen=True)
class Binning:
    """Condition bins: interior energy edges (MeV), interior |eta| edges, particle codes."""

    energy_edges_mev: np.ndarray
    eta_edges: np.ndarray
    particles: tuple[int, ...]

    @classmethod
    def from_settings(cls, settings: dict[str, Any], particles: tuple[int, ...]) -> Binning:
        """The bins of the ``validate`` settings (edges in GeV and |eta|) for ``particles``."""
        return cls(
            np.asarray(settings["energy_edges_gev"], float) * 1000.0,
            np.asarray(settings["eta_edges"], float),
            particles,
        )

    @property
    def n_bins(self) -> int:
        return (len(self.energy_edges_mev) + 1) * (len(self.eta_edges) + 1) * len(self.particles)

    def index(self, energy: np.ndarray, eta: np.ndarray, pdg: np.ndarray) -> np.ndarray:
        """(N,) bin index, -1 for a particle the real sample does not have."""
        ie = np.digitize(energy, self.energy_edges_mev)
        ih = np.digitize(np.abs(eta), self.eta_edges)
        lookup = {p: i for i, p in enumerate(self.particles)}
        ip = np.array([lookup.get(int(p), -1) for p in np.unique(pdg)])
        ipart = ip[np.searchsorted(np.unique(pdg), pdg)]
        idx = (ipart * (len(self.eta_edges) + 1) + ih) * (len(self.energy_edges_mev) + 1) + ie
        return np.where(ipart < 0, -1, idx)

    def label(self, b: int) -> str:
        ne, nh = len(self.energy_edges_mev) + 1, len(self.eta_edges) + 1
        ie, ih, ip = b % ne, (b // ne) % nh, b // (ne * nh)
        e = [0.0, *(self.energy_edges_mev / 1000.0), math.inf]
        h = [0.0, *self.eta_edges, math.inf]
        return f"pdg{self.particles[ip]}_E{e[ie]:g}-{e[ie + 1]:g}GeV_eta{h[ih]:g}-{h[ih + 1]:g}"

    def axis_labels(self) -> tuple[list[str], list[str]]:
        """Labels of the energy bins ("10-100 GeV") and of the |eta| bins ("0-0.75"), for plots."""
        e = [0.0, *(self.energy_edges_mev / 1000.0), math.inf]
        h = [0.0, *self.eta_edges, math.inf]
        return [f"{e[i]:g}-{e[i + 1]:g} GeV" for i in range(len(e) - 1)], [
            f"{h[i]:g}-{h[i + 1]:g}" for i in range(len(h) - 1)
        ]

    def energy_bin(self, b: int) -> int:
        return b % (len(self.energy_edges_mev) + 1)

    def eta_bin(self, b: int) -> int:
        return (b // (len(self.energy_edges_mev) + 1)) % (len(self.eta_edges) + 1)

    def particle(self, b: int) -> int:
        return self.particles[b // ((len(self.energy_edges_mev) + 1) * (len(self.eta_edges) + 1))]
