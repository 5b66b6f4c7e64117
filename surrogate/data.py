"""Rows of ``dataset.h5`` without holding a split: chunk-aligned reads and the shuffled-chunk reader.

A compressed HDF5 chunk is decompressed whole by any read that touches it, so reading rows at
random costs a chunk per row (about 100 times slower than reading the same bytes in chunk order).
Everything here reads whole chunks: :func:`read_rows` the chosen rows of a split (chunk by chunk,
keeping only those rows), :func:`read_chunks` whole chunks, and :class:`ShuffledChunks` serves the
train split to the training loop in a random but reproducible order, one window of chunks at a time.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

__all__ = ["chunk_rows", "read_rows", "read_chunks", "ShuffledChunks"]

log = logging.getLogger(__name__)


def chunk_rows(ds: h5py.Dataset) -> int:
    """Rows per HDF5 chunk of ``ds`` (contiguous datasets: 1024, a read unit of no consequence)."""
    return int(ds.chunks[0]) if ds.chunks else 1024


def read_rows(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """``ds[rows]`` for sorted, unique ``rows``, read a whole chunk at a time (one chunk held besides the result)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), *ds.shape[1:]), dtype=ds.dtype)
    step = chunk_rows(ds)
    chunk_of = rows // step
    for k in np.unique(chunk_of):
        a, b = np.searchsorted(chunk_of, [k, k + 1])
        lo = int(k) * step
        block = ds[lo : min(lo + step, ds.shape[0])]
        out[a:b] = block[rows[a:b] - lo]
    return out


def read_chunks(ds: h5py.Dataset, chunks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, ds[rows]) of whole chunks ``chunks`` (read in ascending order; rows sorted)."""
    step = chunk_rows(ds)
    spans = [(int(k) * step, min((int(k) + 1) * step, ds.shape[0])) for k in sorted(chunks)]
    rows = np.concatenate([np.arange(lo, hi) for lo, hi in spans]) if spans else np.zeros(0, np.int64)
    out = np.empty((len(rows), *ds.shape[1:]), dtype=ds.dtype)
    at = 0
    for lo, hi in spans:
        ds.read_direct(out, np.s_[lo:hi], np.s_[at : at + hi - lo])
        at += hi - lo
    return rows, out


class ShuffledChunks:
    """One split of ``dataset.h5`` in network space, in shuffled chunks, for :func:`surrogate.train.train_steps`.

    Epoch ``e`` visits the split's HDF5 chunks in a random order drawn from ``SeedSequence([seed,
    e])``, ``window`` chunks at a time: a window's chunks are read whole (in file order), its rows
    shuffled together, transformed (``pre.transform_showers``, the same bytes as transforming the
    whole split) and served in that order. Every row comes once per epoch, a batch mixes rows of
    ``window`` random chunks, and the stream is a function of (seed, position): :meth:`seek` to
    ``position`` rows (the training loop's step times the rows it takes per step) resumes it exactly.
    The next window is read and transformed in a background thread while this one is served.

    ``conditions`` (N, C) are the split's network-space conditions, held in RAM (a few bytes per
    event); ``device`` receives each batch.
    """

    def __init__(
        self,
        path: str | Path,
        split: str,
        pre: Any,
        conditions: np.ndarray,
        window: int,
        seed: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.path, self.pre, self.seed, self.device = Path(path), pre, int(seed), torch.device(device)
        self.file = h5py.File(self.path, "r")
        group = self.file[split]
        self.showers = group["showers"]
        self.energies = group["incident_energies"][()]
        self.conditions = np.asarray(conditions, dtype=np.float32)
        self.n = int(self.showers.shape[0])
        if len(self.conditions) != self.n or len(self.energies) != self.n:
            raise ValueError(f"{self.path}: {split}/showers has {self.n} rows, its conditions {len(self.conditions)}")
        self.step = chunk_rows(self.showers)
        self.n_chunks = -(-self.n // self.step)
        self.window = max(1, min(int(window), self.n_chunks))
        self.position = 0
        self._epochs: dict[int, tuple[list[np.ndarray], np.ndarray]] = {}  # this epoch's and the next one's
        self._current: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None  # ((epoch, w), rows, x)
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="train-chunks")
        self._next: tuple[tuple[int, int], cf.Future] | None = None

    def __len__(self) -> int:
        return self.n

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.file.close()

    # ---- the order
    def _windows(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The chunk ids of each window of ``epoch`` and the rows before each window (len + 1)."""
        if epoch not in self._epochs:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x5C4A, epoch]))
            order = rng.permutation(self.n_chunks)
            windows = [order[i : i + self.window] for i in range(0, self.n_chunks, self.window)]
            sizes = [sum(min(self.step, self.n - int(k) * self.step) for k in w) for w in windows]
            for old in [e for e in self._epochs if e < epoch - 1 or e > epoch + 1]:
                del self._epochs[old]
            self._epochs[epoch] = (windows, np.concatenate([[0], np.cumsum(sizes)]))
        return self._epochs[epoch]

    def _load(self, chunks: np.ndarray, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(source rows, network-space showers) of window ``w`` of ``epoch`` (its ``chunks``), shuffled.
        Runs in the reader thread: it touches the file, the thread's only user after construction."""
        rows, showers = read_chunks(self.showers, chunks)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x5C4B, epoch, w]))
        perm = rng.permutation(len(rows))
        rows = rows[perm]
        x = self.pre.transform_showers(showers[perm], self.energies[rows])
        return rows, x

    def _following(self, key: tuple[int, int]) -> tuple[int, int]:
        epoch, w = key
        windows, _ = self._windows(epoch)
        return (epoch, w + 1) if w + 1 < len(windows) else (epoch + 1, 0)

    def _window(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Window ``key`` (from the prefetch when it is the one read ahead); starts reading the one after."""
        if self._current is not None and self._current[0] == key:
            return self._current[1], self._current[2]
        if self._next is not None and self._next[0] == key:
            rows, x = self._next[1].result()
        else:
            if self._next is not None:
                self._next[1].cancel()
            rows, x = self._pool.submit(self._load, self._windows(key[0])[0][key[1]], *key).result()
        self._current = (key, rows, x)
        nxt = self._following(key)
        self._next = (nxt, self._pool.submit(self._load, self._windows(nxt[0])[0][nxt[1]], *nxt))
        return rows, x

    # ---- serving
    def seek(self, position: int) -> None:
        """Continue from row ``position`` of the stream (epochs run on: position N is row 0 of epoch 1)."""
        self.position = int(position)

    def take_rows(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The next ``n`` rows: (source rows (n,), network-space showers (n, V) float32, conditions (n, C))."""
        rows, xs = [], []
        while n > 0:
            epoch, at = divmod(self.position, self.n)
            _, starts = self._windows(epoch)
            w = int(np.searchsorted(starts, at, side="right") - 1)
            wrows, wx = self._window((epoch, w))
            lo = at - int(starts[w])
            k = min(n, len(wrows) - lo)
            rows.append(wrows[lo : lo + k])
            xs.append(wx[lo : lo + k])
            self.position += k
            n -= k
        r = rows[0] if len(rows) == 1 else np.concatenate(rows)
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        return r, x, self.conditions[r]

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``n`` rows as tensors on the device: showers (n, V), conditions (n, C)."""
        _, x, c = self.take_rows(n)
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device), torch.from_numpy(c).to(self.device)
