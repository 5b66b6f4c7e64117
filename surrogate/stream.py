"""Streaming a generated file for the validate stage, here or in worker processes.

The generated showers are read in HDF5-chunk-aligned blocks. Every row of every block is checked
(finite, non-negative energies); every condition-matched row gives its deposited energy E_dep
(for the response test, which uses all of them); the rows of the feature subsample (a random,
condition-matched subset: the distribution tests' power is set by the real sample, see
``validate.subsample.gen_test_ratio``) become high-level features; the rows of a smaller voxel
subsample are kept as they are. Features cost 4 us per event and reading 8 us; checking and
summing every row 0.7 us.

:func:`plan` cuts the file into :class:`Task` s of consecutive blocks; :func:`run_task` does one
task and returns its slice of the outputs, so the tasks can run in this process or, as
:func:`surrogate.validate.run` does with ``validate.threads > 1``, in worker processes.

Processes, not threads: h5py holds the GIL while HDF5 reads and decompresses a block, so a
reading thread and a feature thread take turns rather than overlap (measured on 1M events: 12.4 s
for the two threads against 8.5 s for one doing both); worker processes overlap them and also
decompress in parallel. This module imports only numpy, h5py and the feature code, so that a
worker starts in a fraction of a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from threadpoolctl import threadpool_limits

from surrogate.features import FeaturesError, check_showers, compute_features
from surrogate.geometry import Geometry

__all__ = ["Task", "TaskResult", "plan", "features", "run_task"]

# Rows per compute_features call: its (rows, V) float64 copy then stays in the L2 cache. Measured on
# this project's machines (one thread, 533 voxels): 512 rows 2.2 s per 1M events, 1024 rows 2.1-2.3 s,
# 2048 rows 2.2-2.6 s, 4096 rows 3.1 s.
FEATURE_ROWS = 1024


def feature_rows(n_voxels: int) -> int:
    """Rows per compute_features call: :data:`FEATURE_ROWS` up to 1024 voxels, fewer above, so the float64
    copy stays about the same size (measured, one thread: at 6,480 voxels 200 us per event with 1024 rows,
    60 with 64-256; at 40,500 voxels 1640 us with 1024 rows, 300 with 32)."""
    return FEATURE_ROWS if n_voxels <= 1024 else max(16, FEATURE_ROWS * 1024 // int(n_voxels))


@dataclass(frozen=True)
class Task:
    """Blocks ``[lo, hi)`` of consecutive file rows, with the matched rows inside them.

    ``rows``: sorted matched file rows in the blocks, which are positions ``first ..
    first + len(rows) - 1`` of the matched sample; ``energy``: their incident energies (MeV);
    ``feat`` and ``vox``: positions (into the matched sample, sorted) whose features are computed
    and whose voxels are kept.
    """

    blocks: tuple[tuple[int, int], ...]
    rows: np.ndarray
    first: int
    energy: np.ndarray
    feat: np.ndarray
    vox: np.ndarray

    @property
    def n_file_rows(self) -> int:
        return self.blocks[-1][1] - self.blocks[0][0]


@dataclass
class TaskResult:
    e_dep: np.ndarray  # (len(task.rows),) float64 MeV
    features: np.ndarray  # (len(task.feat), F) float64
    voxels: np.ndarray  # (len(task.vox), V) float32
    read_seconds: float
    feature_seconds: float


def features(showers: np.ndarray, energy: np.ndarray, geometry: Geometry, names: list[str]) -> np.ndarray:
    """(N, F) float64 feature matrix, columns in ``names`` order, computed :func:`feature_rows` rows at a time.

    With one BLAS thread, always: a multi-threaded matrix product sums in another order, so the
    features (and every metric after them) would change in the last digits with the core count.
    """
    out = np.empty((len(showers), len(names)), dtype=np.float64)
    with threadpool_limits(limits=1, user_api="blas"):
        step = feature_rows(geometry.n_voxels)
        for lo in range(0, len(showers), step):
            feats = compute_features(showers[lo : lo + step], energy[lo : lo + step], geometry)
            for j, n in enumerate(names):
                out[lo : lo + step, j] = feats[n]
    return out


def plan(
    n: int,
    step: int,
    rows: np.ndarray,
    energy: np.ndarray,
    feat_pos: np.ndarray,
    vox_pos: np.ndarray,
    task_blocks: int,
) -> list[Task]:
    """Tasks of ``task_blocks`` blocks of ``step`` rows each over a file of ``n`` rows.

    ``rows``: sorted matched file rows; ``energy``: the file's incident energies (all rows);
    ``feat_pos``, ``vox_pos``: sorted positions into ``rows`` of the feature and voxel subsamples.
    """
    tasks = []
    span = step * max(1, task_blocks)
    for lo in range(0, n, span):
        hi = min(n, lo + span)
        a, b = (int(i) for i in np.searchsorted(rows, [lo, hi]))
        fa, fb = np.searchsorted(feat_pos, [a, b])
        va, vb = np.searchsorted(vox_pos, [a, b])
        blocks = tuple((s, min(hi, s + step)) for s in range(lo, hi, step))
        tasks.append(Task(blocks, rows[a:b], a, energy[rows[a:b]], feat_pos[fa:fb], vox_pos[va:vb]))
    return tasks


def run_task(path: str | Path, geometry: Geometry | dict[str, Any], names: list[str], task: Task) -> TaskResult:
    """Read the task's blocks of ``showers``; return the matched rows' E_dep, the feature rows'
    features and the voxel rows' showers.

    Bad shower values, in any row of a block, raise :class:`FeaturesError` naming the file and
    the block's rows (picklable, so a worker process reports it as it is).
    """
    if isinstance(geometry, dict):
        geometry = Geometry.from_dict(geometry)
    e_dep = np.empty(len(task.rows), dtype=np.float64)
    feats = np.empty((len(task.feat), len(names)), dtype=np.float64)
    voxels = np.empty((len(task.vox), geometry.n_voxels), dtype=np.float32)
    t_read = t_feat = 0.0
    with h5py.File(path, "r") as f:
        showers = f["showers"]
        # one buffer for every block: 7% less time than a new array per block (no fresh pages to fault in)
        buffer = np.empty((max(hi - lo for lo, hi in task.blocks), showers.shape[1]), dtype=showers.dtype)
        for lo, hi in task.blocks:
            t0 = time.perf_counter()
            block = buffer[: hi - lo]
            showers.read_direct(block, np.s_[lo:hi], np.s_[0 : hi - lo])
            t1 = time.perf_counter()
            try:
                sums = check_showers(block)
            except ValueError as exc:
                raise FeaturesError(f"{path}: 'showers' rows {lo}..{hi - 1}: {exc}") from exc
            a, b = np.searchsorted(task.rows, [lo, hi])
            e_dep[a:b] = sums[task.rows[a:b] - lo]
            for pos, out, fill in ((task.feat, feats, True), (task.vox, voxels, False)):
                pa, pb = np.searchsorted(pos, [task.first + a, task.first + b])
                if pb == pa:
                    continue
                sel = task.rows[pos[pa:pb] - task.first]  # file rows
                if fill:
                    out[pa:pb] = features(block[sel - lo], task.energy[pos[pa:pb] - task.first], geometry, names)
                else:
                    out[pa:pb] = block[sel - lo]
            t_read += t1 - t0
            t_feat += time.perf_counter() - t1
    return TaskResult(e_dep, feats, voxels, t_read, t_feat)
