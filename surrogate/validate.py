"""Validate stage: generated showers against the held-out test split, judged against real-vs-real.

``python -m surrogate.validate --config C --dataset results/ingest/dataset.h5
--generated results/generate/events.h5 --out results/validate [--history H] [--threads N]``

Steps:

1. The reference ("real") sample is the ``test`` split of the ingest file, loaded into RAM.
   It is split (seeded) into two disjoint halves A and B: every metric computed on A vs B is
   the real-vs-real *floor* the generated sample is judged against.
2. Condition bins = energy bins x |eta| bins x particle (``validate`` config). The generated
   file's conditions are read whole (small); per bin, generated rows are subsampled to the
   real sample's proportions ("matched" sample). Its showers are then streamed in HDF5-chunk
   aligned blocks and turned into high-level features (in ``threads`` reader processes when > 1).
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

Outputs (atomic): ``summary.json``, ``report.html`` (self-contained), ``plots/*.png`` and the
resolved ``config.yaml``.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import contextlib
import html
import json
import logging
import math
import multiprocessing
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from scipy import stats
from sklearn.ensemble import HistGradientBoostingClassifier
from threadpoolctl import threadpool_limits

from surrogate import metrics as M
from surrogate import stream as S
from surrogate.config import dump_config, parse_stage_args, stage_parser
from surrogate.features import FeaturesError, feature_names
from surrogate.geometry import Geometry
from surrogate.io import ProgressBar, atomic_path, write_json

__all__ = [
    "USED_METRICS", "ValidateError", "RealSample", "GeneratedSample", "Binning", "load_real", "load_generated",
    "evaluate", "apply_holm", "run", "main",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Names in :data:`surrogate.metrics.METRICS` that :func:`evaluate` runs; the tests check that it
#: covers the whole registry, so a metric added there is not silently left out of the verdict.
USED_METRICS = frozenset({"separation_power", "ks", "wasserstein_scaled", "response", "fpd", "kpd", "classifier_auc",
                          "mode_fraction_test", "cluster_occupancy", "prdc", "diversity_ratio"})  # fmt: skip
if not USED_METRICS <= set(M.METRICS):
    raise ImportError(f"surrogate.metrics no longer registers {sorted(USED_METRICS - set(M.METRICS))}")


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
    """Condition-matched generated events: features (M, F), conditions, a voxel subsample."""

    features: np.ndarray
    energy: np.ndarray
    eta: np.ndarray
    pdg: np.ndarray
    voxels: np.ndarray  # (m, V) float32 MeV, random subsample of the matched events
    rows_in_file: int
    rows_dropped_unmatched: int
    read_seconds: float  # reading the showers (HDF5 + decompression; summed over reader processes)
    feature_seconds: float | None  # computing the features (summed over reader processes); None for a stand-in
    stream_seconds: float  # wall time of the whole read-and-features loop
    reader_processes: int = 0  # processes that read the file (0: this one)


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


def load_generated(
    path: str | Path,
    geometry: Geometry,
    names: list[str],
    binning: Binning,
    real_bins: np.ndarray,
    *,
    cap: int,
    chunk_events: int,
    voxel_events: int,
    rng: np.random.Generator,
    pool: cf.Executor | None = None,
    workers: int = 1,
) -> GeneratedSample:
    """Read conditions, match them to the real bins, stream the matched showers into features.

    With a ``pool`` of ``workers`` processes the file's blocks are read and turned into features
    there (:mod:`surrogate.stream`); the results are the same as in this process, bit for bit.
    """
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValidateError(f"{path}: cannot open as HDF5 ({exc})") from exc
    with f:
        showers = f.get("showers")
        if not isinstance(showers, h5py.Dataset):
            raise ValidateError(f"{path}: no dataset 'showers'")
        n = showers.shape[0]
        if showers.ndim != 2 or showers.shape[1] != geometry.n_voxels:
            raise ValidateError(f"{path}: 'showers' has shape {showers.shape}, expected (N, {geometry.n_voxels})")
        energy = _read(f, path, "incident_energies").reshape(-1).astype(np.float64)
        eta = _read(f, path, "incident_eta", False)
        pdg = _read(f, path, "incident_pdg", False)
        chunk = showers.chunks[0] if showers.chunks else 1
    eta = np.zeros(n) if eta is None else eta.reshape(-1).astype(np.float64)
    pdg = np.zeros(n, dtype=np.int64) if pdg is None else pdg.reshape(-1).astype(np.int64)
    for name, arr in (("incident_energies", energy), ("incident_eta", eta), ("incident_pdg", pdg)):
        if len(arr) != n:
            raise ValidateError(f"{path}: 'showers' has {n} rows but {name!r} has {len(arr)}")
    gen_bins = binning.index(energy, eta, pdg)
    rows = match_rows(real_bins, gen_bins, binning.n_bins, cap, rng)
    vox_pos = np.sort(rng.choice(len(rows), size=min(voxel_events, len(rows)), replace=False))
    feats = np.empty((len(rows), len(names)), dtype=np.float64)
    voxels = np.empty((len(vox_pos), geometry.n_voxels), dtype=np.float32)
    step = max(1, round(chunk_events / chunk)) * chunk
    # in a pool, four tasks per worker so that they finish close together; in line, one block per task
    task_blocks = max(1, math.ceil(n / (step * 4 * workers))) if pool is not None else 1
    tasks = S.plan(n, step, rows, energy, vox_pos, task_blocks)
    t_read = t_feat = 0.0
    bar = ProgressBar(total=n, desc=f"validate {path.name}", unit="event")

    def store(task: S.Task, res: S.TaskResult) -> None:
        nonlocal t_read, t_feat
        feats[task.first : task.first + len(task.rows)] = res.features
        va = int(np.searchsorted(vox_pos, task.vox[0])) if len(task.vox) else 0
        voxels[va : va + len(task.vox)] = res.voxels
        t_read += res.read_seconds
        t_feat += res.feature_seconds
        bar.update(task.n_file_rows)

    t_stream = time.perf_counter()
    try:
        if pool is None:
            for task in tasks:
                store(task, S.run_task(path, geometry, names, task))
        else:
            futures = {pool.submit(S.run_task, str(path), geometry.to_dict(), names, t): t for t in tasks}
            for fut in cf.as_completed(futures):
                store(futures[fut], fut.result())
    except FeaturesError as exc:
        raise ValidateError(str(exc)) from exc
    finally:
        bar.close()
    t_stream = time.perf_counter() - t_stream
    return GeneratedSample(feats, energy[rows], eta[rows], pdg[rows], voxels, n, int(np.sum(gen_bins < 0)),
                           t_read, t_feat, t_stream, workers if pool is not None else 0)  # fmt: skip


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
        p = float(stats.norm.sf(excess / sigma))
    else:
        p = 0.0 if excess > 0 else 1.0
    return Test(name, value, err, floor, threshold, p, "floor")


def _two_sided(name: str, value: float, err: float, target: float, margin: float, floor: float | None) -> Test:
    """Two-sided test of H0 "|value - target| <= margin" (p-value of the excess)."""
    excess = abs(value - target) - margin
    p = float(min(1.0, 2.0 * stats.norm.sf(excess / err))) if err > 0 else (0.0 if excess > 0 else 1.0)
    return Test(name, value, err, floor, margin, p, "two_sided")


def _pvalue_test(name: str, stat: float, p: float, floor_p: float | None, alpha: float) -> Test:
    return Test(name, stat, 0.0, floor_p, alpha, p, "pvalue")


def _seeds(seed: int, n: int) -> list[int]:
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


def _seed_of(seed: int, name: str) -> int:
    """Seed of one named computation, independent of the order the tests run in (and of the generated sample)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


def _mode_classifier(train: RealSample | None, n_train: int, iters: int, seed: int) -> Any:
    """Truth-mode classifier (features, log E, |eta|, pdg -> mode) fitted on real train events; None without labels."""
    if train is None or not np.all(train.mode >= 0) or len(np.unique(train.mode)) < 2:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(train.mode), size=min(n_train, len(train.mode)), replace=False)
    clf = HistGradientBoostingClassifier(max_iter=iters, early_stopping=True, random_state=seed)
    return clf.fit(_mode_inputs(train)[idx], train.mode[idx])


def _mode_inputs(s: RealSample | GeneratedSample, rows: np.ndarray | None = None) -> np.ndarray:
    rows = slice(None) if rows is None else rows
    return np.column_stack([s.features[rows], np.log(s.energy[rows]), np.abs(s.eta[rows]), s.pdg[rows]])


def _predict_modes(clf: Any, s: RealSample | GeneratedSample, rows: np.ndarray | None = None) -> np.ndarray:
    """(n,) int64 predicted truth mode of the events ``rows`` of ``s``."""
    return clf.predict(_mode_inputs(s, rows)).astype(np.int64)


def _sub(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n else x[np.sort(rng.choice(len(x), n, replace=False))]


def _lap(t0: float, what: str, timings: dict[str, float]) -> float:
    """Log and record the seconds since ``t0``; return now."""
    now = time.perf_counter()
    timings[what] = now - t0
    log.info("%s: %.1f s", what, now - t0)
    return now


@contextlib.contextmanager
def _quiet_metrics() -> Iterator[None]:
    """Silence the metrics' per-call small-sample warnings (one summary line is logged instead)."""
    mlog = logging.getLogger(M.__name__)
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
) -> tuple[list[Test], dict[str, Any]]:
    """All tests (before Holm) and the data the plots need.

    ``floors`` caches the real-vs-real results by name: they depend only on the real sample, the
    settings and the seed, so validating several generated files against one dataset reuses them.
    ``floors_only``: fill ``floors`` and skip the expensive generated-side computations (their
    tests then carry the floor's value and are meaningless): :func:`run` does this in a second
    process while it streams the generated file.
    """
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

    tests: list[Test] = []
    n = len(real.energy)
    perm = rng.permutation(n)
    half_a, half_b = np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])
    real_bins = binning.index(real.energy, real.eta, real.pdg)
    gen_bins = binning.index(gen.energy, gen.eta, gen.pdg)
    # generated events at the size of half B, drawn with the same bin mix as the real sample
    gen_b = _sub(np.arange(len(gen.energy)), len(half_b), rng)
    t_sec = time.perf_counter()
    info: dict[str, Any] = {"halves": [len(half_a), len(half_b)], "generated_matched": len(gen.energy), "seconds": {}}

    def one_d(prefix: str, ra: np.ndarray, rb: np.ndarray, rfull: np.ndarray, g: np.ndarray, gsub: np.ndarray):
        for j, name in enumerate(real.names):
            edges = np.quantile(rfull[:, j], np.linspace(0, 1, nb + 1))
            key = f"separation/{prefix}/{name}"
            s = _seed_of(seed, key)
            fv, fe = floor(key, M.separation_power, ra[:, j], rb[:, j], bins=edges, n_boot=n_boot, seed=s)
            sv, se = generated((fv, fe), M.separation_power, ra[:, j], gsub[:, j], bins=edges, n_boot=n_boot, seed=s)
            tests.append(_worse_than_floor(key, sv, se, fv, fe, mar["separation"]))
            if np.std(ra[:, j]) > 0:
                key = f"wasserstein/{prefix}/{name}"
                fv, fe = floor(key, M.wasserstein_scaled, ra[:, j], rb[:, j], n_boot=n_boot, seed=s)
                wv, we = generated((fv, fe), M.wasserstein_scaled, ra[:, j], gsub[:, j], n_boot=n_boot, seed=s)
                tests.append(_worse_than_floor(key, wv, we, fv, fe, mar["wasserstein"]))
            # n_boot=0: the p-value decides. ``g`` is capped by gen_cap: with n_gen >> n_real the
            # test's power is set by n_real (effective size n_r n_g / (n_r + n_g)), not by n_gen
            kf = floor(f"ks/{prefix}/{name}", M.ks, ra[:, j], rb[:, j], n_boot=0, seed=s)[0]
            # asymptotic p-value: the exact one costs ms per test for bins with <= 10000 generated events, and
            # the asymptotic law is slightly conservative at these sizes (effective size hundreds or more)
            kv = generated((kf,), M.ks, rfull[:, j], g[:, j], n_boot=0, seed=s, method="asymp")[0]
            tests.append(_pvalue_test(f"ks/{prefix}/{name}", kv["statistic"], kv["pvalue"], kf["pvalue"], alpha))

    def gen_cap(n_real: int) -> int:
        """Generated events in a KS or G-test beside ``n_real`` real ones: the power is set by the
        effective size n_r n_g / (n_r + n_g), already 0.91 n_r at n_g = 10 n_r."""
        return min(sub["gen_test_events"], sub["gen_test_ratio"] * n_real)

    rf, gf = real.features, gen.features
    with _quiet_metrics():
        one_d("all", rf[half_a], rf[half_b], rf, gf[_sub(np.arange(len(gf)), gen_cap(n), rng)], gf[gen_b])
    bins_used = []
    small = [binning.label(b) for b in range(binning.n_bins) if 0 < np.sum(real_bins == b) < M.MIN_EVENTS_1D]
    if small:
        log.warning("%d condition bins have fewer than %d real events (%s...): per-bin tests are indicative; "
                    "their errors include the small size", len(small), M.MIN_EVENTS_1D, small[0])  # fmt: skip
    for b in range(binning.n_bins):
        rb_all = np.flatnonzero(real_bins == b)
        if len(rb_all) < settings["min_bin_events"]:
            continue
        bins_used.append(b)
        ra, rb = np.intersect1d(half_a, rb_all), np.intersect1d(half_b, rb_all)
        g_all = np.flatnonzero(gen_bins == b)
        g_sub = _sub(g_all, len(rb), rng)
        with _quiet_metrics():
            one_d(binning.label(b), rf[ra], rf[rb], rf[rb_all], gf[_sub(g_all, gen_cap(len(rb_all)), rng)], gf[g_sub])
            # diversity at fixed conditions: spread of the generated features inside one condition bin
            key = f"diversity/{binning.label(b)}"
            s = _seed_of(seed, key)
            fv, fe = floor(key, M.diversity_ratio, rf[ra], rf[rb], n_boot=n_boot, seed=s)
            dv, de = generated((fv, fe), M.diversity_ratio, rf[ra], gf[g_sub], n_boot=n_boot, seed=s)
        tests.append(_worse_than_floor(key, dv, de, fv, fe, mar["diversity"], False))
    info["bins_used"] = [binning.label(b) for b in bins_used]

    t_sec = _lap(t_sec, "1-D tests", info["seconds"])
    # conditional response per energy bin and particle (pooling |eta| bins)
    resp: dict[str, Any] = {}
    ne = len(binning.energy_edges_mev) + 1
    ie_r, ie_g = np.digitize(real.energy, binning.energy_edges_mev), np.digitize(gen.energy, binning.energy_edges_mev)
    ratio_r, ratio_g = rf[:, real.names.index("E_ratio")], gf[:, real.names.index("E_ratio")]
    for p in binning.particles:
        for ie in range(ne):
            mr, mg = (ie_r == ie) & (real.pdg == p), (ie_g == ie) & (gen.pdg == p)
            if mr.sum() < settings["min_bin_events"] or mg.sum() < 2:
                continue
            label = f"pdg{p}_Ebin{ie}"
            s = _seed_of(seed, f"response/{label}")
            ma, mb = mr.copy(), mr.copy()
            ma[half_b], mb[half_a] = False, False
            with _quiet_metrics():
                v, e = M.response(ratio_r[mr], ratio_g[mg], n_boot=n_boot, seed=s)
                fv, _ = floor(f"response/{label}", M.response, ratio_r[ma], ratio_r[mb], n_boot=2, seed=s)
            resp[label] = {"pdg": p, "ebin": ie, "energy_gev": float(np.median(real.energy[mr]) / 1000.0),
                           "value": v, "error": e}  # fmt: skip
            tests.append(_two_sided(f"response_mean/{label}", v["mean_shift"], e["mean_shift"], 0.0,
                                    mar["response_mean"], fv["mean_shift"]))  # fmt: skip
            tests.append(_two_sided(f"resolution/{label}", v["resolution_ratio"], e["resolution_ratio"], 1.0,
                                    mar["resolution"], fv["resolution_ratio"]))  # fmt: skip
    info["response"] = resp

    t_sec = _lap(t_sec, "response", info["seconds"])
    # multivariate distances on the standardised features (metrics standardise with the real sample)
    nf = min(sub["fpd_events"], len(half_a), len(half_b))
    fpd_kw = {"min_samples": max(nf // 4, 10), "max_samples": nf, "num_points": 5, "num_batches": 10}
    s = _seed_of(seed, "fpd")
    # generated value from the same sample sizes as the floor (half A vs |B| generated events): the
    # extrapolation removes the resampling bias, not the finite-sample distance between two samples
    fv = floor("fpd", M.fpd, rf[half_a], rf[half_b], seed=s, **fpd_kw)
    gv = generated(fv, M.fpd, rf[half_a], gf[gen_b], seed=s, **fpd_kw)
    tests.append(_worse_than_floor("fpd", gv[0], gv[1], fv[0], fv[1], mar["fpd"]))
    # at most half of each sample per batch: batches of the whole sample would all be the same
    # events, and their spread (the KPD error) zero
    kb = max(2, min(sub["kpd_batch_size"], len(half_a) // 2, len(half_b) // 2))
    s = _seed_of(seed, "kpd")
    fv = floor("kpd", M.kpd, rf[half_a], rf[half_b], num_batches=sub["kpd_batches"], batch_size=kb, seed=s)
    gv = generated(fv, M.kpd, rf[half_a], gf[gen_b], num_batches=sub["kpd_batches"], batch_size=kb, seed=s)
    tests.append(_worse_than_floor("kpd", gv[0], gv[1], fv[0], fv[1], mar["kpd"]))

    t_sec = _lap(t_sec, "FPD/KPD", info["seconds"])
    # classifier two-sample tests at the floor's sample sizes
    ncl = min(sub["classifier_events"], len(half_a), len(half_b))
    kw = {"max_events": ncl, "max_iter": sub["classifier_iterations"], "n_boot": n_boot,
          "seed": _seed_of(seed, "classifier_auc")}  # fmt: skip
    fv = floor("classifier_auc/features", M.classifier_auc, rf[half_a], rf[half_b], **kw)
    gv = generated(fv, M.classifier_auc, rf[half_a], gf[gen_b], **kw)
    tests.append(_worse_than_floor("classifier_auc/features", gv[0], gv[1], fv[0], fv[1], mar["auc"]))
    nv = min(sub["voxel_classifier_events"], len(half_a), len(half_b), len(gen.voxels))
    kw["max_events"] = nv
    va, vb = real.showers[half_a], real.showers[half_b]
    fv = floor(f"classifier_auc/voxels@{nv}", M.classifier_auc, va, vb, **kw)
    gv = generated(fv, M.classifier_auc, va, gen.voxels, **kw)
    tests.append(_worse_than_floor("classifier_auc/voxels", gv[0], gv[1], fv[0], fv[1], mar["auc"]))

    t_sec = _lap(t_sec, "classifier AUCs", info["seconds"])
    # PRDC at equal sizes
    npr = min(sub["prdc_events"], len(half_a), len(half_b))
    s = _seed_of(seed, "prdc")
    fv = floor("prdc", M.prdc, rf[half_a], rf[half_b], k=sub["prdc_k"], max_events=npr, seed=s)
    gv = generated(fv, M.prdc, rf[half_a], gf[gen_b], k=sub["prdc_k"], max_events=npr, seed=s)
    for key in ("precision", "recall", "density", "coverage"):
        tests.append(_worse_than_floor(f"prdc/{key}", gv[0][key], gv[1][key], fv[0][key], fv[1][key], mar["prdc"],
                                       False))  # fmt: skip
    s = _seed_of(seed, "diversity/all")
    fv = floor("diversity/all", M.diversity_ratio, rf[half_a], rf[half_b], n_boot=n_boot, seed=s)
    dv = generated(fv, M.diversity_ratio, rf[half_a], gf[gen_b], n_boot=n_boot, seed=s)
    tests.append(_worse_than_floor("diversity/all", dv[0], dv[1], fv[0], fv[1], mar["diversity"], False))

    t_sec = _lap(t_sec, "PRDC/diversity", info["seconds"])
    # mode coverage
    clf = floor("mode_classifier", _mode_classifier, train, sub["mode_classifier_events"],
                sub["classifier_iterations"], _seed_of(seed, "mode_classifier"))  # fmt: skip
    # generated events capped like the KS tests: the G-test's power is set by the real counts
    g_mode = _sub(np.arange(len(gen.energy)), gen_cap(n), rng)
    if clf is None:
        labels = None
    else:
        lr = floor("mode_labels/real", _predict_modes, clf, real)
        labels = (lr, generated(lr[: len(g_mode)], _predict_modes, clf, gen, g_mode))
    n_modes = max(len(real.mode_names), 1)
    modes: dict[str, Any] = {"names": real.mode_names, "bins": {}}
    if labels is not None:
        lr, lg = labels
        n_modes = max(n_modes, int(max(lr.max(), lg.max())) + 1)
        for b in [None, *bins_used]:
            mr = np.ones(n, bool) if b is None else real_bins == b
            mg = np.ones(len(lg), bool) if b is None else gen_bins[g_mode] == b
            v, _ = M.mode_fraction_test(lr[mr], lg[mg], n_modes)
            ma, mb = mr.copy(), mr.copy()
            ma[half_b], mb[half_a] = False, False
            label = "all" if b is None else binning.label(b)
            fv, _ = floor(f"mode_fraction/{label}", M.mode_fraction_test, lr[ma], lr[mb], n_modes)
            tests.append(_pvalue_test(f"mode_fraction/{label}", v["statistic"], v["pvalue"], fv["pvalue"], alpha))
            modes["bins"][label] = {"real": np.bincount(lr[mr], minlength=n_modes).tolist(),
                                    "gen": np.bincount(lg[mg], minlength=n_modes).tolist(),
                                    "ebin": None if b is None else binning.energy_bin(b),
                                    "etabin": None if b is None else binning.eta_bin(b),
                                    "pdg": None if b is None else binning.particle(b)}  # fmt: skip
        modes["method"] = "truth-mode classifier (HistGradientBoosting on train-split features)"
    else:
        s = _seed_of(seed, "cluster_occupancy")
        fv, _ = floor("cluster_occupancy", M.cluster_occupancy, rf[half_a], rf[half_b], k=sub["clusters"],
                      seed=s)  # fmt: skip
        v, _ = generated((fv, None), M.cluster_occupancy, rf, gf, k=sub["clusters"], seed=s)
        tests.append(_pvalue_test("cluster_occupancy/all", v["statistic"], v["pvalue"], fv["pvalue"], alpha))
        modes["method"] = "k-means occupancy (no truth modes in the test split)"
    t_sec = _lap(t_sec, "mode coverage", info["seconds"])
    info["modes"] = modes
    info["subsample"] = {"fpd_max_events": nf, "kpd_batch_size": kb, "kpd_batches": sub["kpd_batches"],
                         "classifier_events_per_class": ncl, "voxel_classifier_events_per_class": nv,
                         "prdc_events": npr, "floor_half_sizes": [len(half_a), len(half_b)],
                         "generated_at_floor_size": len(gen_b), "gen_test_events": sub["gen_test_events"],
                         "gen_test_ratio": sub["gen_test_ratio"],
                         "n_boot": n_boot, "mode_classifier_events": sub["mode_classifier_events"],
                         "clusters": sub["clusters"]}  # fmt: skip
    return tests, info


def _floors(real: RealSample, train: RealSample | None, binning: Binning, settings: dict[str, Any],
            seed: int) -> dict[str, Any]:  # fmt: skip
    """Every real-vs-real floor of :func:`evaluate` (run in the second process)."""
    n_vox = min(settings["subsample"]["voxel_classifier_events"], len(real.showers))
    # the real sample stands in for the generated one; evaluate(floors_only=True) skips its metrics
    stand_in = GeneratedSample(real.features, real.energy, real.eta, real.pdg, real.showers[:n_vox], len(real.energy),
                               0, 0.0, None, 0.0)  # fmt: skip
    floors: dict[str, Any] = {}
    with threadpool_limits(limits=settings["sklearn_threads"]), _quiet_metrics():
        evaluate(real, stand_in, train, binning, settings, seed, floors, floors_only=True)
    return floors


def _start_floors(
    real: RealSample, train: RealSample | None, binning: Binning, settings: dict[str, Any], seed: int
) -> tuple[cf.ProcessPoolExecutor, cf.Future]:
    """:func:`_floors` in a fresh ("spawn": no forked locks or OpenMP state) process; its results are
    the same numbers the serial path computes (same seeds, same thread limits)."""
    pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    return pool, pool.submit(_floors, real, train, binning, settings, seed)


def _start_readers(workers: int) -> cf.ProcessPoolExecutor:
    """``workers`` fresh ("spawn") processes for :func:`surrogate.stream.run_task`, one BLAS/OpenMP
    thread each, asked to start now (a worker imports numpy and h5py in about 0.2 s)."""
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=S.init_worker)  # fmt: skip
    for _ in range(workers):
        pool.submit(S.warm_up)
    return pool


def apply_holm(tests: list[Test], alpha: float) -> None:
    """Fill in Holm-adjusted p-values and pass flags (in place)."""
    if not tests:
        return
    adj = M.holm(np.clip([t.pvalue for t in tests], 0.0, 1.0))
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


def run(
    cfg: dict[str, Any],
    dataset: str | Path,
    generated: str | Path,
    out: str | Path,
    history: str | Path | None = None,
    threads: int | None = None,
    plots: bool = True,
    reuse: dict[Any, Any] | None = None,
) -> dict[str, Any]:
    """Validate ``generated`` against the test split of ``dataset``; write the outputs in ``out``.

    With ``validate.floor_process`` a second process is started the "spawn" way, which imports the
    calling script again: call ``run`` from a script under ``if __name__ == "__main__":`` (if the
    second process fails, the floors are computed in this one, with the same results, only slower).

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
    s_split, s_match, s_eval = _seeds(seed, 3)
    try:
        stat = Path(dataset).stat()
    except OSError as exc:
        raise ValidateError(f"{dataset}: cannot read the dataset ({exc})") from exc
    settings_json = json.dumps(settings, sort_keys=True)
    identity = (str(Path(dataset).resolve()), stat.st_size, stat.st_mtime_ns, seed, settings_json)
    state = {} if reuse is None else reuse.setdefault(identity, {})
    if "real" not in state:
        state["real"] = load_real(dataset, "test")
    real = state["real"]
    log.info("real test split: %d events, %d features", len(real.energy), len(real.names))
    particles = tuple(int(p) for p in np.unique(real.pdg))
    binning = Binning(
        np.asarray(settings["energy_edges_gev"], float) * 1000.0, np.asarray(settings["eta_edges"], float), particles
    )
    real_bins = binning.index(real.energy, real.eta, real.pdg)
    if "train" not in state:
        state["train"] = None
        if np.all(real.mode >= 0):
            state["train"] = load_real(dataset, "train", max_rows=settings["subsample"]["mode_classifier_events"])
    train = state["train"]
    floors = state.setdefault("floors", {})
    # The real-vs-real floors need only the real samples: a second process computes them while
    # this one reads the generated file (it holds the GIL while HDF5 decompresses).
    helper = _start_floors(real, train, binning, settings, s_eval) if settings["floor_process"] and not floors else None
    # reader processes for the generated file; they start while its conditions are read and matched
    readers = _start_readers(threads) if threads > 1 else None
    try:
        gen_kw = {"cap": settings["max_generated_events"], "chunk_events": settings["chunk_events"],
                  "voxel_events": settings["subsample"]["voxel_classifier_events"]}  # fmt: skip
        try:
            gen = load_generated(generated, real.geometry, real.names, binning, real_bins, **gen_kw,
                                 rng=np.random.default_rng(s_match), pool=readers, workers=threads)  # fmt: skip
        except BrokenProcessPool as exc:  # a reader process died (killed, out of memory): read here instead
            log.warning("a reader process failed (%s); reading %s in this process", exc, generated)
            readers.shutdown(wait=False, cancel_futures=True)
            readers = None
            gen = load_generated(generated, real.geometry, real.names, binning, real_bins, **gen_kw,
                                 rng=np.random.default_rng(s_match))  # fmt: skip
        finally:
            if readers is not None:
                readers.shutdown(wait=True, cancel_futures=True)
        log.info("generated: %d events in file, %d matched to the real conditions", gen.rows_in_file, len(gen.energy))
        pages = None
        if helper is not None:
            t0 = time.perf_counter()
            try:
                floors.update(helper[1].result())
                log.info("real-vs-real floors from the second process (waited %.1f s)", time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - any failure there only costs time: the floors are computed here
                log.warning("the second process failed (%s: %s); computing the floors in this one",
                            type(exc).__name__, exc)  # fmt: skip
                helper[0].shutdown(wait=False, cancel_futures=True)
                helper = None
        if helper is not None:
            if plots:  # the feature histograms need only the features: drawn there while the tests run here
                from surrogate import plots as P

                pages = helper[0].submit(P.feature_histograms, out / "plots", real.features,
                                         P.histogram_sample(gen.features, settings["subsample"]["gen_test_events"]),
                                         real.names, settings["hist_bins"])  # fmt: skip
        # OpenMP (HistGradientBoosting, k-means) gets its own thread count: spinning OpenMP workers on
        # shared, oversubscribed cores made the classifier fits 4x slower with 2 threads than with 1.
        with threadpool_limits(limits=settings["sklearn_threads"]):
            tests, info = evaluate(real, gen, train, binning, settings, s_eval, floors)
        histograms = None if pages is None else pages.result()
    finally:
        if helper is not None:
            helper[0].shutdown(wait=True, cancel_futures=True)
    apply_holm(tests, settings["alpha"])
    verdict = "PASS" if all(t.passed for t in tests) else "FAIL"
    failed = [t.name for t in tests if not t.passed]
    summary = {
        "verdict": verdict,
        "alpha": settings["alpha"],
        "n_tests": len(tests),
        "n_failed": len(failed),
        "failed": failed,
        "real_events": len(real.energy),
        "generated_events_in_file": gen.rows_in_file,
        "generated_events_matched": len(gen.energy),
        "generated_events_unknown_particle": gen.rows_dropped_unmatched,
        "reader_processes": gen.reader_processes,
        "subsample": info["subsample"],
        "bins_used": info["bins_used"],
        "mode_method": info["modes"]["method"],
        "seconds": {"total": None, "read_generated": gen.read_seconds, "features_generated": gen.feature_seconds,
                    "stream_generated": gen.stream_seconds, **info["seconds"]},  # fmt: skip
        "metrics": [t.as_dict() for t in tests],
    }
    plot_paths: list[Path] = []
    if plots:
        from surrogate import plots as P

        t0 = time.perf_counter()
        plot_paths = P.make_all(out / "plots", real, gen, info, binning, settings["hist_bins"], history,
                                settings["subsample"]["gen_test_events"], histograms)  # fmt: skip
        summary["seconds"]["plots"] = time.perf_counter() - t0
    summary["seconds"]["total"] = time.perf_counter() - t_start
    dump_config(cfg, out / "config.yaml")  # the resolved configuration beside the outputs
    write_json(out / "summary.json", summary)
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(_html(summary, plot_paths))
    log.info("verdict %s: %d of %d tests failed%s", verdict, len(failed), len(tests),
             f" (first: {', '.join(failed[:5])})" if failed else "")  # fmt: skip
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exit 0 unless the input is unusable or (with fail_pipeline) the verdict is FAIL."""
    parser = stage_parser("python -m surrogate.validate", "Validate generated showers against the test split.")
    parser.add_argument("--dataset", required=True, help="ingest output HDF5 (its 'test' group is the reference)")
    parser.add_argument("--generated", required=True, help="generated events HDF5 (generate stage output)")
    parser.add_argument("--out", required=True, help="output folder (summary.json, report.html, plots/)")
    parser.add_argument("--history", default=None, help="training history.jsonl for the training-curve plot")
    parser.add_argument("--threads", type=int, default=None,
                        help="reader processes for the generated file (default: validate.threads)")
    args, cfg = parse_stage_args(parser, argv)
    history = args.history if args.history and Path(args.history).exists() else None
    try:
        summary = run(cfg, args.dataset, args.generated, args.out, history=history, threads=args.threads)
    except (ValidateError, M.MetricError, FeaturesError) as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    if summary["verdict"] == "FAIL" and cfg["validate"]["fail_pipeline"]:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
