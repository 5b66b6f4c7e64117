"""Reference shower simulator: a fast, parametrised stand-in for a full (Geant4) simulation.

Physics, per event (all depths along the particle's path unless stated; the material of each
layer, given at normal incidence in ``config.material``, is scaled by ``cosh(eta)``):

* Photons (22) convert at a depth drawn from an exponential of mean 9/7 X0. A conversion in
  the dead material in front of layer 0 is ``photon_early_conversion``; one inside the
  calorimeter (depth > ``dead_x0 * cosh(eta)``) is ``photon_late_conversion``. Electrons (11)
  start showering at depth 0. The shower follows the GFlash parametrisation of Grindhammer &
  Peters (Geant4 Physics Reference Manual, "Gflash Shower Parameterizations"), with homogeneous-
  medium formulas evaluated for an effective Z and critical energy: a gamma-distribution
  longitudinal profile whose ln T_max and ln alpha fluctuate event by event with the published
  means, widths and correlation, and a two-component (core + tail) radial profile in Moliere
  radii whose parameters depend on energy and on the depth in units of T_max.
* Charged pions (211) first interact at an exponential depth in lambda. Before that they are
  minimum-ionising (``mip_mev_per_x0_*`` per X0 crossed, Landau-like fluctuations). A pion that
  interacts before the first hadronic layer is ``pion_em_start``, one that reaches the tile first
  ``pion_tile_start`` (probability exp(-lambda_EM cosh eta)), one that crosses everything
  ``pion_punch_through``. At the interaction point a fluctuating pi0 fraction
  (Groom: <f_em> = 1 - E^(m-1), Beta-distributed) showers EM-like; the rest follows a longer
  gamma profile in lambda with a broad two-component radial profile, loses ``1 - h_over_e`` of
  its energy invisibly and has a larger sampling term.
* Energy is deposited as spots sampled from those profiles. The number of spots per shower is
  ``clip(round(spots.per_gev * E_GeV ** spots.exponent), spots.min, spots.max)`` so the cost per
  event grows with energy as in a real simulator. Each spot's energy is gamma distributed with
  relative variance ``n_spots * a**2 / E_GeV`` so that the summed sampling fluctuation of a
  shower is exactly ``a / sqrt(E)`` (``em_stochastic``, ``had_stochastic``); an event-wide
  factor adds the constant term. Finite spot counts and the readout threshold give the empty
  outer voxels real showers have.

The pure API is :func:`simulate_events` (arrays in memory) and :func:`run` (HDF5 file).
Determinism: chunk ``i`` of a run uses ``SeedSequence(seed).spawn(n_chunks)[i]``, so the output
does not depend on the number of worker processes. ``truth/cpu_seconds`` is measured and is the
one dataset that differs between runs with the same seed.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from surrogate import geometry as geometry_mod
from surrogate.config import parse_stage_args, stage_parser
from surrogate.geometry import Geometry
from surrogate.io import ProgressBar, atomic_path

__all__ = [
    "MODE_NAMES",
    "SIMULATOR_VERSION",
    "PARTICLES",
    "SimulationError",
    "Material",
    "SimParams",
    "resolve_material",
    "build_params",
    "simulate_events",
    "run",
    "main",
]

log = logging.getLogger(__name__)

SIMULATOR_VERSION = "1.0.0"
MODE_NAMES: tuple[str, ...] = (
    "photon_early_conversion",
    "photon_late_conversion",
    "pion_em_start",
    "pion_tile_start",
    "pion_punch_through",
    "electron",
)
MODE = {name: i for i, name in enumerate(MODE_NAMES)}
PARTICLES = (11, 22, 211)
PHOTON_CONVERSION_X0 = 9.0 / 7.0  # mean free path of a high-energy photon for pair production
_BIG_MM = 1.0e7  # separates layers when all layers' radial edges are searched at once
_MAX_BATCH_SPOTS = 1_500_000  # bounds memory: ~100 bytes per spot in flight
_TAU_MAX = 6.0  # GFlash radial parameters are fitted up to a few T_max; freeze them beyond


class SimulationError(ValueError):
    """Simulator settings or requests that cannot be honoured."""


@dataclass(frozen=True)
class Material:
    """Depth of each active layer at normal incidence, in active-layer order.

    ``x0`` and ``lam`` have one entry per active layer (radiation / nuclear interaction lengths),
    ``is_em`` says which layers use the EM sampling fraction and MIP rate; ``dead_*`` is the
    material in front of the first layer. ``fallback`` is true when the split is the uniform one.
    """

    x0: tuple[float, ...]
    lam: tuple[float, ...]
    is_em: tuple[bool, ...]
    dead_x0: float
    dead_lambda: float
    fallback: bool = False

    @property
    def bounds_x0(self) -> np.ndarray:
        """Layer boundaries in X0 at normal incidence: [0, dead, dead + x0_0, ...], shape (L + 2,)."""
        return np.concatenate([[0.0, self.dead_x0], self.dead_x0 + np.cumsum(self.x0)])

    @property
    def bounds_lambda(self) -> np.ndarray:
        """Layer boundaries in lambda at normal incidence, shape (L + 2,)."""
        return np.concatenate([[0.0, self.dead_lambda], self.dead_lambda + np.cumsum(self.lam)])

    @property
    def lambda_before_hadronic(self) -> float:
        """Lambda in front of the first hadronic layer (all material if there is none)."""
        b = self.bounds_lambda
        had = [i for i, em in enumerate(self.is_em) if not em]
        return float(b[had[0] + 1]) if had else float(b[-1])


@dataclass(frozen=True)
class SimParams:
    """Everything the simulator needs, as plain picklable data (sent to worker processes)."""

    geometry: Geometry
    material: Material
    sampling_fraction_em: float
    sampling_fraction_had: float
    em_stochastic: float  # sqrt(GeV)
    em_constant: float
    had_stochastic: float  # sqrt(GeV)
    h_over_e: float
    z_eff: float
    critical_energy_mev: float
    moliere_radius_mm: float
    mip_mev_per_x0_em: float
    mip_mev_per_x0_had: float
    spots_per_gev: float
    spots_exponent: float
    spots_min: int
    spots_max: int
    pi0_exponent: float
    pi0_concentration: float
    had_core_radius_mm: float
    had_tail_radius_mm: float
    had_core_fraction: float
    readout_threshold_mev: float
    energy_spectrum: str
    energy_min_mev: float
    energy_max_mev: float
    energy_values_mev: tuple[float, ...]
    eta_min: float
    eta_max: float
    particles: tuple[int, ...]
    particle_fractions: tuple[float, ...]


def resolve_material(material_cfg: dict[str, Any], geometry: Geometry) -> Material:
    """Per-layer material for ``geometry``'s active layers.

    When ``material.layers`` does not list exactly the geometry's active layer ids, the
    uniform split ``fallback_total_x0`` / ``fallback_total_lambda`` (all layers EM) is used
    and a warning says why.
    """
    ids = [layer.id for layer in geometry.active_layers]
    by_id = {int(d["id"]): d for d in material_cfg.get("layers", [])}
    dead_x0 = float(material_cfg.get("dead_x0", 2.0))
    dead_lambda = float(material_cfg.get("dead_lambda", 0.11))
    if by_id and set(by_id) == set(ids):
        rows = [by_id[i] for i in ids]
        return Material(
            x0=tuple(float(r["x0"]) for r in rows),
            lam=tuple(float(r["lambda"]) for r in rows),
            is_em=tuple(r["kind"] == "em" for r in rows),
            dead_x0=dead_x0,
            dead_lambda=dead_lambda,
        )
    total_x0 = float(material_cfg.get("fallback_total_x0", 25.0))
    total_lambda = float(material_cfg.get("fallback_total_lambda", 1.3))
    missing = sorted(set(ids) - set(by_id))
    extra = sorted(set(by_id) - set(ids))
    log.warning(
        "geometry %r: material.layers does not match its active layers (missing %s, extra %s); "
        "using the uniform fallback: %.3g X0 and %.3g lambda split evenly over %d EM layers",
        geometry.name,
        missing,
        extra,
        total_x0,
        total_lambda,
        len(ids),
    )
    n = len(ids)
    return Material(
        x0=(total_x0 / n,) * n,
        lam=(total_lambda / n,) * n,
        is_em=(True,) * n,
        dead_x0=dead_x0,
        dead_lambda=dead_lambda,
        fallback=True,
    )


def build_params(cfg: dict[str, Any], base_dir: str | Path = ".") -> SimParams:
    """SimParams from a validated config (``geometry``, ``material``, ``simulate`` sections)."""
    geom = geometry_mod.from_config(cfg, base_dir)
    mat_cfg = cfg.get("material", {})
    sim = cfg.get("simulate", {})
    energy = sim.get("energy", {})
    eta = sim.get("eta", {})
    spots = sim.get("spots", {})
    had = sim.get("hadronic", {})
    parts = sim.get("particles", [{"pdg": 22, "fraction": 0.5}, {"pdg": 211, "fraction": 0.5}])
    spectrum = energy.get("spectrum", "log_uniform")
    values = tuple(float(v) for v in energy.get("values_mev", []))
    if spectrum == "discrete" and not values:
        raise SimulationError("simulate.energy.spectrum is 'discrete' but simulate.energy.values_mev is empty")
    e_min, e_max = float(energy.get("min_gev", 1.0)) * 1e3, float(energy.get("max_gev", 1000.0)) * 1e3
    if spectrum == "log_uniform" and e_min > e_max:
        raise SimulationError(f"simulate.energy: min_gev {e_min / 1e3} is above max_gev {e_max / 1e3}")
    eta_min, eta_max = float(eta.get("min", 0.0)), float(eta.get("max", 1.5))
    if eta_min > eta_max:
        raise SimulationError(f"simulate.eta: min {eta_min} is above max {eta_max}")
    return SimParams(
        geometry=geom,
        material=resolve_material(mat_cfg, geom),
        sampling_fraction_em=float(mat_cfg.get("sampling_fraction_em", 1.0)),
        sampling_fraction_had=float(mat_cfg.get("sampling_fraction_had", 1.0)),
        em_stochastic=float(mat_cfg.get("em_stochastic", 0.10)),
        em_constant=float(mat_cfg.get("em_constant", 0.007)),
        had_stochastic=float(mat_cfg.get("had_stochastic", 0.50)),
        h_over_e=float(mat_cfg.get("h_over_e", 0.74)),
        z_eff=float(mat_cfg.get("z_eff", 70.0)),
        critical_energy_mev=float(mat_cfg.get("critical_energy_mev", 10.0)),
        moliere_radius_mm=float(mat_cfg.get("moliere_radius_mm", 40.0)),
        mip_mev_per_x0_em=float(mat_cfg.get("mip_mev_per_x0_em", 12.0)),
        mip_mev_per_x0_had=float(mat_cfg.get("mip_mev_per_x0_had", 28.0)),
        spots_per_gev=float(spots.get("per_gev", 300.0)),
        spots_exponent=float(spots.get("exponent", 0.6)),
        spots_min=int(spots.get("min", 20)),
        spots_max=int(spots.get("max", 20000)),
        pi0_exponent=float(had.get("pi0_exponent", 0.82)),
        pi0_concentration=float(had.get("pi0_concentration", 8.0)),
        had_core_radius_mm=float(had.get("core_radius_mm", 40.0)),
        had_tail_radius_mm=float(had.get("tail_radius_mm", 180.0)),
        had_core_fraction=float(had.get("core_fraction", 0.65)),
        readout_threshold_mev=float(sim.get("readout_threshold_mev", 0.0)),
        energy_spectrum=spectrum,
        energy_min_mev=e_min,
        energy_max_mev=e_max,
        energy_values_mev=values,
        eta_min=eta_min,
        eta_max=eta_max,
        particles=tuple(int(p["pdg"]) for p in parts),
        particle_fractions=tuple(float(p["fraction"]) for p in parts),
    )


# --------------------------------------------------------------------------- binning


class _Binner:
    """Maps spots (active-layer index, r in mm, azimuth) to flat voxel indices of a Geometry."""

    def __init__(self, geom: Geometry) -> None:
        layers = geom.active_layers
        self.n_voxels = geom.n_voxels
        self.n_r = np.array([layer.n_r for layer in layers])
        self.n_alpha = np.array([layer.n_alpha for layer in layers])
        self.r_max = np.array([layer.r_edges[-1] for layer in layers])
        self.voxel_offset = np.concatenate([[0], np.cumsum(self.n_r * self.n_alpha)[:-1]])
        # lower radial edges of every layer, shifted apart so one searchsorted bins all layers
        self.keys = np.concatenate([k * _BIG_MM + np.asarray(layer.r_edges[:-1]) for k, layer in enumerate(layers)])
        self.key_offset = np.concatenate([[0], np.cumsum(self.n_r)[:-1]])

    def histogram(
        self, n_events: int, event: np.ndarray, layer: np.ndarray, r: np.ndarray, phi: np.ndarray, w: np.ndarray
    ) -> np.ndarray:
        """Sum spot energies ``w`` (MeV) into an (n_events, n_voxels) float64 array.

        ``layer`` is the active-layer index; spots outside the layers or beyond the outermost
        radial edge are dropped (longitudinal and lateral leakage).
        """
        n_layers = len(self.n_r)
        ok = (layer >= 0) & (layer < n_layers)
        event, layer, r, phi, w = event[ok], layer[ok], r[ok], phi[ok], w[ok]
        ok = r < self.r_max[layer]
        event, layer, r, phi, w = event[ok], layer[ok], r[ok], phi[ok], w[ok]
        r_bin = np.searchsorted(self.keys, layer * _BIG_MM + r, side="right") - 1 - self.key_offset[layer]
        na = self.n_alpha[layer]
        a_bin = np.minimum(((phi + math.pi) * (na / (2 * math.pi))).astype(np.int64), na - 1)
        voxel = self.voxel_offset[layer] + a_bin * self.n_r[layer] + r_bin
        flat = np.bincount(event * self.n_voxels + voxel, weights=w, minlength=n_events * self.n_voxels)
        return flat.reshape(n_events, self.n_voxels)


# --------------------------------------------------------------------------- shower models


def _n_spots(p: SimParams, e_gev: np.ndarray) -> np.ndarray:
    """Spots per shower: per_gev * E^exponent, clipped to [min, max] (0 for a shower of no energy)."""
    n = np.clip(np.rint(p.spots_per_gev * np.maximum(e_gev, 0.0) ** p.spots_exponent), p.spots_min, p.spots_max)
    return np.where(e_gev > 0, n, 0).astype(np.int64)


def _spot_weights(
    rng: np.random.Generator, e_gev: np.ndarray, n: np.ndarray, ev: np.ndarray, stochastic: float
) -> np.ndarray:
    """Per-spot energies in MeV, gamma distributed so that their sum has sigma/E = stochastic/sqrt(E)."""
    e_spot = np.where(n > 0, 1e3 * e_gev / np.maximum(n, 1), 0.0)
    shape = np.maximum(e_gev, 1e-12) / (np.maximum(n, 1) * stochastic**2)
    k = shape[ev]
    return e_spot[ev] * rng.gamma(k) / k


def _em_spots(
    rng: np.random.Generator, p: SimParams, e_gev: np.ndarray, start_x0: np.ndarray, cosh: np.ndarray
) -> tuple[np.ndarray, ...]:
    """GFlash EM showers of energy ``e_gev`` (m,) starting at normal-incidence depth ``start_x0`` (m,).

    Returns per-spot (shower index, normal-incidence depth in X0, r in mm, azimuth, energy in MeV).
    """
    z = p.z_eff
    ln_y = np.maximum(np.log(np.maximum(e_gev, 1e-9) * 1e3 / p.critical_energy_mev), 2.0)
    ln_e = np.log(np.maximum(e_gev, 1e-3))
    # Grindhammer-Peters homogeneous-medium means, widths and correlation of ln T and ln alpha
    mean_ln_t = np.log(np.maximum(ln_y - 0.812, 0.5))
    sig_ln_t = 1.0 / (-1.4 + 1.26 * ln_y)
    mean_ln_a = np.log(0.81 + (0.458 + 2.26 / z) * ln_y)
    sig_ln_a = 1.0 / (-0.58 + 0.86 * ln_y)
    rho = np.clip(0.705 - 0.023 * ln_y, -0.99, 0.99)
    g1, g2 = rng.standard_normal((2, len(e_gev)))
    t_max = np.exp(mean_ln_t + sig_ln_t * g1)
    alpha = np.maximum(np.exp(mean_ln_a + sig_ln_a * (rho * g1 + np.sqrt(1 - rho**2) * g2)), 1.05)
    beta = (alpha - 1.0) / t_max

    n = _n_spots(p, e_gev)
    ev = np.repeat(np.arange(len(e_gev)), n)
    t = rng.gamma(alpha[ev]) / beta[ev]  # X0 along the path, from the shower start
    depth = start_x0[ev] + t / cosh[ev]
    tau = np.minimum(t / t_max[ev], _TAU_MAX)
    lne = ln_e[ev]
    r_core = (0.0251 + 0.00319 * lne) + (0.1162 - 0.000381 * z) * tau
    k4 = 0.3585 + 0.0421 * lne
    r_tail = (0.659 - 0.00309 * z) * (np.exp(-2.59 * (tau - 0.645)) + np.exp(k4 * (tau - 0.645)))
    x = (0.401 + 0.00187 * z - tau) / (1.313 - 0.0686 * lne)
    p_core = np.clip((2.632 - 0.00094 * z) * np.exp(x - np.exp(x)), 0.0, 1.0)
    u = rng.random((2, len(ev)))
    radius = np.where(u[0] < p_core, r_core, r_tail)
    # inverse CDF of f(r) = 2 r R^2 / (r^2 + R^2)^2
    r = p.moliere_radius_mm * radius * np.sqrt(u[1] / (1.0 - u[1]))
    phi = rng.uniform(-math.pi, math.pi, len(ev))
    w = _spot_weights(rng, e_gev, n, ev, p.em_stochastic)
    return ev, depth, r, phi, w


def _had_spots(
    rng: np.random.Generator,
    p: SimParams,
    e_gev: np.ndarray,
    e_ref_gev: np.ndarray,
    start_lam: np.ndarray,
    cosh: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Non-EM part of hadronic showers: energy ``e_gev`` (m,), starting at ``start_lam`` (normal lambda).

    The profile is a gamma distribution in lambda with its maximum at 0.2 ln(E/GeV) + 0.7 lambda
    (``e_ref_gev`` is the pion energy) and a shape that grows with ln E; both fluctuate per event.
    Returns per-spot (shower index, normal-incidence depth in lambda, r in mm, azimuth, MeV).
    """
    ln_e = np.log(np.maximum(e_ref_gev, 0.1))
    t_max = np.maximum(0.2 * ln_e + 0.7, 0.3) * np.exp(0.2 * rng.standard_normal(len(e_gev)))
    alpha = (1.8 + 0.25 * np.maximum(ln_e, 0.0)) * np.exp(0.15 * rng.standard_normal(len(e_gev)))
    beta = (alpha - 1.0) / t_max
    n = _n_spots(p, e_gev)
    ev = np.repeat(np.arange(len(e_gev)), n)
    t = rng.gamma(alpha[ev]) / beta[ev]
    depth = start_lam[ev] + t / cosh[ev]
    u = rng.random((2, len(ev)))
    # the core widens as the cascade develops; the halo is the neutron/low-energy hadron tail
    radius = np.where(u[0] < p.had_core_fraction, p.had_core_radius_mm * (0.5 + 0.5 * t), p.had_tail_radius_mm)
    r = radius * np.sqrt(u[1] / (1.0 - u[1]))
    phi = rng.uniform(-math.pi, math.pi, len(ev))
    w = _spot_weights(rng, e_gev, n, ev, p.had_stochastic)
    return ev, depth, r, phi, w


def _mip_deposits(
    rng: np.random.Generator, p: SimParams, stop_x0: np.ndarray, cosh: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimum-ionising energy of pions up to normal depth ``stop_x0`` (m,): (m, L) MeV per layer.

    Also returns the dead-material deposit (m,) and the total deposited (m,) in MeV, before
    sampling fractions, to subtract from the energy available to the shower.
    """
    mat = p.material
    b = mat.bounds_x0
    lo, hi = b[1:-1], b[2:]
    path = np.clip(stop_x0[:, None] - lo[None, :], 0.0, hi - lo) * cosh[:, None]  # X0 crossed per layer
    rate = np.where(np.asarray(mat.is_em), p.mip_mev_per_x0_em, p.mip_mev_per_x0_had)
    # Landau-like fluctuation: Moyal variate -ln(Z^2) has mean gamma_E + ln 2 and a long upper tail
    moyal = -np.log(np.maximum(rng.standard_normal(path.shape) ** 2, 1e-12)) - 1.2704
    e = path * rate * np.clip(1.0 + 0.12 * moyal, 0.3, None)
    dead = np.minimum(stop_x0, mat.dead_x0) * cosh * p.mip_mev_per_x0_em
    return e, dead, e.sum(axis=1) + dead


# --------------------------------------------------------------------------- events


def _draw_conditions(
    rng: np.random.Generator,
    p: SimParams,
    n: int,
    particle: int | None,
    energy_mev: float | None,
    eta: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-event (pdg (n,) int32, energy (n,) MeV, eta (n,)); a fixed value replaces the draw."""
    if particle is None:
        frac = np.asarray(p.particle_fractions, dtype=np.float64)
        pdg = np.asarray(p.particles, dtype=np.int32)[rng.choice(len(frac), size=n, p=frac / frac.sum())]
    else:
        pdg = np.full(n, particle, dtype=np.int32)
    if energy_mev is not None:
        energy = np.full(n, float(energy_mev))
    elif p.energy_spectrum == "discrete":
        energy = np.asarray(p.energy_values_mev)[rng.integers(0, len(p.energy_values_mev), n)]
    else:
        energy = np.exp(rng.uniform(math.log(p.energy_min_mev), math.log(p.energy_max_mev), n))
    eta_arr = np.full(n, float(eta)) if eta is not None else rng.uniform(p.eta_min, p.eta_max, n)
    return pdg, energy, eta_arr


def _layer_of(bounds: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Active-layer index of normal-incidence depths (-1 dead material, L beyond the last layer)."""
    return np.searchsorted(bounds, depth, side="right") - 2


def _simulate_batch(
    rng: np.random.Generator, p: SimParams, binner: _Binner, pdg: np.ndarray, energy: np.ndarray, eta: np.ndarray
) -> dict[str, np.ndarray]:
    """Showers of one batch of events with given conditions; see :func:`simulate_events`."""
    n = len(pdg)
    mat = p.material
    b_x0, b_lam = mat.bounds_x0, mat.bounds_lambda
    sf = np.where(np.asarray(mat.is_em), p.sampling_fraction_em, p.sampling_fraction_had)
    cosh = np.cosh(eta)
    e_gev = energy / 1e3
    mode = np.zeros(n, dtype=np.int8)
    em_fraction = np.ones(n, dtype=np.float32)
    first = np.zeros(n, dtype=np.float32)
    n_spots = np.zeros(n, dtype=np.int64)
    spots = []  # (event, layer, r, phi, visible MeV)
    showers = np.zeros((n, binner.n_voxels))

    # --- photons and electrons
    is_em = pdg != 211
    if is_em.any():
        idx = np.flatnonzero(is_em)
        photon = pdg[idx] == 22
        t_conv = np.where(photon, rng.exponential(PHOTON_CONVERSION_X0, len(idx)), 0.0)  # X0 along path
        start = t_conv / cosh[idx]
        mode[idx] = np.where(
            photon,
            np.where(start > mat.dead_x0, MODE["photon_late_conversion"], MODE["photon_early_conversion"]),
            MODE["electron"],
        )
        first[idx] = t_conv
        ev, depth, r, phi, w = _em_spots(rng, p, e_gev[idx], start, cosh[idx])
        layer = _layer_of(b_x0, depth)
        spots.append((idx[ev], layer, r, phi, w))
        n_spots[idx] += _n_spots(p, e_gev[idx])

    # --- charged pions
    is_pi = pdg == 211
    if is_pi.any():
        idx = np.flatnonzero(is_pi)
        m, c = len(idx), cosh[idx]
        t_int = rng.exponential(1.0, m)  # lambda along the path
        start_lam = t_int / c
        first[idx] = t_int
        mode[idx] = np.where(
            start_lam < mat.lambda_before_hadronic,
            MODE["pion_em_start"],
            np.where(start_lam < b_lam[-1], MODE["pion_tile_start"], MODE["pion_punch_through"]),
        )
        stop_x0 = np.interp(start_lam, b_lam, b_x0, right=b_x0[-1] + 1.0)
        mip, _, mip_total = _mip_deposits(rng, p, stop_x0, c)
        # the track: one spot per crossed layer, within a millimetre of the axis
        ev_l, lay_l = np.nonzero(mip > 0)
        spots.append(
            (
                idx[ev_l],
                lay_l,
                np.abs(rng.normal(0.0, 1.0, len(ev_l))),
                rng.uniform(-math.pi, math.pi, len(ev_l)),
                mip[ev_l, lay_l],
            )
        )
        interacts = start_lam < b_lam[-1]
        e_avail = np.where(interacts, np.maximum(e_gev[idx] - mip_total / 1e3, 0.0), 0.0)
        mu = np.clip(1.0 - np.maximum(e_gev[idx], 1.0) ** (p.pi0_exponent - 1.0), 0.05, 0.95)
        f_em = rng.beta(mu * p.pi0_concentration, (1.0 - mu) * p.pi0_concentration)
        em_fraction[idx] = np.where(interacts, f_em, 0.0)
        # pi0 photons shower EM-like from the interaction point
        ev, depth, r, phi, w = _em_spots(rng, p, f_em * e_avail, stop_x0, c)
        layer = _layer_of(b_x0, depth)
        spots.append((idx[ev], layer, r, phi, w))
        # the hadronic remainder: visible fraction h/e with a few per cent event-by-event spread
        vis = np.clip(p.h_over_e * (1.0 + 0.05 * rng.standard_normal(m)), 0.0, 1.0)
        e_had = (1.0 - f_em) * e_avail * vis
        ev, depth, r, phi, w = _had_spots(rng, p, e_had, e_gev[idx], start_lam, c)
        layer = _layer_of(b_lam, depth)
        spots.append((idx[ev], layer, r, phi, w))
        n_spots[idx] += _n_spots(p, f_em * e_avail) + _n_spots(p, e_had) + (mip > 0).sum(axis=1)

    for ev, layer, r, phi, w in spots:
        # visible energy: the sampling fraction of the layer each spot lands in
        showers += binner.histogram(n, ev, layer, r, phi, w * sf[np.clip(layer, 0, len(sf) - 1)])
    # constant term: calibration non-uniformity, one factor per event
    showers *= np.maximum(1.0 + p.em_constant * rng.standard_normal(n), 0.0)[:, None]
    if p.readout_threshold_mev > 0:
        showers[showers < p.readout_threshold_mev] = 0.0
    return {
        "showers": showers,
        "mode": mode,
        "em_fraction": em_fraction,
        "first_interaction": first,
        "n_spots": n_spots,
    }


def _expected_spots(p: SimParams, pdg: np.ndarray, energy_mev: np.ndarray) -> np.ndarray:
    """Upper estimate of spots per event, used only to cut a chunk into memory-bounded batches."""
    n = _n_spots(p, energy_mev / 1e3)
    return np.where(pdg == 211, 2 * n + 8, n)


def simulate_events(
    n: int,
    params: SimParams | dict[str, Any],
    seed: int | np.random.SeedSequence | np.random.Generator | None,
    particle: int | None = None,
    energy_mev: float | None = None,
    eta: float | None = None,
) -> dict[str, np.ndarray]:
    """Simulate ``n`` events in memory.

    ``params`` is a SimParams or a validated config dict; ``seed`` an int, SeedSequence or
    Generator. ``particle`` (PDG 11, 22 or 211), ``energy_mev`` and ``eta`` fix a condition
    instead of drawing it from the configured distribution.

    Returns the keys of the HDF5 file: ``incident_energies`` (n, 1) float32 MeV, ``showers``
    (n, n_voxels) float32 MeV, ``incident_eta`` (n, 1) float32, ``incident_pdg`` (n, 1) int32,
    ``truth/mode`` (n,) int8 (index into MODE_NAMES), ``truth/em_fraction`` (n,) float32,
    ``truth/first_interaction`` (n,) float32 (X0 for e/gamma, lambda for pions, along the path),
    ``truth/cpu_seconds`` (n,) float32 (the batch's CPU time shared out by spot count).
    """
    p = params if isinstance(params, SimParams) else build_params(params)
    if n < 0:
        raise SimulationError(f"number of events must be >= 0, got {n}")
    if particle is not None and particle not in PARTICLES:
        raise SimulationError(f"particle {particle} is not simulated; choose one of {PARTICLES}")
    if energy_mev is not None and not (math.isfinite(energy_mev) and energy_mev > 0):
        raise SimulationError(f"incident energy must be a positive number of MeV, got {energy_mev}")
    if eta is not None and not math.isfinite(eta):
        raise SimulationError(f"eta must be finite, got {eta}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    binner = _Binner(p.geometry)
    pdg, energy, eta_arr = _draw_conditions(rng, p, n, particle, energy_mev, eta)
    # batches bounded in spots (memory); their boundaries depend only on the drawn conditions
    cum = np.cumsum(_expected_spots(p, pdg, energy))
    cuts = [0]
    while cuts[-1] < n:
        base = cum[cuts[-1] - 1] if cuts[-1] else 0
        cuts.append(max(int(np.searchsorted(cum, base + _MAX_BATCH_SPOTS, side="right")), cuts[-1] + 1))
    out = {
        "showers": np.zeros((n, p.geometry.n_voxels), dtype=np.float32),
        "truth/mode": np.zeros(n, dtype=np.int8),
        "truth/em_fraction": np.zeros(n, dtype=np.float32),
        "truth/first_interaction": np.zeros(n, dtype=np.float32),
        "truth/cpu_seconds": np.zeros(n, dtype=np.float32),
    }
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        t0 = time.process_time()
        res = _simulate_batch(rng, p, binner, pdg[a:b], energy[a:b], eta_arr[a:b])
        cpu = time.process_time() - t0
        out["showers"][a:b] = res["showers"]
        out["truth/mode"][a:b] = res["mode"]
        out["truth/em_fraction"][a:b] = res["em_fraction"]
        out["truth/first_interaction"][a:b] = res["first_interaction"]
        # a fixed per-event overhead worth 50 spots, the rest in proportion to the spots
        cost = res["n_spots"] + 50.0
        out["truth/cpu_seconds"][a:b] = cpu * cost / cost.sum()
    out["incident_energies"] = energy.astype(np.float32)[:, None]
    out["incident_eta"] = eta_arr.astype(np.float32)[:, None]
    out["incident_pdg"] = pdg.astype(np.int32)[:, None]
    return out


# --------------------------------------------------------------------------- file output

_DATASETS = (
    "incident_energies",
    "showers",
    "incident_eta",
    "incident_pdg",
    "truth/mode",
    "truth/em_fraction",
    "truth/first_interaction",
    "truth/cpu_seconds",
)


def _chunk_task(task: tuple[SimParams, int, np.random.SeedSequence, int | None, float | None, float | None]):
    p, n, seq, particle, energy_mev, eta = task
    return simulate_events(n, p, seq, particle=particle, energy_mev=energy_mev, eta=eta)


def _compression(name: str) -> dict[str, Any]:
    # Measured on this simulator's default output (60000 events x 533 voxels, 128 MB raw,
    # 54% zeros; 2 shared cores): lzf 66.7 MB, write 1.2 s, read 0.54 s; lzf+shuffle 70.9 MB
    # (shuffle hurts lzf here); gzip level 4 + shuffle 62.6 MB (6% smaller) but write 3.8 s and
    # read 0.95 s. lzf is the default: ~3x faster to write, ~2x faster for ingest to read.
    if name == "lzf":
        return {"compression": "lzf"}
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    return {}


def run(
    cfg: dict[str, Any],
    out_path: str | Path,
    events: int | None = None,
    particle: int | None = None,
    energy_mev: float | None = None,
    eta: float | None = None,
    workers: int | None = None,
    base_dir: str | Path = ".",
) -> Path:
    """Simulate ``events`` (default ``simulate.events``) and write the HDF5 file at ``out_path``.

    Chunks of ``simulate.chunk_events`` rows are simulated by ``workers`` processes (default
    ``simulate.workers``), each from its own ``SeedSequence(seed).spawn`` child, and written in
    order, compressed, to a temporary file renamed onto ``out_path`` when complete.
    """
    import h5py

    sim = cfg.get("simulate", {})
    p = build_params(cfg, base_dir)
    n = int(sim.get("events", 60000) if events is None else events)
    if n < 1:
        raise SimulationError(f"number of events must be >= 1, got {n}")
    chunk = int(sim.get("chunk_events", 2000))
    workers = int(sim.get("workers", 2) if workers is None else workers)
    n_chunks = math.ceil(n / chunk)
    seeds = np.random.SeedSequence(int(cfg["seed"])).spawn(n_chunks)
    sizes = [min(chunk, n - i * chunk) for i in range(n_chunks)]
    tasks = [(p, size, seq, particle, energy_mev, eta) for size, seq in zip(sizes, seeds, strict=True)]
    n_vox = p.geometry.n_voxels
    comp = _compression(sim.get("compression", "lzf"))
    shapes = {"incident_energies": (n, 1), "showers": (n, n_vox), "incident_eta": (n, 1), "incident_pdg": (n, 1)}
    dtypes = {"incident_pdg": np.int32, "truth/mode": np.int8}
    out_path = Path(out_path)
    log.info(
        "simulating %d events (%d chunks of %d, %d worker(s)) into %s; geometry %s, %d voxels",
        n,
        n_chunks,
        chunk,
        workers,
        out_path,
        p.geometry.name,
        n_vox,
    )
    t0 = time.perf_counter()
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w", track_order=False) as f:
        dsets = {}
        for name in _DATASETS:
            shape = shapes.get(name, (n,))
            # rows per HDF5 chunk = simulate.chunk_events, capped at 16 MiB for very fine binnings
            rows = max(1, min(chunk, n, (16 << 20) // (4 * int(np.prod(shape[1:])))))
            dsets[name] = f.create_dataset(
                name,
                shape=shape,
                dtype=dtypes.get(name, np.float32),
                chunks=(rows, *shape[1:]),
                track_times=False,
                **comp,
            )
        f["truth/mode"].attrs["names"] = json.dumps(list(MODE_NAMES))
        f.attrs["simulator_version"] = SIMULATOR_VERSION
        f.attrs["geometry"] = json.dumps(p.geometry.to_dict())
        f.attrs["material"] = json.dumps(asdict(p.material))
        f.attrs["seed"] = int(cfg["seed"])
        f.attrs["config"] = json.dumps(cfg, sort_keys=True)
        if workers > 1 and n_chunks > 1:
            ctx = multiprocessing.get_context("forkserver")
            pool = ctx.Pool(min(workers, n_chunks))
            results = pool.imap(_chunk_task, tasks)
        else:
            pool, results = None, map(_chunk_task, tasks)
        try:
            start = 0
            with ProgressBar(total=n, unit="ev", desc="simulate") as bar:
                for res in results:
                    stop = start + len(res["showers"])
                    for name in _DATASETS:
                        dsets[name][start:stop] = res[name]
                    start = stop
                    bar.update(len(res["showers"]))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    wall = time.perf_counter() - t0
    log.info("wrote %s: %d events in %.1f s (%.0f events/s)", out_path, n, wall, n / wall)
    return out_path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m surrogate.simulate --config C --out FILE [options]``."""
    parser = stage_parser(
        "python -m surrogate.simulate",
        "Reference calorimeter shower simulator: writes showers and truth to an HDF5 file.",
    )
    parser.add_argument("--out", default=None, help="output HDF5 file (default: simulate.output from the config)")
    parser.add_argument("--events", type=int, default=None, help="number of events (default: simulate.events)")
    parser.add_argument("--particle", type=int, choices=PARTICLES, default=None, help="fix the particle (PDG code)")
    parser.add_argument("--energy-gev", type=float, default=None, help="fix the incident energy, in GeV")
    parser.add_argument("--eta", type=float, default=None, help="fix the pseudorapidity")
    args, cfg = parse_stage_args(parser, argv)
    if args.events is not None and args.events < 1:
        parser.error(f"--events must be >= 1, got {args.events}")
    if args.energy_gev is not None and not (math.isfinite(args.energy_gev) and args.energy_gev > 0):
        parser.error(f"--energy-gev must be a positive number, got {args.energy_gev}")
    if args.eta is not None and not math.isfinite(args.eta):
        parser.error(f"--eta must be finite, got {args.eta}")
    out = args.out or cfg["simulate"]["output"]
    try:
        run(
            cfg,
            out,
            events=args.events,
            particle=args.particle,
            energy_mev=None if args.energy_gev is None else args.energy_gev * 1e3,
            eta=args.eta,
        )
    except (SimulationError, geometry_mod.GeometryError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
