"""Condition bins of the validate stage: energy bins x |eta| bins x particle.

The energy bins are ranges between ``validate.energy_edges_gev``, or, when ingest found the incident
energies discrete (CaloChallenge dataset 1: 15 values) and ``validate.energy_bins`` is ``auto``, one
bin per discrete energy (edges at the geometric midpoints). Data without η (plain CaloChallenge files)
have one |eta| bin and no η in their labels; data without a PDG code are labelled with
``ingest.particle_name``, or "all".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Binning", "ALL_PARTICLES"]

#: The particle label of data without a PDG code when ``ingest.particle_name`` is not set.
ALL_PARTICLES = "all"


@dataclass(frozen=True)
class Binning:
    """Condition bins: interior energy edges (MeV), interior |eta| edges, particle codes.

    ``energies_mev``: the discrete incident energies, one bin each (``energy_edges_mev`` then lie
    between them), or None. ``eta``: whether the data carry η (without it: one |eta| bin, unlabelled).
    ``names``: the label of a particle code (default ``pdg<code>``).
    """

    energy_edges_mev: np.ndarray
    eta_edges: np.ndarray
    particles: tuple[int, ...]
    energies_mev: np.ndarray | None = None
    eta: bool = True
    names: dict[int, str] = field(default_factory=dict)

    @classmethod
    def from_settings(
        cls, settings: dict[str, Any], particles: tuple[int, ...], info: dict[str, Any] | None = None
    ) -> Binning:
        """The bins of the ``validate`` settings (edges in GeV and |eta|) for ``particles``.

        ``info``: the ingest file's ``condition_info`` (which conditions the data carry, the particle
        name of data without a PDG code, the discrete energies in MeV); None or {} for a file without it.
        """
        info = info or {}
        discrete = np.asarray(info.get("discrete_energies_mev") or [], float)
        eta = bool(info.get("eta", True))
        names = {}
        if info.get("pdg") is False:  # every event carries the code ingest filled in: name it
            names = {int(p): info.get("particle_name") or ALL_PARTICLES for p in particles}
        if len(discrete) and settings.get("energy_bins", "auto") == "auto":
            return cls(
                np.sqrt(discrete[1:] * discrete[:-1]),
                np.asarray(settings["eta_edges"] if eta else [], float),
                particles,
                discrete,
                eta,
                names,
            )
        return cls(
            np.asarray(settings["energy_edges_gev"], float) * 1000.0,
            np.asarray(settings["eta_edges"] if eta else [], float),
            particles,
            None,
            eta,
            names,
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

    def particle_label(self, code: int) -> str:
        """``pdg22``, or the name of a particle without a code (``ingest.particle_name``, else "all")."""
        return self.names.get(int(code), f"pdg{code}")

    def energy_label(self, ie: int) -> str:
        """``E10-100GeV`` for a range, ``E65.536GeV`` for a discrete energy."""
        if self.energies_mev is not None:
            return f"E{self.energies_mev[ie] / 1000.0:.7g}GeV"  # float32 precision: 1048.576, not 1048.58
        e = [0.0, *(self.energy_edges_mev / 1000.0), math.inf]
        return f"E{e[ie]:g}-{e[ie + 1]:g}GeV"

    def response_label(self, code: int, ie: int) -> str:
        """Label of one (particle, energy bin) of the response tests: ``pdg22_Ebin0`` for an energy range (the bin's
        number), ``photon_E65.536GeV`` for a discrete energy."""
        energy = self.energy_label(ie) if self.energies_mev is not None else f"Ebin{ie}"
        return f"{self.particle_label(code)}_{energy}"

    def label(self, b: int) -> str:
        ne, nh = len(self.energy_edges_mev) + 1, len(self.eta_edges) + 1
        ie, ih, ip = b % ne, (b // ne) % nh, b // (ne * nh)
        out = f"{self.particle_label(self.particles[ip])}_{self.energy_label(ie)}"
        if not self.eta:
            return out
        h = [0.0, *self.eta_edges, math.inf]
        return f"{out}_eta{h[ih]:g}-{h[ih + 1]:g}"

    def axis_labels(self) -> tuple[list[str], list[str]]:
        """Labels of the energy bins ("10-100 GeV", or "65.536 GeV") and of the |eta| bins ("0-0.75"), for plots."""
        if self.energies_mev is not None:
            energies = [f"{e / 1000.0:.7g} GeV" for e in self.energies_mev]
        else:
            e = [0.0, *(self.energy_edges_mev / 1000.0), math.inf]
            energies = [f"{e[i]:g}-{e[i + 1]:g} GeV" for i in range(len(e) - 1)]
        if not self.eta:
            return energies, ["all (no eta)"]
        h = [0.0, *self.eta_edges, math.inf]
        return energies, [f"{h[i]:g}-{h[i + 1]:g}" for i in range(len(h) - 1)]

    def energy_bin(self, b: int) -> int:
        return b % (len(self.energy_edges_mev) + 1)

    def eta_bin(self, b: int) -> int:
        return (b // (len(self.energy_edges_mev) + 1)) % (len(self.eta_edges) + 1)

    def particle(self, b: int) -> int:
        return self.particles[b // ((len(self.energy_edges_mev) + 1) * (len(self.eta_edges) + 1))]

    def to_dict(self) -> dict[str, Any]:
        """Plain data: what the bins are (``summary.json``; the floors' identity covers it)."""
        return {
            "energy": "discrete" if self.energies_mev is not None else "edges",
            "energy_edges_gev": (self.energy_edges_mev / 1000.0).tolist(),
            "energies_gev": None if self.energies_mev is None else (self.energies_mev / 1000.0).tolist(),
            "eta_edges": self.eta_edges.tolist() if self.eta else None,
            "particles": {self.particle_label(p): int(p) for p in self.particles},
            "labels": [self.label(b) for b in range(self.n_bins)],
        }
