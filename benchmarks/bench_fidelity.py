"""Fidelity benchmark: train at a fixed budget of generator steps, generate, validate; one JSON object.

The budget is in **generator steps**, never minutes (the wall-clock cap is lifted), so the
figure does not depend on the CPU that runs it: two runs with the same config, steps and seed
give the same model on any machine of the same kind of arithmetic (fp32, or bf16 where it is
native; ``--set train.precision=fp32`` pins it). Every stage runs through its own CLI,
``python -m surrogate.<stage>``, exactly as the workflow runs it, so the numbers are the
validate stage's own:

    simulate (cached by its settings) -> ingest (cached) -> validate floors (cached)
      -> train (--steps) -> generate (--events, one shard) -> validate

Output: one JSON object with the steps, wall seconds, the CPU, and every headline number of
:func:`surrogate.validation.headline` next to its real-vs-real floor (``{"value", "error",
"floor", "threshold", "passed", "total"}`` per row, the keys that apply), with the verdict and
the failed-test counts. Each run is also logged as one MLflow run in the experiment
``--experiment`` (default ``fidelity``) of the project's store (``mlflow.db``, or
``$MLFLOW_TRACKING_URI``): params are the preset, the overrides and the steps; metrics are the
headline values (``headline.<name>``, as the report stage logs them) and their floors
(``headline.<name>.floor``); artifacts ``summary.json`` and ``report.html``. Compare ablations
in the MLflow UI's compare view, or sort the Runs table by ``headline.n_failed``.
``--log-only`` reads a finished run's folder again (print and log, no training).

``--overlay config/interpolation.yaml`` (repeatable: config files laid over the preset) holds the
overlay's condition regions out of training (``ingest.holdout``): the held-out splits get their own
generated file, floors and validation, and the JSON object (and MLflow, ``unseen.headline.<name>``)
their headline numbers under ``unseen`` and ``extrapolation``, beside the seen ones.

    python benchmarks/bench_fidelity.py [--preset default|quality|gpu] [--steps N]
        [--set train.critic.physics_weight=10 ...] [--events 200000] [--name TAG] [--no-mlflow]
        [--overlay config/interpolation.yaml]

Work files live in ``results/fidelity/`` (data caches in ``data-<hash>/``, each run in
``runs/<name>/``); a rerun of the same name starts training over.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surrogate.config import load_config  # noqa: E402
from surrogate.holdout import regions_from_config, split_names  # noqa: E402
from surrogate.validation import headline  # noqa: E402

log = logging.getLogger("bench_fidelity")

PRESETS = {"default": [], "quality": ["config/quality.yaml"], "gpu": ["config/gpu.yaml"]}
#: Held-out splits reported beside the seen conditions (``--overlay config/interpolation.yaml``).
HELDOUT = ("unseen", "extrapolation")


def cpu_name() -> str:
    """The CPU model as lscpu names it (every figure must say which CPU it came from)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


class Stages:
    """Runs ``python -m surrogate.<stage>`` with the benchmark's config files and overrides."""

    def __init__(self, configs: list[str], overrides: list[str], threads: int) -> None:
        self.configs, self.overrides, self.threads = configs, overrides, threads
        self.env = {**os.environ, "SURROGATE_PROGRESS": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}

    def __call__(self, stage: str, *args: str, log_file: Path, extra: tuple[str, ...] = ()) -> float:
        """Run one stage to completion; its stderr goes to ``log_file``. Returns its wall seconds."""
        sub = args[:1] if args and not args[0].startswith("-") else ()
        cmd = [sys.executable, "-m", f"surrogate.{stage}", *sub]
        for c in self.configs:
            cmd += ["--config", c]
        for o in [*self.overrides, *extra]:
            cmd += ["--set", o]
        cmd += list(args[len(sub) :])
        log.info("%s", " ".join(cmd))
        log_file.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(log_file, "w") as err:
            rc = subprocess.call(cmd, cwd=ROOT, env=self.env, stderr=err, stdout=err)
        if rc != 0:
            tail = log_file.read_text().strip().splitlines()[-5:]
            raise SystemExit(f"bench_fidelity: {stage} failed (exit {rc}); see {log_file}:\n" + "\n".join(tail))
        return time.perf_counter() - t0


def data_dir(cfg: dict[str, Any], work: Path) -> Path:
    """Cache folder of the simulated sample, its ingest output and floors: keyed by what makes them."""
    keys = {k: cfg.get(k) for k in ("seed", "geometry", "material", "simulate", "ingest", "preprocess", "validate")}
    return work / f"data-{_digest(keys)}"


def prepare_data(cfg: dict[str, Any], run: Stages, work: Path) -> tuple[Path, Path, dict[str, float]]:
    """(dataset.h5, floors.json, seconds per stage that ran); each made once per its settings (the
    floors of the held-out splits, if any, beside floors.json as floors-<split>.json)."""
    data = data_dir(cfg, work)
    raw, dataset, floors = data / "reference.h5", data / "ingest" / "dataset.h5", data / "floors.json"
    seconds: dict[str, float] = {}
    if not raw.exists():
        seconds["simulate"] = run(
            "simulate", "--out", str(raw), log_file=data / "simulate.log", extra=(f"simulate.workers={run.threads}",)
        )
    if not dataset.exists():
        seconds["ingest"] = run(
            "ingest", "--input", str(raw), "--out", str(dataset.parent), log_file=data / "ingest.log"
        )
    if not floors.exists():
        seconds["floors"] = run(
            "validate",
            "floors",
            "--dataset",
            str(dataset),
            "--out",
            str(floors),
            "--threads",
            str(run.threads),
            log_file=data / "floors.log",
        )
    for split in split_names(regions_from_config(cfg)):
        path = data / f"floors-{split}.json"
        if not path.exists():
            seconds[f"floors-{split}"] = run(
                "validate",
                "floors",
                "--dataset",
                str(dataset),
                "--split",
                split,
                "--out",
                str(path),
                "--threads",
                str(run.threads),
                log_file=data / f"floors-{split}.log",
            )
    return dataset, floors, seconds


def log_mlflow(experiment: str, name: str, params: dict[str, Any], result: dict[str, Any], out: Path) -> str:
    """One MLflow run per benchmark run: params, headline metrics and floors, the summary and report."""
    import mlflow

    from surrogate.report import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri({"report": {}}, ROOT))
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=name) as active:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        metrics = {"steps": result["steps"], "train_seconds": result["seconds"]["train"]}
        heldout = [(f"{s}.", result[s]["headline"]) for s in HELDOUT if s in result]  # with an overlay only
        for prefix, rows in (("", result["headline"]), *heldout):
            for key, row in rows.items():
                if isinstance(row.get("value"), int | float):
                    metrics[f"{prefix}headline.{key}"] = float(row["value"])
                if isinstance(row.get("floor"), int | float):
                    metrics[f"{prefix}headline.{key}.floor"] = float(row["floor"])
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"verdict": result["verdict"], "cpu": result["cpu"], "preset": params["preset"]})
        for f in ("summary.json", "report.html"):
            if (out / "validate" / f).exists():
                mlflow.log_artifact(str(out / "validate" / f))
        return active.info.run_id


def stage_all(run: Stages, cfg: dict[str, Any], out: Path, work: Path) -> dict[str, float]:
    """Data (cached in ``work``), then train, generate and validate into ``out``; seconds per stage."""
    dataset, floors, seconds = prepare_data(cfg, run, work)

    seconds["train"] = run(
        "train",
        "--dataset",
        str(dataset),
        "--out",
        str(out / "train"),
        "--restart",
        "--threads",
        str(run.threads),
        log_file=out / "train.log",
    )
    gen = out / "generate" / "events.h5"
    seconds["generate"] = run(
        "generate",
        "--generator",
        str(out / "train" / "generator.pt"),
        "--dataset",
        str(dataset),
        "--out",
        str(gen),
        "--threads",
        str(run.threads),
        log_file=out / "generate.log",
    )
    heldout: list[str] = []
    for split in split_names(regions_from_config(cfg)):
        path = out / "generate" / f"{split}.h5"
        seconds[f"generate-{split}"] = run(
            "generate",
            "--generator",
            str(out / "train" / "generator.pt"),
            "--dataset",
            str(dataset),
            "--split",
            split,
            "--out",
            str(path),
            "--threads",
            str(run.threads),
            log_file=out / f"generate-{split}.log",
        )
        heldout += [f"--{split}", str(path), f"--{split}-floors", str(floors.parent / f"floors-{split}.json")]
    seconds["validate"] = run(
        "validate",
        "--dataset",
        str(dataset),
        "--generated",
        str(gen),
        "--floors",
        str(floors),
        "--history",
        str(out / "train" / "history.jsonl"),
        "--out",
        str(out / "validate"),
        *heldout,
        "--threads",
        str(run.threads),
        log_file=out / "validate.log",
    )
    (out / "seconds.json").write_text(json.dumps(seconds))
    return seconds


def _headline(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The headline rows of a (seen or held-out) validation summary, keyed by name."""
    keys = ("value", "error", "floor", "threshold", "passed", "total")
    return {r["name"]: {k: r[k] for k in keys if r.get(k) is not None} for r in headline(summary)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--steps", type=int, default=None, help="generator steps (default: the preset's train.steps)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the change under test (repeatable)",
    )
    parser.add_argument("--events", type=int, default=None, help="generated events (default: generate.events)")
    parser.add_argument(
        "--overlay",
        action="append",
        default=[],
        metavar="PATH",
        help="config file laid over the preset (repeatable), e.g. config/interpolation.yaml (held-out conditions)",
    )
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2 if os.cpu_count() == 2 else 8))
    parser.add_argument("--name", default=None, help="run name (default: preset, overrides and steps)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "results" / "fidelity")
    parser.add_argument("--experiment", default="fidelity", help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    parser.add_argument(
        "--log-only",
        action="store_true",
        help="train nothing: read the finished run --name from its folder, print and log it",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    configs = ["config.yaml", *PRESETS[args.preset], *args.overlay]
    base = load_config([ROOT / c for c in configs], args.overrides)
    steps = int(args.steps if args.steps is not None else base["train"]["steps"])
    # the budget is the steps: the wall-clock cap only guards against a hang (a week)
    overrides = [*args.overrides, f"train.steps={steps}", "train.max_minutes=10080"]
    if args.events is not None:
        overrides.append(f"generate.events={args.events}")
    cfg = load_config([ROOT / c for c in configs], overrides)
    run = Stages(configs, overrides, args.threads)
    tags = [Path(o).stem for o in args.overlay]
    name = args.name or "-".join([args.preset, *tags, *args.overrides, f"{steps}steps"]).replace("/", "_")
    out = args.workdir / "runs" / name
    if args.log_only:
        seconds = json.loads((out / "seconds.json").read_text())
    else:
        seconds = stage_all(run, cfg, out, args.workdir)
    summary = json.loads((out / "validate" / "summary.json").read_text())
    train = json.loads((out / "train" / "summary.json").read_text())
    result = {
        "benchmark": "fidelity",
        "preset": args.preset,
        "overrides": args.overrides,
        "steps": int(train["steps"]),
        "best_step": int(train["best_step"]),
        "precision": train["precision"],
        "cpu": cpu_name(),
        "threads": args.threads,
        "steps_per_second": round(float(train["steps_per_second"]), 2),
        "verdict": summary["verdict"],
        "headline": _headline(summary),
        **({"verdicts": summary["verdicts"], "verdict_line": summary["verdict_line"]} if "verdicts" in summary else {}),
        # held-out conditions (--overlay config/interpolation.yaml): the same numbers, seen beside unseen
        **{
            s: {
                "verdict": summary[s]["verdict"],
                "real_events": summary[s]["real_events"],
                "headline": _headline(summary[s]),
            }
            for s in HELDOUT
            if s in summary
        },
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    if train["steps"] != steps:
        raise SystemExit(f"bench_fidelity: training stopped at step {train['steps']} of {steps}; see {out}")
    if not args.no_mlflow:
        result["mlflow_run_id"] = log_mlflow(
            args.experiment,
            name,
            {
                "preset": args.preset,
                "steps": steps,
                "overrides": " ".join(args.overrides) or "none",
                "overlays": " ".join(args.overlay) or "none",
                "events": cfg["generate"]["events"],
                "cpu": result["cpu"],
                "precision": train["precision"],
            },
            result,
            out,
        )
    print(json.dumps(result))  # noqa: T201 (the benchmark's one JSON object)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
