"""Calorimeter voxel geometry in the CaloChallenge binning format.

A CaloChallenge binning XML file lists, per layer id, the radial bin edges in mm
(``r_edges``) and the number of angular bins (``n_bin_alpha``). A layer whose
``r_edges`` is just ``"0"`` has no voxels (it is not read out). Voxels are ordered
radial-fastest, then angle, then layer, which is the order of the ``showers``
dataset columns.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GeometryError", "Layer", "Geometry", "load_xml", "from_config"]


class GeometryError(ValueError):
    """A binning description that cannot be used."""


@dataclass(frozen=True)
class Layer:
    """One calorimeter layer: ``r_edges`` in mm (length n_r + 1), ``n_alpha`` angular bins."""

    id: int
    r_edges: tuple[float, ...]
    n_alpha: int

    @property
    def n_r(self) -> int:
        return max(len(self.r_edges) - 1, 0)

    @property
    def n_voxels(self) -> int:
        return self.n_r * self.n_alpha if self.n_r else 0

    @property
    def alpha_edges(self) -> np.ndarray:
        """Angular bin edges in radians, from -pi to pi (CaloChallenge convention)."""
        return np.linspace(-math.pi, math.pi, self.n_alpha + 1)


@dataclass(frozen=True)
class Geometry:
    """All layers of one binning, in layer-id order, empty layers included."""

    name: str
    layers: tuple[Layer, ...]

    def __post_init__(self) -> None:
        ids = [layer.id for layer in self.layers]
        if ids != sorted(set(ids)):
            raise GeometryError(f"geometry {self.name!r}: layer ids must be unique and increasing, got {ids}")
        for layer in self.layers:
            edges = np.asarray(layer.r_edges)
            if len(edges) == 0 or edges[0] != 0 or np.any(np.diff(edges) <= 0):
                raise GeometryError(
                    f"geometry {self.name!r}, layer {layer.id}: r_edges must start at 0 and increase, got {list(edges)}"
                )
            if layer.n_alpha < 1:
                raise GeometryError(f"geometry {self.name!r}, layer {layer.id}: n_bin_alpha must be >= 1")
        if self.n_voxels == 0:
            raise GeometryError(f"geometry {self.name!r} has no voxels")

    @property
    def active_layers(self) -> tuple[Layer, ...]:
        """Layers that have voxels, in order."""
        return tuple(layer for layer in self.layers if layer.n_voxels)

    @property
    def n_voxels(self) -> int:
        return sum(layer.n_voxels for layer in self.layers)

    @property
    def layer_slices(self) -> dict[int, slice]:
        """Column range of each active layer's voxels in the flat shower vector."""
        out, start = {}, 0
        for layer in self.active_layers:
            out[layer.id] = slice(start, start + layer.n_voxels)
            start += layer.n_voxels
        return out

    def voxel_centres(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-voxel (layer_index, r_centre_mm, alpha_centre_rad), each of shape (n_voxels,).

        ``layer_index`` counts active layers from 0. The radial centre is the bin midpoint,
        the angular centre the bin midpoint; a single angular bin has centre 0.
        """
        idx, rc, ac = [], [], []
        for i, layer in enumerate(self.active_layers):
            edges = np.asarray(layer.r_edges, dtype=np.float64)
            r_mid = 0.5 * (edges[1:] + edges[:-1])
            a_edges = layer.alpha_edges
            a_mid = 0.5 * (a_edges[1:] + a_edges[:-1]) if layer.n_alpha > 1 else np.zeros(1)
            # radial index runs fastest, then angle
            rc.append(np.tile(r_mid, layer.n_alpha))
            ac.append(np.repeat(a_mid, layer.n_r))
            idx.append(np.full(layer.n_voxels, i))
        return np.concatenate(idx), np.concatenate(rc), np.concatenate(ac)

    def voxel_xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Voxel-centre x and y in mm, shape (n_voxels,) each (CaloChallenge r cos/sin alpha)."""
        _, r, a = self.voxel_centres()
        return r * np.cos(a), r * np.sin(a)

    def orientations(self, reflect: bool = False) -> np.ndarray:
        """Voxel permutations (R, n_voxels) that turn every shower about its axis together, int64.

        Row k takes column ``perm[k, v]`` into column v: all layers with angular bins are
        rotated by the same angle ``2 pi k / g`` (g: the greatest common divisor of their angular
        bin counts), so layer with n bins moves by ``k n / g`` bins; ``reflect`` adds the mirror
        image (alpha -> -alpha) of each. Row 0 is the identity; R = 1 without angular bins.
        """
        counts = [layer.n_alpha for layer in self.active_layers if layer.n_alpha > 1]
        g = math.gcd(*counts) if counts else 1
        rows = []
        for mirror in (False, True) if reflect and counts else (False,):
            for k in range(g):
                perm, start = [], 0
                for layer in self.active_layers:
                    n, n_r = layer.n_alpha, layer.n_r
                    a = np.arange(n)
                    src = (a - k * n // g) % n
                    if mirror:
                        src = (n - 1 - src) % n
                    perm.append(start + (src[:, None] * n_r + np.arange(n_r)[None, :]).reshape(-1))
                    start += layer.n_voxels
                rows.append(np.concatenate(perm))
        return np.stack(rows).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as stored in config, HDF5 attributes and checkpoints."""
        return {
            "name": self.name,
            "layers": [
                {"id": layer.id, "r_edges": list(layer.r_edges), "n_bin_alpha": layer.n_alpha} for layer in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        layers = tuple(
            Layer(int(d["id"]), tuple(float(x) for x in d["r_edges"]), int(d["n_bin_alpha"])) for d in data["layers"]
        )
        return cls(str(data.get("name", "custom")), layers)


def load_xml(path: str | Path, pid: int | None = None) -> Geometry:
    """Parse a CaloChallenge binning XML file.

    ``pid`` picks the ``<Bin>`` element for that particle when a file has several;
    otherwise the first ``<Bin>`` is used.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise GeometryError(f"{path}: not a readable CaloChallenge binning XML file ({exc})") from exc
    bins = root.findall("Bin")
    if not bins:
        raise GeometryError(f"{path}: no <Bin> element")
    chosen = bins[0]
    if pid is not None:
        matching = [b for b in bins if b.get("pid") is not None and int(b.get("pid")) == pid]
        if not matching:
            raise GeometryError(f"{path}: no <Bin> for pid {pid} (found {[b.get('pid') for b in bins]})")
        chosen = matching[0]
    layers = []
    for el in chosen.findall("Layer"):
        try:
            edges = tuple(float(x) for x in el.get("r_edges", "").split(","))
            layers.append(Layer(int(el.get("id")), edges, int(el.get("n_bin_alpha", "1"))))
        except (TypeError, ValueError) as exc:
            raise GeometryError(f"{path}: layer {el.get('id')!r}: bad attribute ({exc})") from exc
    return Geometry(path.stem, tuple(layers))


def from_config(cfg: dict[str, Any], base_dir: str | Path = ".") -> Geometry:
    """Geometry from the config's ``geometry`` section: a ``binning_file`` if set, else inline ``layers``."""
    section = cfg["geometry"]
    if section.get("binning_file"):
        path = Path(section["binning_file"])
        if not path.is_absolute():
            path = Path(base_dir) / path
        return load_xml(path, section.get("pid"))
    return Geometry.from_dict(section)
