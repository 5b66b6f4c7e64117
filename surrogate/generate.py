"""Generate stage: sample showers from a trained generator, sharded, seeded, written atomically.

``python -m surrogate.generate --config C --generator G.pt --out shard-0.h5 --shard 0 --shards 4``
writes one shard; ``python -m surrogate.generate join --shards shard-*.h5 --out events.h5``
writes an HDF5 virtual dataset over the shards (no copy).

Each shard depends only on (checkpoint, seed, shard, shards, events, config): its random
streams come from ``numpy.random.SeedSequence(seed).spawn(shards)[shard]``, so a shard run
alone is byte-identical to the same shard of a full run, and shards run in parallel.

Throughput: the forward pass (and inverse preprocessing) runs on the calling thread while a
writer thread compresses and writes the previous batches (bounded queue), so the stage runs
at about min(forward, write) rather than their sum.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import queue
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

import surrogate
from surrogate import memory
from surrogate.config import parse_stage_args, stage_parser
from surrogate.device import resolve_device, resolve_precision
from surrogate.holdout import canonical, check_same, from_canonical
from surrogate.io import ProgressBar, atomic_path, setup_logging, sha256_file

__all__ = [
    "GenerateError",
    "Conditions",
    "FORMAT_VERSION",
    "shard_bounds",
    "shard_seeds",
    "load_conditions_file",
    "default_particle",
    "make_conditions",
    "check_conditions",
    "readout_threshold",
    "stage_threshold",
    "forward_batches",
    "output_filter",
    "run",
    "join",
    "main",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SHOWER_KEYS = ("incident_energies", "showers", "incident_eta", "incident_pdg")


class GenerateError(ValueError):
    """Conditions, files or settings the generate stage refuses, with a message naming them."""


@dataclass(frozen=True)
class Conditions:
    """Per-event conditions: ``energies`` (N, 1) float32 MeV, ``eta`` (N, 1) float32, ``pdg`` (N, 1) int32."""

    energies: np.ndarray
    eta: np.ndarray
    pdg: np.ndarray

    def __len__(self) -> int:
        return len(self.energies)


# --------------------------------------------------------------------------- shards, seeds, device


def shard_bounds(events: int, shards: int, shard: int) -> tuple[int, int]:
    """Global event range [start, stop) of ``shard``: the first ``events % shards`` shards get one more."""
    if shards < 1 or not 0 <= shard < shards:
        raise GenerateError(f"shard {shard} of {shards}: need 0 <= shard < shards and shards >= 1")
    base, extra = divmod(events, shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (shard < extra)


def shard_seeds(seed: int, shards: int, shard: int) -> tuple[np.random.SeedSequence, int]:
    """(SeedSequence for the shard's condition sampling, integer seed of its torch latent generator)."""
    child = np.random.SeedSequence(seed).spawn(shards)[shard]
    cond_ss, latent_ss = child.spawn(2)
    # torch.Generator.manual_seed takes a 64-bit value; keep it positive
    return cond_ss, int(latent_ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


# --------------------------------------------------------------------------- conditions


def _column(f: h5py.File, path: str, name: str, dtype: Any, required: bool) -> np.ndarray | None:
    if name not in f:
        if required:
            raise GenerateError(f"{path}: no dataset '{name}' (a conditions file needs at least 'incident_energies')")
        return None
    ds = f[name]
    if not isinstance(ds, h5py.Dataset):
        raise GenerateError(f"{path}: '{name}' is a group, expected a dataset of shape (N,) or (N, 1)")
    if ds.ndim not in (1, 2) or (ds.ndim == 2 and ds.shape[1] != 1):
        raise GenerateError(f"{path}: dataset '{name}' has shape {ds.shape}, expected (N,) or (N, 1)")
    if ds.dtype.kind not in "fiu":
        raise GenerateError(f"{path}: dataset '{name}' has dtype {ds.dtype}, expected numbers")
    return np.asarray(ds[()], dtype=np.float64).reshape(-1, 1).astype(dtype)


def load_conditions_file(path: str | Path, default_pdg: int | None = None) -> Conditions:
    """Read a user conditions file: ``incident_energies`` (N,) or (N, 1) MeV; optional ``incident_eta`` and
    ``incident_pdg``.

    A missing ``incident_pdg`` is allowed only when the generator needs no particle code
    (``default_pdg``: its one particle, or 0 when it was trained without codes, as ingest fills them
    in); a missing ``incident_eta`` means eta = 0.
    """
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise GenerateError(f"{path}: cannot open as HDF5 ({exc})") from exc
    with f:
        energies = _column(f, str(path), "incident_energies", np.float32, True)
        if energies is None:  # unreachable (required=True raises); narrows the type
            raise GenerateError(f"{path}: no dataset 'incident_energies'")
        eta = _column(f, str(path), "incident_eta", np.float32, False)
        pdg_raw = _column(f, str(path), "incident_pdg", np.float64, False)
    n = len(energies)
    if n == 0:
        raise GenerateError(f"{path}: 'incident_energies' has no rows")
    for name, col in (("incident_eta", eta), ("incident_pdg", pdg_raw)):
        if col is not None and len(col) != n:
            raise GenerateError(f"{path}: dataset '{name}' has {len(col)} rows but 'incident_energies' has {n}")
    if pdg_raw is None:
        if default_pdg is None:
            raise GenerateError(
                f"{path}: no dataset 'incident_pdg', and the generator was trained on several particles: add it"
            )
        pdg = np.full((n, 1), default_pdg, dtype=np.int32)
    else:
        bad = np.flatnonzero(~np.isfinite(pdg_raw[:, 0]) | (pdg_raw[:, 0] != np.round(pdg_raw[:, 0])))
        if len(bad):
            raise GenerateError(f"{path}: 'incident_pdg' row {bad[0]} is {pdg_raw[bad[0], 0]!r}, not a PDG code")
        pdg = pdg_raw.astype(np.int32)
    if eta is None:
        eta = np.zeros((n, 1), dtype=np.float32)
    return Conditions(energies, eta, pdg)


def default_particle(particles: Sequence[int]) -> int | None:
    """The particle code of events whose conditions give none: the generator's one particle, 0 for a generator
    trained without codes (ingest writes 0 for inputs without ``incident_pdg``), None when it knows several."""
    if len(particles) > 1:
        return None
    return int(particles[0]) if particles else 0


def _rows(path: str | Path) -> int:
    try:
        with h5py.File(path, "r") as f:
            return int(f["incident_energies"].shape[0])
    except (OSError, KeyError) as exc:
        raise GenerateError(f"{path}: cannot read dataset 'incident_energies' ({exc})") from exc


def _split_conditions(dataset: str | Path, split: str = "test") -> Conditions:
    path = Path(dataset)
    if not path.exists():
        raise GenerateError(
            f"{path}: dataset not found (condition source {split!r} resamples its {split} split; "
            "run the ingest stage, pass --dataset, or set generate.conditions.source)"
        )
    with h5py.File(path, "r") as f:
        if split not in f:
            hint = " (set ingest.holdout and rerun ingest)" if split != "test" else " (not an ingest output?)"
            raise GenerateError(f"{path}: no group {split!r}{hint}")
        g = f[split]
        try:
            return Conditions(
                g["incident_energies"][()].astype(np.float32).reshape(-1, 1),
                g["incident_eta"][()].astype(np.float32).reshape(-1, 1),
                g["incident_pdg"][()].astype(np.int32).reshape(-1, 1),
            )
        except KeyError as exc:
            raise GenerateError(f"{path}: group {split!r} lacks a condition dataset ({exc})") from exc


def make_conditions(
    settings: dict[str, Any],
    start: int,
    stop: int,
    rng: np.random.Generator,
    *,
    dataset: str | Path | None = None,
    conditions_file: str | Path | None = None,
    default_pdg: int | None = None,
    split: str | None = None,
) -> tuple[Conditions, str]:
    """Conditions of global events [start, stop) and a label of their source.

    ``settings`` is ``config["generate"]["conditions"]``. Random sources (``test``: resampled with
    replacement from the test split; ``range``: log-uniform energy, uniform eta, equal particle
    shares) draw from ``rng``, which is per shard; deterministic sources (``grid``, ``file``) index
    their rows by global event number modulo their length, so shards tile the sequence.
    ``split`` (e.g. ``unseen``): resample that split of ``dataset`` instead, whatever the source.
    """
    n = stop - start
    source = "file" if conditions_file is not None else settings["source"]
    if split is not None and conditions_file is None:
        source = "test"
    split = split or "test"
    if source == "file":
        path = conditions_file if conditions_file is not None else settings["file"]
        if path is None:
            raise GenerateError("generate.conditions.source is 'file' but generate.conditions.file is not set")
        table = load_conditions_file(path, default_pdg)
        idx = np.arange(start, stop) % len(table)
        return Conditions(table.energies[idx], table.eta[idx], table.pdg[idx]), f"file:{Path(path).name}"
    if source == "test":
        if dataset is None:
            raise GenerateError(f"condition source {split!r} needs the ingest dataset (--dataset)")
        table = _split_conditions(dataset, split)
        if len(table) == 0:
            raise GenerateError(f"{dataset}: the {split} split is empty")
        idx = rng.integers(0, len(table), size=n)
        return Conditions(table.energies[idx], table.eta[idx], table.pdg[idx]), split
    if source == "range":
        r = settings["range"]
        lo, hi = np.log(np.array(r["energy_gev"], dtype=np.float64) * 1000.0)
        energies = np.exp(rng.uniform(lo, hi, size=(n, 1))).astype(np.float32)
        eta = rng.uniform(r["eta"][0], r["eta"][1], size=(n, 1)).astype(np.float32)
        pdg = rng.choice(np.asarray(r["particles"], dtype=np.int32), size=(n, 1))
        return Conditions(energies, eta, pdg.astype(np.int32)), "range"
    if source == "grid":
        g = settings["grid"]
        rows = np.array(list(itertools.product(g["particles"], g["energies_gev"], g["eta"])), dtype=np.float64)
        idx = np.arange(start, stop) % len(rows)
        return (
            Conditions(
                (rows[idx, 1:2] * 1000.0).astype(np.float32),
                rows[idx, 2:3].astype(np.float32),
                rows[idx, 0:1].astype(np.int32),
            ),
            "grid",
        )
    raise GenerateError(f"generate.conditions.source: unknown source {source!r}")


def check_conditions(cond: Conditions, pre: Any, extrapolation: str, source: str) -> None:
    """Refuse unknown particles and non-physical values; warn (or refuse) outside the trained range.

    ``pre`` is the checkpoint's Preprocessor (``energy_range_mev``, ``eta_range``, ``particles``).
    """
    e, eta, pdg = cond.energies[:, 0], cond.eta[:, 0], cond.pdg[:, 0]
    bad = np.flatnonzero(~np.isfinite(e) | (e <= 0))
    if len(bad):
        raise GenerateError(f"conditions ({source}): row {bad[0]} has incident energy {e[bad[0]]!r} MeV, need > 0")
    bad = np.flatnonzero(~np.isfinite(eta))
    if len(bad):
        raise GenerateError(f"conditions ({source}): row {bad[0]} has eta {eta[bad[0]]!r}")
    particles = list(getattr(pre, "particles", None) or [])
    if particles:
        bad = np.flatnonzero(~np.isin(pdg, particles))
        if len(bad):
            raise GenerateError(
                f"conditions ({source}): row {bad[0]} has particle {pdg[bad[0]]}, which the generator was "
                f"not trained on (known: {particles})"
            )
    checks = [("incident energy (MeV)", e, getattr(pre, "energy_range_mev", None))]
    if getattr(pre, "eta_range", None) is not None:
        checks.append(("eta", eta, pre.eta_range))
    for what, values, rng in checks:
        if rng is None:
            continue
        lo, hi = float(rng[0]), float(rng[1])
        # float32 conditions against float64 ranges: allow one float32 ulp of slack
        tol = 1e-6 * max(abs(lo), abs(hi), 1.0)
        out = np.flatnonzero((values < lo - tol) | (values > hi + tol))
        if len(out):
            msg = (
                f"conditions ({source}): {len(out)} of {len(values)} events have {what} outside the trained "
                f"range [{lo:g}, {hi:g}] (first: row {out[0]}, {values[out[0]]:g}); the generator extrapolates there"
            )
            if extrapolation == "error":
                raise GenerateError(msg + " (generate.extrapolation: error)")
            log.warning("%s", msg)


def _check_holdout(generator_path: Path, meta: dict[str, Any], dataset: str | Path | None, uses_dataset: bool) -> str:
    """The held-out regions the generator never saw (:func:`surrogate.holdout.canonical`), after
    checking, when the conditions come from ``dataset``'s splits, that it holds out the same ones
    (else its "unseen" events may be the generator's training events, and its test events too)."""
    have = canonical(from_canonical(meta.get("holdout")))
    if uses_dataset and dataset is not None and Path(dataset).exists():
        with h5py.File(dataset, "r") as f:
            stored = f.attrs.get("holdout")
        check_same(stored, have, str(dataset), f"the generator {generator_path}", GenerateError)
    return have


def readout_threshold(
    setting: float | None, dataset: str | Path | None, simulated_threshold: float | None = None
) -> float:
    """Readout threshold in MeV: the configured value, else the one the real data were read out with.

    ``simulated_threshold`` is the reference simulator's ``readout_threshold_mev`` when the real
    data are its output (no ``ingest.inputs``). Otherwise the ingest dataset's attribute is used
    when recorded there, else the smallest positive voxel energy of its test split (nothing below
    it was ever read out). Without a dataset it is 0 (only negatives are removed).
    """
    if setting is not None:
        return float(setting)
    if simulated_threshold is not None:
        return float(simulated_threshold)
    if dataset is None or not Path(dataset).exists():
        log.info("no ingest dataset: readout threshold 0 MeV (set generate.threshold_mev to apply one)")
        return 0.0
    with h5py.File(dataset, "r") as f:
        for key in ("readout_threshold_mev", "threshold_mev"):
            if key in f.attrs:
                return float(f.attrs[key])
        if "test/showers" not in f:
            return 0.0
        ds = f["test/showers"]
        smallest = np.inf
        for i in range(0, ds.shape[0], 8192):
            block = ds[i : i + 8192]
            pos = block[block > 0]
            if pos.size:
                smallest = min(smallest, float(pos.min()))
    return 0.0 if not np.isfinite(smallest) else smallest


def stage_threshold(cfg: dict[str, Any], dataset: str | Path | None) -> float:
    """The readout threshold (MeV) the generate stage applies with config ``cfg`` and ingest output ``dataset``."""
    sim_threshold = None
    if not cfg.get("ingest", {}).get("inputs"):  # the real data are the reference simulator's
        sim_threshold = cfg.get("simulate", {}).get("readout_threshold_mev")
    return readout_threshold(cfg["generate"]["threshold_mev"], dataset, sim_threshold)


# --------------------------------------------------------------------------- forward pass


def forward_batches(
    G: torch.nn.Module,
    pre: Any,
    cond: Conditions,
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    latent: torch.Generator,
    threshold_mev: float = 0.0,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (row offset, showers (B, V) float32 MeV) batch by batch.

    Latents are drawn on the CPU from ``latent`` (device-independent streams), the network runs
    under ``torch.inference_mode()`` (bf16 autocast when ``precision == 'bf16'``), the inverse
    preprocessing maps back to MeV, and voxels below ``threshold_mev`` are zeroed.
    """
    c_all = pre.transform_conditions(cond.energies, cond.eta, cond.pdg).astype(np.float32, copy=False)
    z_dim = int(G.z_dim)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    with torch.inference_mode():
        for start in range(0, len(cond), batch_size):
            stop = min(start + batch_size, len(cond))
            z = torch.randn((stop - start, z_dim), generator=latent).to(device)
            c = torch.from_numpy(c_all[start:stop]).to(device)
            with autocast:
                x = G(z, c)
            x = x.float().cpu().numpy()
            showers = np.asarray(pre.inverse_showers(x, cond.energies[start:stop]), dtype=np.float32)
            # non-negative, and nothing below the readout threshold (>= 0), as in the real data;
            # the negated comparison also zeroes NaN
            np.putmask(showers, ~(showers >= threshold_mev), 0.0)
            yield start, showers


# --------------------------------------------------------------------------- output


def output_filter(settings: dict[str, Any]) -> dict[str, Any]:
    """h5py ``create_dataset`` keyword arguments of the configured filter (``config['generate']['output']``)."""
    comp = settings["compression"]
    kwargs: dict[str, Any] = {"shuffle": bool(settings["shuffle"])}
    if comp == "gzip":
        kwargs.update(compression="gzip", compression_opts=int(settings["gzip_level"]))
    elif comp == "lzf":
        kwargs["compression"] = "lzf"
    return kwargs


#: Largest HDF5 chunk the stage writes (as the simulator): 1024 rows of 533 voxels are 2.2 MB, of 40,500 166 MB.
MAX_CHUNK_BYTES = 16 << 20
#: Largest batch of showers (float32) per forward pass. Bigger arrays are mapped fresh from the kernel for
#: each of the forward pass's and the inverse preprocessing's temporaries, page faults and all: at 6,480
#: voxels (CaloChallenge dataset 2), batches of 3,882 rows (100 MB) ran at 2.0 k events/s with 22 s of the
#: process's 40 s CPU time in the kernel; batches of 647 rows (16 MB) at 5.1 k events/s (writer-bound), 3.6 s.
MAX_BATCH_BYTES = 16 << 20


def _chunk_rows(chunk_events: int, row_bytes: int, batch_size: int | None = None) -> int:
    """Rows per HDF5 chunk: ``generate.output.chunk_events``, at most :data:`MAX_CHUNK_BYTES` and one batch."""
    rows = min(int(chunk_events), MAX_CHUNK_BYTES // max(int(row_bytes), 1))
    return max(1, rows if batch_size is None else min(rows, int(batch_size)))


def _create(f: h5py.File, name: str, shape: tuple[int, ...], dtype: Any, chunk_rows: int, **kw: Any) -> h5py.Dataset:
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    chunks = (max(1, min(_chunk_rows(chunk_rows, row_bytes), shape[0])),) + shape[1:]
    # track_times=False: no modification time in object headers, so same inputs give same bytes
    return f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, track_times=False, **kw)


#: Share of ``memory_gb`` the batches in flight may take (``queue_batches`` of them and about 8 copies
#: made by the forward pass and the inverse preprocessing).
BATCH_SHARE = 1 / 4


class _Writer(threading.Thread):
    """Writes (offset, showers) items from a bounded queue into ``dset``; ``None`` ends the stream."""

    def __init__(self, dset: h5py.Dataset, depth: int, bar: Any) -> None:
        super().__init__(name="generate-writer", daemon=True)
        self.dset, self.bar = dset, bar
        self.q: queue.Queue[tuple[int, np.ndarray] | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while (item := self.q.get()) is not None:
                start, block = item
                self.dset[start : start + len(block)] = block
                self.bar.update(len(block))
        except BaseException as exc:  # handed to the producer, which re-raises it
            self.error = exc
            # drain so a producer blocked on put() wakes up and sees the error
            while self.q.get() is not None:
                pass

    def put(self, item: tuple[int, np.ndarray] | None) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)


def _write_shard(
    tmp: Path,
    attrs: dict[str, Any],
    cond: Conditions,
    n_voxels: int,
    batches: Iterator[tuple[int, np.ndarray]],
    out_settings: dict[str, Any],
    queue_batches: int,
    bar: Any,
) -> None:
    n = len(cond)
    chunk_rows = int(out_settings["chunk_events"])
    filt = output_filter(out_settings)
    with h5py.File(tmp, "w") as f:
        for key in sorted(attrs):  # fixed attribute order: same inputs, same bytes
            f.attrs[key] = attrs[key]
        _create(f, "incident_energies", (n, 1), np.float32, chunk_rows, **filt)[...] = cond.energies
        _create(f, "incident_eta", (n, 1), np.float32, chunk_rows, **filt)[...] = cond.eta
        _create(f, "incident_pdg", (n, 1), np.int32, chunk_rows, **filt)[...] = cond.pdg
        showers = _create(f, "showers", (n, n_voxels), np.float32, chunk_rows, fillvalue=0.0, **filt)
        writer = _Writer(showers, queue_batches, bar)
        writer.start()
        try:
            for start, block in batches:
                if block.shape[1] != n_voxels:
                    raise GenerateError(
                        f"generator returns {block.shape[1]} voxels but its geometry has {n_voxels}: "
                        "corrupt checkpoint?"
                    )
                writer.put((start, block))
        finally:
            writer.q.put(None)
            writer.join()
        if writer.error is not None:
            raise writer.error


def run(
    cfg: dict[str, Any],
    generator_path: str | Path,
    out: str | Path,
    *,
    events: int | None = None,
    seed: int | None = None,
    shard: int = 0,
    shards: int = 1,
    conditions_file: str | Path | None = None,
    dataset: str | Path | None = "results/ingest/dataset.h5",
    threads: int | None = None,
    progress: bool = True,
    split: str | None = None,
) -> dict[str, Any]:
    """Generate shard ``shard`` of ``shards`` of ``events`` events into ``out`` (atomically).

    Defaults come from ``cfg['generate']`` (events; one per row of a conditions file) and
    ``cfg['seed']``. ``split``: resample the conditions of that split of ``dataset`` (``unseen``,
    ``extrapolation``: the held-out regions; the generator must have been trained with the same
    ``ingest.holdout``; ``generate.holdout_events`` events by default). Returns a summary (events,
    seconds, events_per_s, batch_size, precision, device, threshold_mev).
    """
    gcfg = cfg["generate"]
    file_source = (
        conditions_file
        if conditions_file is not None
        else (gcfg["conditions"]["file"] if gcfg["conditions"]["source"] == "file" else None)
    )
    if events is None and file_source is not None:
        events = _rows(file_source)  # a conditions file means one event per row unless told otherwise
    if events is None and split not in (None, "test"):
        events = int(gcfg["holdout_events"])
    events = int(gcfg["events"] if events is None else events)
    seed = int(cfg["seed"] if seed is None else seed)
    if events < 1:
        raise GenerateError(f"events must be >= 1, got {events}")
    threads = gcfg["threads"] if threads is None else threads
    previous_threads = torch.get_num_threads()
    total = int(threads) or previous_threads
    # a compressing writer keeps one core busy; the forward pass gets the rest (measured on
    # 2 cores: 46 k events/s with 1 torch thread vs 38 k with 2, both writer-bound)
    torch_threads = max(1, total - (gcfg["output"]["compression"] != "none"))
    torch.set_num_threads(torch_threads)
    try:
        return _run(
            cfg,
            gcfg,
            Path(generator_path),
            Path(out),
            events,
            seed,
            shard,
            shards,
            conditions_file,
            dataset,
            progress,
            split,
        )
    finally:
        torch.set_num_threads(previous_threads)  # callers (tests, benchmarks) keep their setting


def _run(
    cfg: dict[str, Any],
    gcfg: dict[str, Any],
    generator_path: Path,
    out: Path,
    events: int,
    seed: int,
    shard: int,
    shards: int,
    conditions_file: str | Path | None,
    dataset: str | Path | None,
    progress: bool,
    split: str | None = None,
) -> dict[str, Any]:
    from surrogate.geometry import Geometry
    from surrogate.models import load_generator
    from surrogate.preprocess import Preprocessor

    device = resolve_device(gcfg["device"], GenerateError)
    precision = resolve_precision(gcfg["precision"], device)
    batch_size = int(gcfg["batch_size"])

    if not generator_path.exists():
        raise GenerateError(f"{generator_path}: generator checkpoint not found (run the train stage)")
    G, meta = load_generator(generator_path, device)
    pre = Preprocessor.from_dict(meta["preprocessing"])
    geometry = Geometry.from_dict(meta["geometry"])
    # the batches in the writer's queue and the forward pass's copies of one stay within a share of memory_gb
    fitting = memory.rows_within(4 * geometry.n_voxels * (int(gcfg["queue_batches"]) + 8), BATCH_SHARE, cfg)
    if fitting < batch_size:
        why = f"memory_gb {cfg.get('memory_gb')}"
        log.info("batch of %d events instead of generate.batch_size %d (%s)", fitting, batch_size, why)
        batch_size = fitting
    row_bytes = 4 * geometry.n_voxels
    if batch_size * row_bytes > MAX_BATCH_BYTES:
        batch_size = max(1, MAX_BATCH_BYTES // row_bytes)
        log.info("batch of %d events: at most %d MB of showers per forward pass", batch_size, MAX_BATCH_BYTES >> 20)
    # whole HDF5 chunks per write: a compressed chunk written in parts is read back, decompressed and
    # compressed again for each part (at 6,480 voxels, batches of 32 rows into chunks of 647 ran at 63 events/s)
    chunk = _chunk_rows(gcfg["output"]["chunk_events"], row_bytes, batch_size)
    if batch_size % chunk:
        batch_size = batch_size // chunk * chunk
        log.info("batch of %d events: whole HDF5 chunks of %d rows per write", batch_size, chunk)
    particles = list(getattr(pre, "particles", None) or [])
    uses_dataset = conditions_file is None and (split is not None or gcfg["conditions"]["source"] == "test")
    holdout = _check_holdout(generator_path, meta, dataset, uses_dataset)

    start, stop = shard_bounds(events, shards, shard)
    # a held-out split's file gets streams of its own (its shard 0 is not the test conditions' shard 0)
    stream_seed = (
        seed
        if split in (None, "test")
        else int(np.random.SeedSequence([seed, zlib.crc32(split.encode())]).generate_state(1)[0])
    )
    cond_ss, latent_seed = shard_seeds(stream_seed, shards, shard)
    cond, source = make_conditions(
        gcfg["conditions"],
        start,
        stop,
        np.random.default_rng(cond_ss),
        dataset=dataset,
        conditions_file=conditions_file,
        default_pdg=default_particle(particles),
        split=split,
    )
    # the extrapolation split lies outside the trained range by design: warn there, never refuse
    check_conditions(cond, pre, "warn" if split == "extrapolation" else gcfg["extrapolation"], source)
    threshold = stage_threshold(cfg, dataset)
    latent = torch.Generator(device="cpu").manual_seed(latent_seed)

    attrs = {
        "format_version": FORMAT_VERSION,
        "generator_sha256": sha256_file(generator_path),
        "generator_step": int(meta.get("step", -1)),
        "seed": seed,
        "shard": shard,
        "shards": shards,
        "events_total": events,
        "first_event": start,
        "package_version": surrogate.__version__,
        "precision": precision,
        "condition_source": source,
        "readout_threshold_mev": threshold,
        "geometry": json.dumps(meta["geometry"], sort_keys=True),
        "condition_names": json.dumps(list(meta.get("condition_names", []))),
        **({"holdout": holdout} if holdout != "[]" else {}),
    }
    log.info(
        "shard %d/%d: events %d..%d of %d, device %s, %s, batch %d, conditions %s, threshold %.4g MeV",
        shard,
        shards,
        start,
        stop,
        events,
        device,
        precision,
        batch_size,
        source,
        threshold,
    )
    batches = forward_batches(
        G,
        pre,
        cond,
        batch_size=batch_size,
        device=device,
        precision=precision,
        latent=latent,
        threshold_mev=threshold,
    )
    t0 = time.perf_counter()
    with (
        ProgressBar(total=len(cond), unit="ev", unit_scale=True, desc=f"shard {shard}", disable=not progress) as bar,
        atomic_path(out) as tmp,
    ):
        out_settings = {**gcfg["output"], "chunk_events": chunk}
        _write_shard(tmp, attrs, cond, geometry.n_voxels, batches, out_settings, int(gcfg["queue_batches"]), bar)
    seconds = time.perf_counter() - t0
    summary = {
        "out": str(out),
        "events": len(cond),
        "seconds": seconds,
        "events_per_s": len(cond) / max(seconds, 1e-9),
        "batch_size": batch_size,
        "precision": precision,
        "device": str(device),
        "threshold_mev": threshold,
    }
    log.info("wrote %s: %d events in %.1f s (%.0f events/s)", out, len(cond), seconds, summary["events_per_s"])
    return summary


# --------------------------------------------------------------------------- join


_JOIN_COMMON = (
    "format_version",
    "generator_sha256",
    "seed",
    "shards",
    "events_total",
    "package_version",
    "precision",
    "geometry",
    "condition_names",
)


def _virtual_dataset(f: h5py.File, name: str, sources: list[tuple[str, tuple[int, ...]]], dtype: np.dtype) -> None:
    """Dataset ``name`` of ``f`` as the row-wise concatenation of dataset ``name`` in each source file.

    Built with the low-level API (not ``create_virtual_dataset``) to switch off modification
    times, so joining the same shards gives the same bytes.
    """
    total = sum(shape[0] for _, shape in sources)
    shape = (total,) + tuple(sources[0][1][1:])
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_obj_track_times(False)
    dcpl.set_fill_value(np.zeros(1, dtype=dtype))
    offset = 0
    for filename, src_shape in sources:
        vspace = h5py.h5s.create_simple(shape)
        vspace.select_hyperslab(
            (offset,) + (0,) * (len(shape) - 1), (1,) * len(shape), block=(src_shape[0],) + shape[1:]
        )
        dcpl.set_virtual(vspace, filename.encode(), name.encode(), h5py.h5s.create_simple(tuple(src_shape)))
        offset += src_shape[0]
    tid = h5py.h5t.py_create(np.dtype(dtype), logical=1)
    h5py.h5d.create(f.id, name.encode(), tid, h5py.h5s.create_simple(shape), dcpl=dcpl).close()


def join(shard_paths: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Write ``out`` with virtual datasets over the shard files (no data copied).

    The shards must be the complete set 0..K-1 of one run (same generator, seed, event count);
    source paths are stored relative to ``out``'s folder, so the folder can be moved as a whole.
    """
    out = Path(out)
    infos = []
    for p in shard_paths:
        p = Path(p)
        try:
            with h5py.File(p, "r") as f:
                attrs = {k: f.attrs[k] for k in (*_JOIN_COMMON, "shard", "first_event")}
                shapes = {k: (f[k].shape, f[k].dtype) for k in SHOWER_KEYS}
        except (OSError, KeyError) as exc:
            raise GenerateError(f"{p}: not a complete generate shard ({exc})") from exc
        infos.append((p, attrs, shapes))
    if not infos:
        raise GenerateError("join: no shard files given")
    infos.sort(key=lambda t: int(t[1]["shard"]))
    ref = infos[0][1]
    k = int(ref["shards"])
    found = [int(a["shard"]) for _, a, _ in infos]
    if found != list(range(k)):
        names = [str(p) for p in shard_paths]
        raise GenerateError(f"join: expected shards 0..{k - 1} once each, got {found} from {names}")
    total = 0
    for p, a, shapes in infos:
        for key in _JOIN_COMMON:
            if str(a[key]) != str(ref[key]):
                raise GenerateError(f"{p}: attribute {key}={a[key]!r} differs from {infos[0][0]} ({ref[key]!r})")
        if int(a["first_event"]) != total:
            raise GenerateError(f"{p}: first_event {a['first_event']} but the shards before it hold {total} events")
        total += shapes["showers"][0][0]
    if total != int(ref["events_total"]):
        raise GenerateError(f"join: shards hold {total} events, expected {ref['events_total']}")

    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        for key in sorted(ref):
            if key not in ("shard", "first_event"):
                f.attrs[key] = ref[key]
        rel = [os.path.relpath(p, out.parent) for p, _, _ in infos]
        f.attrs["shard_files"] = json.dumps(rel)
        for key in SHOWER_KEYS:
            sources = [(r, shapes[key][0]) for r, (_, _, shapes) in zip(rel, infos, strict=True)]
            _virtual_dataset(f, key, sources, infos[0][2][key][1])
    log.info("wrote %s: virtual datasets over %d shards, %d events", out, k, total)
    return {"out": str(out), "events": total, "shards": k}


# --------------------------------------------------------------------------- CLI


def _join_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m surrogate.generate join",
        description="Join generate shards into one file of HDF5 virtual datasets (no copy).",
    )
    parser.add_argument("--shards", nargs="+", required=True, help="shard files, any order")
    parser.add_argument("--out", required=True, help="output HDF5 file, e.g. results/generate/events.h5")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        join(args.shards, args.out)
    except GenerateError as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: generate one shard (default), or ``join`` shards into a virtual-dataset file."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["join"]:
        return _join_main(argv[1:])
    parser = stage_parser(
        "python -m surrogate.generate",
        "Generate showers from a trained generator into a CaloChallenge-format HDF5 file "
        "(one shard of a sharded run). `python -m surrogate.generate join --help` joins shards.",
    )
    parser.add_argument("--generator", required=True, help="checkpoint, e.g. results/train/generator.pt")
    parser.add_argument("--out", required=True, help="output HDF5 file, e.g. results/generate/shard-0.h5")
    parser.add_argument("--events", type=int, default=None, help="events over all shards (default: generate.events)")
    parser.add_argument("--seed", type=int, default=None, help="run seed (default: the config's seed)")
    parser.add_argument("--shard", type=int, default=None, help="which shard to write (default: 0)")
    parser.add_argument(
        "--shards", type=int, default=None, help="number of shards (default: 1 without --shard, else generate.shards)"
    )
    parser.add_argument("--conditions", default=None, help="HDF5 file of conditions (overrides the config source)")
    parser.add_argument("--dataset", default="results/ingest/dataset.h5", help="ingest output (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: generate.threads)")
    parser.add_argument(
        "--split",
        default=None,
        help="resample the conditions of this split of --dataset (unseen, extrapolation: the ingest.holdout "
        "regions; default events: generate.holdout_events) instead of generate.conditions",
    )
    args, cfg = parse_stage_args(parser, argv)
    shards = args.shards if args.shards is not None else (cfg["generate"]["shards"] if args.shard is not None else 1)
    try:
        run(
            cfg,
            args.generator,
            args.out,
            events=args.events,
            seed=args.seed,
            shard=args.shard or 0,
            shards=shards,
            conditions_file=args.conditions,
            dataset=args.dataset,
            threads=args.threads,
            split=args.split,
        )
    except GenerateError as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
