"""Report stage: log one pipeline execution to MLflow.

``python -m surrogate.report --config C --results results --out results/report``

Only this stage talks to MLflow, so the other stages run without a tracking store and
parallel Snakemake jobs never contend for it. Everything it logs is read from files the
earlier stages wrote under ``results/``; nothing there is modified. If the store cannot be
reached the stage retries with backoff, then fails with one line, and
``snakemake --forcerun report`` finishes the job later.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from surrogate.config import parse_stage_args, stage_parser
from surrogate.holdout import SPLIT_OF_KIND
from surrogate.io import write_json
from surrogate.validation.scoreboard import headline

#: The held-out splits whose validation the summary may carry (ingest.holdout).
HELDOUT_SPLITS = tuple(SPLIT_OF_KIND.values())

__all__ = ["ReportError", "ShowerSampler", "resolve_tracking_uri", "flatten", "onnx_signature", "run", "main"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# MLflow limits a param value to 6000 characters.
_PARAM_MAX = 6000
_PACKAGES = (
    "surrogate",
    "torch",
    "numpy",
    "scipy",
    "h5py",
    "scikit-learn",
    "snakemake",
    "mlflow",
    "matplotlib",
    "onnx",
    "onnxruntime",
)


class ReportError(RuntimeError):
    """The report could not be written (store unreachable, required result missing)."""


class ShowerSampler(torch.nn.Module):
    """The generator as users meet it in MLflow: raw conditions in, showers in MeV out.

    Input (B, 3) float32: incident energy in MeV, η, PDG code. Output (B, n_voxels) float32 MeV,
    non-negative, below-threshold voxels zeroed. Latents come from a generator seeded with
    ``seed`` on every call, so the same input gives the same showers.
    """

    def __init__(self, generator: torch.nn.Module, meta: dict[str, Any], threshold_mev: float = 0.0, seed: int = 0):
        super().__init__()
        self.generator = generator
        self.preprocessing = dict(meta["preprocessing"])
        self.threshold_mev = float(threshold_mev)
        self.seed = int(seed)

    @classmethod
    def from_checkpoint(cls, path: str | Path, threshold_mev: float = 0.0) -> ShowerSampler:
        from surrogate.models import load_generator

        generator, meta = load_generator(path, torch.device("cpu"))
        return cls(generator, meta, threshold_mev)

    def example_conditions(self) -> np.ndarray:
        """A few valid raw conditions (B, 3): energy MeV, η, PDG."""
        from surrogate.preprocess import Preprocessor

        pre = Preprocessor.from_dict(self.preprocessing)
        lo, hi = pre.energy_range_mev
        eta = 0.5 * sum(pre.eta_range) if pre.eta_range else 0.0
        particles = list(pre.particles) or [0]
        rows = [[float(np.sqrt(lo * hi)), eta, p] for p in particles] + [[hi, eta, particles[0]]]
        return np.asarray(rows, dtype=np.float32)

    def forward(self, conditions: torch.Tensor) -> torch.Tensor:
        from surrogate.preprocess import Preprocessor

        pre = Preprocessor.from_dict(self.preprocessing)
        raw = conditions.detach().cpu().numpy().astype(np.float64)
        energies = raw[:, :1]
        c = pre.transform_conditions(energies, raw[:, 1:2], np.rint(raw[:, 2:3]).astype(np.int64))
        latent = torch.Generator().manual_seed(self.seed)
        z = torch.randn((len(raw), int(self.generator.z_dim)), generator=latent)
        with torch.inference_mode():
            x = self.generator(z, torch.from_numpy(c)).float().numpy()
        showers = pre.inverse_showers(x, energies)
        showers[~(showers >= self.threshold_mev)] = 0.0
        return torch.from_numpy(showers)


def resolve_tracking_uri(cfg: dict[str, Any], root: Path | None = None) -> str:
    """Tracking URI: config, else ``MLFLOW_TRACKING_URI``, else SQLite at ``<root>/mlflow.db``
    (root: the project, i.e. the working directory)."""
    uri = cfg.get("report", {}).get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{((root or Path.cwd()) / 'mlflow.db').resolve()}"


def default_artifact_location(cfg: dict[str, Any], root: Path | None = None) -> str | None:
    """Artifacts under ``<root>/mlartifacts`` for the default local store; the server decides otherwise."""
    location = cfg.get("report", {}).get("artifact_location")
    if location:
        return location
    uri = resolve_tracking_uri(cfg, root)
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        return ((root or Path.cwd()) / "mlartifacts").resolve().as_uri()
    return None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "value"}``; lists become JSON (cut to MLflow's length limit)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            out[name] = text if len(text) <= _PARAM_MAX else text[: _PARAM_MAX - 3] + "..."
    return out


def with_retries(fn: Callable[[], T], what: str, attempts: int, backoff_s: float) -> T:
    """Call ``fn``; on failure wait ``backoff_s * 2**k`` and retry; after ``attempts`` raise ReportError."""
    for k in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any store failure is retried, then reported once
            if k == attempts - 1:
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ReportError(f"{what} failed after {attempts} attempts: {first_line}") from exc
            delay = backoff_s * 2**k
            log.warning("%s failed (%s); retrying in %.1f s", what, type(exc).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _git_tags(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"git.commit": git("rev-parse", "HEAD"), "git.dirty": str(bool(git("status", "--porcelain")))}
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}


def _versions() -> dict[str, str]:
    out = {}
    for pkg in _PACKAGES:
        try:
            out[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[f"version.{pkg}"] = "absent"
    out["version.python"] = platform.python_version()
    return out


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _stage_seconds(bench_dir: Path) -> dict[str, float]:
    """Wall seconds per rule from Snakemake's ``benchmark:`` files (shards summed per stage)."""
    out: dict[str, float] = {}
    for tsv in sorted(bench_dir.glob("*.tsv")):
        with tsv.open() as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if rows:
            stage = tsv.stem.split("-")[0]
            out[stage] = out.get(stage, 0.0) + float(rows[-1]["s"])
    return out


def _generated_events(path: Path) -> dict[str, int] | None:
    """{"events": rows of the joined generated file}, None when it is absent or unreadable."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {"events": int(f["showers"].shape[0])}
    except (OSError, KeyError):
        return None


def collect(results: Path) -> dict[str, Any]:
    """Everything the report logs, read from ``results/`` (absent pieces are None)."""
    history_path = results / "train" / "history.jsonl"
    history = []
    if history_path.exists():
        history = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
    return {
        "manifest": _read_json(results / "ingest" / "manifest.json"),
        "train_summary": _read_json(results / "train" / "summary.json"),
        "history": history,
        "generate_summary": _generated_events(results / "generate" / "events.h5"),
        "validate_summary": _read_json(results / "validate" / "summary.json"),
        "stage_seconds": _stage_seconds(results / "benchmarks"),
    }


def _metrics(info: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(name, value, step) triples: training history by step, validation metrics, throughput."""
    out: list[tuple[str, float, int]] = []
    for row in info["history"]:
        step = int(row.get("step", 0))
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and value == value:  # skip NaN
                out.append((f"train.{key}", float(value), step))
    summary = info["validate_summary"] or {}
    out += _validation_metrics(summary)
    # held-out conditions (ingest.holdout): the same metrics under their split's name
    for split in HELDOUT_SPLITS:
        if isinstance(summary.get(split), dict):
            out += [(f"{split}.{n}", v, s) for n, v, s in _validation_metrics(summary[split])]
    for stage, seconds in info["stage_seconds"].items():
        out.append((f"stage_seconds.{stage}", seconds, 0))
    gen = info["generate_summary"] or {}
    if gen.get("events") and info["stage_seconds"].get("generate"):
        out.append(("generate.events_per_second", gen["events"] / info["stage_seconds"]["generate"], 0))
    train = info["train_summary"] or {}
    for key in ("steps_per_second", "samples_per_second", "wall_seconds", "best_score"):
        if isinstance(train.get(key), int | float):
            out.append((f"train.summary.{key}", float(train[key]), 0))
    return out


def _validation_metrics(summary: dict[str, Any]) -> list[tuple[str, float, int]]:
    """Every test's value, error, floor, threshold and pass (``validate.<test>.<field>``), and the headline."""
    out: list[tuple[str, float, int]] = []
    for m in summary.get("metrics", []):
        for field in ("value", "error", "floor", "threshold"):
            v = m.get(field)
            if isinstance(v, int | float) and v == v:
                out.append((f"validate.{m['name']}.{field}", float(v), 0))
        if "passed" in m and m["passed"] is not None:
            out.append((f"validate.{m['name']}.passed", float(bool(m["passed"])), 0))
    return out + _headline_metrics(summary)


def _headline_metrics(summary: dict[str, Any]) -> list[tuple[str, float, int]]:
    """The validation scoreboard as top-level metrics (the Runs table sorts by them): ``headline.<name>``
    is a row's value, ``headline.<name>.floor`` its floor where it has one."""
    if not summary:
        return []
    out = []
    for row in headline(summary):
        for suffix, v in (("", row["value"]), (".floor", row["floor"])):
            if isinstance(v, int | float) and v == v:  # skip None and NaN
                out.append((f"headline.{row['name']}{suffix}", float(v), 0))
    return out


def _sanitize(name: str) -> str:
    # MLflow metric names allow alphanumerics, _ - . space / only
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)


def run(
    cfg: dict[str, Any],
    results: str | Path,
    out_dir: str | Path,
    config_path: str | Path | Sequence[str | Path] | None = None,
    root: Path | None = None,
) -> dict[str, Any]:
    """Log the pipeline run under ``results`` to MLflow; write ``out_dir/mlflow_run.json``; return it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    results, out_dir = Path(results), Path(out_dir)
    root = root or Path.cwd()
    settings = cfg.get("report", {})
    attempts = int(settings.get("retries", 4))
    backoff = float(settings.get("backoff_seconds", 1.0))
    uri = resolve_tracking_uri(cfg, root)
    experiment_name = settings.get("experiment", "surrogate")
    info = collect(results)
    if info["validate_summary"] is None and info["train_summary"] is None and info["manifest"] is None:
        raise ReportError(f"{results}: no stage outputs found (manifest, train summary, validation summary)")

    # MLflow's HTTP client retries for minutes on its own; our backoff is the one retry policy.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)

    def get_experiment() -> str:
        exp = client.get_experiment_by_name(experiment_name)
        if exp is not None:
            return exp.experiment_id
        return client.create_experiment(experiment_name, artifact_location=default_artifact_location(cfg, root))

    experiment_id = with_retries(get_experiment, f"connecting to MLflow at {uri}", attempts, backoff)

    tags = {**_git_tags(root), **_versions()}
    manifest = info["manifest"] or {}
    for i, item in enumerate(manifest.get("inputs", [])):
        tags[f"input.{i}.path"] = str(item.get("path"))
        tags[f"input.{i}.sha256"] = str(item.get("sha256"))
    train = info["train_summary"] or {}
    tags["device"] = str(train.get("device", "unknown"))
    verdict = (info["validate_summary"] or {}).get("verdict", "NOT_RUN")
    tags["validation.verdict"] = verdict
    for key, value in ((info["validate_summary"] or {}).get("verdicts") or {}).items():
        tags[f"validation.{key}.verdict"] = str(value)  # seen, unseen, extrapolation (ingest.holdout)

    def log_everything(run_id: str) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        params = [Param(k, v) for k, v in flatten(cfg).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        metrics = [Metric(_sanitize(n), v, now, s) for n, v, s in _metrics(info)]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        client.log_batch(run_id, tags=[RunTag("mlflow.note.content", _note(verdict, info))])
        for path, dest in _artifacts(results, config_path):
            client.log_artifact(run_id, str(path), dest)
        generator = results / "train" / "generator.pt"
        if generator.exists() and settings.get("log_model", True):
            _log_model(run_id, generator, _threshold(results / "ingest" / "dataset.h5"))
        onnx_path = results / "export" / "generator.onnx"
        if onnx_path.exists() and settings.get("log_model", True):
            _log_onnx(run_id, onnx_path)
        client.set_terminated(run_id, "FINISHED")

    create = lambda: client.create_run(experiment_id, tags=tags, run_name=settings.get("run_name") or None)  # noqa: E731
    run_id = with_retries(create, f"creating a run in MLflow at {uri}", attempts, backoff).info.run_id
    try:
        # not retried as a whole: a second attempt would log a second, duplicate run
        log_everything(run_id)
    except Exception as exc:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "FAILED")
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ReportError(f"logging run {run_id} to MLflow at {uri} failed: {first_line}") from exc
    backend = uri if "://" in uri else f"file://{uri}"
    record = {
        "tracking_uri": uri,
        "experiment": experiment_name,
        "experiment_id": experiment_id,
        "run_id": run_id,
        "verdict": verdict,
        "open_with": f"mlflow ui --backend-store-uri {backend} --host 127.0.0.1 --port 5000"
        if uri.startswith("sqlite:")
        else f"open {uri}/#/experiments/{experiment_id}/runs/{run_id}",
    }
    write_json(out_dir / "mlflow_run.json", record)
    log.info("logged run %s to %s (experiment %r, verdict %s)", run_id, uri, experiment_name, verdict)
    return record


def _note(verdict: str, info: dict[str, Any]) -> str:
    train = info["train_summary"] or {}
    lines = [f"Validation verdict: **{verdict}**"]
    line = (info["validate_summary"] or {}).get("verdict_line")
    if line:
        lines.append(line)
    if train:
        lines.append(f"Best generator at step {train.get('best_step')} (score {train.get('best_score')}).")
    seconds = info["stage_seconds"]
    if seconds:
        lines.append("Stage wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    return "\n\n".join(lines)


def _artifacts(results: Path, config_path: str | Path | Sequence[str | Path] | None) -> list[tuple[Path, str]]:
    """(file, artifact sub-directory) pairs that exist."""
    candidates = [
        (results / "validate" / "report.html", "validate"),
        (results / "validate" / "summary.json", "validate"),
        (results / "ingest" / "manifest.json", "ingest"),
        (results / "train" / "history.jsonl", "train"),
        (results / "train" / "summary.json", "train"),
        (results / "generate" / "summary.json", "generate"),
        (results / "export" / "generator.json", "export"),
    ]
    candidates += [(p, "validate/plots") for p in sorted((results / "validate" / "plots").glob("*.png"))]
    for split in HELDOUT_SPLITS:
        candidates += [
            (p, f"validate/plots/{split}") for p in sorted((results / "validate" / "plots" / split).glob("*.png"))
        ]
    if config_path is not None:  # one file, or the overlays given to --config
        paths = [config_path] if isinstance(config_path, str | Path) else config_path
        candidates += [(Path(p), "config") for p in paths]
    return [(p, d) for p, d in candidates if p.exists()]


def _threshold(dataset: Path) -> float:
    """The readout threshold (MeV) the real data were read out with, as ingest recorded it."""
    if not dataset.exists():
        return 0.0
    import h5py

    with h5py.File(dataset, "r") as f:
        return float(f.attrs.get("readout_threshold_mev", 0.0))


def _log_model(run_id: str, generator_path: Path, threshold_mev: float) -> None:
    """Log the generator as an MLflow PyTorch model that samples showers from raw conditions."""
    import mlflow
    from mlflow.models import infer_signature

    sampler = ShowerSampler.from_checkpoint(generator_path, threshold_mev)
    example = sampler.example_conditions()
    with torch.inference_mode():
        output = sampler(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    requirements = [f"{pkg}=={metadata.version(pkg)}" for pkg in ("torch", "numpy", "h5py")]
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            sampler,
            name="generator",
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
            # torch.export cannot trace the numpy inverse preprocessing; the pickle is our own artifact
            serialization_format="pickle",
        )


def onnx_signature(metadata: dict[str, str]) -> Any:
    """MLflow signature of an exported ONNX generator, from its ``inputs``/``outputs`` metadata: named tensors
    with a free batch dimension."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def schema(key: str) -> Schema:
        specs = json.loads(metadata[key])
        return Schema(
            [
                TensorSpec(np.dtype(d["dtype"]), tuple(-1 if n == "N" else int(n) for n in d["shape"]), d["name"])
                for d in specs
            ]
        )

    return ModelSignature(inputs=schema("inputs"), outputs=schema("outputs"))


def _log_onnx(run_id: str, path: Path) -> None:
    """Log the exported ONNX generator with MLflow's ONNX flavour (its metadata_props kept), signature named
    after the graph's inputs."""
    import mlflow
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    if "inputs" not in props:
        raise ReportError(f"{path}: no 'inputs' in its metadata (not written by surrogate.export)")
    requirements = [f"{pkg}=={metadata.version(pkg)}" for pkg in ("onnx", "onnxruntime", "numpy")]
    with mlflow.start_run(run_id=run_id):
        mlflow.onnx.log_model(
            model,
            name="generator_onnx",
            signature=onnx_signature(props),
            pip_requirements=requirements,
            onnx_execution_providers=["CPUExecutionProvider"],
            save_as_external_data=False,  # one self-contained file, as C++ callers load it
            metadata={k: props[k] for k in ("format_version", "generator_sha256", "geometry_name", "opset")},
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser("python -m surrogate.report", "Log a pipeline run (results/) to MLflow.")
    parser.add_argument("--results", default="results", help="directory with the stage outputs")
    parser.add_argument("--out", default="results/report", help="directory for mlflow_run.json")
    args, cfg = parse_stage_args(parser, argv)
    try:
        run(cfg, args.results, args.out, config_path=args.config)
    except ReportError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
