"""Ingest throughput against raw h5py sequential reads of the same file, measured in one run.

Prints one JSON object: ingest_mb_s, read_mb_s (uncompressed MB of the input datasets per
second), and ratio = ingest_mb_s / read_mb_s (target >= 0.5).
"""

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surrogate import ingest  # noqa: E402
from surrogate.config import load_config  # noqa: E402
from surrogate.simulate import simulate_events  # noqa: E402

EVENTS = 60000
REPEATS = 5
KEYS = ("incident_energies", "showers", "incident_eta", "incident_pdg", "truth/mode")


def make_input(path: Path, cfg: dict) -> int:
    """Simulator showers (3000 events, tiled) written as the simulator writes: lzf, 2000-row chunks."""
    sample = simulate_events(3000, cfg, 7)
    reps = -(-EVENTS // 3000)
    with h5py.File(path, "w") as f:
        for key in KEYS:
            a = np.concatenate([sample[key]] * reps)[:EVENTS]
            f.create_dataset(key, data=a, chunks=(2000, *a.shape[1:]), compression="lzf")
        f["truth/mode"].attrs["names"] = json.dumps(["m"] * 6)
    with h5py.File(path) as f:
        return sum(f[k].size * f[k].dtype.itemsize for k in KEYS)


def raw_read(path: Path) -> tuple[float, float]:
    """(wall, CPU) seconds to read every dataset sequentially, one 2000-row HDF5 chunk at a time."""
    t, c = time.perf_counter(), time.process_time()
    with h5py.File(path) as f:
        for key in KEYS:
            ds = f[key]
            for i in range(0, ds.shape[0], 2000):
                ds[i : i + 2000]
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(ROOT / "config.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "input.h5"
        nbytes = make_input(src, cfg)
        raw_read(src)  # warm the page cache for both measurements
        reads, ingests = [], []
        for i in range(REPEATS):  # interleaved repeats, best of each: the machine is shared and noisy
            reads.append(raw_read(src))
            t, c = time.perf_counter(), time.process_time()
            ingest.run(cfg, [src], Path(tmp) / f"out{i}", progress=False)
            ingests.append((time.perf_counter() - t, time.process_time() - c))
        mb = nbytes / 1e6
        read_wall, read_cpu = min(r[0] for r in reads), min(r[1] for r in reads)
        ingest_wall, ingest_cpu = min(r[0] for r in ingests), min(r[1] for r in ingests)
        result = {
            "events": EVENTS,
            "input_mb_uncompressed": round(mb, 1),
            "read_mb_s": round(mb / read_wall, 1),
            "ingest_mb_s": round(mb / ingest_wall, 1),
            "ratio": round(read_wall / ingest_wall, 3),
            "target_ratio": 0.5,
            # CPU seconds (all threads): steadier than wall time on a loaded machine
            "read_cpu_s": round(read_cpu, 3),
            "ingest_cpu_s": round(ingest_cpu, 3),
            "cpu_ratio": round(read_cpu / ingest_cpu, 3),
            "repeats": REPEATS,
        }
    print(json.dumps(result))  # noqa: T201 - the benchmark's output


if __name__ == "__main__":
    main()
