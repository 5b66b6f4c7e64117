"""Held-out condition regions (``ingest.holdout``): conditions that training never sees.

A region is an incident-energy range in GeV, optionally an |eta| range and a set of particles.
Ingest puts every event inside a region into a split of its own (``unseen`` for
``kind: interpolation``, ``extrapolation`` for ``kind: extrapolation``), never into train, val
or test; generate draws conditions from those splits and validate runs the same tests there.

The regions travel with the data: ingest stores them (:func:`canonical`) in ``dataset.h5``,
train copies them into ``generator.pt``, generate into its output file. Each stage compares the
stored regions with its own config and with its inputs' (:func:`check_same`) and refuses a
mismatch, so a generator trained with one holdout is never judged on another's "unseen" events,
which it may have trained on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "HoldoutError",
    "Region",
    "KINDS",
    "SPLIT_OF_KIND",
    "regions_from_config",
    "canonical",
    "from_canonical",
    "region_index",
    "split_names",
    "check_same",
]

#: Region kinds and the dataset split their events go to.
KINDS = ("interpolation", "extrapolation")
SPLIT_OF_KIND = {"interpolation": "unseen", "extrapolation": "extrapolation"}


class HoldoutError(ValueError):
    """Held-out regions that overlap, hold no events, or differ between a config and its inputs."""


@dataclass(frozen=True)
class Region:
    """One held-out region: energy in [lo, hi) GeV, |eta| in [lo, hi) (None: any), particles (empty: any)."""

    name: str
    kind: str
    energy_gev: tuple[float, float]
    eta: tuple[float, float] | None = None
    particles: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "ingest.holdout") -> Region:
        def bounds(key: str, value: Any) -> tuple[float, float]:
            lo = 0.0 if value[0] is None else float(value[0])
            hi = math.inf if value[1] is None else float(value[1])
            if not lo < hi:
                raise HoldoutError(f"{where}: region {d.get('name')!r}: {key} [{value[0]}, {value[1]}] is empty")
            return lo, hi

        eta = d.get("eta")
        return cls(
            name=str(d["name"]),
            kind=str(d.get("kind", "interpolation")),
            energy_gev=bounds("energy_gev", d["energy_gev"]),
            eta=None if eta is None else bounds("eta", eta),
            particles=tuple(sorted(int(p) for p in (d.get("particles") or ()))),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (an open upper bound is null, as in the config)."""

        def plain(b: tuple[float, float]) -> list[float | None]:
            return [b[0], None if math.isinf(b[1]) else b[1]]

        return {
            "name": self.name,
            "kind": self.kind,
            "energy_gev": plain(self.energy_gev),
            "eta": None if self.eta is None else plain(self.eta),
            "particles": list(self.particles),
        }

    @property
    def label(self) -> str:
        """``name (E 40-70 GeV, |eta| 1.05-1.2, pdg 22)``, for messages and reports."""
        parts = [f"E {self.energy_gev[0]:g}-{self.energy_gev[1]:g} GeV"]
        if self.eta is not None:
            parts.append(f"|eta| {self.eta[0]:g}-{self.eta[1]:g}")
        if self.particles:
            parts.append("pdg " + "/".join(map(str, self.particles)))
        return f"{self.name} ({', '.join(parts)})"

    @property
    def split(self) -> str:
        return SPLIT_OF_KIND[self.kind]

    def contains(self, energy_mev: np.ndarray, eta: np.ndarray, pdg: np.ndarray) -> np.ndarray:
        """(N,) bool: the events inside the region (NaN conditions are outside)."""
        e = np.asarray(energy_mev, dtype=np.float64).reshape(-1) / 1000.0
        inside = (e >= self.energy_gev[0]) & (e < self.energy_gev[1])
        if self.eta is not None:
            a = np.abs(np.asarray(eta, dtype=np.float64).reshape(-1))
            inside &= (a >= self.eta[0]) & (a < self.eta[1])
        if self.particles:
            inside &= np.isin(np.asarray(pdg).reshape(-1), self.particles)
        return inside

    def overlaps(self, other: Region) -> bool:
        def meet(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
            return a is None or b is None or (a[0] < b[1] and b[0] < a[1])

        particles = not self.particles or not other.particles or bool(set(self.particles) & set(other.particles))
        return meet(self.energy_gev, other.energy_gev) and meet(self.eta, other.eta) and particles


def regions_from_config(cfg: dict[str, Any]) -> tuple[Region, ...]:
    """The checked regions of ``cfg['ingest']['holdout']`` (empty by default).

    Raises HoldoutError for two regions with one name, an unknown kind, or an interpolation region
    that overlaps an extrapolation one (an event in both would have no single split to be judged
    in). Regions of one kind may overlap: an event in several belongs to the first listed.
    """
    raw = (cfg.get("ingest") or {}).get("holdout") or []
    regions = tuple(Region.from_dict(d) for d in raw)
    names = [r.name for r in regions]
    if len(set(names)) != len(names):
        raise HoldoutError(f"ingest.holdout: region names repeat ({names})")
    for r in regions:
        if r.kind not in KINDS:
            raise HoldoutError(f"ingest.holdout: region {r.name!r}: kind {r.kind!r}, expected one of {KINDS}")
    for i, a in enumerate(regions):
        for b in regions[i + 1 :]:
            if a.kind != b.kind and a.overlaps(b):
                raise HoldoutError(
                    f"ingest.holdout: {a.kind} region {a.label} overlaps {b.kind} region {b.label}; make them disjoint"
                )
    return regions


def canonical(regions: Sequence[Region]) -> str:
    """The regions as one JSON string, the form stored in and compared between files ("[]" for none)."""
    return json.dumps([r.to_dict() for r in regions], sort_keys=True)


def from_canonical(text: str | bytes | None) -> tuple[Region, ...]:
    """The regions of a stored :func:`canonical` string (None or absent: none)."""
    if text is None:
        return ()
    if isinstance(text, bytes):
        text = text.decode()
    return tuple(Region.from_dict(d, "stored holdout") for d in json.loads(text))


def region_index(regions: Sequence[Region], energy_mev: np.ndarray, eta: np.ndarray, pdg: np.ndarray) -> np.ndarray:
    """(N,) int8: the first region each event lies in, -1 for none."""
    out = np.full(np.asarray(energy_mev).reshape(-1).shape, -1, dtype=np.int8)
    for i, r in reversed(list(enumerate(regions))):
        out[r.contains(energy_mev, eta, pdg)] = i
    return out


def split_names(regions: Sequence[Region]) -> tuple[str, ...]:
    """The held-out splits the regions fill, in :data:`KINDS` order (``()`` without regions)."""
    kinds = {r.kind for r in regions}
    return tuple(SPLIT_OF_KIND[k] for k in KINDS if k in kinds)


def check_same(stored: str | bytes | None, expected: str, what: str, against: str, error: type[Exception]) -> None:
    """Raise ``error`` when the stored holdout (``what`` says whose) differs from ``expected`` (``against``)."""
    have = canonical(from_canonical(stored))
    if have != expected:
        raise error(
            f"{what} holds out {_describe(have)}, but {against} holds out {_describe(expected)}: "
            "events held out by one may have been trained on by the other. Rerun the stages from ingest "
            "with one config (Snakemake does this when the config changes)"
        )


def _describe(text: str) -> str:
    regions = from_canonical(text)
    return ", ".join(r.label for r in regions) if regions else "nothing"
