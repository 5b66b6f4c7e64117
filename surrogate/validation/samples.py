"""The two samples of the validate stage: the real test split in memory, and the generated file
matched to its conditions and streamed (here or in reader processes, :mod:`surrogate.stream`)."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from surrogate import stream as S
from surrogate.features import FeaturesError, feature_names
from surrogate.geometry import Geometry
from surrogate.io import ProgressBar
from surrogate.validation.binning import Binning

__all__ = [
    "ValidateError",
    "RealSample",
    "GeneratedSample",
    "GeneratedStream",
    "load_real",
    "load_splits",
    "condition_info",
    "match_rows",
    "load_generated",
]

log = logging.getLogger(__name__)


class ValidateError(ValueError):
    """Input the validate stage cannot use (missing dataset, mismatched geometry, no overlap)."""


@dataclass
class RealSample:
    """Test split in memory: features (N, F), conditions, truth modes, voxel showers (N, V) MeV.

    A streamed split (``memory_gb``) keeps the showers of only some rows, ``shower_rows`` (sorted),
    and the sha256 of all of them, ``showers_sha256``; :meth:`voxels_of` serves both kinds.
    """

    features: np.ndarray
    energy: np.ndarray  # (N,) MeV
    eta: np.ndarray  # (N,)
    pdg: np.ndarray  # (N,) int
    mode: np.ndarray  # (N,) int, -1 when unknown
    showers: np.ndarray  # (N, V) float32 MeV; streamed: (len(shower_rows), V)
    mode_names: list[str]
    geometry: Geometry
    names: list[str]
    shower_rows: np.ndarray | None = None  # streamed: the rows whose showers are kept; None: every row
    showers_sha256: bytes | None = None  # streamed: sha256 of every row's showers, in row order

    def _kept(self, rows: np.ndarray) -> np.ndarray:
        """Positions in ``showers`` of those of ``rows`` (sorted) whose showers are kept."""
        if self.shower_rows is None:
            return rows
        pos = np.searchsorted(self.shower_rows, rows)
        pos = np.minimum(pos, max(len(self.shower_rows) - 1, 0))
        return pos[self.shower_rows[pos] == rows] if len(self.shower_rows) else pos[:0]

    def voxels_of(self, rows: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """Showers (n, V) of ``rows`` (sorted sample rows; streamed: those of them that are kept), all
        voxels or ``columns``."""
        pos = self._kept(rows)
        return self.showers[pos] if columns is None else self.showers[np.ix_(pos, columns)]

    def n_voxel_rows(self, rows: np.ndarray) -> int:
        """How many of ``rows`` have their showers kept (all of them unless streamed)."""
        return len(self._kept(rows))


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


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ValidateError(f"{path}: cannot open as HDF5 ({exc})") from exc


def load_real(
    path: str | Path,
    group: str = "test",
    max_rows: int | None = None,
    *,
    stream: bool = False,
    voxel_rows: int = 0,
    seed: int = 0,
    block_rows: int = 0,
) -> RealSample:
    """Load one split of the ingest file and compute its features (float64 (N, F)).

    ``stream``: read it ``block_rows`` rows at a time (a multiple of :func:`surrogate.stream.feature_rows`,
    so the features are the same), keeping the showers of ``voxel_rows`` rows drawn by ``seed``
    (what the voxel classifier uses) and the sha256 of all of them.
    """
    path = Path(path)
    with _open(path) as f:
        if group not in f:
            raise ValidateError(f"{path}: no group {group!r} (expected the ingest output with train/val/test)")
        try:
            geometry = Geometry.from_dict(json.loads(f.attrs["geometry"]))
            mode_names = json.loads(f.attrs.get("mode_names", "[]"))
        except (KeyError, ValueError) as exc:
            raise ValidateError(f"{path}: bad or missing root attribute ({exc})") from exc
        g = f[group]
        sl = slice(0, max_rows)
        if "showers" not in g:
            raise ValidateError(f"{path}: no dataset '{group}/showers'")
        n = len(g["showers"]) if max_rows is None else min(len(g["showers"]), max_rows)
        energy = _read(g, path, "incident_energies")[sl].reshape(-1)
        eta = _read(g, path, "incident_eta", False)
        pdg = _read(g, path, "incident_pdg", False)
        mode = _read(g, path, "mode", False)
        if len(energy) != n:
            raise ValidateError(f"{path}: '{group}/showers' has {n} rows but incident_energies has {len(energy)}")
        names = feature_names(geometry)
        kept, digest = None, None
        if not stream:
            showers = g["showers"][sl]
            features = S.features(showers, energy, geometry, names)
        else:
            kept, showers, features, digest = _stream_split(
                g["showers"], n, energy, geometry, names, voxel_rows, seed, block_rows
            )
    eta = np.zeros(n) if eta is None else eta[sl].reshape(-1)
    pdg = np.zeros(n, dtype=np.int64) if pdg is None else pdg[sl].reshape(-1).astype(np.int64)
    mode = np.full(n, -1, dtype=np.int64) if mode is None else mode[sl].astype(np.int64)
    return RealSample(
        features,
        energy.astype(np.float64),
        eta.astype(np.float64),
        pdg,
        mode,
        showers,
        mode_names,
        geometry,
        names,
        kept,
        digest,
    )


def condition_info(path: str | Path) -> dict[str, Any]:
    """The ingest file's ``condition_info`` attribute (conditions carried, particle name, discrete energies),
    {} for a file written without it."""
    with _open(Path(path)) as f:
        raw = f.attrs.get("condition_info")
    try:
        return {} if raw is None else dict(json.loads(raw))
    except (TypeError, ValueError) as exc:
        raise ValidateError(f"{path}: bad root attribute 'condition_info' ({exc})") from exc


def _stream_split(
    ds: h5py.Dataset,
    n: int,
    energy: np.ndarray,
    geometry: Geometry,
    names: list[str],
    voxel_rows: int,
    seed: int,
    block_rows: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bytes]:
    """(kept rows, their showers, every row's features, sha256 of every row's showers) of ``ds[:n]``, read
    ``block_rows`` at a time."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7E57, n]))
    kept = np.sort(rng.choice(n, size=min(int(voxel_rows), n), replace=False))
    showers = np.empty((len(kept), ds.shape[1]), dtype=np.float32)
    features = np.empty((n, len(names)), dtype=np.float64)
    digest = hashlib.sha256()
    rows = S.feature_rows(geometry.n_voxels)
    step = max(rows, block_rows // rows * rows)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        block = ds[lo:hi]
        digest.update(np.ascontiguousarray(block, dtype=np.float32).tobytes())
        features[lo:hi] = S.features(block, energy[lo:hi], geometry, names)
        a, b = np.searchsorted(kept, [lo, hi])
        showers[a:b] = block[kept[a:b] - lo]
    return kept, showers, features, digest.digest()


def load_splits(
    dataset: str | Path, settings: dict[str, Any], split: str = "test", budget: int | None = None, seed: int = 0
) -> tuple[RealSample, RealSample | None, Binning]:
    """The reference split (``test``, or a held-out one: ``unseen``, ``extrapolation``), the train
    events of the mode classifier (None without truth modes), the condition bins (by the discrete
    energies ingest found, if any: :meth:`Binning.from_settings`).

    ``budget`` (bytes, ``memory_gb``): when holding the splits whole would exceed it
    (:func:`surrogate.memory.validate_bytes`) they are streamed, keeping the showers of three times
    ``subsample.voxel_classifier_events`` reference rows (drawn by ``seed``) and none of the train rows.
    """
    from surrogate import memory

    sub = settings["subsample"]
    with _open(Path(dataset)) as f:
        if split not in f or "showers" not in f[split]:
            raise ValidateError(f"{dataset}: no dataset '{split}/showers' (expected the ingest output)")
        n_real, n_voxels = f[split]["showers"].shape
        n_train = min(f["train"]["showers"].shape[0], sub["mode_classifier_events"]) if "train" in f else 0
    need = memory.validate_bytes(n_real, n_train, n_voxels)
    stream = budget is not None and need > budget
    kw = {}
    if stream:
        block = budget // 64 // (4 * n_voxels)  # rows read at a time (rounded up to whole feature calls)
        kw = {"stream": True, "seed": seed, "block_rows": block}
        log.info(
            "real splits streamed: %.2f GB whole against memory_gb %.2f GB", need / memory.GIB, budget / memory.GIB
        )
    real = load_real(dataset, split, voxel_rows=3 * sub["voxel_classifier_events"], **kw)
    log.info("real %s split: %d events, %d features", split, len(real.energy), len(real.names))
    train = None
    if np.all(real.mode >= 0):
        train = load_real(dataset, "train", max_rows=sub["mode_classifier_events"], **kw)
    particles = tuple(int(p) for p in np.unique(real.pdg))
    binning = Binning.from_settings(settings, particles, condition_info(dataset))
    if binning.energies_mev is not None:
        log.info("incident energies discrete: one energy bin each (%d)", len(binning.energies_mev))
    return real, train, binning


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


def _read_conditions(path: Path, n_voxels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The generated file's energies (MeV), eta and pdg, checked, and the showers' HDF5 chunk rows."""
    with _open(path) as f:
        showers = f.get("showers")
        if not isinstance(showers, h5py.Dataset):
            raise ValidateError(f"{path}: no dataset 'showers'")
        n = showers.shape[0]
        if showers.ndim != 2 or showers.shape[1] != n_voxels:
            raise ValidateError(f"{path}: 'showers' has shape {showers.shape}, expected (N, {n_voxels})")
        energy = _read(f, path, "incident_energies").reshape(-1).astype(np.float64)
        eta = _read(f, path, "incident_eta", False)
        pdg = _read(f, path, "incident_pdg", False)
        chunk = showers.chunks[0] if showers.chunks else _source_chunk_rows(path, showers)
    eta = np.zeros(n) if eta is None else eta.reshape(-1).astype(np.float64)
    pdg = np.zeros(n, dtype=np.int64) if pdg is None else pdg.reshape(-1).astype(np.int64)
    for name, arr in (("incident_energies", energy), ("incident_eta", eta), ("incident_pdg", pdg)):
        if len(arr) != n:
            raise ValidateError(f"{path}: 'showers' has {n} rows but {name!r} has {len(arr)}")
    bad = np.flatnonzero(~np.isfinite(energy) | (energy <= 0))
    if len(bad):
        raise ValidateError(
            f"{path}: 'incident_energies' row {bad[0]} is {float(energy[bad[0]])!r}; it must be finite and > 0 MeV"
        )
    return energy, eta, pdg, chunk


def _source_chunk_rows(path: Path, showers: h5py.Dataset) -> int:
    """HDF5 chunk rows of a virtual dataset's first source (the generate stage's joined shards), else 1.

    Blocks are read in multiples of it: a block that ends inside a compressed chunk makes the next block
    decompress that chunk again (with blocks smaller than a chunk, every block does: 20x slower)."""
    if not showers.is_virtual:
        return 1
    source = showers.virtual_sources()[0]
    name = Path(source.file_name)
    try:
        with h5py.File(name if name.is_absolute() else path.parent / name, "r") as f:
            chunks = f[source.dset_name].chunks
    except (OSError, KeyError):
        return 1
    return int(chunks[0]) if chunks else 1


class GeneratedStream:
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
        energy, eta, pdg, chunk = _read_conditions(self.path, geometry.n_voxels)
        n = len(energy)
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
        self.futures = {}
        if pool is not None:
            self.futures = {
                pool.submit(S.run_task, str(self.path), geometry.to_dict(), names, t): t for t in self.tasks
            }

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
        return GeneratedSample(
            feats,
            self.energy[fp],
            self.eta[fp],
            self.pdg[fp],
            voxels,
            self.energy,
            self.pdg,
            e_dep / self.energy,
            fp,
            self.n,
            self.unmatched,
            t_read,
            t_feat,
            time.perf_counter() - self.t0,
            self.workers,
            modes,
        )


def load_generated(*args: Any, labeller: Callable[..., np.ndarray] | None = None, **kwargs: Any) -> GeneratedSample:
    """Read conditions, match them to the real bins, stream the matched showers: :class:`GeneratedStream`'s
    arguments, then :meth:`GeneratedStream.collect` with ``labeller``.

    With a ``pool`` of ``workers`` processes the file's blocks are read and turned into features
    there (:mod:`surrogate.stream`); the results are the same as in this process, bit for bit.
    """
    return GeneratedStream(*args, **kwargs).collect(labeller)
