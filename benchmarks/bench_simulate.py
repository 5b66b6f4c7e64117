"""Reference simulator speed: one JSON object with events/s and CPU ms/event per particle and energy.

Single process, fixed energy, eta = 0.2, a few hundred events per point (fewer at 1 TeV).
Run: python benchmarks/bench_simulate.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from surrogate.config import load_config
from surrogate.simulate import build_params, simulate_events

REPO = Path(__file__).resolve().parents[1]
EVENTS = {1: 400, 10: 400, 100: 300, 1000: 150}


def main() -> None:
    params = build_params(load_config(REPO / "config.yaml"))
    simulate_events(20, params, seed=0)  # warm-up: imports, allocator
    results = {}
    for pdg, name in ((22, "photon"), (211, "pion")):
        for e_gev, n in EVENTS.items():
            wall0, cpu0 = time.perf_counter(), time.process_time()
            simulate_events(n, params, seed=1, particle=pdg, energy_mev=e_gev * 1e3, eta=0.2)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            results[f"{name}_{e_gev}GeV"] = {
                "events": n,
                "events_per_s": round(n / wall, 1),
                "cpu_ms_per_event": round(1e3 * cpu / n, 3),
            }
    json.dump({"benchmark": "simulate", "eta": 0.2, "processes": 1, "results": results}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
