"""Benchmark of the training loop; prints one JSON object.

Generator steps/s (each step = ``n_critic`` critic updates with gradient penalty + one generator
update + EMA) and samples/s (= steps/s x batch_size, generator samples) of the default config's
model (533 voxels, 4 conditions, its real output head and critic inputs) on reference-simulator
showers, through the real :func:`surrogate.train.train_steps`,
on the CPU in fp32 and bf16 autocast, and on CUDA when present.

Run: ``python benchmarks/bench_train.py [--steps N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from surrogate.config import load_config
from surrogate.train import TrainState, loop_settings_from, model_parts, train_steps

ROOT = Path(__file__).resolve().parents[1]


def reference_sample(cfg: dict, events: int) -> tuple:
    """(network-space showers (N, V), conditions (N, C), model parts) from the reference simulator,
    preprocessed as the ingest stage does, so the model is the default one with its real head."""
    from surrogate.geometry import from_config
    from surrogate.preprocess import Preprocessor
    from surrogate.simulate import simulate_events

    ev = simulate_events(events, cfg, seed=1)
    pre = Preprocessor.fit(
        ev["showers"],
        ev["incident_energies"],
        ev["incident_eta"],
        ev["incident_pdg"],
        cfg["preprocess"],
        cfg["ingest"]["particles"],
    )
    parts = model_parts(
        cfg["train"], pre, from_config(cfg, ROOT), ev["showers"], ev["incident_energies"], pdg=ev["incident_pdg"]
    )
    x = torch.from_numpy(pre.transform_showers(ev["showers"], ev["incident_energies"]))
    c = torch.from_numpy(pre.transform_conditions(ev["incident_energies"], ev["incident_eta"], ev["incident_pdg"]))
    return x, c, parts


def _timer(cfg: dict, device: torch.device, precision: str, sample: tuple):
    """A function timing ``n`` generator steps of a fresh default model (after 3 warm-up steps)."""
    x, c, (mcfg, head, physics) = sample
    state = TrainState(mcfg, loop_settings_from(cfg["train"], precision), device, 0, head=head, physics=physics)
    x, c = x.to(device), c.to(device)
    train_steps(state, x, c, 3)

    def timed(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_steps(state, x, c, n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return timed


def measure(cfg: dict, device: torch.device, steps: int, rounds: int, sample: tuple) -> dict:
    """Steps/s and samples/s in fp32 and bf16, timed in alternating rounds (best round counts).

    Alternating rounds keep a load change on a shared machine from favouring one precision.
    """
    timers = {p: _timer(cfg, device, p, sample) for p in ("fp32", "bf16")}
    best = {p: float("inf") for p in timers}
    for _ in range(rounds):
        for p, timed in timers.items():
            best[p] = min(best[p], timed(steps))
    batch = cfg["train"]["batch_size"]
    out: dict = {
        p: {"steps_per_s": steps / dt, "samples_per_s": steps * batch / dt, "steps": steps} for p, dt in best.items()
    }
    out["bf16_speedup"] = best["fp32"] / best["bf16"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed generator steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating fp32/bf16 rounds (the best counts)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--events", type=int, default=4000, help="reference-simulator events to train on")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "config.yaml")
    sample = reference_sample(cfg, args.events)
    result = {
        "model": {k: cfg["train"][k] for k in ("batch_size", "n_critic", "z_dim", "generator", "critic")},
        "voxels": int(sample[0].shape[1]),
        "conditions": int(sample[1].shape[1]),
        "threads": torch.get_num_threads(),
        "cpu": measure(cfg, torch.device("cpu"), args.steps, args.rounds, sample),
    }
    if torch.cuda.is_available():
        result["cuda"] = measure(cfg, torch.device("cuda"), 10 * args.steps, args.rounds, sample)
    print(json.dumps(result))  # noqa: T201 - the benchmark's output


if __name__ == "__main__":
    main()
