"""Validate stage: generated showers against the held-out test split, judged against real-vs-real.

``python -m surrogate.validate --config C --dataset results/ingest/dataset.h5
--generated results/generate/events.h5 --out results/validate [--floors F] [--history H] [--threads N]``
and ``python -m surrogate.validate floors --config C --dataset results/ingest/dataset.h5 --out F``.

Steps:

1. The reference ("real") sample is the ``test`` split of the ingest file, loaded into RAM.
   It is split (seeded) into two disjoint halves A and B: every metric computed on A vs B is
   the real-vs-real *floor* the generated sample is judged against. The floors depend only on
   the dataset, the settings and the seed: ``floors`` computes them once per dataset (the
   workflow runs it beside training) and the stage reads them from ``--floors``, after checking
   that they belong to the same test split, settings and seed; without them (or when they do not
   match) the stage computes them itself, with the same results.
2. Condition bins = energy bins x |eta| bins x particle (``validate`` config). The generated
   file's conditions are read whole (small); per bin, generated rows are subsampled to the
   real sample's proportions ("matched" sample). Its showers are then streamed in HDF5-chunk
   aligned blocks (in ``threads`` reader processes when > 1): every row is checked, every matched
   row's deposited energy feeds the response test, and a random condition-matched *feature
   subsample* (at most ``gen_test_ratio`` times the real sample: the distribution tests' power is
   set by the real sample) is turned into high-level features, whose truth modes the mode
   classifier predicts as the blocks arrive.
3. Tests, each reduced to one p-value and corrected together with Holm at ``alpha``:

   - direct p-values: KS per feature (overall and per bin), G-test of the predicted-mode
     fractions per bin (or k-means occupancy without truth labels), response mean and
     resolution per energy bin x particle (two-sided z with a tolerance margin);
   - floor-relative metrics (separation power, scaled W1, FPD, KPD, classifier AUCs, PRDC,
     diversity): the generated value is computed at the *same sample sizes* as the floor
     (A vs a generated subsample of |B| events) so the size-dependent biases cancel; the
     p-value is that of "worse than floor + margin" with the two errors in quadrature.

   A test passes when its Holm-adjusted p-value exceeds ``alpha``; the verdict is PASS when
   every test passes.

Outputs (atomic): ``summary.json``, ``report.html`` (self-contained), ``plots/*.png`` (drawn in a
separate process while the tests run, when ``threads > 1``) and the resolved ``config.yaml``.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import contextlib
import functools
import hashlib
import html
import importlib.util
import json
import logging
import math
import multiprocessing
import time
import types
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from threadpoolctl import threadpool_limits

from surrogate import __version__
from surrogate import stream as S
from surrogate import workers as W
from surrogate.config import dump_config, parse_stage_args, stage_parser
from surrogate.features import FeaturesError, feature_names
from surrogate.geometry import Geometry
from surrogate.io import ProgressBar, atomic_path, write_json

__all__ = [
    "USED_METRICS", "FLOORS_FORMAT", "ValidateError", "RealSample", "GeneratedSample", "Binning", "ModeClassifier",
    "load_real", "load_generated", "evaluate", "apply_holm", "compute_floors", "run", "main",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Names in :data:`surrogate.metrics.METRICS` that :func:`evaluate` runs; the tests check that it
#: covers the whole registry, so a metric added there is not silently left out of the verdict.
USED_METRICS = frozenset({"separation_power", "ks", "wasserstein_scaled", "response", "fpd", "kpd", "classifier_auc",
                          "mode_fraction_test", "cluster_occupancy", "prdc", "diversity_ratio"})  # fmt: skip
# scipy, scikit-learn and the metrics (2-3 s of imports) are imported where they are used: a
# worker process started the "spawn" way imports the parent's main module again, which under
# `python -m surrogate.validate` is this one, and a reader needs none of them.

#: Layout version of the floors file (its identity also covers the code that computes the floors).
FLOORS_FORMAT = 1
#: ``validate`` settings that change how the stage runs, not what any floor is.
_RUN_ONLY_SETTINGS = ("threads", "fail_pipeline", "chunk_events", "max_generated_events", "alpha", "margins")


class ValidateError(ValueError):
    """Input the validate stage cannot use (missing dataset, mismatched geometry, no overlap)."""


# ----------------------------------------------------------------------------- inputs


@dataclass
class RealSample:
    """Test split in memory: features (N, F), conditions, truth modes, voxel showers (N, V) MeV."""

    features: np.ndarray
    energy: np.ndarray  # (N,) MeV
    eta: np.ndarray  # (N,)
    pdg: np.ndarray  # (N,) int
    mode: np.ndarray  # (N,) int, -1 when unknown
    showers: np.ndarray  # (N, V) float32 MeV
    mode_names: list[str]
    geometry: Geometry
    names: list[str]


@dataclass
class GeneratedSample:
    """Condition-matched generated events.

    ``features`` (m, F), ``energy``, ``eta``, ``pdg`` and ``modes`` (predicted truth modes, or
    None) are those of the feature subsample, a random subset of the matched events (same bin
    mix); ``voxels`` are the showers of a random part of it. ``all_*`` hold every matched event:
    its conditions and ``all_e_ratio``, E_dep/E_inc (the response test uses every event).
    """

    features: np.ndarray
    energy: np.ndarray
    eta: np.ndarray
    pdg: np.ndarray
    voxels: np.ndarray  # (v, V) float32 MeV
    all_energy: np.ndarray  # (M,) MeV
    all_pdg: np.ndarray  # (M,)
    all_e_ratio: np.ndarray  # (M,)
    feature_rows: np.ndarray  # (m,) positions of the feature subsample in the all_* arrays
    rows_in_file: int
    rows_dropped_unmatched: int
    read_seconds: float  # reading the showers (HDF5 + decompression; summed over reader processes)
    feature_seconds: float | None  # checking, summing, features (summed over reader processes); None for a stand-in
    stream_seconds: float  # wall time of the whole read-and-features loop
    reader_processes: int = 0  # processes that read the file (0: this one)
    modes: np.ndarray | None = None  # (m,) int64


def _read(f: h5py.File, path: Path, name: str, required: bool = True) -> np.ndarray | None:
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        if required:
            raise ValidateError(f"{path}: no dataset {name!r}")
        return None
    return obj[()]


def load_real(path: str | Path, group: str = "test", max_rows: int | None = None) -> RealSample:
    """Load one split of the ingest file and compute its features (float64 (N, F))."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValidateError(f"{path}: cannot open as HDF5 ({exc})") from exc
    with f:
        if group not in f:
            raise ValidateError(f"{path}: no group {group!r} (expected the ingest output with train/val/test)")
        try:
            geometry = Geometry.from_dict(json.loads(f.attrs["geometry"]))
            mode_names = json.loads(f.attrs.get("mode_names", "[]"))
        except (KeyError, ValueError) as exc:
            raise ValidateError(f"{path}: bad or missing root attribute ({exc})") from exc
        g = f[group]
        sl = slice(0, max_rows)
        showers = g["showers"][sl] if "showers" in g else None
        if showers is None:
            raise ValidateError(f"{path}: no dataset '{group}/showers'")
        n = len(showers)
        energy = _read(g, path, "incident_energies")[sl].reshape(-1)
        eta = _read(g, path, "incident_eta", False)
        pdg = _read(g, path, "incident_pdg", False)
        mode = _read(g, path, "mode", False)
    eta = np.zeros(n) if eta is None else eta[sl].reshape(-1)
    pdg = np.zeros(n, dtype=np.int64) if pdg is None else pdg[sl].reshape(-1).astype(np.int64)
    mode = np.full(n, -1, dtype=np.int64) if mode is None else mode[sl].astype(np.int64)
    if len(energy) != n:
        raise ValidateError(f"{path}: '{group}/showers' has {n} rows but incident_energies has {len(energy)}")
    names = feature_names(geometry)
    return RealSample(S.features(showers, energy, geometry, names), energy.astype(np.float64), eta.astype(np.float64),
                      pdg, mode, showers, mode_names, geometry, names)  # fmt: skip


@dataclass(frozen=True)
class Binning:
    """Condition bins: interior energy edges (MeV), interior |eta| edges, particle codes."""

    energy_edges_mev: np.ndarray
    eta_edges: np.ndarray
    particles: tuple[int, ...]

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

    def energy_bin(self, b: int) -> int:
        return b % (len(self.energy_edges_mev) + 1)

    def eta_bin(self, b: int) -> int:
        return (b // (len(self.energy_edges_mev) + 1)) % (len(self.eta_edges) + 1)

    def particle(self, b: int) -> int:
        return self.particles[b // ((len(self.energy_edges_mev) + 1) * (len(self.eta_edges) + 1))]


def match_rows(
    real_bins: np.ndarray, gen_bins: np.ndarray, n_bins: int, cap: int, rng: np.random.Generator
) -> np.ndarray:
    """Sorted generated row indices whose per-bin counts follow the real proportions.

    The matched size is the largest M with round(M f_b) <= available_b for every real bin b
    (capped at ``cap`` when > 0); bins without real events get no generated events.
    """
    real_counts = np.bincount(real_bins, minlength=n_bins).astype(np.float64)
    frac = real_counts / real_counts.sum()
    ok = gen_bins >= 0
    gen_counts = np.bincount(gen_bins[ok], minlength=n_bins)
    need = frac > 0
    if np.any(gen_counts[need] == 0):
        b = int(np.flatnonzero(need & (gen_counts == 0))[0])
        raise ValidateError(f"generated file has no events in condition bin {b}, which the real test split has")
    m = int(np.min(gen_counts[need] / frac[need]))
    if cap > 0:
        m = min(m, cap)
    rows = []
    order = np.argsort(gen_bins, kind="stable")
    starts = np.searchsorted(gen_bins[order], np.arange(n_bins))
    for b in np.flatnonzero(need):
        k = min(int(round(m * frac[b])), int(gen_counts[b]))
        pool = order[starts[b] : starts[b] + gen_counts[b]]
        rows.append(rng.choice(pool, size=k, replace=False))
    return np.sort(np.concatenate(rows))


class _Stream:
    """The generated file, matched and planned, its blocks submitted to ``pool`` (when given) on
    construction; :meth:`collect` gathers them (or reads them here) into a :class:`GeneratedSample`.

    Splitting the two lets the caller do real-side work (fit the mode classifier, compute floors)
    while the reader processes work.
    """

    def __init__(
        self,
        path: str | Path,
        geometry: Geometry,
        names: list[str],
        binning: Binning,
        real_bins: np.ndarray,
        *,
        cap: int,
        feature_events: int,
        chunk_events: int,
        voxel_events: int,
        rng: np.random.Generator,
        pool: cf.Executor | None = None,
        workers: int = 1,
    ) -> None:
        self.path, self.geometry, self.names, self.pool = Path(path), geometry, names, pool
        self.workers = workers if pool is not None else 0
        try:
            f = h5py.File(self.path, "r")
        except OSError as exc:
            raise ValidateError(f"{self.path}: cannot open as HDF5 ({exc})") from exc
        with f:
            showers = f.get("showers")
            if not isinstance(showers, h5py.Dataset):
                raise ValidateError(f"{self.path}: no dataset 'showers'")
            n = showers.shape[0]
            if showers.ndim != 2 or showers.shape[1] != geometry.n_voxels:
                raise ValidateError(
                    f"{self.path}: 'showers' has shape {showers.shape}, expected (N, {geometry.n_voxels})")
            energy = _read(f, self.path, "incident_energies").reshape(-1).astype(np.float64)
            eta = _read(f, self.path, "incident_eta", False)
            pdg = _read(f, self.path, "incident_pdg", False)
            chunk = showers.chunks[0] if showers.chunks else 1
        eta = np.zeros(n) if eta is None else eta.reshape(-1).astype(np.float64)
        pdg = np.zeros(n, dtype=np.int64) if pdg is None else pdg.reshape(-1).astype(np.int64)
        for name, arr in (("incident_energies", energy), ("incident_eta", eta), ("incident_pdg", pdg)):
            if len(arr) != n:
                raise ValidateError(f"{self.path}: 'showers' has {n} rows but {name!r} has {len(arr)}")
        bad = np.flatnonzero(~np.isfinite(energy) | (energy <= 0))
        if len(bad):
            raise ValidateError(f"{self.path}: 'incident_energies' row {bad[0]} is {float(energy[bad[0]])!r}; "
                                "it must be finite and > 0 MeV")  # fmt: skip
        gen_bins = binning.index(energy, eta, pdg)
        self.n, self.unmatched = n, int(np.sum(gen_bins < 0))
        self.rows = match_rows(real_bins, gen_bins, binning.n_bins, cap, rng)
        self.energy, self.eta, self.pdg = energy[self.rows], eta[self.rows], pdg[self.rows]
        m = len(self.rows)
        self.feat_pos = np.sort(rng.choice(m, size=min(feature_events, m), replace=False))
        self.vox_pos = np.sort(rng.choice(self.feat_pos, size=min(voxel_events, len(self.feat_pos)), replace=False))
        step = max(1, round(chunk_events / chunk)) * chunk
        # in a pool, a dozen tasks per worker so that they finish close together (with four, the last
        # one kept a single worker busy for a second); in line, one block per task
        task_blocks = max(1, math.ceil(n / (step * 12 * workers))) if pool is not None else 1
        self.tasks = S.plan(n, step, self.rows, energy, self.feat_pos, self.vox_pos, task_blocks)
        self.t0 = time.perf_counter()
        self.futures = {} if pool is None else {
            pool.submit(S.run_task, str(self.path), geometry.to_dict(), names, t): t for t in self.tasks}  # fmt: skip

    def collect(self, labeller: Callable[..., np.ndarray] | None = None) -> GeneratedSample:
        """Every block's results, in file order of the outputs; ``labeller(features, energy, eta,
        pdg) -> modes`` is applied to each block's feature rows as they arrive."""
        m, nf = len(self.rows), len(self.feat_pos)
        e_dep = np.empty(m)
        feats = np.empty((nf, len(self.names)))
        voxels = np.empty((len(self.vox_pos), self.geometry.n_voxels), dtype=np.float32)
        modes = np.empty(nf, dtype=np.int64) if labeller is not None else None
        t_read = t_feat = 0.0
        bar = ProgressBar(total=self.n, desc=f"validate {self.path.name}", unit="event")

        def store(task: S.Task, res: S.TaskResult) -> None:
            nonlocal t_read, t_feat
            e_dep[task.first : task.first + len(task.rows)] = res.e_dep
            fa = int(np.searchsorted(self.feat_pos, task.feat[0])) if len(task.feat) else 0
            feats[fa : fa + len(task.feat)] = res.features
            if modes is not None and len(task.feat):
                sl = slice(fa, fa + len(task.feat))
                modes[sl] = labeller(res.features, self.energy[task.feat], self.eta[task.feat], self.pdg[task.feat])
            va = int(np.searchsorted(self.vox_pos, task.vox[0])) if len(task.vox) else 0
            voxels[va : va + len(task.vox)] = res.voxels
            t_read += res.read_seconds
            t_feat += res.feature_seconds
            bar.update(task.n_file_rows)

        try:
            if self.pool is None:
                for task in self.tasks:
                    store(task, S.run_task(self.path, self.geometry, self.names, task))
            else:
                for fut in cf.as_completed(self.futures):
                    store(self.futures[fut], fut.result())
        except FeaturesError as exc:
            raise ValidateError(str(exc)) from exc
        finally:
            bar.close()
        fp = self.feat_pos
        return GeneratedSample(feats, self.energy[fp], self.eta[fp], self.pdg[fp], voxels, self.energy, self.pdg,
                               e_dep / self.energy, fp, self.n, self.unmatched, t_read, t_feat,
                               time.perf_counter() - self.t0, self.workers, modes)  # fmt: skip


def load_generated(*args: Any, labeller: Callable[..., np.ndarray] | None = None, **kwargs: Any) -> GeneratedSample:
    """Read conditions, match them to the real bins, stream the matched showers: :class:`_Stream`'s
    arguments, then :meth:`_Stream.collect` with ``labeller``.

    With a ``pool`` of ``workers`` processes the file's blocks are read and turned into features
    there (:mod:`surrogate.stream`); the results are the same as in this process, bit for bit.
    """
    return _Stream(*args, **kwargs).collect(labeller)


# ----------------------------------------------------------------------------- tests


@dataclass
class Test:
    """One verdict-bearing test: its metric value and the p-value that decides it."""

    name: str
    value: float
    error: float
    floor: float | None
    threshold: float | None
    pvalue: float
    kind: str
    pvalue_holm: float = 1.0
    passed: bool = True

    def as_dict(self) -> dict[str, Any]:
        def clean(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else float(x)

        return {"name": self.name, "value": clean(self.value), "error": clean(self.error), "floor": clean(self.floor),
                "threshold": clean(self.threshold), "passed": bool(self.passed), "kind": self.kind,
                "pvalue": clean(self.pvalue), "pvalue_holm": clean(self.pvalue_holm)}  # fmt: skip


def _worse_than_floor(
    name: str, value: float, err: float, floor: float, floor_err: float, margin: float, higher_is_worse: bool = True
) -> Test:
    """One-sided test of H0 "value is no worse than floor + margin"; sigma = both errors in quadrature."""
    sigma = math.hypot(err, floor_err)
    sign = 1.0 if higher_is_worse else -1.0
    threshold = floor + sign * margin
    excess = sign * (value - threshold)
    if sigma > 0:
        p = _normal_sf(excess / sigma)
    else:
        p = 0.0 if excess > 0 else 1.0
    return Test(name, value, err, floor, threshold, p, "floor")


def _two_sided(name: str, value: float, err: float, target: float, margin: float, floor: float | None) -> Test:
    """Two-sided test of H0 "|value - target| <= margin" (p-value of the excess)."""
    excess = abs(value - target) - margin
    p = min(1.0, 2.0 * _normal_sf(excess / err)) if err > 0 else (0.0 if excess > 0 else 1.0)
    return Test(name, value, err, floor, margin, p, "two_sided")


def _normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z (what scipy.stats.norm.sf computes, from the standard library)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _pvalue_test(name: str, stat: float, p: float, floor_p: float | None, alpha: float) -> Test:
    return Test(name, stat, 0.0, floor_p, alpha, p, "pvalue")


def _seeds(seed: int, n: int) -> list[int]:
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


def _seed_of(seed: int, name: str) -> int:
    """Seed of one named computation, independent of the order the tests run in (and of the generated sample)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


class ModeClassifier:
    """Truth mode from high-level features, log E and |eta|: one HistGradientBoostingClassifier per
    particle type, fitted on real train events.

    Per particle because the modes are the particle's own (a photon converts early or late, a pion
    starts its shower in the EM or the tile calorimeter): binary classifiers label an event with
    fewer trees than one four-class classifier (measured on the reference simulator: 1.4 s instead
    of 2.8 s for 100k events, fitted in 0.6 s instead of 1.5 s), at the same accuracy (0.97 on the
    test split). A particle with a single mode in the train events gets that mode; one of
    ``particles`` without train events, the prediction of a classifier of all particles.
    """

    def __init__(self, train: RealSample, n_train: int, iters: int, seed: int, particles: Sequence[int]) -> None:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(train.mode), size=min(n_train, len(train.mode)), replace=False))
        x = _mode_matrix(train.features[idx], train.energy[idx], train.eta[idx])
        y, pdg = train.mode[idx], train.pdg[idx]
        self.models: dict[int, Any] = {}
        for p in np.unique(pdg):
            sel = pdg == p
            self.models[int(p)] = self._fit(x[sel], y[sel], iters, seed)
        missing = [int(p) for p in particles if int(p) not in self.models]
        if missing:
            log.warning("no train events of particle(s) %s: their modes come from a classifier of all particles",
                        missing)  # fmt: skip
            fallback = self._fit(x, y, iters, seed)
            self.models.update(dict.fromkeys(missing, fallback))

    @staticmethod
    def _fit(x: np.ndarray, y: np.ndarray, iters: int, seed: int) -> Any:
        classes = np.unique(y)
        if len(classes) == 1:
            return int(classes[0])
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=iters, early_stopping=True, random_state=seed).fit(x, y)

    def predict(self, features: np.ndarray, energy: np.ndarray, eta: np.ndarray, pdg: np.ndarray) -> np.ndarray:
        """(n,) int64 predicted truth modes of events with features (n, F), energies (MeV), eta and pdg."""
        out = np.empty(len(features), dtype=np.int64)
        x = _mode_matrix(features, energy, eta)
        for p in np.unique(pdg):
            sel = pdg == p
            model = self.models[int(p)]
            out[sel] = model if isinstance(model, int) else model.predict(x[sel])
        return out


def _mode_classifier(train: RealSample | None, n_train: int, iters: int, seed: int,
                     particles: Sequence[int]) -> ModeClassifier | None:  # fmt: skip
    """The truth-mode classifier fitted on real train events; None without labels (or with one mode only)."""
    if train is None or not np.all(train.mode >= 0) or len(np.unique(train.mode)) < 2:
        return None
    return ModeClassifier(train, n_train, iters, seed, particles)


def _mode_matrix(features: np.ndarray, energy: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """The mode classifier's inputs: features (n, F), log E, |eta|."""
    return np.column_stack([features, np.log(energy), np.abs(eta)])


def _predict_modes(clf: ModeClassifier, s: RealSample | GeneratedSample, rows: np.ndarray | None = None) -> np.ndarray:
    """(n,) int64 predicted truth mode of the events ``rows`` of ``s``."""
    rows = slice(None) if rows is None else rows
    return clf.predict(s.features[rows], s.energy[rows], s.eta[rows], s.pdg[rows])


def mode_classifier(floors: dict[str, Any], train: RealSample | None, settings: dict[str, Any], seed: int,
                    particles: Sequence[int]) -> ModeClassifier | None:  # fmt: skip
    """The truth-mode classifier, fitted once and kept in ``floors`` (None when the data carry no modes).

    A fitted model is not stored in a floors file: it is fitted again, the same way (seeded, one thread).
    """
    if "mode_classifier" not in floors:
        sub = settings["subsample"]
        floors["mode_classifier"] = _mode_classifier(train, sub["mode_classifier_events"],
                                                     sub["classifier_iterations"], _seed_of(seed, "mode_classifier"),
                                                     particles)  # fmt: skip
    return floors["mode_classifier"]


def _sub(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n else x[np.sort(rng.choice(len(x), n, replace=False))]


def _sklearn_threads(n: int) -> threadpool_limits:
    """Limit BLAS and OpenMP to ``n`` threads, scikit-learn's OpenMP runtime included.

    threadpoolctl limits only the libraries loaded when it is called, and scikit-learn (imported
    where it is used) loads its OpenMP runtime on import: unlimited, a mode-classifier fit beside
    the reader processes took 4 s instead of 0.6 s.
    """
    import sklearn.ensemble  # noqa: F401

    return threadpool_limits(limits=n)


@contextlib.contextmanager
def _quiet_metrics() -> Iterator[None]:
    """Silence the metrics' per-call small-sample warnings (one summary line is logged instead)."""
    mlog = logging.getLogger("surrogate.metrics")
    level = mlog.level
    mlog.setLevel(logging.ERROR)
    try:
        yield
    finally:
        mlog.setLevel(level)


def evaluate(
    real: RealSample,
    gen: GeneratedSample,
    train: RealSample | None,
    binning: Binning,
    settings: dict[str, Any],
    seed: int,
    floors: dict[str, Any] | None = None,
    floors_only: bool = False,
    threads: int = 1,
    on_family: Callable[[str, dict[str, Any]], None] | None = None,
    busy_until: Callable[[], Any] | None = None,
) -> tuple[list[Test], dict[str, Any]]:
    """All tests (before Holm) and the data the plots need.

    ``floors`` caches the real-vs-real results by name: they depend only on the real sample, the
    settings and the seed, so validating several generated files against one dataset reuses them.
    ``floors_only``: fill ``floors`` and skip the expensive generated-side computations (their
    tests then carry the floor's value and are meaningless): :func:`compute_floors` does this.

    The generated side uses ``gen.features`` (the feature subsample) for every distribution test
    and ``gen.all_*`` (every matched event) for the response. The test families run in
    ``threads`` threads (numpy and scikit-learn release the GIL in their heavy loops); every random
    draw is made before they start, so the results do not depend on ``threads``. ``on_family(name,
    info_part)`` is called as each family finishes (from its thread), e.g. to plot its results.
    ``busy_until()``, with ``threads > 1``: returns when other work of the caller (a plotting
    process) frees its core; one thread waits for it, after the two families that feed the plots.
    """
    from surrogate import metrics as M

    if not USED_METRICS <= set(M.METRICS):
        raise ImportError(f"surrogate.metrics no longer registers {sorted(USED_METRICS - set(M.METRICS))}")
    sub, mar = settings["subsample"], settings["margins"]
    nb, n_boot, alpha = settings["hist_bins"], settings["n_boot"], settings["alpha"]
    rng = np.random.default_rng(seed)
    cache: dict[str, Any] = {} if floors is None else floors

    def floor(key: str, metric: Any, *args: Any, **kwargs: Any) -> Any:
        """``metric(*args, **kwargs)`` for a real-vs-real comparison, computed once per ``key``."""
        if key not in cache:
            cache[key] = metric(*args, **kwargs)
        return cache[key]

    def generated(stand_in: Any, metric: Any, *args: Any, **kwargs: Any) -> Any:
        """``metric(*args, **kwargs)`` on the generated sample; ``stand_in`` (the floor) when floors_only."""
        return stand_in if floors_only else metric(*args, **kwargs)

    def gen_cap(n_real: int) -> int:
        """Generated events in a KS or G-test beside ``n_real`` real ones: the power is set by the
        effective size n_r n_g / (n_r + n_g), already 0.91 n_r at n_g = 10 n_r."""
        return min(sub["gen_test_events"], sub["gen_test_ratio"] * n_real)

    # ---- every random draw, in a fixed order
    n = len(real.energy)
    perm = rng.permutation(n)
    half_a, half_b = np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])
    real_bins = binning.index(real.energy, real.eta, real.pdg)
    gen_bins = binning.index(gen.energy, gen.eta, gen.pdg)
    # generated events at the size of half B, drawn with the same bin mix as the real sample
    gen_b = _sub(np.arange(len(gen.energy)), len(half_b), rng)
    g_ks = _sub(np.arange(len(gen.energy)), gen_cap(n), rng)
    per_bin = []  # (bin, real rows, real half A rows, real half B rows, generated at |B|, generated for KS)
    for b in range(binning.n_bins):
        rb_all = np.flatnonzero(real_bins == b)
        if len(rb_all) < settings["min_bin_events"]:
            continue
        ra, rb = np.intersect1d(half_a, rb_all), np.intersect1d(half_b, rb_all)
        g_all = np.flatnonzero(gen_bins == b)
        g_sub = _sub(g_all, len(rb), rng)
        per_bin.append((b, rb_all, ra, rb, g_sub, _sub(g_all, gen_cap(len(rb_all)), rng)))
    # generated events capped like the KS tests: the G-test's power is set by the real counts
    g_mode = _sub(np.arange(len(gen.energy)), gen_cap(n), rng)

    rf, gf = real.features, gen.features
    small = [binning.label(b) for b in range(binning.n_bins) if 0 < np.sum(real_bins == b) < M.MIN_EVENTS_1D]
    if small:
        log.warning("%d condition bins have fewer than %d real events (%s...): per-bin tests are indicative; "
                    "their errors include the small size", len(small), M.MIN_EVENTS_1D, small[0])  # fmt: skip
    nf = min(sub["fpd_events"], len(half_a), len(half_b))
    # at most half of each sample per KPD batch: batches of the whole sample would all be the same
    # events, and their spread (the KPD error) zero
    kb = max(2, min(sub["kpd_batch_size"], len(half_a) // 2, len(half_b) // 2))
    ncl = min(sub["classifier_events"], len(half_a), len(half_b))
    nv = min(sub["voxel_classifier_events"], len(half_a), len(half_b), len(gen.voxels))
    npr = min(sub["prdc_events"], len(half_a), len(half_b))

    # ---- the test families: each returns its tests and its part of ``info``
    def one_d(prefix: str, ra: np.ndarray, rb: np.ndarray, rfull: np.ndarray, g: np.ndarray,
              gsub: np.ndarray) -> list[Test]:  # fmt: skip
        """Separation power, scaled W1 and KS of every feature at once (the metrics take (N, F))."""
        edges = list(np.quantile(rfull, np.linspace(0, 1, nb + 1), axis=0).T)  # per feature, at real quantiles
        s = _seed_of(seed, f"1d/{prefix}")
        sep_f = floor(f"separation/{prefix}", M.separation_power, ra, rb, bins=edges, n_boot=n_boot, seed=s)
        sep_g = generated(sep_f, M.separation_power, ra, gsub, bins=edges, n_boot=n_boot, seed=s)
        w1_f = floor(f"wasserstein/{prefix}", M.wasserstein_scaled, ra, rb, n_boot=n_boot, seed=s)
        w1_g = generated(w1_f, M.wasserstein_scaled, ra, gsub, n_boot=n_boot, seed=s)
        # n_boot=0: the p-value decides. ``g`` is capped by gen_cap: with n_gen >> n_real the test's
        # power is set by n_real (effective size n_r n_g / (n_r + n_g)), not by n_gen. Asymptotic
        # p-values: the exact ones cost ms per test, and the asymptotic law is slightly conservative
        # at these sizes (effective size hundreds or more)
        ks_f = floor(f"ks/{prefix}", M.ks, ra, rb, n_boot=0, seed=s, method="asymp")[0]
        ks_g = generated((ks_f,), M.ks, rfull, g, n_boot=0, seed=s, method="asymp")[0]
        varying = np.std(ra, axis=0) > 0  # W1 is scaled by the real std: no test for a constant feature
        out = []
        for j, name in enumerate(real.names):
            out.append(_worse_than_floor(f"separation/{prefix}/{name}", sep_g[0][j], sep_g[1][j], sep_f[0][j],
                                         sep_f[1][j], mar["separation"]))  # fmt: skip
            if varying[j]:
                out.append(_worse_than_floor(f"wasserstein/{prefix}/{name}", w1_g[0][j], w1_g[1][j], w1_f[0][j],
                                             w1_f[1][j], mar["wasserstein"]))  # fmt: skip
            out.append(_pvalue_test(f"ks/{prefix}/{name}", ks_g["statistic"][j], ks_g["pvalue"][j],
                                    ks_f["pvalue"][j], alpha))  # fmt: skip
        return out

    def distributions() -> tuple[list[Test], dict[str, Any]]:
        out = one_d("all", rf[half_a], rf[half_b], rf, gf[g_ks], gf[gen_b])
        for b, rb_all, ra, rb, g_sub, g_bin in per_bin:
            out += one_d(binning.label(b), rf[ra], rf[rb], rf[rb_all], gf[g_bin], gf[g_sub])
            # diversity at fixed conditions: spread of the generated features inside one condition bin
            key = f"diversity/{binning.label(b)}"
            s = _seed_of(seed, key)
            fv, fe = floor(key, M.diversity_ratio, rf[ra], rf[rb], n_boot=n_boot, seed=s)
            dv, de = generated((fv, fe), M.diversity_ratio, rf[ra], gf[g_sub], n_boot=n_boot, seed=s)
            out.append(_worse_than_floor(key, dv, de, fv, fe, mar["diversity"], False))
        return out, {"bins_used": [binning.label(b) for b, *_ in per_bin]}

    def response() -> tuple[list[Test], dict[str, Any]]:
        """Conditional response per energy bin and particle (pooling |eta| bins), every matched event."""
        out, resp = [], {}
        ne = len(binning.energy_edges_mev) + 1
        ie_r = np.digitize(real.energy, binning.energy_edges_mev)
        ie_g = np.digitize(gen.all_energy, binning.energy_edges_mev)
        ratio_r, ratio_g = rf[:, real.names.index("E_ratio")], gen.all_e_ratio
        for p in binning.particles:
            for ie in range(ne):
                mr, mg = (ie_r == ie) & (real.pdg == p), (ie_g == ie) & (gen.all_pdg == p)
                if mr.sum() < settings["min_bin_events"] or mg.sum() < 2:
                    continue
                label = f"pdg{p}_Ebin{ie}"
                s = _seed_of(seed, f"response/{label}")
                ma, mb = mr.copy(), mr.copy()
                ma[half_b], mb[half_a] = False, False
                v, e = M.response(ratio_r[mr], ratio_g[mg], n_boot=n_boot, seed=s)
                fv, _ = floor(f"response/{label}", M.response, ratio_r[ma], ratio_r[mb], n_boot=2, seed=s)
                resp[label] = {"pdg": p, "ebin": ie, "energy_gev": float(np.median(real.energy[mr]) / 1000.0),
                               "value": v, "error": e}  # fmt: skip
                out.append(_two_sided(f"response_mean/{label}", v["mean_shift"], e["mean_shift"], 0.0,
                                      mar["response_mean"], fv["mean_shift"]))  # fmt: skip
                out.append(_two_sided(f"resolution/{label}", v["resolution_ratio"], e["resolution_ratio"], 1.0,
                                      mar["resolution"], fv["resolution_ratio"]))  # fmt: skip
        return out, {"response": resp}

    def distances() -> tuple[list[Test], dict[str, Any]]:
        """FPD and KPD on the standardised features (the metrics standardise with the real sample)."""
        fpd_kw = {"min_samples": max(nf // 4, 10), "max_samples": nf, "num_points": 5, "num_batches": 10}
        s = _seed_of(seed, "fpd")
        # generated value from the same sample sizes as the floor (half A vs |B| generated events): the
        # extrapolation removes the resampling bias, not the finite-sample distance between two samples
        fv = floor("fpd", M.fpd, rf[half_a], rf[half_b], seed=s, **fpd_kw)
        gv = generated(fv, M.fpd, rf[half_a], gf[gen_b], seed=s, **fpd_kw)
        out = [_worse_than_floor("fpd", gv[0], gv[1], fv[0], fv[1], mar["fpd"])]
        s = _seed_of(seed, "kpd")
        fv = floor("kpd", M.kpd, rf[half_a], rf[half_b], num_batches=sub["kpd_batches"], batch_size=kb, seed=s)
        gv = generated(fv, M.kpd, rf[half_a], gf[gen_b], num_batches=sub["kpd_batches"], batch_size=kb, seed=s)
        out.append(_worse_than_floor("kpd", gv[0], gv[1], fv[0], fv[1], mar["kpd"]))
        return out, {}

    def classifier(on_voxels: bool) -> tuple[list[Test], dict[str, Any]]:
        """Classifier two-sample test at the floor's sample sizes, on high-level features or on voxels."""
        kw = {"max_events": nv if on_voxels else ncl, "max_iter": sub["classifier_iterations"], "n_boot": n_boot,
              "seed": _seed_of(seed, "classifier_auc")}  # fmt: skip
        if on_voxels:
            # 63 bins per voxel, not 255: ~30 training events a bin here. Measured (2000 events a class,
            # 533 voxels, 3 seeds): the same AUCs (real vs real 0.499/0.502, energy x1.1 0.511/0.509, the
            # quality preset's generator 0.9969/0.9975) in half the time (2.2 s instead of 5.5 s for the
            # 100 iterations a distinguishable sample takes)
            kw["max_bins"] = 63
        if on_voxels:
            key, ra, rb, g = f"classifier_auc/voxels@{nv}", real.showers[half_a], real.showers[half_b], gen.voxels
        else:
            key, ra, rb, g = "classifier_auc/features", rf[half_a], rf[half_b], gf[gen_b]
        fv = floor(key, M.classifier_auc, ra, rb, **kw)
        gv = generated(fv, M.classifier_auc, ra, g, **kw)
        return [_worse_than_floor(key.split("@")[0], gv[0], gv[1], fv[0], fv[1], mar["auc"])], {}

    def coverage() -> tuple[list[Test], dict[str, Any]]:
        """PRDC at equal sizes and the overall diversity."""
        s = _seed_of(seed, "prdc")
        fv = floor("prdc", M.prdc, rf[half_a], rf[half_b], k=sub["prdc_k"], max_events=npr, seed=s)
        gv = generated(fv, M.prdc, rf[half_a], gf[gen_b], k=sub["prdc_k"], max_events=npr, seed=s)
        out = [_worse_than_floor(f"prdc/{key}", gv[0][key], gv[1][key], fv[0][key], fv[1][key], mar["prdc"], False)
               for key in ("precision", "recall", "density", "coverage")]  # fmt: skip
        s = _seed_of(seed, "diversity/all")
        fv = floor("diversity/all", M.diversity_ratio, rf[half_a], rf[half_b], n_boot=n_boot, seed=s)
        dv = generated(fv, M.diversity_ratio, rf[half_a], gf[gen_b], n_boot=n_boot, seed=s)
        out.append(_worse_than_floor("diversity/all", dv[0], dv[1], fv[0], fv[1], mar["diversity"], False))
        return out, {}

    def modes() -> tuple[list[Test], dict[str, Any]]:
        """Mode coverage: predicted truth-mode fractions (or k-means occupancy without truth modes)."""
        clf = mode_classifier(cache, train, settings, seed, binning.particles)
        out: list[Test] = []
        labels = None
        if clf is not None:
            lr = floor("mode_labels/real", _predict_modes, clf, real)
            if floors_only:
                labels = (lr, lr[: len(g_mode)])
            elif gen.modes is not None:  # predicted while the file streamed
                labels = (lr, gen.modes[g_mode])
            else:
                labels = (lr, _predict_modes(clf, gen, g_mode))
        n_modes = max(len(real.mode_names), 1)
        result: dict[str, Any] = {"names": real.mode_names, "bins": {}}
        if labels is not None:
            lr, lg = labels
            n_modes = max(n_modes, int(max(lr.max(), lg.max())) + 1)
            for b in [None, *(b for b, *_ in per_bin)]:
                mr = np.ones(n, bool) if b is None else real_bins == b
                mg = np.ones(len(lg), bool) if b is None else gen_bins[g_mode] == b
                v, _ = M.mode_fraction_test(lr[mr], lg[mg], n_modes)
                ma, mb = mr.copy(), mr.copy()
                ma[half_b], mb[half_a] = False, False
                label = "all" if b is None else binning.label(b)
                fv, _ = floor(f"mode_fraction/{label}", M.mode_fraction_test, lr[ma], lr[mb], n_modes)
                out.append(_pvalue_test(f"mode_fraction/{label}", v["statistic"], v["pvalue"], fv["pvalue"], alpha))
                result["bins"][label] = {"real": np.bincount(lr[mr], minlength=n_modes).tolist(),
                                         "gen": np.bincount(lg[mg], minlength=n_modes).tolist(),
                                         "ebin": None if b is None else binning.energy_bin(b),
                                         "etabin": None if b is None else binning.eta_bin(b),
                                         "pdg": None if b is None else binning.particle(b)}  # fmt: skip
            result["method"] = "truth-mode classifier per particle (HistGradientBoosting on train-split features)"
        else:
            s = _seed_of(seed, "cluster_occupancy")
            fv, _ = floor("cluster_occupancy", M.cluster_occupancy, rf[half_a], rf[half_b], k=sub["clusters"],
                          seed=s)  # fmt: skip
            v, _ = generated((fv, None), M.cluster_occupancy, rf, gf, k=sub["clusters"], seed=s)
            out.append(_pvalue_test("cluster_occupancy/all", v["statistic"], v["pvalue"], fv["pvalue"], alpha))
            result["method"] = "k-means occupancy (no truth modes in the test split)"
        return out, {"modes": result}

    # ---- run them (longest first, for the thread pool), then assemble in the documented order
    families = {"1-D tests": distributions, "response": response, "FPD/KPD": distances,
                "classifier AUC, features": functools.partial(classifier, False),
                "classifier AUC, voxels": functools.partial(classifier, True),
                "PRDC/diversity": coverage, "mode coverage": modes}  # fmt: skip
    # the short ones whose results are plotted first, then the longest first (the classifiers of a
    # distinguishable sample boost to the last iteration: the voxel one then takes seconds)
    order = ["response", "mode coverage", "classifier AUC, voxels", "PRDC/diversity", "1-D tests",
             "classifier AUC, features", "FPD/KPD"]
    omp_threads = settings["sklearn_threads"]

    def timed(name: str) -> tuple[list[Test], dict[str, Any], float]:
        t0 = time.perf_counter()
        # OpenMP's thread count belongs to each thread (BLAS's is the process's, set by the caller)
        with threadpool_limits(limits=omp_threads, user_api="openmp"):
            out, part = families[name]()
        if on_family is not None:
            on_family(name, part)
        return out, part, time.perf_counter() - t0

    with _quiet_metrics():
        if threads > 1:
            with cf.ThreadPoolExecutor(threads, thread_name_prefix="validate") as pool:
                futures = {name: pool.submit(timed, name) for name in order[:2]}
                if busy_until is not None:
                    pool.submit(busy_until)
                futures.update({name: pool.submit(timed, name) for name in order[2:]})
                results = {name: fut.result() for name, fut in futures.items()}
        else:
            results = {name: timed(name) for name in order}
    tests: list[Test] = []
    info: dict[str, Any] = {"halves": [len(half_a), len(half_b)], "generated_matched": len(gen.all_energy),
                            "seconds": {}}  # fmt: skip
    for name in families:
        out, part, seconds = results[name]
        tests += out
        info.update(part)
        info["seconds"][name] = seconds
        log.info("%s: %.1f s", name, seconds)
    info["subsample"] = {"fpd_max_events": nf, "kpd_batch_size": kb, "kpd_batches": sub["kpd_batches"],
                         "classifier_events_per_class": ncl, "voxel_classifier_events_per_class": nv,
                         "prdc_events": npr, "floor_half_sizes": [len(half_a), len(half_b)],
                         "generated_at_floor_size": len(gen_b), "generated_feature_events": len(gen.energy),
                         "gen_test_events": sub["gen_test_events"], "gen_test_ratio": sub["gen_test_ratio"],
                         "n_boot": n_boot, "mode_classifier_events": sub["mode_classifier_events"],
                         "clusters": sub["clusters"]}  # fmt: skip
    return tests, info


def _floor_stand_in(real: RealSample, settings: dict[str, Any]) -> GeneratedSample:
    """The real sample in the generated sample's place, for ``evaluate(floors_only=True)``."""
    n_vox = min(settings["subsample"]["voxel_classifier_events"], len(real.showers))
    ratio = real.features[:, real.names.index("E_ratio")]
    return GeneratedSample(real.features, real.energy, real.eta, real.pdg, real.showers[:n_vox], real.energy,
                           real.pdg, ratio, np.arange(len(ratio)), len(real.energy), 0, 0.0, None, 0.0)  # fmt: skip


def _fill_floors(real: RealSample, train: RealSample | None, binning: Binning, settings: dict[str, Any], seed: int,
                 floors: dict[str, Any], threads: int = 1) -> None:  # fmt: skip
    """Every real-vs-real floor of :func:`evaluate` into ``floors`` (those already there are kept)."""
    with _sklearn_threads(settings["sklearn_threads"]):
        evaluate(real, _floor_stand_in(real, settings), train, binning, settings, seed, floors, floors_only=True,
                 threads=threads)  # fmt: skip


def _floor_identity(real: RealSample, train: RealSample | None, settings: dict[str, Any], seed: int) -> str:
    """sha256 of everything the floors depend on: the real arrays, the settings, the seed, the code."""
    h = hashlib.sha256()
    for s in (real, train):
        if s is not None:
            for arr in (s.showers, s.energy, s.eta, s.pdg, s.mode):
                h.update(np.ascontiguousarray(arr).tobytes())
    used = {k: v for k, v in settings.items() if k not in _RUN_ONLY_SETTINGS}
    h.update(json.dumps({"seed": seed, "settings": used, "format": FLOORS_FORMAT, "version": __version__},
                        sort_keys=True).encode())  # fmt: skip
    # the code that computes them: floors written by an older version are recomputed, never trusted
    for module in ("surrogate.features", "surrogate.metrics", "surrogate.validate"):
        h.update(Path(importlib.util.find_spec(module).origin).read_bytes())
    return h.hexdigest()


def _encode(x: Any) -> Any:
    """A floor result as JSON-able data (floats round-trip exactly); TypeError for what is not plain data."""
    if isinstance(x, np.ndarray):
        return {"__array__": x.tolist(), "dtype": x.dtype.str}
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v) for v in x]}
    if isinstance(x, dict):
        return {str(k): _encode(v) for k, v in x.items()}
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        return float(x)
    raise TypeError(type(x).__name__)


def _decode(x: Any) -> Any:
    if isinstance(x, dict):
        if "__array__" in x:
            return np.asarray(x["__array__"], dtype=np.dtype(x["dtype"]))
        if "__tuple__" in x:
            return tuple(_decode(v) for v in x["__tuple__"])
        return {k: _decode(v) for k, v in x.items()}
    return x


def _write_floors(path: Path, floors: dict[str, Any], identity: str, dataset: str | Path, seconds: float) -> None:
    data = {}
    for key, value in floors.items():
        try:
            data[key] = _encode(value)
        except TypeError:  # the fitted mode classifier: fitted again where it is needed
            continue
    write_json(path, {"format": FLOORS_FORMAT, "identity": identity, "dataset": str(dataset),
                      "seconds": round(seconds, 3), "floors": data})  # fmt: skip


def _read_floors(path: Path, identity: str) -> dict[str, Any] | None:
    """The floors stored in ``path``, or None (logged) when it is unreadable or for other data or settings."""
    try:
        data = json.loads(path.read_text())
        stored = data["identity"]
        floors = {k: _decode(v) for k, v in data["floors"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: cannot read the floors (%s); computing them here", path, exc)
        return None
    if stored != identity:
        log.warning("%s: the floors were computed for another test split, settings, seed or code version; "
                    "computing them here", path)  # fmt: skip
        return None
    return floors


def _load_splits(dataset: str | Path, settings: dict[str, Any]) -> tuple[RealSample, RealSample | None, Binning]:
    """The test split, the train events of the mode classifier (None without truth modes), the condition bins."""
    real = load_real(dataset, "test")
    log.info("real test split: %d events, %d features", len(real.energy), len(real.names))
    train = None
    if np.all(real.mode >= 0):
        train = load_real(dataset, "train", max_rows=settings["subsample"]["mode_classifier_events"])
    particles = tuple(int(p) for p in np.unique(real.pdg))
    binning = Binning(np.asarray(settings["energy_edges_gev"], float) * 1000.0,
                      np.asarray(settings["eta_edges"], float), particles)  # fmt: skip
    return real, train, binning


def compute_floors(cfg: dict[str, Any], dataset: str | Path, out: str | Path, threads: int | None = None
                   ) -> dict[str, Any]:  # fmt: skip
    """Every real-vs-real floor of ``dataset``'s test split, written to ``out`` (JSON) for :func:`run`,
    computed in ``threads`` threads (default ``validate.threads``)."""
    t0 = time.perf_counter()
    settings, seed = cfg["validate"], int(cfg["seed"])
    real, train, binning = _load_splits(dataset, settings)
    s_eval = _seeds(seed, 3)[2]
    floors: dict[str, Any] = {}
    _fill_floors(real, train, binning, settings, s_eval, floors, threads or settings["threads"])
    _write_floors(Path(out), floors, _floor_identity(real, train, settings, s_eval), dataset, time.perf_counter() - t0)
    log.info("%d real-vs-real floors of %s in %.1f s -> %s", len(floors), dataset, time.perf_counter() - t0, out)
    return floors


def _start_readers(workers: int) -> cf.ProcessPoolExecutor:
    """``workers`` fresh ("spawn") processes for :func:`surrogate.stream.run_task`, one BLAS/OpenMP
    thread each, asked to start now (a worker imports numpy and h5py in about 0.2 s)."""
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=W.init)
    for _ in range(workers):
        pool.submit(W.ready)
    return pool


class _Plotter:
    """Plots drawn in one separate ("spawn") process while this one runs the tests, or here.

    :meth:`submit` takes a function name of :mod:`surrogate.plots` and its arguments; :meth:`paths`
    returns every written PNG in submission order. If the process fails, the plots are drawn here.
    """

    def __init__(self, separate: bool) -> None:
        self.pool = None
        if separate:
            self.pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=W.init)
            self.pool.submit(W.call, "surrogate.plots", "ready")  # matplotlib is imported while the file streams
        self.jobs: list[tuple[str, tuple[Any, ...], cf.Future | None]] = []

    def submit(self, name: str, *args: Any) -> None:
        fut = None
        if self.pool is not None:
            try:
                fut = self.pool.submit(W.call, "surrogate.plots", name, *args)
            except BrokenProcessPool:  # it died already: drawn here, by paths() (which also logs why)
                fut = cf.Future()
                fut.set_exception(BrokenProcessPool("the plotting process is gone"))
        self.jobs.append((name, args, fut))

    def drain(self) -> None:
        """Wait until every plot submitted so far is drawn (or failed: :meth:`paths` handles that)."""
        cf.wait([fut for *_, fut in self.jobs if fut is not None])

    def paths(self) -> list[Path]:
        out: list[Path] = []
        for name, args, fut in self.jobs:
            result = None
            if fut is not None:
                try:
                    result = fut.result()
                except BrokenProcessPool as exc:
                    log.warning("the plotting process failed (%s); drawing %s here", exc, name)
                    fut = None
            if fut is None:
                result = W.call("surrogate.plots", name, *args)
            out.extend(result if isinstance(result, list) else [] if result is None else [result])
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def apply_holm(tests: list[Test], alpha: float) -> None:
    """Fill in Holm-adjusted p-values and pass flags (in place)."""
    from surrogate.metrics import holm

    if not tests:
        return
    adj = holm(np.clip([t.pvalue for t in tests], 0.0, 1.0))
    for t, a in zip(tests, adj, strict=True):
        t.pvalue_holm = float(a)
        t.passed = bool(a > alpha)


# ----------------------------------------------------------------------------- stage


def _html(summary: dict[str, Any], plots: list[Path]) -> str:
    rows = sorted(summary["metrics"], key=lambda r: (r["passed"], r["pvalue_holm"] or 0.0))

    def fmt(x: Any) -> str:
        return "" if x is None else (f"{x:.4g}" if isinstance(x, float) else html.escape(str(x)))

    cols = ("name", "value", "error", "floor", "threshold", "pvalue_holm", "passed")
    body = "\n".join(
        "<tr class='{}'>{}</tr>".format("ok" if r["passed"] else "bad", "".join(f"<td>{fmt(r[c])}</td>" for c in cols))
        for r in rows
    )
    imgs = "\n".join(
        f"<h3>{html.escape(p.stem)}</h3><img alt='{html.escape(p.stem)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}'>"
        for p in plots
    )
    n_fail = sum(not r["passed"] for r in rows)
    sizes = html.escape(json.dumps(summary["subsample"], indent=1))
    families: dict[str, list[int]] = {}
    for r in rows:
        fam = families.setdefault(r["name"].split("/")[0], [0, 0])
        fam[0] += 1
        fam[1] += not r["passed"]
    overview = "".join(f"<tr class='{'bad' if f else 'ok'}'><td>{html.escape(k)}</td><td>{n}</td><td>{f}</td></tr>"
                       for k, (n, f) in sorted(families.items()))  # fmt: skip
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>Validation: {summary['verdict']}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 8px;border-bottom:1px solid #ddd;font-size:90%}}
.bad{{background:#fdd}} .ok{{}} img{{max-width:100%}} .PASS{{color:green}} .FAIL{{color:#b00}}</style></head><body>
<h1>Validation verdict: <span class="{summary['verdict']}">{summary['verdict']}</span></h1>
<p>{len(rows)} tests, {n_fail} failed (Holm-corrected at alpha = {summary['alpha']}). Generated events in file:
{summary['generated_events_in_file']}, condition-matched: {summary['generated_events_matched']}; real test events:
{summary['real_events']}.</p>
<h2>Test families</h2><table><tr><th>family</th><th>tests</th><th>failed</th></tr>{overview}</table>
<h2>Subsample sizes</h2><pre>{sizes}</pre>
<h2>Plots</h2>{imgs}
<h2>Tests (failed first)</h2><table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{body}</table></body></html>
"""


#: Order of the plots in the report, by file-name prefix.
_PLOT_ORDER = ("features_", "response", "modes", "mean_shower_per_layer", "training_curves")


def _plot_rank(path: Path) -> tuple[int, str]:
    return next((i for i, p in enumerate(_PLOT_ORDER) if path.stem.startswith(p)), len(_PLOT_ORDER)), path.stem


def run(
    cfg: dict[str, Any],
    dataset: str | Path,
    generated: str | Path,
    out: str | Path,
    history: str | Path | None = None,
    threads: int | None = None,
    plots: bool = True,
    reuse: dict[Any, Any] | None = None,
    floors_path: str | Path | None = None,
) -> dict[str, Any]:
    """Validate ``generated`` against the test split of ``dataset``; write the outputs in ``out``.

    ``floors_path``: the real-vs-real floors written by :func:`compute_floors` for this dataset,
    settings and seed; used when they match, else (logged) computed here, with the same results.

    With ``threads > 1`` that many reader processes and one plotting process are started the
    "spawn" way, which imports the calling script again: call ``run`` from a script under
    ``if __name__ == "__main__":`` (if a process fails, its work is done in this one, with the same
    results, only slower).

    ``reuse``: an (initially empty) dict kept by a caller that validates several generated files
    against the same dataset in one process; the real samples and every real-vs-real floor are
    stored in it under the dataset's identity (path, size, mtime), the seed and the settings, and
    reused. Results are the same as without it.

    Returns the summary dict (also written to ``out/summary.json``).
    """
    settings = cfg["validate"]
    threads = threads or settings["threads"]
    out = Path(out)
    t_start = time.perf_counter()
    seed = int(cfg["seed"])
    _, s_match, s_eval = _seeds(seed, 3)
    try:
        stat = Path(dataset).stat()
    except OSError as exc:
        raise ValidateError(f"{dataset}: cannot read the dataset ({exc})") from exc
    settings_json = json.dumps(settings, sort_keys=True)
    identity = (str(Path(dataset).resolve()), stat.st_size, stat.st_mtime_ns, seed, settings_json)
    state = {} if reuse is None else reuse.setdefault(identity, {})
    sub = settings["subsample"]
    # the processes first: they start (and import) while the real splits load
    readers = _start_readers(threads) if threads > 1 else None
    plotter = _Plotter(separate=threads > 1) if plots else None
    try:
        if "real" not in state:
            state["real"], state["train"], state["binning"] = _load_splits(dataset, settings)
        real, train, binning = state["real"], state["train"], state["binning"]
        floors = state.setdefault("floors", {})
        floors_source = "reused" if floors else "computed here"
        if not floors and floors_path is not None:
            loaded = _read_floors(Path(floors_path), _floor_identity(real, train, settings, s_eval))
            if loaded is not None:
                floors.update(loaded)
                floors_source = str(floors_path)
        if plotter is not None and history is not None:
            plotter.submit("training_curves", out / "plots", history)
        n_real = len(real.energy)
        gen_args = (generated, real.geometry, real.names, binning, binning.index(real.energy, real.eta, real.pdg))
        gen_kw = {"cap": settings["max_generated_events"], "chunk_events": settings["chunk_events"],
                  "feature_events": min(sub["gen_test_events"], sub["gen_test_ratio"] * n_real),
                  "voxel_events": sub["voxel_classifier_events"]}  # fmt: skip
        stream = _Stream(*gen_args, **gen_kw, rng=np.random.default_rng(s_match), pool=readers, workers=threads)
        # OpenMP (HistGradientBoosting, k-means) gets its own thread count: spinning OpenMP workers on
        # shared, oversubscribed cores made the classifier fits 4x slower with 2 threads than with 1.
        with _sklearn_threads(settings["sklearn_threads"]):
            t0 = time.perf_counter()
            # while the readers work: the floors (unless read) and the mode classifier
            if not floors:
                _fill_floors(real, train, binning, settings, s_eval, floors)
                log.info("real-vs-real floors computed in %.1f s", time.perf_counter() - t0)
            clf = mode_classifier(floors, train, settings, s_eval, binning.particles)
            labeller = None if clf is None else clf.predict
            try:
                gen = stream.collect(labeller)
            except BrokenProcessPool as exc:  # a reader process died (killed, out of memory): read here instead
                log.warning("a reader process failed (%s); reading %s in this process", exc, generated)
                readers.shutdown(wait=False, cancel_futures=True)
                readers = None
                gen = load_generated(*gen_args, **gen_kw, rng=np.random.default_rng(s_match), labeller=labeller)
            if readers is not None:
                readers.shutdown(wait=True)
                readers = None
            log.info("generated: %d events in file, %d matched to the real conditions, %d with features",
                     gen.rows_in_file, len(gen.all_energy), len(gen.energy))  # fmt: skip
            if plotter is not None:  # drawn there while the tests run here
                plotter.submit("feature_histograms", out / "plots", real.features, gen.features, real.names,
                               settings["hist_bins"])  # fmt: skip
                plotter.submit("layer_plot", out / "plots", _plain(real), _plain(gen), real.names)
            e = [0.0, *(binning.energy_edges_mev / 1000.0), math.inf]
            h = [0.0, *binning.eta_edges, math.inf]
            bin_labels = ([f"{e[i]:g}-{e[i + 1]:g} GeV" for i in range(len(e) - 1)],
                          [f"{h[i]:g}-{h[i + 1]:g}" for i in range(len(h) - 1)])  # fmt: skip

            def plot(family: str, part: dict[str, Any]) -> None:  # as soon as the family's numbers are there
                if plotter is not None and family == "response" and part["response"]:
                    plotter.submit("response_plot", out / "plots", part["response"])
                if plotter is not None and family == "mode coverage":
                    plotter.submit("mode_plot", out / "plots", part["modes"], *bin_labels)

            # the plotting process keeps a core busy meanwhile: one test thread waits for it to finish
            tests, info = evaluate(real, gen, train, binning, settings, s_eval, floors, threads=threads,
                                   on_family=plot, busy_until=None if plotter is None else plotter.drain)  # fmt: skip
        plot_paths: list[Path] = []
        if plotter is not None:
            t0 = time.perf_counter()
            plot_paths = sorted(plotter.paths(), key=_plot_rank)
            info["seconds"]["plots (waited)"] = time.perf_counter() - t0
    finally:  # on an error too: no process is left behind
        if readers is not None:
            readers.shutdown(wait=True, cancel_futures=True)
        if plotter is not None:
            plotter.close()
    apply_holm(tests, settings["alpha"])
    verdict = "PASS" if all(t.passed for t in tests) else "FAIL"
    failed = [t.name for t in tests if not t.passed]
    summary = {
        "verdict": verdict,
        "alpha": settings["alpha"],
        "n_tests": len(tests),
        "n_failed": len(failed),
        "failed": failed,
        "real_events": n_real,
        "generated_events_in_file": gen.rows_in_file,
        "generated_events_matched": len(gen.all_energy),
        "generated_events_features": len(gen.energy),
        "generated_events_unknown_particle": gen.rows_dropped_unmatched,
        "reader_processes": gen.reader_processes,
        "floors": floors_source,
        "subsample": info["subsample"],
        "bins_used": info["bins_used"],
        "mode_method": info["modes"]["method"],
        "seconds": {"total": None, "read_generated": gen.read_seconds, "features_generated": gen.feature_seconds,
                    "stream_generated": gen.stream_seconds, **info["seconds"]},  # fmt: skip
        "metrics": [t.as_dict() for t in tests],
    }
    summary["seconds"]["total"] = time.perf_counter() - t_start
    dump_config(cfg, out / "config.yaml")  # the resolved configuration beside the outputs
    write_json(out / "summary.json", summary)
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(_html(summary, plot_paths))
    log.info("verdict %s: %d of %d tests failed%s", verdict, len(failed), len(tests),
             f" (first: {', '.join(failed[:5])})" if failed else "")  # fmt: skip
    return summary


def _plain(s: RealSample | GeneratedSample) -> types.SimpleNamespace:
    """What the layer plot needs of a sample (features, energy, pdg), without the rest, to send it to a process."""
    return types.SimpleNamespace(features=s.features, energy=s.energy, pdg=s.pdg)


def _floors_main(argv: list[str]) -> int:
    parser = stage_parser("python -m surrogate.validate floors",
                          "Compute the real-vs-real floors of a dataset's test split, for --floors of the stage.")
    parser.add_argument("--dataset", required=True, help="ingest output HDF5 (its 'test' group is the reference)")
    parser.add_argument("--out", required=True, help="output JSON, e.g. results/validate/floors.json")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: validate.threads)")
    args, cfg = parse_stage_args(parser, argv)
    from surrogate.metrics import MetricError

    try:
        compute_floors(cfg, args.dataset, args.out, args.threads)
    except (ValidateError, MetricError, FeaturesError) as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exit 0 unless the input is unusable or (with fail_pipeline) the verdict is FAIL."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["floors"]:
        return _floors_main(argv[1:])
    parser = stage_parser("python -m surrogate.validate",
                          "Validate generated showers against the test split. `python -m surrogate.validate floors "
                          "--help` computes the real-vs-real floors once per dataset.")  # fmt: skip
    parser.add_argument("--dataset", required=True, help="ingest output HDF5 (its 'test' group is the reference)")
    parser.add_argument("--generated", required=True, help="generated events HDF5 (generate stage output)")
    parser.add_argument("--out", required=True, help="output folder (summary.json, report.html, plots/)")
    parser.add_argument("--floors", default=None,
                        help="floors JSON from `validate floors` (default: computed here; also when it does not match)")
    parser.add_argument("--history", default=None, help="training history.jsonl for the training-curve plot")
    parser.add_argument("--threads", type=int, default=None,
                        help="reader processes for the generated file (default: validate.threads); above 1, "
                             "plots are drawn in one more process")  # fmt: skip
    args, cfg = parse_stage_args(parser, argv)
    history = args.history if args.history and Path(args.history).exists() else None
    from surrogate.metrics import MetricError

    try:
        summary = run(cfg, args.dataset, args.generated, args.out, history=history, threads=args.threads,
                      floors_path=args.floors)  # fmt: skip
    except (ValidateError, MetricError, FeaturesError) as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    if summary["verdict"] == "FAIL" and cfg["validate"]["fail_pipeline"]:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
