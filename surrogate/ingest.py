"""Ingest stage: read simulation files, check them, fit preprocessing, split, write ``dataset.h5``.

``python -m surrogate.ingest --config C --input FILE [--input FILE ...] --out DIR``

Reads CaloChallenge files (``incident_energies`` + ``showers``; energy is then the only
condition) and our superset (``incident_eta``, ``incident_pdg``, ``truth/mode``). Bad input is
refused with one line naming the file, dataset, row and problem, and nothing is written
(or, with ``ingest.on_bad_rows: drop``, bad rows are dropped and counted in the manifest).
Inputs are streamed once, in row chunks aligned to their HDF5 chunks (a compressed chunk read
across a boundary is decompressed twice): a reader thread decompresses and checks the next
chunk while the main thread writes this one to its split and adds its training rows to the
preprocessing statistics. The small per-event columns are read back at the end to write the
preprocessed conditions. Memory is bounded by a few chunks plus a few bytes per event.

``ingest.holdout`` regions (:mod:`surrogate.holdout`) take their events out of train/val/test into
the splits ``unseen`` and ``extrapolation`` (with a ``region`` column); every other event keeps
the split the seed gave it. The file then records the regions (root attribute ``holdout``) and
the stage refuses to write one whose train, val or test split holds an event inside a region.

Discrete incident energies (CaloChallenge dataset 1 comes at 15): when the kept rows of every split
hold at most ``ingest.discrete_energies.max_values`` distinct float32 energies, each carried by at
least ``min_events`` events, the values and their counts go to the manifest
(``conditions.discrete_energies``) and to the root attribute ``condition_info`` (JSON: which
optional conditions the inputs carry, the particle's name for inputs without a PDG code
(``ingest.particle_name``), the discrete energies), which validation bins by.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import surrogate
from surrogate import memory
from surrogate.config import dump_config, parse_stage_args, stage_parser
from surrogate.geometry import Geometry, from_config
from surrogate.holdout import HoldoutError, Region, canonical, region_index, regions_from_config, split_names
from surrogate.io import ProgressBar, atomic_path, sha256_file, write_json
from surrogate.preprocess import Preprocessor

__all__ = ["IngestError", "FORMAT_VERSION", "SPLITS", "HELDOUT_SPLITS", "run", "main"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
#: Splits of the events in ``ingest.holdout`` regions (written only when a region of that kind is set).
HELDOUT_SPLITS = ("unseen", "extrapolation")
_OPTIONAL = ("incident_eta", "incident_pdg", "mode")


class IngestError(ValueError):
    """Input that cannot be ingested; the message names file, dataset, row and problem."""


@dataclass
class _Input:
    """One opened input file: its datasets (h5py objects) and per-row split labels."""

    path: Path
    datasets: dict[str, h5py.Dataset]
    rows: int
    chunk_rows: int
    mode_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # h5py attribute look-ups take h5py's global lock, which the reader thread holds while
        # it decompresses: resolve names once here
        self.names = {k: ds.name.lstrip("/") for k, ds in self.datasets.items()}


def _open(path: Path, names: dict[str, str | None], geometry: Geometry, chunk_events: int) -> tuple[h5py.File, _Input]:
    """Open one input and check its structure (datasets, ranks, row counts, voxel count)."""
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError as exc:
        raise IngestError(f"{path}: file not found") from exc
    except OSError as exc:
        raise IngestError(f"{path}: not a readable HDF5 file (truncated or another format: {exc})") from exc
    try:
        found: dict[str, h5py.Dataset] = {}
        for key, name in names.items():
            if name is None:
                continue
            obj = f.get(name)
            if obj is None:
                if key in ("incident_energies", "showers"):
                    raise IngestError(f"{path}: dataset '{name}' is missing (required: the {key})")
                continue
            if not isinstance(obj, h5py.Dataset):
                raise IngestError(f"{path}: '{name}' is a group, expected a dataset")
            found[key] = obj
        showers = found["showers"]
        sname = showers.name.lstrip("/")  # h5py names are absolute; messages use the config's spelling
        if showers.ndim != 2:
            raise IngestError(f"{path}: dataset '{sname}' has rank {showers.ndim}, expected 2 (events, voxels)")
        rows = showers.shape[0]
        if rows == 0:
            raise IngestError(f"{path}: dataset '{sname}' has 0 rows (empty file)")
        if showers.shape[1] != geometry.n_voxels:
            raise IngestError(
                f"{path}: dataset '{sname}' has {showers.shape[1]} voxels per row, "
                f"geometry {geometry.name!r} has {geometry.n_voxels}"
            )
        for key, ds in found.items():
            if key == "showers":
                continue
            dname = ds.name.lstrip("/")
            if not (ds.ndim == 1 or (ds.ndim == 2 and ds.shape[1] == 1)):
                raise IngestError(f"{path}: dataset '{dname}' has shape {ds.shape}, expected ({ds.shape[0]}, 1)")
            if ds.shape[0] != rows:
                raise IngestError(f"{path}: dataset '{dname}' has {ds.shape[0]} rows but '{sname}' has {rows}")
        # chunk-aligned reads: compressed data read across chunk boundaries decompress twice
        native = showers.chunks[0] if showers.chunks else chunk_events
        chunk_rows = max(native, (chunk_events // native) * native)
        item = _Input(path, found, rows, chunk_rows)
        if "mode" in found:
            raw = found["mode"].attrs.get("names")
            if raw is not None:
                item.mode_names = json.loads(raw) if isinstance(raw, str) else [str(x) for x in raw]
        return f, item
    except BaseException:
        f.close()
        raise


@dataclass
class _Chunk:
    """One chunk of rows as read and checked by the reader thread."""

    start: int  # first row in its file
    arrays: dict[str, np.ndarray]  # column vectors flattened to (n,)
    problems: list[tuple[np.ndarray, str, str]]  # (bad-row mask, dataset, problem)
    min_positive: float  # smallest voxel energy > 0 in the chunk, MeV (inf if none)


def _read_chunks(item: _Input, particles: set[int], tol: float) -> Iterator[_Chunk]:
    scratch = np.empty(0, dtype=np.uint32)  # reused: a fresh chunk-sized array costs page faults each time
    for start in range(0, item.rows, item.chunk_rows):
        stop = min(start + item.chunk_rows, item.rows)
        arrays = {}
        for key, ds in item.datasets.items():
            try:
                a = ds[start:stop]
            except (OSError, ValueError) as exc:  # a damaged or truncated chunk
                raise IngestError(
                    f"{item.path}: dataset '{ds.name.lstrip('/')}' rows {start}-{stop - 1}: cannot be read ({exc})"
                ) from exc
            arrays[key] = a if key == "showers" else a.reshape(-1)
        problems = _check_rows(item, arrays, particles, tol)
        if scratch.size != arrays["showers"].size:
            scratch = np.empty(arrays["showers"].shape, dtype=np.uint32)
        smallest = _min_positive(arrays["showers"], scratch.reshape(arrays["showers"].shape))
        yield _Chunk(start, arrays, problems, smallest)


def _min_positive(showers: np.ndarray, scratch: np.ndarray | None = None) -> float:
    """Smallest voxel energy above 0 (MeV), inf when there is none.

    The bit patterns of non-negative float32 values sort like the values when read as unsigned
    integers; subtracting 1 turns +0 into the largest unsigned value, and negative values,
    NaN and Inf sort above every finite positive value, so one integer pass and one reduction
    find the smallest positive value (about 5x faster than a masked minimum). ``scratch``, a
    uint32 array of the same shape, avoids allocating one.
    """
    if showers.size == 0:
        return np.inf
    bits = np.subtract(showers.view(np.uint32), np.uint32(1), out=scratch)
    low = np.uint32(bits.min()) + np.uint32(1)
    if low == 0 or low >= np.uint32(0x7F800000):  # all zero, or nothing finite and positive
        return np.inf
    return float(np.array(low, dtype=np.uint32).view(np.float32))


def _chunks(item: _Input, particles: set[int], tol: float) -> Iterator[_Chunk]:
    """Read and checked chunks of one input, in order.

    A reader thread decompresses and checks the next chunk while the caller writes this one
    (h5py decompression and numpy release the GIL for most of their work), so the stage runs
    at close to the speed of reading alone when a second core is free.
    """
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def reader() -> None:
        try:
            for chunk in _read_chunks(item, particles, tol):
                while not stop.is_set():
                    try:
                        q.put(chunk, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(None)
        except BaseException as exc:  # handed to the consumer, raised there
            q.put(exc)

    thread = threading.Thread(target=reader, name=f"ingest-read-{item.path.name}", daemon=True)
    thread.start()
    try:
        while (got := q.get()) is not None:
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        thread.join()


def _check_rows(
    item: _Input, a: dict[str, np.ndarray], particles: set[int], tol: float
) -> list[tuple[np.ndarray, str, str]]:
    """Row-level problems in one chunk: (bad-row mask, dataset, problem) for each kind found.

    Also sets voxel energies in [-tol, 0) to 0, in place, in rows with no voxel below -tol
    (those are bad rows, left as read for the error message).
    """
    ds = item.names
    problems = []
    showers, energies = a["showers"], a["incident_energies"]
    with np.errstate(invalid="ignore", over="ignore"):
        # a row sum is NaN or Inf exactly when a voxel is (or the row overflows float32, also bad);
        # two row reductions cost less than an elementwise isfinite mask
        problems.append((~np.isfinite(showers.sum(axis=1)), ds["showers"], "NaN or Inf voxel energy"))
        # a NaN row's minimum is NaN and compares False here: it is reported as NaN above
        row_min = showers.min(axis=1)
        problems.append((row_min < -tol, ds["showers"], f"negative voxel energy below -{tol:g} MeV"))
        problems.append((~np.isfinite(energies), ds["incident_energies"], "NaN or Inf incident energy"))
        problems.append((np.isfinite(energies) & (energies <= 0), ds["incident_energies"], "incident energy <= 0"))
        negative = np.flatnonzero((row_min < 0) & (row_min >= -tol))
    if negative.size:
        showers[negative] = np.maximum(showers[negative], 0)
    if "incident_eta" in a:
        problems.append((~np.isfinite(a["incident_eta"]), ds["incident_eta"], "NaN or Inf eta"))
    if "incident_pdg" in a:
        known = np.isin(a["incident_pdg"], np.fromiter(particles, dtype=np.int64))
        problems.append((~known, ds["incident_pdg"], f"unknown particle code (accepted: {sorted(particles)})"))
    return [(m, d, p) for m, d, p in problems if m.any()]


def _describe(item: _Input, start: int, mask: np.ndarray, dataset: str, problem: str, a: dict) -> str:
    row = start + int(np.flatnonzero(mask)[0])
    key = next((k for k, v in item.names.items() if v == dataset), None)
    value = ""
    if key is not None and key != "showers":
        value = f" (value {a[key][row - start].item()!r})"
    elif key == "showers":
        r = a["showers"][row - start]
        # the first non-finite voxel, else the most negative one (a voxel within the tolerance
        # may come first); nothing to show when only the row sum overflowed
        bad = np.flatnonzero(~np.isfinite(r))
        col = int(bad[0]) if bad.size else int(np.argmin(r))
        if bad.size or r[col] < 0:
            value = f" (voxel {col}: {r[col].item()!r})"
    return f"{item.path}: dataset '{dataset}' row {row}: {problem}{value}"


def _split_labels(seed: int, index: int, rows: int, block: int, edges: np.ndarray) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) of every row of input number ``index``, (rows,) int8.

    One uniform draw per row from a stream seeded by (seed, input index): the assignment does
    not depend on chunk sizes, and drawing it up front sizes the outputs before any data is read.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1A6E57, index]))
    labels = np.empty(rows, dtype=np.int8)
    for i in range(0, rows, block):  # bounded temporary memory for huge inputs
        labels[i : i + block] = np.searchsorted(edges, rng.random(min(block, rows - i)), side="right")
    return labels


def _first_problem(item: _Input, chunk: _Chunk) -> str:
    """The message for the earliest bad row of a chunk."""
    mask, dataset, problem = min(chunk.problems, key=lambda p: int(np.argmax(p[0])))
    return _describe(item, chunk.start, mask, dataset, problem, chunk.arrays)


def _remove_stale(out_dir: Path) -> None:
    # a failed run must not leave the outputs of an earlier one looking current
    for name in ("manifest.json", "dataset.h5", "config.yaml"):
        if (out_dir / name).exists():
            log.info("removing the previous %s", out_dir / name)
            (out_dir / name).unlink()


def run(
    cfg: dict[str, Any], inputs: Sequence[str | Path], out_dir: str | Path, progress: bool = True
) -> dict[str, Any]:
    """Ingest ``inputs`` into ``out_dir/dataset.h5``, ``manifest.json`` and ``config.yaml``; return the manifest.

    Raises IngestError (one line naming file, dataset, row and problem) on bad input; then no
    dataset or manifest is left in ``out_dir``.
    """
    t0 = time.perf_counter()
    settings = cfg["ingest"]
    out_dir = Path(out_dir)
    geometry = from_config(cfg)
    names = dict(settings["datasets"])
    particles = set(int(p) for p in settings["particles"])
    tol = float(settings["negative_tolerance_mev"])
    drop = settings["on_bad_rows"] == "drop"
    # rows read per step, capped so that the reader's few chunks in flight stay a small share of memory_gb
    chunk_events = min(int(settings["chunk_events"]), memory.rows_within(4 * geometry.n_voxels, READ_SHARE, cfg))
    fractions = np.array([settings["split"][s] for s in SPLITS], dtype=np.float64)
    if not inputs:
        raise IngestError("no input files given (ingest.inputs is empty and no --input)")
    if abs(fractions.sum() - 1.0) > 1e-6:
        raise IngestError(f"ingest.split fractions sum to {fractions.sum():g}, expected 1")
    edges = np.cumsum(fractions)[:-1]
    try:
        regions = regions_from_config(cfg)
    except HoldoutError as exc:
        raise IngestError(str(exc)) from exc
    splits = SPLITS + split_names(regions)
    rule = settings["discrete_energies"]
    _remove_stale(out_dir)

    files: list[h5py.File] = []
    items: list[_Input] = []
    try:
        for path in inputs:
            f, item = _open(Path(path), names, geometry, chunk_events)
            files.append(f)
            items.append(item)
        present = [{k for k in _OPTIONAL if k in it.datasets} for it in items]
        if any(p != present[0] for p in present):
            raise IngestError(
                "inputs disagree on optional datasets: "
                + "; ".join(f"{it.path}: {sorted(p) or 'none'}" for it, p in zip(items, present, strict=True))
            )
        optional = present[0]
        particle_name = settings["particle_name"]
        if particle_name is not None and "incident_pdg" in optional:
            log.warning("ingest.particle_name %r is ignored: the inputs carry incident_pdg", particle_name)
            particle_name = None
        mode_names = next((it.mode_names for it in items if it.mode_names), [])
        # hashing reads whole files: do it beside the stream (hashlib releases the GIL)
        hasher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-sha256")
        digests = [hasher.submit(sha256_file, it.path) for it in items]
        hasher.shutdown(wait=False)
        labels = [_split_labels(int(cfg["seed"]), i, it.rows, chunk_events, edges) for i, it in enumerate(items)]
        for item, lab in zip(items, labels, strict=True):
            _hold_out(item, lab, regions, splits)
        capacity = {s: int(sum((lab == i).sum() for lab in labels)) for i, s in enumerate(splits)}
        storage = _storage(cfg, capacity, geometry.n_voxels)
        file_kwargs = storage.pop("file_kwargs")

        pre = Preprocessor.from_settings(cfg["preprocess"])
        stats = _Stats()
        total = sum(it.rows for it in items)
        t1 = time.perf_counter()
        bar = ProgressBar(total=total, unit="ev", desc="ingest", **({} if progress else {"disable": True}))
        dataset_path = out_dir / "dataset.h5"
        with atomic_path(dataset_path) as tmp:
            with h5py.File(tmp, "w", track_order=True, **file_kwargs) as out:
                writers = {
                    s: _SplitWriter(out.create_group(s, track_order=True), capacity[s], geometry.n_voxels, **storage)
                    for s in splits
                }
                row_base = 0
                for item, item_labels in zip(items, labels, strict=True):
                    for chunk in _chunks(item, particles, tol):
                        a, n = chunk.arrays, len(chunk.arrays["incident_energies"])
                        lab = item_labels[chunk.start : chunk.start + n]
                        if chunk.problems:
                            if not drop:
                                raise IngestError(_first_problem(item, chunk))
                            lab = lab.copy()
                            lab[stats.count_dropped(chunk.problems)] = -1
                        keep = lab >= 0
                        min_positive = chunk.min_positive if keep.all() else _min_positive(a["showers"][keep])
                        stats.add(a, keep, min_positive, optional)
                        for i, split in enumerate(splits):
                            rows = np.flatnonzero(lab == i)
                            if rows.size == 0:
                                continue
                            cols = _columns(a, rows, optional, row_base + chunk.start)
                            writers[split].append(cols)
                            if split == "train":
                                # written already: the copy is scratch space for the transform
                                pre.partial_fit(
                                    cols["showers"],
                                    cols["incident_energies"],
                                    cols["incident_eta"] if "incident_eta" in optional else None,
                                    cols["incident_pdg"] if "incident_pdg" in optional else None,
                                    overwrite=True,
                                )
                        bar.update(n)
                    row_base += item.rows
                bar.close()
                counts = {s: writers[s].finish() for s in splits}
                for split, n in counts.items():
                    if n == 0:
                        raise IngestError(
                            f"split {split!r} would be empty ({sum(counts.values())} usable rows); add events"
                            + (
                                " or widen its ingest.holdout regions: "
                                + ", ".join(r.label for r in regions if r.split == split)
                                if split in HELDOUT_SPLITS
                                else ""
                            )
                        )
                pre.finalize(settings["particles"])
                t2 = time.perf_counter()
                region_events = [0] * len(regions)
                for split in splits:
                    g = out[split]
                    eta = g["incident_eta"][:] if "incident_eta" in optional else None
                    pdg = g["incident_pdg"][:] if "incident_pdg" in optional else None
                    cond = pre.transform_conditions(g["incident_energies"][:], eta, pdg)
                    g.create_dataset(
                        "conditions", data=cond, chunks=(min(len(cond), 8192), cond.shape[1]), track_times=False
                    )
                    if regions:
                        region_events = _check_regions(g, split, regions, region_events)
                threshold = stats.threshold_mev
                discrete = stats.discrete_energies(int(rule["max_values"]), int(rule["min_events"]))
                info = {
                    "eta": "incident_eta" in optional,
                    "pdg": "incident_pdg" in optional,
                    "particle_name": particle_name,
                    "discrete_energies_mev": discrete["values_mev"] if discrete else [],
                }
                out.attrs["format_version"] = FORMAT_VERSION
                out.attrs["seed"] = int(cfg["seed"])
                out.attrs["geometry"] = json.dumps(geometry.to_dict())
                out.attrs["preprocessing"] = json.dumps(pre.to_dict())
                out.attrs["condition_names"] = json.dumps(pre.condition_names)
                out.attrs["mode_names"] = json.dumps(mode_names)
                out.attrs["readout_threshold_mev"] = threshold
                out.attrs["condition_info"] = json.dumps(info)
                out.attrs["package_version"] = surrogate.__version__
                if regions:  # absent without a holdout: the file is then the same as before holdouts existed
                    out.attrs["holdout"] = canonical(regions)
            t3 = time.perf_counter()
            manifest = {
                "format_version": FORMAT_VERSION,
                "package_version": surrogate.__version__,
                "dataset": str(dataset_path),
                "inputs": [
                    {"path": str(it.path), "sha256": digest.result(), "rows": it.rows}
                    for it, digest in zip(items, digests, strict=True)
                ],
                "rows": {**counts, "total_read": total, "dropped": int(sum(stats.dropped.values()))},
                "dropped": dict(stats.dropped),
                "conditions": {
                    "names": pre.condition_names,
                    **stats.summary(optional, mode_names),
                    "particle_name": particle_name,
                    "discrete_energies": None if discrete is None else {**discrete, "rule": _discrete_rule(rule)},
                },
                "readout_threshold_mev": threshold,
                **(
                    {"holdout": [{**r.to_dict(), "events": n} for r, n in zip(regions, region_events, strict=True)]}
                    if regions
                    else {}
                ),
                "timings_s": {"open": t1 - t0, "read_check_write": t2 - t1, "conditions": t3 - t2},
            }
            manifest["timings_s"]["total"] = time.perf_counter() - t0
            manifest["showers_storage"] = {**storage, "read_chunk_events": chunk_events}
            dump_config(cfg, out_dir / "config.yaml")
            write_json(out_dir / "manifest.json", manifest)  # last: its presence marks a complete output
    finally:
        for f in files:
            f.close()
    for split in splits[len(SPLITS) :]:
        names = ", ".join(r.label for r in regions if r.split == split)
        log.info("held out of training: %d events in split %r (%s)", counts[split], split, names)
    log.info(
        "ingested %d rows from %d file(s): train %d, val %d, test %d, dropped %d (%.1f s)",
        total,
        len(items),
        counts["train"],
        counts["val"],
        counts["test"],
        manifest["rows"]["dropped"],
        t3 - t0,
    )
    return manifest


#: Share of ``memory_gb`` one read step's rows may take (the reader thread keeps two more in its queue,
#: and the checks and the split's copy as many again).
READ_SHARE = 1 / 64


def _storage(cfg: dict[str, Any], capacity: dict[str, int], n_voxels: int) -> dict[str, Any]:
    """How ``dataset.h5`` stores showers: as configured while the train stage can hold its splits whole
    (``memory_gb``); else lzf-compressed (unless a filter is configured) in chunks of
    :data:`surrogate.memory.CHUNK_BYTES`, the unit the streaming train and validate stages read, through
    a chunk cache that holds the chunks being filled (a compressed chunk written in parts would
    otherwise be re-read and re-compressed). Returns the writer's arguments and ``file_kwargs``."""
    compression = cfg["ingest"]["compression"]
    need = memory.train_bytes(capacity.get("train", 0), capacity.get("val", 0), n_voxels)
    if memory.fits(need, cfg, "train and val splits"):
        return {"compression": compression, "chunk_rows": _SplitWriter.CHUNK_ROWS, "file_kwargs": {}}
    rows = max(1, memory.CHUNK_BYTES // (4 * n_voxels))
    cache = {"rdcc_nbytes": 8 * rows * 4 * n_voxels, "rdcc_nslots": 1021}
    return {"compression": "lzf" if compression == "none" else compression, "chunk_rows": rows, "file_kwargs": cache}


def _hold_out(item: _Input, labels: np.ndarray, regions: tuple[Region, ...], splits: tuple[str, ...]) -> None:
    """Relabel, in place, the rows of ``item`` inside a held-out region with their split's index in ``splits``.

    Reads the input's condition columns whole (a few bytes per event). The train/val/test draw of
    every other row is unchanged, so a holdout moves events out of the splits and reshuffles nothing.
    """
    if not regions:
        return
    cols = {}
    for key in ("incident_energies", "incident_eta", "incident_pdg"):
        ds = item.datasets.get(key)
        cols[key] = np.zeros(item.rows) if ds is None else ds[()].reshape(-1)
    where = region_index(regions, cols["incident_energies"], cols["incident_eta"], cols["incident_pdg"])
    for i, r in enumerate(regions):
        labels[where == i] = splits.index(r.split)


def _check_regions(g: h5py.Group, split: str, regions: tuple[Region, ...], counts: list[int]) -> list[int]:
    """Write the ``region`` column of a held-out split and count its events per region; refuse an
    event of train/val/test inside a region, or a held-out event outside its split's regions."""
    where = region_index(
        regions, g["incident_energies"][:, 0], g["incident_eta"][:, 0], g["incident_pdg"][:, 0]
    ).astype(np.int64)
    if split in SPLITS:
        inside = np.flatnonzero(where >= 0)
        if inside.size:
            raise IngestError(
                f"split {split!r} row {inside[0]} (source row {g['source_row'][inside[0]]}) lies in held-out region "
                f"{regions[where[inside[0]]].name!r}: refusing to write a dataset that leaks it into {split}"
            )
        return counts
    own = [i for i, r in enumerate(regions) if r.split == split]
    stray = np.flatnonzero(~np.isin(where, own))
    if stray.size:
        raise IngestError(f"split {split!r} row {stray[0]} lies in none of its regions (internal error)")
    g.create_dataset("region", data=where.astype(np.int8), track_times=False)
    g.attrs["regions"] = json.dumps([regions[i].name for i in own])
    n = np.bincount(where, minlength=len(regions))
    for i in own:
        if n[i] == 0:
            raise IngestError(
                f"held-out region {regions[i].label} holds no events of the inputs; widen it or remove it"
            )
    return [c + int(n[i]) if i in own else c for i, c in enumerate(counts)]


class _Stats:
    """Per-condition statistics of the kept rows, and dropped-row counts, for the manifest."""

    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter()
        self.energies: list[np.ndarray] = []  # 4 bytes per event: kept for exact quantiles
        self.particles: Counter[int] = Counter()
        self.modes: Counter[int] = Counter()
        self.eta = [np.inf, -np.inf]
        self.min_positive = np.inf

    def count_dropped(self, problems: list[tuple[np.ndarray, str, str]]) -> np.ndarray:
        """Count each bad row once, under its first problem; return the bad-row mask."""
        bad = np.zeros_like(problems[0][0])
        for mask, _, problem in problems:
            self.dropped[problem] += int((mask & ~bad).sum())
            bad |= mask
        return bad

    def add(self, a: dict[str, np.ndarray], keep: np.ndarray, min_positive: float, optional: set[str]) -> None:
        """Add the kept rows of one chunk (``min_positive``: their smallest voxel energy above 0)."""
        if not keep.any():
            return
        every = bool(keep.all())
        pick = (lambda x: x) if every else (lambda x: x[keep])
        self.min_positive = min(self.min_positive, min_positive)
        self.energies.append(pick(a["incident_energies"]).astype(np.float32))
        if "incident_pdg" in optional:
            codes, n = np.unique(pick(a["incident_pdg"]), return_counts=True)
            self.particles.update(dict(zip(codes.tolist(), n.tolist(), strict=True)))
        if "mode" in optional:
            codes, n = np.unique(pick(a["mode"]), return_counts=True)
            self.modes.update(dict(zip(codes.tolist(), n.tolist(), strict=True)))
        if "incident_eta" in optional:
            eta = pick(a["incident_eta"])
            self.eta = [min(self.eta[0], float(eta.min())), max(self.eta[1], float(eta.max()))]

    def discrete_energies(self, max_values: int, min_events: int) -> dict[str, list] | None:
        """The distinct incident energies of the kept rows (float32 values, MeV, ascending) and their event
        counts, when there are at most ``max_values`` of them, each with at least ``min_events`` events; else None."""
        if not self.energies:
            return None
        values, counts = np.unique(np.concatenate(self.energies), return_counts=True)
        if len(values) > max_values or counts.min() < min_events:
            return None
        return {"values_mev": values.astype(float).tolist(), "events": counts.tolist()}

    @property
    def threshold_mev(self) -> float:
        """Smallest voxel energy above 0 in the kept rows (the input's readout threshold, at most)."""
        return self.min_positive if np.isfinite(self.min_positive) else 0.0

    def summary(self, optional: set[str], mode_names: list[str]) -> dict[str, Any]:
        e = np.concatenate(self.energies) if self.energies else np.zeros(1)
        qs = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
        return {
            "energy_mev": {
                "min": float(e.min()),
                "max": float(e.max()),
                "quantiles": {str(q): float(v) for q, v in zip(qs, np.quantile(e, qs), strict=True)},
            },
            "eta": {"min": self.eta[0], "max": self.eta[1]} if "incident_eta" in optional else None,
            "particles": {str(k): v for k, v in sorted(self.particles.items())},
            "modes": {
                (mode_names[k] if 0 <= k < len(mode_names) else str(k)): v for k, v in sorted(self.modes.items())
            },
        }


def _discrete_rule(rule: dict[str, int]) -> str:
    return f"at most {rule['max_values']} distinct values, each with at least {rule['min_events']} events"


def _columns(a: dict[str, np.ndarray], rows: np.ndarray, optional: set[str], first_row: int) -> dict[str, np.ndarray]:
    """The output columns of the given rows of one chunk, in the output dtypes and shapes."""
    k = len(rows)

    def column(key: str, dtype: type, missing: float) -> np.ndarray:
        if key in optional:
            return a[key][rows].astype(dtype, copy=False).reshape(k, 1)
        return np.full((k, 1), missing, dtype=dtype)

    return {
        "showers": a["showers"].take(rows, axis=0),
        "incident_energies": a["incident_energies"][rows].astype(np.float32, copy=False).reshape(k, 1),
        "incident_eta": column("incident_eta", np.float32, 0.0),
        "incident_pdg": column("incident_pdg", np.int32, 0),
        "mode": column("mode", np.int8, -1).reshape(k),
        "source_row": first_row + rows.astype(np.int64),
    }


class _SplitWriter:
    """Row-chunked datasets of one split, created at their final size (shrunk if rows are dropped)."""

    # ~4 MB of float32 showers per chunk at 533 voxels: few chunks to index, small enough that
    # a reader taking a slice does not decompress much it does not need
    CHUNK_ROWS = 2048

    def __init__(
        self, group: h5py.Group, capacity: int, n_voxels: int, compression: str, chunk_rows: int = CHUNK_ROWS
    ) -> None:
        filters = {} if compression == "none" else {"compression": compression}
        spec = {
            "showers": ((n_voxels,), np.float32, filters),
            "incident_energies": ((1,), np.float32, {}),
            "incident_eta": ((1,), np.float32, {}),
            "incident_pdg": ((1,), np.int32, {}),
            "mode": ((), np.int8, {}),
            "source_row": ((), np.int64, {}),
        }
        rows = max(1, min(self.CHUNK_ROWS, capacity))
        shower_rows = max(1, min(chunk_rows, capacity))  # rows of a showers chunk (fewer when ingest streams)
        self.datasets = {
            name: group.create_dataset(
                name,
                shape=(capacity, *tail),
                maxshape=(None, *tail),
                dtype=dtype,
                chunks=(shower_rows if name == "showers" else rows, *tail),
                track_times=False,
                **kw,
            )
            for name, (tail, dtype, kw) in spec.items()
        }
        self.rows = 0

    def append(self, columns: dict[str, np.ndarray]) -> None:
        k = len(columns["source_row"])
        for name, values in columns.items():
            self.datasets[name][self.rows : self.rows + k] = values
        self.rows += k

    def finish(self) -> int:
        """Shrink to the rows written (fewer than the capacity when rows were dropped); return them."""
        for ds in self.datasets.values():
            if ds.shape[0] != self.rows:
                ds.resize(self.rows, axis=0)
        return self.rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser(
        "python -m surrogate.ingest", "Check, preprocess and split simulation files into DIR/dataset.h5."
    )
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="FILE",
        help="input HDF5 file (repeatable; default: ingest.inputs, else simulate.output)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory, e.g. results/ingest")
    args, cfg = parse_stage_args(parser, argv)
    inputs = args.input or cfg["ingest"]["inputs"] or [cfg["simulate"]["output"]]
    try:
        run(cfg, inputs, args.out)
    except IngestError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
