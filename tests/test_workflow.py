"""End to end: a tiny config through `snakemake --cores 2`, then the rerun behaviour users rely on."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Small enough for CI on 2 cores; every stage still does its real work.
TINY = {
    "simulate": {"events": 1500, "chunk_events": 500},
    "ingest": {"chunk_events": 500},
}
# keys of later stages, added when those stages are in the DAG
TINY_LATER = {
    "train": {
        "steps": 20,
        "eval_every": 10,
        "eval_events": 200,
        "checkpoint_every": 10,
        "batch_size": 64,
        "log_every": 5,
        "generator": {"width": 64, "depth": 2},
        "critic": {"width": 64, "depth": 2},
    },
    "generate": {"events": 3000, "shards": 2, "batch_size": 1024},
    "validate": {
        "n_boot": 5,
        "min_bin_events": 20,
        "subsample": {
            "classifier_events": 600,
            "voxel_classifier_events": 300,
            "classifier_iterations": 20,
            "fpd_events": 600,
            "kpd_batch_size": 100,
            "kpd_batches": 3,
            "prdc_events": 300,
            "mode_classifier_events": 600,
        },
    },
    "report": {"log_model": True},
}


def snakemake_argv(*args: str, runner: tuple[str, ...] = ("--cores", "2"), targets: tuple[str, ...] = ()) -> list[str]:
    """`snakemake TARGETS RUNNER --configfile tiny.yaml ARGS` (ARGS may add config files)."""
    return [sys.executable, "-m", "snakemake", *targets, *runner, "--configfile", "tiny.yaml", *args]


def snakemake_env() -> dict[str, str]:
    """The environment with this interpreter's scripts first on PATH (the rules call `python`)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def snakemake(workdir: Path, *args: str, timeout: float = 900, **how: tuple[str, ...]) -> subprocess.CompletedProcess:
    """snakemake_argv(*args, **how) run in workdir."""
    return subprocess.run(
        snakemake_argv(*args, **how), cwd=workdir, capture_output=True, text=True, env=snakemake_env(), timeout=timeout
    )


def _targets(workdir: Path) -> list[str]:
    out = snakemake(workdir, "--list-target-rules")
    return out.stdout.split()


def tiny_workflow(work: Path, log_model: bool = True) -> Path:
    """A copy of the workflow in work with the tiny overlay tiny.yaml (MLflow store work/mlflow.db)."""
    shutil.copy(ROOT / "Snakefile", work / "Snakefile")
    shutil.copy(ROOT / "config.yaml", work / "config.yaml")
    shutil.copytree(ROOT / "workflow", work / "workflow")
    tiny = dict(TINY)
    rules = (ROOT / "Snakefile").read_text()
    for stage, settings in TINY_LATER.items():
        if f"rules/{stage}.smk" in rules:
            tiny[stage] = settings
    if "report" in tiny:
        tiny["report"] = {**tiny["report"], "tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "log_model": log_model}
    (work / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    return work


@pytest.fixture(scope="module")
def workflow_dir(tmp_path_factory) -> Path:
    """A copy of the workflow with the tiny overlay, run once end to end."""
    work = tiny_workflow(tmp_path_factory.mktemp("workflow"))
    out = snakemake(work)
    assert out.returncode == 0, out.stderr[-5000:]
    return work


def test_dag_produces_every_output(workflow_dir):
    rules = (ROOT / "Snakefile").read_text()
    expected = ["data/raw/reference.h5", "results/ingest/dataset.h5", "results/ingest/manifest.json"]
    if "rules/train.smk" in rules:
        expected += ["results/train/generator.pt", "results/train/history.jsonl", "results/train/summary.json"]
    if "rules/generate.smk" in rules:
        expected += ["results/generate/events.h5", "results/generate/shard-0.h5", "results/generate/shard-1.h5"]
    if "rules/validate.smk" in rules:
        expected += ["results/validate/summary.json", "results/validate/report.html"]
    if "rules/export.smk" in rules:
        expected += ["results/export/generator.onnx", "results/export/generator.json"]
    if "rules/report.smk" in rules:
        expected += ["results/report/mlflow_run.json"]
    missing = [p for p in expected if not (workflow_dir / p).exists()]
    assert not missing
    for stage in ("simulate", "ingest") + (("export",) if "rules/export.smk" in rules else ()):
        assert (workflow_dir / "results" / "benchmarks" / f"{stage}.tsv").exists()
        assert (workflow_dir / "results" / "logs" / f"{stage}.log").exists()


def test_second_run_has_nothing_to_do(workflow_dir):
    out = snakemake(workflow_dir, "-n")
    assert out.returncode == 0, out.stderr
    assert "Nothing to be done" in out.stdout + out.stderr


def test_snakemake_report_builds(workflow_dir, tmp_path):
    """`snakemake --report report.html` (README) works without --cores and embeds the validation plots."""
    out = snakemake(workflow_dir, "--report", str(tmp_path / "report.html"), runner=())
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "response.png" in (tmp_path / "report.html").read_text(errors="replace")


def test_changed_key_reruns_only_downstream(workflow_dir):
    """Changing an ingest key reruns ingest and what follows, not the simulator."""
    tiny = yaml.safe_load((workflow_dir / "tiny.yaml").read_text())
    tiny["ingest"]["split"] = {"train": 0.7, "val": 0.1, "test": 0.2}
    (workflow_dir / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    try:
        out = snakemake(workflow_dir, "-n", "--quiet", "rules")
        text = out.stdout + out.stderr
        assert out.returncode == 0, text
        assert "ingest" in text
        assert "simulate" not in text
    finally:
        tiny["ingest"].pop("split")
        (workflow_dir / "tiny.yaml").write_text(yaml.safe_dump(tiny))


def test_changed_training_key_reruns_train_and_downstream(workflow_dir):
    """A new model width: train (over its stale checkpoint), generate, validate and report run again; simulate
    and ingest do not, and the run succeeds."""
    before = {p: (workflow_dir / p).stat().st_mtime_ns for p in ("data/raw/reference.h5", "results/ingest/dataset.h5")}
    tiny = yaml.safe_load((workflow_dir / "tiny.yaml").read_text())
    tiny["train"]["generator"]["width"] = 48
    (workflow_dir / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    out = snakemake(workflow_dir)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    ran = {line.split()[-1] for line in text.splitlines() if line.strip().startswith(("localrule", "rule "))}
    ran = {r.rstrip(":") for r in ran}
    assert {"train", "generate_shard", "generate", "validate", "export", "report"} <= ran, ran
    assert not {"simulate", "ingest"} & ran, ran
    assert before == {p: (workflow_dir / p).stat().st_mtime_ns for p in before}
    import torch

    ckpt = torch.load(workflow_dir / "results/train/generator.pt", weights_only=True)
    assert ckpt["model_config"]["g_width"] == 48
    assert "starting at step 0" in (workflow_dir / "results/logs/train.log").read_text()
    assert "Nothing to be done" in (lambda o: o.stdout + o.stderr)(snakemake(workflow_dir, "-n"))


@pytest.mark.slow
def test_interpolation_overlay_runs_end_to_end(workflow_dir, tmp_path):
    """With held-out regions (as config/interpolation.yaml, sized for the tiny sample) the DAG generates and
    validates the unseen and extrapolation conditions too, and they appear in summary.json, report.html
    and the MLflow run; the simulator's output is reused."""
    work = tmp_path / "w"
    shutil.copytree(workflow_dir, work)
    overlay = yaml.safe_load((ROOT / "config" / "interpolation.yaml").read_text())
    overlay["ingest"]["holdout"] = [r for r in overlay["ingest"]["holdout"] if r.get("eta") is None]
    overlay["generate"] = {"holdout_events": 1000}
    # the logged model is tested by the default run: not again here (it is a third of the report's time)
    overlay["report"] = {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "log_model": False}
    (work / "interp.yaml").write_text(yaml.safe_dump(overlay))
    out = snakemake(work, "interp.yaml")  # a second --configfile, laid over tiny.yaml
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    assert "rule simulate" not in text
    manifest = json.loads((work / "results/ingest/manifest.json").read_text())
    assert manifest["rows"]["unseen"] > 0 and manifest["rows"]["extrapolation"] > 0
    summary = json.loads((work / "results/validate/summary.json").read_text())
    assert set(summary["verdicts"]) == {"seen", "unseen", "extrapolation"}
    assert summary["unseen"]["n_tests"] > 0 and summary["extrapolation"]["informational"] is True
    assert "conditions never seen in training" in summary["verdict_line"]
    assert "Conditions never seen in training" in (work / "results/validate/report.html").read_text()
    from mlflow.tracking import MlflowClient

    record = json.loads((work / "results/report/mlflow_run.json").read_text())
    run = MlflowClient(record["tracking_uri"]).get_run(record["run_id"])
    assert run.data.tags["validation.unseen.verdict"] == summary["unseen"]["verdict"]
    assert run.data.metrics["unseen.headline.n_tests"] == summary["unseen"]["n_tests"]
