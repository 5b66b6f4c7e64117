"""Benchmark of the generate stage; prints one JSON object.

Measured in one run, on the default config's generator architecture with random weights
(speed does not depend on the weights; nothing is trained):

* ``forward_eps_fp32`` / ``forward_eps_bf16``: events/s of the bare forward pass at its best batch
  size; ``forward_eps`` is the one of the precision the stage uses;
* ``write_eps``: events/s of h5py alone writing the stage's own showers with its chunking and filter;
* ``bound = min(forward_eps, write_eps)``; ``stage_eps`` for >= 1M events through ``generate.run``;
  ``ratio = stage_eps / bound``;
* ``filters``: write rate and compression ratio of each filter on reference-simulator showers
  (what a trained generator produces looks like these; random weights do not), the basis of the
  default filter choice;
* ``bf16_check``: E_dep/E_inc of bf16 vs fp32 output for the same latents (KS distance, mean shift);
* ``simulator_eps`` for the same condition mix (one process), ``speedup``, and speedups at fixed
  100 GeV photons and pions.

Run: ``python benchmarks/bench_generate.py [--events N] [--overlay config/calochallenge-ds2.yaml]``
(default 1,000,000 events). ``--overlay`` (repeatable) lays config files over config.yaml: with the
CaloChallenge dataset-2 preset the generator is that preset's (per_layer, 6,480 voxels), its reference
sample the simulator's electrons in that binning, and the fixed-energy comparison at 100 GeV is made for
the preset's particles; the JSON names the overlays and the voxel count.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from surrogate import generate
from surrogate.config import load_config
from surrogate.device import resolve_precision
from surrogate.simulate import simulate_events

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1024, 4096, 16384)


def _rate(fn, batch: int, seconds: float = 1.5) -> float:
    fn()  # warm-up (oneDNN kernel selection)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * batch / (time.perf_counter() - t0)


def forward_rates(G: torch.nn.Module, c_dim: int) -> dict[str, tuple[float, int]]:
    """Best (events/s, batch) of the bare forward pass per precision."""
    out = {}
    gen = torch.Generator().manual_seed(0)
    for precision in ("fp32", "bf16"):
        best = (0.0, 0)
        for batch in BATCHES:
            z, c = torch.randn(batch, G.z_dim, generator=gen), torch.randn(batch, c_dim, generator=gen)

            def fwd(z=z, c=c, precision=precision):
                with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                    return G(z, c).float()

            best = max(best, (_rate(fwd, batch), batch))
        out[precision] = best
    return out


def write_rate(block: np.ndarray, rows: int, out_settings: dict, path: Path) -> tuple[float, float]:
    """(events/s, compression ratio) of h5py writing ``rows`` rows cycled from ``block``, as the stage does."""
    kw = generate.output_filter(out_settings)
    chunk = int(out_settings["chunk_events"])
    step = 4096
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        d = f.create_dataset(
            "showers",
            shape=(rows, block.shape[1]),
            dtype=np.float32,
            chunks=(chunk, block.shape[1]),
            track_times=False,
            **kw,
        )
        for i in range(0, rows, step):
            j = i % len(block)
            part = block[j : j + min(step, rows - i)]
            d[i : i + len(part)] = part
    seconds = time.perf_counter() - t0
    ratio = rows * block.shape[1] * 4 / path.stat().st_size
    path.unlink()
    return rows / seconds, ratio


def bf16_check(G, pre, cond: generate.Conditions) -> dict[str, float]:
    """E_dep/E_inc of fp32 vs bf16 output for the same latents and conditions."""
    from scipy.stats import ks_2samp

    res = {}
    for precision in ("fp32", "bf16"):
        latent = torch.Generator().manual_seed(1)
        parts = [
            s
            for _, s in generate.forward_batches(
                G, pre, cond, batch_size=4096, device=torch.device("cpu"), precision=precision, latent=latent
            )
        ]
        res[precision] = np.concatenate(parts).sum(axis=1, dtype=np.float64) / cond.energies[:, 0]
    a, b = res["fp32"], res["bf16"]
    ks = ks_2samp(a, b, method="asymp")
    return {
        "events": len(a),
        "ks_statistic": float(ks.statistic),
        "ks_pvalue": float(ks.pvalue),
        "mean_fp32": float(a.mean()),
        "mean_bf16": float(b.mean()),
        "median_abs_rel_diff_per_event": float(np.median(np.abs(b - a) / np.maximum(np.abs(a), 1e-12))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--sim-events", type=int, default=1000)
    parser.add_argument(
        "--overlay", action="append", default=[], metavar="PATH", help="config file laid over config.yaml (repeatable)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from surrogate.geometry import from_config
    from surrogate.models import load_generator
    from surrogate.preprocess import Preprocessor

    configs = [ROOT / "config.yaml", *args.overlay]
    cfg = load_config(configs)
    sim = cfg["simulate"]
    # the stage's condition mix = the simulator's (the test split is drawn from it)
    mix = [
        "generate.conditions.source=range",
        f"generate.conditions.range.energy_gev=[{sim['energy']['min_gev']}, {sim['energy']['max_gev']}]",
        f"generate.conditions.range.eta=[{sim['eta']['min']}, {sim['eta']['max']}]",
        f"generate.conditions.range.particles={[p['pdg'] for p in sim['particles']]}",
    ]
    cfg = load_config(configs, mix)
    result: dict = {
        "torch_threads": torch.get_num_threads(),
        "overlays": [str(o) for o in args.overlay],
        "n_voxels": from_config(cfg).n_voxels,
    }

    with tempfile.TemporaryDirectory(prefix="bench_generate.") as tmp:
        tmp = Path(tmp)
        # reference sample: fits the preprocessing and times the simulator
        t0 = time.perf_counter()
        ref = simulate_events(args.sim_events, cfg, np.random.SeedSequence(1))
        result["simulator_eps"] = args.sim_events / (time.perf_counter() - t0)
        ckpt = random_checkpoint(cfg, ref, tmp / "generator.pt")
        G, meta = load_generator(ckpt, torch.device("cpu"))
        pre = Preprocessor.from_dict(meta["preprocessing"])

        fw = forward_rates(G, len(meta["condition_names"]))
        precision = resolve_precision(cfg["generate"]["precision"], torch.device("cpu"))
        result.update(
            precision=precision,
            forward_eps_fp32=fw["fp32"][0],
            forward_batch_fp32=fw["fp32"][1],
            forward_eps_bf16=fw["bf16"][0],
            forward_batch_bf16=fw["bf16"][1],
            forward_eps=fw[precision][0],
        )

        cond = generate.Conditions(ref["incident_energies"], ref["incident_eta"], ref["incident_pdg"])
        result["bf16_check"] = bf16_check(G, pre, cond)
        trained = ROOT / cfg["results_dir"] / "train" / "generator.pt"
        if trained.exists():  # the check that matters: a trained generator at the test split's conditions
            Gt, meta_t = load_generator(trained, torch.device("cpu"))
            pre_t = Preprocessor.from_dict(meta_t["preprocessing"])
            result["bf16_check_trained"] = bf16_check(Gt, pre_t, cond)

        # filters on realistic (simulated) showers
        block = np.concatenate([ref["showers"]] * max(1, 16384 // len(ref["showers"])))
        result["filters"] = {}
        for name, comp, shuffle in [
            ("none", "none", False),
            ("lzf", "lzf", False),
            ("shuffle+lzf", "lzf", True),
            ("gzip1", "gzip", False),
        ]:
            settings = dict(cfg["generate"]["output"], compression=comp, shuffle=shuffle, gzip_level=1)
            eps, ratio = write_rate(block, 65536, settings, tmp / "filter.h5")
            result["filters"][name] = {"write_eps": eps, "compression_ratio": ratio}

        # the whole stage, >= 1M events
        out = tmp / "events.h5"
        summary = generate.run(cfg, ckpt, out, events=args.events, seed=1, dataset=None, progress=False)
        result["events"] = args.events
        result["stage_eps"] = summary["events_per_s"]
        result["output_filter"] = cfg["generate"]["output"]
        with h5py.File(out, "r") as f:
            stage_block = f["showers"][:65536]
        out.unlink()
        result["write_eps"], result["output_compression_ratio"] = write_rate(
            stage_block, args.events, cfg["generate"]["output"], tmp / "write.h5"
        )
        result["bound"] = min(result["forward_eps"], result["write_eps"])
        result["ratio"] = result["stage_eps"] / result["bound"]
        result["speedup"] = result["stage_eps"] / result["simulator_eps"]

        # fixed 100 GeV photons and pions (or the preset's particles)
        names = {11: "electron", 22: "photon", 211: "pion"}
        for name, pdg in ((names[p["pdg"]], p["pdg"]) for p in sim["particles"]):
            n_sim = max(50, args.sim_events // 5)
            t0 = time.perf_counter()
            simulate_events(
                n_sim, cfg, np.random.SeedSequence(2), particle=pdg, energy_mev=1e5, eta=min(0.2, sim["eta"]["max"])
            )
            sim_eps = n_sim / (time.perf_counter() - t0)
            fixed = load_config(
                configs,
                [
                    "generate.conditions.source=grid",
                    "generate.conditions.grid.energies_gev=[100]",
                    f"generate.conditions.grid.eta=[{min(0.2, sim['eta']['max'])}]",
                    f"generate.conditions.grid.particles=[{pdg}]",
                ],
            )
            n_gen = max(args.events // 5, 1000)
            s = generate.run(fixed, ckpt, tmp / f"{name}.h5", events=n_gen, seed=2, dataset=None, progress=False)
            result[f"simulator_eps_100gev_{name}"] = sim_eps
            result[f"stage_eps_100gev_{name}"] = s["events_per_s"]
            result[f"speedup_100gev_{name}"] = s["events_per_s"] / sim_eps
            (tmp / f"{name}.h5").unlink()

    print(json.dumps(result, indent=1))  # noqa: T201 - the benchmark's output


def random_checkpoint(cfg: dict, ref: dict, path: Path) -> Path:
    """Save a randomly initialised generator of the default architecture in the real checkpoint format.

    Preprocessing is fitted on the reference sample (``Preprocessor.fit``); the generator is the
    default config's (``surrogate.train.model_parts``, its output head included).
    """
    import torch

    from surrogate.geometry import from_config
    from surrogate.models import FORMAT_VERSION, Generator
    from surrogate.preprocess import Preprocessor
    from surrogate.train import model_parts

    no_eta = cfg["ingest"]["datasets"]["incident_eta"] is None  # energy the only condition (a plain file)
    pre = Preprocessor.fit(
        ref["showers"],
        ref["incident_energies"],
        None if no_eta else ref["incident_eta"],
        ref["incident_pdg"],
        cfg["preprocess"],
        cfg["ingest"]["particles"],
    )
    geometry = from_config(cfg)
    no_critic_inputs = {"physics_weight": 0.0, "shape_weight": 0.0, "threshold": False}  # only G is saved
    mc, head, _ = model_parts(
        {**cfg["train"], "critic": {**cfg["train"]["critic"], **no_critic_inputs}},
        pre,
        geometry,
        ref["showers"],
        ref["incident_energies"],
        pdg=ref["incident_pdg"],
    )
    torch.manual_seed(0)
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "model_config": mc.to_dict(),
            "ema_state_dict": Generator(mc, head).state_dict(),
            "preprocessing": pre.to_dict(),
            "condition_names": pre.condition_names,
            "geometry": geometry.to_dict(),
            "step": 0,
        },
        path,
    )
    return path


if __name__ == "__main__":
    main()
