"""Plain CaloChallenge-format files for the tests, from a small generator of their own.

Only ``incident_energies`` (N, 1) MeV and ``showers`` (N, n_voxels) MeV, as in the CaloChallenge
datasets: no η, no PDG code, no truth modes. The showers are not our simulator's: a gamma-shaped
longitudinal profile over the active layers (its depth growing with log E), exponential radial
profiles, Gaussian sampling fluctuations of the response, multiplicative log-normal noise per
voxel and a readout threshold, all in a few lines of numpy.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from surrogate.geometry import Geometry, load_xml

#: The CaloChallenge binning files, in the shared checkout beside this one (as tests/test_geometry.py finds them).
SHARED = Path(__file__).resolve().parents[2] / "shared" / "calochallenge"
MISSING = f"CaloChallenge binning files not found at {SHARED} (shared checkout absent)"
DS1_PHOTONS = SHARED / "binning_dataset_1_photons.xml"
DS2 = SHARED / "binning_dataset_2.xml"
DS3 = SHARED / "binning_dataset_3.xml"
#: Dataset 1 photons' 15 discrete incident energies, 2^k x 256 MeV (256 MeV .. 4.19 TeV).
DS1_ENERGIES_MEV = tuple(256.0 * 2**k for k in range(15))
THRESHOLD_MEV = 0.05


def showers(geometry: Geometry, energies_mev: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, V) float32 MeV showers of photons at ``energies_mev`` (N,) in ``geometry``'s voxels."""
    e = np.asarray(energies_mev, np.float64).reshape(-1, 1)
    n = len(e)
    active = geometry.active_layers
    depth = np.arange(len(active)) + 0.5
    # longitudinal: gamma profile in units of active layers, deeper at higher energy, fluctuating per event
    shape = 1.5 + 0.25 * np.log(e / 1000.0 + 1.0) + 0.15 * rng.standard_normal((n, 1))
    profile = depth ** np.maximum(shape - 1, 0.1) * np.exp(-depth / 0.9)
    profile /= profile.sum(axis=1, keepdims=True)
    # radial: an exponential of radius growing with depth, the share of each (r, alpha) bin in closed form
    cols = []
    for i, lay in enumerate(active):
        edges = np.asarray(lay.r_edges)
        radius = 15.0 * (1 + 0.6 * i) * np.exp(0.1 * rng.standard_normal((n, 1)))
        ring = np.exp(-edges[:-1] / radius) - np.exp(-edges[1:] / radius)  # (n, n_r)
        cols.append(np.tile(ring / lay.n_alpha, (1, lay.n_alpha)) * profile[:, i : i + 1])
    share = np.concatenate(cols, axis=1)
    response = 0.95 + 0.04 / np.sqrt(e / 1000.0) * rng.standard_normal((n, 1))  # sampling term 4% / sqrt(E/GeV)
    noise = np.exp(0.3 * rng.standard_normal(share.shape))
    out = (share * noise * e * np.clip(response, 0.5, 1.2)).astype(np.float32)
    out[out < THRESHOLD_MEV] = 0.0
    return out


def write_plain(
    path: Path,
    geometry: Geometry,
    energies_mev: np.ndarray,
    seed: int,
    compression: str | None = None,
) -> Path:
    """A plain CaloChallenge file of one shower per entry of ``energies_mev``."""
    rng = np.random.default_rng(seed)
    e = np.asarray(energies_mev, np.float64).reshape(-1, 1)
    with h5py.File(path, "w") as f:
        f.create_dataset("incident_energies", data=e, compression=compression)
        f.create_dataset("showers", data=showers(geometry, e[:, 0], rng), compression=compression)
    return path


def discrete_energies(per_energy: int, seed: int, energies: tuple[float, ...] = DS1_ENERGIES_MEV) -> np.ndarray:
    """``per_energy`` events at each of ``energies`` (MeV), shuffled (as the CaloChallenge files are)."""
    e = np.repeat(np.asarray(energies, np.float64), per_energy)
    return np.random.default_rng(seed).permutation(e)


def ds1_photons() -> Geometry:
    return load_xml(DS1_PHOTONS)
