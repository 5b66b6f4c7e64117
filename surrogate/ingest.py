"""Ingest stage: read simulation files, check them, fit preprocessing, split, write ``dataset.h5``.

``python -m surrogate.ingest --config C --input FILE [--input FILE ...] --out DIR``

Reads CaloChallenge files (``incident_energies`` + ``showers``; energy is then the only
condition) and our superset (``incident_eta``, ``incident_pdg``, ``truth/mode``). Bad input is
refused with one line naming the file, dataset, row and problem, and nothing is written
(or, with ``ingest.on_bad_rows: drop``, bad rows are dropped and counted in the manifest).
Inputs are streamed in row chunks aligned to their HDF5 chunks, in two passes: the first checks
every row, assigns the split and fits the preprocessing on the training rows; the second writes.
"""

from __future__ import annotations

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
from surrogate.config import dump_config, parse_stage_args, stage_parser
from surrogate.geometry import Geometry, from_config
from surrogate.io import ProgressBar, atomic_path, sha256_file, write_json
from surrogate.preprocess import Preprocessor

__all__ = ["IngestError", "FORMAT_VERSION", "SPLITS", "run", "main"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
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
        if showers.ndim != 2:
            raise IngestError(f"{path}: dataset '{showers.name}' has rank {showers.ndim}, expected 2 (events, voxels)")
        rows = showers.shape[0]
        if rows == 0:
            raise IngestError(f"{path}: dataset '{showers.name}' has 0 rows (empty file)")
        if showers.shape[1] != geometry.n_voxels:
            raise IngestError(
                f"{path}: dataset '{showers.name}' has {showers.shape[1]} voxels per row, "
                f"geometry {geometry.name!r} has {geometry.n_voxels}"
            )
        for key, ds in found.items():
            if key == "showers":
                continue
            if not (ds.ndim == 1 or (ds.ndim == 2 and ds.shape[1] == 1)):
                raise IngestError(f"{path}: dataset '{ds.name}' has shape {ds.shape}, expected ({ds.shape[0]}, 1)")
            if ds.shape[0] != rows:
                raise IngestError(
                    f"{path}: dataset '{ds.name}' has {ds.shape[0]} rows but '{showers.name}' has {rows}"
                )
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


def _read_chunks(item: _Input) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    for start in range(0, item.rows, item.chunk_rows):
        stop = min(start + item.chunk_rows, item.rows)
        arrays = {}
        for key, ds in item.datasets.items():
            a = ds[start:stop]
            arrays[key] = a if key == "showers" else a.reshape(-1)
        yield start, arrays


def _chunks(item: _Input) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(first row, arrays) per chunk, column vectors flattened to (n,).

    A reader thread decompresses the next chunk while the caller checks and writes this one
    (numpy releases the GIL), so the stage runs at about the speed of reading alone.
    """
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def reader() -> None:
        try:
            for item_chunk in _read_chunks(item):
                while not stop.is_set():
                    try:
                        q.put(item_chunk, timeout=0.1)
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
    item: _Input, start: int, a: dict[str, np.ndarray], particles: set[int], tol: float
) -> list[tuple[np.ndarray, str, str]]:
    """Row-level problems in one chunk: (bad-row mask, dataset, problem) for each kind found."""
    ds = item.names
    problems = []
    showers, energies = a["showers"], a["incident_energies"]
    bad = ~np.isfinite(showers).all(axis=1)
    problems.append((bad, ds["showers"], "NaN or Inf voxel energy"))
    with np.errstate(invalid="ignore"):
        # a NaN row's minimum is NaN and compares False here: it is reported as NaN above
        problems.append((showers.min(axis=1) < -tol, ds["showers"], f"negative voxel energy below -{tol:g} MeV"))
        problems.append((~np.isfinite(energies), ds["incident_energies"], "NaN or Inf incident energy"))
        problems.append((np.isfinite(energies) & (energies <= 0), ds["incident_energies"], "incident energy <= 0"))
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
        value = f" (value {a[key][row - start]!r})"
    elif key == "showers":
        r = a["showers"][row - start]
        col = int(np.flatnonzero(~np.isfinite(r) | (np.nan_to_num(r) < 0))[0])
        value = f" (voxel {col}: {r[col]!r})"
    return f"{item.path}: dataset '{dataset}' row {row}: {problem}{value}"


def run(cfg: dict[str, Any], inputs: Sequence[str | Path], out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Ingest ``inputs`` into ``out_dir/dataset.h5`` and ``out_dir/manifest.json``; return the manifest."""
    t0 = time.perf_counter()
    settings = cfg["ingest"]
    out_dir = Path(out_dir)
    geometry = from_config(cfg)
    names = dict(settings["datasets"])
    particles = set(int(p) for p in settings["particles"])
    tol = float(settings["negative_tolerance_mev"])
    drop = settings["on_bad_rows"] == "drop"
    fractions = np.array([settings["split"][s] for s in SPLITS], dtype=np.float64)
    if not inputs:
        raise IngestError("no input files given (ingest.inputs is empty and no --input)")
    if abs(fractions.sum() - 1.0) > 1e-6:
        raise IngestError(f"ingest.split fractions sum to {fractions.sum():g}, expected 1")
    edges = np.cumsum(fractions)[:-1]

    files: list[h5py.File] = []
    items: list[_Input] = []
    try:
        for path in inputs:
            f, item = _open(Path(path), names, geometry, int(settings["chunk_events"]))
            files.append(f)
            items.append(item)
        present = [{k for k in _OPTIONAL if k in it.datasets} for it in items]
        if any(p != present[0] for p in present):
            raise IngestError(
                "inputs disagree on optional datasets: "
                + "; ".join(f"{it.path}: {sorted(p) or 'none'}" for it, p in zip(items, present))
            )
        optional = present[0]
        mode_names = next((it.mode_names for it in items if it.mode_names), [])

        # one pass: check rows, assign splits, write raw rows, fit preprocessing on training rows;
        # conditions (small) are written at the end, once the preprocessing is fitted
        pre = Preprocessor.from_settings(cfg["preprocess"])
        dropped: Counter[str] = Counter()
        threshold = np.inf
        energies_kept, particle_counts, mode_counts = [], Counter(), Counter()
        eta_lo, eta_hi = np.inf, -np.inf
        total = sum(it.rows for it in items)
        t1 = time.perf_counter()
        bar = ProgressBar(total=total, unit="ev", desc="ingest", **({} if progress else {"disable": True}))
        dataset_path = out_dir / "dataset.h5"
        with atomic_path(dataset_path) as tmp:
            with h5py.File(tmp, "w", track_order=True) as out:
                dsets = _create_outputs(out, geometry.n_voxels, settings["compression"])
                row_base = 0
                for index, item in enumerate(items):
                    # the split stream depends only on (seed, input index, row), not on chunking
                    split_rng = np.random.default_rng(np.random.SeedSequence([cfg["seed"], 0x1A6E57, index]))
                    for start, a in _chunks(item):
                        n = len(a["incident_energies"])
                        labels = np.searchsorted(edges, split_rng.random(n), side="right").astype(np.int8)
                        bad = np.zeros(n, dtype=bool)
                        for mask, dataset, problem in _check_rows(item, start, a, particles, tol):
                            if not drop:
                                raise IngestError(_describe(item, start, mask, dataset, problem, a))
                            dropped[problem] += int((mask & ~bad).sum())
                            bad |= mask
                        labels[bad] = -1
                        showers = a["showers"]
                        np.maximum(showers, 0, out=showers)  # negatives within tolerance (checked above)
                        keep = ~bad
                        kept = showers[keep] if bad.any() else showers
                        threshold = min(threshold, float(np.min(kept, where=kept > 0, initial=np.inf)))
                        energies_kept.append(a["incident_energies"][keep].astype(np.float32))
                        if "incident_pdg" in optional:
                            particle_counts.update(a["incident_pdg"][keep].astype(int).tolist())
                        if "mode" in optional:
                            mode_counts.update(a["mode"][keep].astype(int).tolist())
                        if "incident_eta" in optional and keep.any():
                            eta_lo = min(eta_lo, float(a["incident_eta"][keep].min()))
                            eta_hi = max(eta_hi, float(a["incident_eta"][keep].max()))
                        for i, split in enumerate(SPLITS):
                            sel = labels == i
                            if sel.any():
                                _append_rows(dsets[split], a, sel, optional, row_base + start)
                        train = labels == 0
                        if train.any():
                            pre.partial_fit(
                                showers[train],
                                a["incident_energies"][train].reshape(-1, 1),
                                a["incident_eta"][train].reshape(-1, 1) if "incident_eta" in optional else None,
                                a["incident_pdg"][train].reshape(-1, 1) if "incident_pdg" in optional else None,
                            )
                        bar.update(n)
                    row_base += item.rows
                bar.close()
                counts = {s: int(dsets[s]["_rows"]) for s in SPLITS}
                for split, n in counts.items():
                    if n == 0:
                        raise IngestError(
                            f"split {split!r} would be empty ({sum(counts.values())} usable rows); add events"
                        )
                pre.finalize(settings["particles"])
                t2 = time.perf_counter()
                for split in SPLITS:
                    g = out[split]
                    eta = g["incident_eta"][:] if "incident_eta" in optional else None
                    pdg = g["incident_pdg"][:] if "incident_pdg" in optional else None
                    cond = pre.transform_conditions(g["incident_energies"][:], eta, pdg)
                    g.create_dataset("conditions", data=cond, chunks=(min(len(cond), 8192), cond.shape[1]),
                                     track_times=False)  # fmt: skip
                out.attrs["format_version"] = FORMAT_VERSION
                out.attrs["seed"] = int(cfg["seed"])
                out.attrs["geometry"] = json.dumps(geometry.to_dict())
                out.attrs["preprocessing"] = json.dumps(pre.to_dict())
                out.attrs["condition_names"] = json.dumps(pre.condition_names)
                out.attrs["mode_names"] = json.dumps(mode_names)
                out.attrs["readout_threshold_mev"] = float(threshold if np.isfinite(threshold) else 0.0)
                out.attrs["package_version"] = surrogate.__version__
            t3 = time.perf_counter()
            energies = np.concatenate(energies_kept) if energies_kept else np.zeros(0)
            manifest = {
                "format_version": FORMAT_VERSION,
                "package_version": surrogate.__version__,
                "dataset": str(dataset_path),
                "inputs": [{"path": str(it.path), "sha256": sha256_file(it.path), "rows": it.rows} for it in items],
                "rows": {**counts, "total_read": total, "dropped": int(sum(dropped.values()))},
                "dropped": dict(dropped),
                "conditions": {
                    "names": pre.condition_names,
                    "energy_mev": {
                        "min": float(energies.min()),
                        "max": float(energies.max()),
                        "quantiles": {str(q): float(np.quantile(energies, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
                    },
                    "eta": None if "incident_eta" not in optional else {"min": eta_lo, "max": eta_hi},
                    "particles": {str(k): v for k, v in sorted(particle_counts.items())},
                    "modes": {(mode_names[k] if 0 <= k < len(mode_names) else str(k)): v
                              for k, v in sorted(mode_counts.items())},  # fmt: skip
                },
                "readout_threshold_mev": float(threshold if np.isfinite(threshold) else 0.0),
                "timings_s": {"open": t1 - t0, "read_check_write": t2 - t1, "conditions": t3 - t2, "total": t3 - t0},
            }
            write_json(out_dir / "manifest.json", manifest)
            dump_config(cfg, out_dir / "config.yaml")
    finally:
        for f in files:
            f.close()
    log.info(
        "ingested %d rows from %d file(s): train %d, val %d, test %d, dropped %d (%.1f s)",
        total, len(items), counts["train"], counts["val"], counts["test"], manifest["rows"]["dropped"], t3 - t0,
    )  # fmt: skip
    return manifest


def _create_outputs(out: h5py.File, n_voxels: int, compression: str) -> dict[str, dict[str, Any]]:
    """Empty, growable, row-chunked datasets for every split (filled chunk by chunk); ``_rows`` counts rows."""
    filters = {} if compression == "none" else {"compression": compression}
    dsets = {}
    for split in SPLITS:
        g = out.create_group(split, track_order=True)
        spec = {
            "showers": ((n_voxels,), np.float32, filters),
            "incident_energies": ((1,), np.float32, {}),
            "incident_eta": ((1,), np.float32, {}),
            "incident_pdg": ((1,), np.int32, {}),
            "mode": ((), np.int8, {}),
            "source_row": ((), np.int64, {}),
        }
        dsets[split] = {"_rows": 0} | {
            name: g.create_dataset(
                name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype, chunks=(2048, *tail),
                track_times=False, **kw,
            )
            for name, (tail, dtype, kw) in spec.items()
        }  # fmt: skip
    return dsets


def _append_rows(
    d: dict[str, h5py.Dataset], a: dict[str, np.ndarray], sel: np.ndarray, optional: set[str], first_row: int
) -> None:
    """Append the selected rows of one chunk to one split's datasets."""
    k = int(sel.sum())
    at = d["_rows"]
    d["_rows"] = at + k
    columns = {
        "showers": a["showers"][sel],
        "incident_energies": a["incident_energies"][sel].reshape(-1, 1),
        "incident_eta": a["incident_eta"][sel].reshape(-1, 1) if "incident_eta" in optional else np.zeros((k, 1)),
        "incident_pdg": a["incident_pdg"][sel].reshape(-1, 1) if "incident_pdg" in optional else np.zeros((k, 1)),
        "mode": a["mode"][sel] if "mode" in optional else np.full(k, -1),
        "source_row": first_row + np.flatnonzero(sel),
    }
    for name, values in columns.items():
        ds = d[name]
        ds.resize(at + k, axis=0)
        ds[at : at + k] = values.astype(ds.dtype, copy=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser(
        "python -m surrogate.ingest", "Check, preprocess and split simulation files into DIR/dataset.h5."
    )
    parser.add_argument("--input", action="append", default=[], metavar="FILE",
                        help="input HDF5 file (repeatable; default: ingest.inputs, else simulate.output)")  # fmt: skip
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
