"""Benchmark of the validate stage on 1M generated events: stage wall time vs only reading the events.

Prints ONE JSON object: ``{"events", "threads", "read_seconds", "stage_seconds", "ratio", ...}``.
The target is ``ratio <= 2`` (validation must not take much longer than reading the events).

``stage_seconds`` is the stage as the workflow runs it: the real-vs-real floors come from their
own rule (``validate floors``, run once per dataset beside training; its time is
``floors_seconds``), the stage reads them. ``stage_seconds_floors_inline`` is the stage computing
its floors itself (no ``--floors``). Both time :func:`surrogate.validate.run` after the libraries
it uses are imported, as earlier versions of this benchmark did (``import_seconds``, not counted:
the stage imports scipy and scikit-learn on first use, which under ``python -m surrogate.validate``
happens while the reader processes read).

The generated file is synthesised cheaply: 20,000 simulator showers tiled to ``--events``
rows, written like the generate stage writes (lzf, 1024-row chunks). Its ``verdict`` means little:
each shower repeats ~50 times, and repeated values make the KS p-values over-confident (a draw of
the subsamples has been seen to fail one of the 1916 tests). The reference is a small
contract-format ``dataset.h5`` simulated with another seed. Everything lives in ``--workdir``
(a temporary folder by default, deleted afterwards).

    python benchmarks/bench_validate.py [--events 1000000] [--threads 2] [--workdir DIR] [--no-inline]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surrogate import validate  # noqa: E402
from surrogate.config import load_config  # noqa: E402
from surrogate.io import atomic_path  # noqa: E402
from surrogate.simulate import MODE_NAMES, build_params, simulate_events  # noqa: E402

log = logging.getLogger("bench_validate")


def write_dataset(path: Path, cfg: dict, n: int, seed: int) -> None:
    """Contract-format ingest file with train and test splits (half each) of simulated events."""
    ev = simulate_events(n, cfg, seed=seed)
    geometry = build_params(cfg).geometry
    with h5py.File(path, "w") as f:
        f.attrs["geometry"] = json.dumps(geometry.to_dict())
        f.attrs["preprocessing"] = "{}"
        f.attrs["condition_names"] = json.dumps(["log_energy"])
        f.attrs["mode_names"] = json.dumps(list(MODE_NAMES))
        f.attrs["format_version"] = 1
        f.attrs["seed"] = seed
        for name, sl in (("train", slice(0, n // 2)), ("val", slice(0, 0)), ("test", slice(n // 2, n))):
            g = f.create_group(name)
            for key in ("showers", "incident_energies", "incident_eta", "incident_pdg"):
                g[key] = ev[key][sl]
            g["conditions"] = np.log(ev["incident_energies"][sl])
            g["mode"] = ev["truth/mode"][sl]
            g["source_row"] = np.arange(n)[sl]


def write_generated(path: Path, cfg: dict, events: int, n_unique: int, seed: int) -> None:
    """``events`` rows tiled from ``n_unique`` simulated events, lzf-compressed in 1024-row chunks."""
    ev = simulate_events(n_unique, cfg, seed=seed)
    v = ev["showers"].shape[1]
    block = 1 << 15
    with h5py.File(path, "w") as f:
        ds = {
            k: f.create_dataset(
                k,
                shape=(events, ev[k].shape[1]),
                dtype=ev[k].dtype,
                chunks=(1024, ev[k].shape[1]),
                compression="lzf" if k == "showers" else None,
            )
            for k in ("incident_energies", "showers", "incident_eta", "incident_pdg")
        }
        for lo in range(0, events, block):
            idx = np.arange(lo, min(events, lo + block)) % n_unique
            for k, d in ds.items():
                d[lo : lo + len(idx)] = ev[k][idx]
    log.info("wrote %s: %d events x %d voxels", path, events, v)


def read_only(path: Path, chunk_events: int) -> float:
    """Seconds to read every dataset of the generated file in the stage's chunk-aligned blocks."""
    t0 = time.perf_counter()
    with h5py.File(path, "r") as f:
        for k in ("incident_energies", "incident_eta", "incident_pdg"):
            f[k][()]
        s = f["showers"]
        step = max(1, round(chunk_events / s.chunks[0])) * s.chunks[0]
        for lo in range(0, s.shape[0], step):
            s[lo : lo + step]
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--real-events", type=int, default=20_000, help="simulated events in dataset.h5 (half test)")
    ap.add_argument("--workdir", default=None, help="keep the files here (reused when present) instead of a temp dir")
    ap.add_argument("--log-level", default="INFO", help="INFO shows the stage's per-step timings on stderr")
    ap.add_argument(
        "--no-inline",
        dest="inline",
        action="store_false",
        help="skip the run that computes the floors in the stage (saves ~20 s)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_validate_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        cfg = load_config(ROOT / "config.yaml")
        if not (work / "dataset.h5").exists():
            with atomic_path(work / "dataset.h5") as tmp:
                write_dataset(tmp, cfg, args.real_events, seed=1)
        if not (work / "events.h5").exists():
            with atomic_path(work / "events.h5") as tmp:
                write_generated(tmp, cfg, args.events, n_unique=20_000, seed=2)
        chunk = cfg["validate"]["chunk_events"]
        t0 = time.perf_counter()
        import scipy.stats  # noqa: F401 - what the stage imports on first use, imported as a starting process does
        import sklearn.ensemble  # noqa: F401

        from surrogate import metrics  # noqa: F401

        t_import = time.perf_counter() - t0
        read_only(work / "events.h5", chunk)  # warm the page cache so both timings read from memory
        t_read = read_only(work / "events.h5", chunk)
        t0 = time.perf_counter()
        validate.compute_floors(cfg, work / "dataset.h5", work / "floors.json", threads=args.threads)
        t_floors = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = validate.run(
            cfg,
            work / "dataset.h5",
            work / "events.h5",
            work / "out",
            threads=args.threads,
            floors_path=work / "floors.json",
        )
        t_stage = time.perf_counter() - t0
        if summary["floors"] != str(work / "floors.json"):
            raise SystemExit(f"the stage did not use the floors file ({summary['floors']})")
        t_inline = None
        if args.inline:
            t0 = time.perf_counter()
            inline = validate.run(
                cfg, work / "dataset.h5", work / "events.h5", work / "out_inline", threads=args.threads
            )
            t_inline = time.perf_counter() - t0
            if inline["metrics"] != summary["metrics"]:
                raise SystemExit("floors computed in the stage gave other metrics than floors read from the file")
        result = {
            "events": args.events,
            "real_test_events": summary["real_events"],
            "generated_matched": summary["generated_events_matched"],
            "generated_features": summary["generated_events_features"],
            "threads": args.threads,
            "read_seconds": round(t_read, 2),
            "stage_seconds": round(t_stage, 2),
            "ratio": round(t_stage / t_read, 2),
            "target_ratio": 2.0,
            "floors_seconds": round(t_floors, 2),
            "stage_seconds_floors_inline": None if t_inline is None else round(t_inline, 2),
            "ratio_floors_inline": None if t_inline is None else round(t_inline / t_read, 2),
            "import_seconds": round(t_import, 2),
            # the part that grows with N (reading, checking, features inside the stage) and the rest
            "stream_ratio": round(summary["seconds"]["stream_generated"] / t_read, 2),
            "fixed_seconds": round(t_stage - summary["seconds"]["stream_generated"], 2),
            "stage_breakdown_seconds": {k: None if v is None else round(v, 2) for k, v in summary["seconds"].items()},
            "n_tests": summary["n_tests"],
            "verdict": summary["verdict"],
        }
        print(json.dumps(result))  # noqa: T201 - the benchmark's one JSON line
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
