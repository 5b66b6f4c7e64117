"""Benchmark of the ONNX export; prints one JSON object.

Measured in one run, on one generator (``--generator``, default ``results/train/generator.pt``; without
it the default config's architecture with random weights, as ``bench_generate`` builds it), with the
same number of CPU threads for PyTorch and ONNX Runtime (``--threads``):

* ``export_seconds``: ``torch.onnx.export`` + metadata + ``onnx.checker`` (the graph alone), and
  ``stage_seconds``: the whole export stage (load, export, ONNX Runtime check, write);
* per batch size (4096 and 1): events/s of ONNX Runtime (the exported graph: raw conditions and z in,
  showers in MeV out) against PyTorch fp32 doing the same work, two ways: ``torch_stage``, the
  generate stage's path (numpy condition transform, ``G`` forward, numpy inverse transform and
  threshold, as :func:`surrogate.generate.forward_batches`), and ``torch_graph``, the exported
  module (:class:`surrogate.export.ShowerGraph`) run by PyTorch; ``ratio`` = ORT / the faster of
  the two; at batch 1 also the median latency in microseconds per call (a C++ framework calls one
  particle at a time). Rounds alternate between the contenders; each keeps its best round;
* ``parity``: 10,000 events, photons and pions, a quarter each at the two ends of the trained
  energy range: ORT at batch 4096 and 1 against the generate stage's path at batch 4096
  (:func:`surrogate.export.compare`), and PyTorch at batch 1 against itself at 4096 (its own
  batch dependence, for scale);
* ``graph``: opset, bytes, node count, op types.

Targets (from the issue): ORT >= 0.8x PyTorch at batch 4096, faster at batch 1.

Run: ``python benchmarks/bench_export.py [--generator PATH] [--threads T]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from surrogate import export, generate
from surrogate.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (4096, 1)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def best_rate(fns: dict, batch: int, rounds: int = 5, seconds: float = 0.6) -> dict[str, dict[str, float]]:
    """Alternating rounds of each function; per name the best events/s and, at batch 1, the median latency."""
    for fn in fns.values():
        fn()  # warm-up (kernel selection, allocations)
    best = {name: 0.0 for name in fns}
    latencies: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n, t0 = 0, time.perf_counter()
            while (now := time.perf_counter()) - t0 < seconds:
                fn()
                n += 1
                if batch == 1:
                    latencies[name].append(time.perf_counter() - now)
            best[name] = max(best[name], n * batch / (time.perf_counter() - t0))
    out = {}
    for name in fns:
        out[name] = {"events_per_s": best[name]}
        if batch == 1:
            out[name]["latency_us_median"] = 1e6 * statistics.median(latencies[name])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default=str(ROOT / "results" / "train" / "generator.pt"))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of both PyTorch and ONNX Runtime")
    parser.add_argument("--parity-events", type=int, default=10_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from surrogate.models import load_generator
    from surrogate.preprocess import Preprocessor

    cfg = load_config(ROOT / "config.yaml")
    result: dict = {"cpu": cpu_name(), "threads": args.threads, "opset": export.OPSET}
    with tempfile.TemporaryDirectory(prefix="bench_export.") as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.generator)
        if ckpt.exists():
            result["generator"] = str(ckpt)
        else:
            from bench_generate import random_checkpoint

            from surrogate.simulate import simulate_events

            ref = simulate_events(1000, cfg, np.random.SeedSequence(1))
            ckpt = random_checkpoint(cfg, ref, tmp / "generator.pt")
            result["generator"] = "random weights, default architecture"
        dataset = ROOT / "results" / "ingest" / "dataset.h5"
        t0 = time.perf_counter()
        summary = export.run(cfg, ckpt, tmp / "generator.onnx", dataset=dataset, threads=args.threads)
        result["stage_seconds"] = time.perf_counter() - t0
        result["export_seconds"] = summary["export_seconds"]
        threshold = summary["readout_threshold_mev"]
        result["readout_threshold_mev"] = threshold

        import onnx

        graph_proto = onnx.load(str(tmp / "generator.onnx"))
        result["graph"] = {
            "opset": export.OPSET,
            "bytes": summary["bytes"],
            "nodes": len(graph_proto.graph.node),
            "ops": dict(collections.Counter(n.op_type for n in graph_proto.graph.node).most_common()),
        }

        G, meta = load_generator(ckpt, torch.device("cpu"))
        pre = Preprocessor.from_dict(meta["preprocessing"])
        graph = export.ShowerGraph(G, pre, threshold).eval()
        session = export._session(tmp / "generator.onnx", args.threads)

        feeds_all = export.parity_sample(pre, max(BATCHES), 3, G.z_dim)
        result["batches"] = {}
        for batch in BATCHES:
            feeds = {k: v[:batch] for k, v in feeds_all.items()}
            cond = generate.Conditions(feeds["incident_energy"], feeds["incident_eta"], feeds["incident_pdg"])
            tensors = [torch.from_numpy(feeds[k]) for k in export.INPUT_NAMES]

            def torch_stage(cond=cond, z=tensors[0]):
                with torch.inference_mode():
                    c = torch.from_numpy(pre.transform_conditions(cond.energies, cond.eta, cond.pdg))
                    x = G(z, c).float().numpy()
                showers = pre.inverse_showers(x, cond.energies)
                np.putmask(showers, ~(showers >= threshold), 0.0)
                return showers

            def torch_graph(tensors=tensors):
                with torch.inference_mode():
                    return graph(*tensors)

            def ort(feeds=feeds):
                return session.run(None, feeds)

            rates = best_rate({"torch_stage": torch_stage, "torch_graph": torch_graph, "onnxruntime": ort}, batch)
            torch_best = max(rates["torch_stage"]["events_per_s"], rates["torch_graph"]["events_per_s"])
            rates["ratio"] = rates["onnxruntime"]["events_per_s"] / torch_best
            result["batches"][str(batch)] = rates

        result["parity"] = parity(G, pre, session, threshold, args.parity_events)
    b4096, b1 = result["batches"]["4096"], result["batches"]["1"]
    result["targets"] = {
        "ort_vs_torch_at_4096": {"value": b4096["ratio"], "target": ">= 0.8", "met": b4096["ratio"] >= 0.8},
        "ort_vs_torch_at_1": {"value": b1["ratio"], "target": "> 1", "met": b1["ratio"] > 1.0},
        "parity": {"target": "max_rel_diff <= 1e-5, same zero sets", "met": result["parity"]["met"]},
    }
    print(json.dumps(result, indent=1))  # noqa: T201 - the benchmark's output


def parity(G, pre, session, threshold: float, n: int) -> dict:
    """ORT at batch 4096 and 1 vs the generate stage's forward pass (fp32, batch 4096) on the same z and conditions."""
    feeds = export.parity_sample(pre, n, 11, G.z_dim)
    cond = generate.Conditions(feeds["incident_energy"], feeds["incident_eta"], feeds["incident_pdg"])
    seed = 7

    def stage(batch: int) -> np.ndarray:
        parts = generate.forward_batches(
            G,
            pre,
            cond,
            batch_size=batch,
            device=torch.device("cpu"),
            precision="fp32",
            latent=torch.Generator().manual_seed(seed),
            threshold_mev=threshold,
        )
        return np.concatenate([s for _, s in parts])

    reference = stage(4096)
    # the same latents as forward_batches drew, batch by batch
    gen = torch.Generator().manual_seed(seed)
    feeds["z"] = np.concatenate(
        [torch.randn((min(4096, n - s), G.z_dim), generator=gen).numpy() for s in range(0, n, 4096)]
    )
    out = {"events": n}
    ort_runs = {}
    for batch in (4096, 1):
        ort_runs[batch] = np.concatenate(
            [session.run(None, {k: v[s : s + batch] for k, v in feeds.items()})[0] for s in range(0, n, batch)]
        )
        out[f"onnxruntime_batch{batch}_vs_torch"] = export.compare(reference, ort_runs[batch], threshold)
    out["onnxruntime_batch1_equals_batch4096"] = bool(np.array_equal(ort_runs[1], ort_runs[4096]))
    # for scale, PyTorch's own batch dependence: the exported module run by PyTorch at batch 1 against itself
    # at 4096, same z (the first 2000 events: 2000 single-row calls)
    graph = export.ShowerGraph(G, pre, threshold).eval()
    with torch.inference_mode():
        tensors = [torch.from_numpy(feeds[k]) for k in export.INPUT_NAMES]
        t4096 = torch.cat([graph(*(t[s : s + 4096] for t in tensors)) for s in range(0, n, 4096)]).numpy()
        t1 = torch.cat([graph(*(t[s : s + 1] for t in tensors)) for s in range(0, min(n, 2000))]).numpy()
    out["torch_batch1_vs_torch_batch4096_first_2000"] = export.compare(t4096[: len(t1)], t1, threshold)
    out["onnxruntime_batch1_vs_torch_batch1_first_2000"] = export.compare(t1, ort_runs[1][: len(t1)], threshold)
    out["met"] = all(out[f"onnxruntime_batch{b}_vs_torch"]["ok"] for b in (4096, 1))
    return out


if __name__ == "__main__":
    main()
