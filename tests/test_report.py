"""Report stage: a run lands in MLflow with params, stepped metrics, artifacts and verdict;
an unreachable store fails clearly and changes nothing under results/."""

import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest

from surrogate import report
from surrogate.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A results/ tree as the earlier stages leave it (no generator: model logging is tested elsewhere)."""
    res = tmp_path / "results"
    (res / "ingest").mkdir(parents=True)
    (res / "train").mkdir()
    (res / "validate" / "plots").mkdir(parents=True)
    (res / "benchmarks").mkdir()
    (res / "ingest" / "manifest.json").write_text(
        json.dumps({"inputs": [{"path": "data/raw/reference.h5", "sha256": "ab" * 32, "rows": 10}]})
    )
    history = [{"step": s, "loss_d": -1.0 / s, "loss_g": 0.1 * s, "quick_val": 2.0 / s} for s in (1, 2, 3)]
    (res / "train" / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (res / "train" / "summary.json").write_text(json.dumps({"device": "cpu", "best_step": 3, "best_score": 0.7}))
    summary = {
        "verdict": "FAIL",
        "metrics": [
            {"name": "response/mean", "value": 1.01, "error": 0.01, "floor": 0.002, "threshold": 0.02, "passed": True},
            {"name": "fpd", "value": 3.0, "error": 0.1, "floor": 0.01, "threshold": 0.1, "passed": False},
        ],
        # held-out conditions (ingest.holdout): their own key, verdict and metrics
        "verdicts": {"seen": "FAIL", "unseen": "PASS"},
        "verdict_line": "verdict FAIL: seen conditions: FAIL; conditions never seen in training: PASS",
        "unseen": {
            "verdict": "PASS",
            "metrics": [
                {"name": "fpd", "value": 0.2, "error": 0.1, "floor": 0.01, "threshold": 0.1, "passed": True},
            ],
        },
    }
    (res / "validate" / "summary.json").write_text(json.dumps(summary))
    (res / "validate" / "report.html").write_text("<html><body>report</body></html>")
    (res / "validate" / "plots" / "response.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    (res / "benchmarks" / "train.tsv").write_text("s\th:m:s\tmax_rss\n12.5\t0:00:12\t100\n")
    for i in (0, 1):  # two generate shards of 2 s each
        (res / "benchmarks" / f"generate-{i}.tsv").write_text("s\th:m:s\tmax_rss\n2.0\t0:00:02\t100\n")
    (res / "generate").mkdir()
    with h5py.File(res / "generate" / "events.h5", "w") as f:
        f["showers"] = np.zeros((8, 3), np.float32)
    return res


def _cfg(uri: str, **report_settings) -> dict:
    cfg = load_config(ROOT / "config.yaml")
    cfg["report"].update(tracking_uri=uri, **report_settings)
    return cfg


def test_report_to_sqlite_reads_back(results, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(uri, artifact_location=(tmp_path / "art").as_uri())
    before = _tree_digest(results)
    record = report.run(cfg, results, tmp_path / "out", config_path=ROOT / "config.yaml")

    client = MlflowClient(uri)
    run = client.get_run(record["run_id"])
    assert run.data.params["seed"] == str(cfg["seed"])
    assert run.data.params["simulate.events"] == str(cfg["simulate"]["events"])
    assert run.data.tags["validation.verdict"] == "FAIL"
    assert run.data.tags["input.0.sha256"] == "ab" * 32
    assert "git.commit" in run.data.tags and "version.torch" in run.data.tags
    steps = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train.loss_g")]
    assert sorted(steps) == [(1, 0.1), (2, 0.2), (3, pytest.approx(0.3))]
    assert run.data.metrics["validate.fpd.floor"] == 0.01
    assert run.data.metrics["validate.fpd.passed"] == 0.0
    # the validation scoreboard as top-level metrics, to sort runs by
    assert run.data.metrics["headline.verdict"] == 0.0
    assert (run.data.metrics["headline.n_tests"], run.data.metrics["headline.n_failed"]) == (2.0, 1.0)
    assert (run.data.metrics["headline.fpd"], run.data.metrics["headline.fpd.floor"]) == (3.0, 0.01)
    assert run.data.tags["validation.unseen.verdict"] == "PASS" and run.data.tags["validation.seen.verdict"] == "FAIL"
    assert (run.data.metrics["unseen.validate.fpd.value"], run.data.metrics["unseen.headline.n_failed"]) == (0.2, 0.0)
    assert run.data.metrics["unseen.headline.verdict"] == 1.0
    assert run.data.metrics["stage_seconds.train"] == 12.5
    assert run.data.metrics["generate.events_per_second"] == 8 / 4.0  # events over the shards' summed seconds
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "validate")}
    assert {"validate/report.html", "validate/summary.json", "validate/plots"} <= artifacts
    assert json.loads((tmp_path / "out" / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    assert _tree_digest(results) == before, "the report stage must not modify results/"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_store_fails_clearly(results, tmp_path, caplog):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    cfg = _cfg(uri, retries=2, backoff_seconds=0.01)
    before = _tree_digest(results)
    code = report.main(
        [
            "--config",
            str(ROOT / "config.yaml"),
            "--set",
            f"report.tracking_uri={uri}",
            "--set",
            "report.retries=2",
            "--set",
            "report.backoff_seconds=0.01",
            "--results",
            str(results),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and uri in errors[0] and "after 2 attempts" in errors[0]
    assert _tree_digest(results) == before
    assert not (tmp_path / "out" / "mlflow_run.json").exists()
    with pytest.raises(report.ReportError):
        report.run(cfg, results, tmp_path / "out")


@pytest.mark.slow
def test_report_to_real_server(results, tmp_path):
    """A real `mlflow server` on 127.0.0.1, started here and stopped by PID."""
    from mlflow.tracking import MlflowClient

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--default-artifact-root",
            (tmp_path / "server-art").as_uri(),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow server did not start in 90 s"
            time.sleep(0.5)
        record = report.run(_cfg(uri), results, tmp_path / "out")
        run = MlflowClient(uri).get_run(record["run_id"])
        assert run.data.tags["validation.verdict"] == "FAIL"
        assert record["tracking_uri"] == uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_logged_model_loads_and_generates(results, tmp_path):
    """The generator logged as an MLflow model samples showers from raw conditions."""
    import mlflow
    import numpy as np
    import torch

    from surrogate.geometry import from_config
    from surrogate.models import FORMAT_VERSION, Generator, ModelConfig
    from surrogate.preprocess import Preprocessor

    cfg = _cfg(f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=(tmp_path / "art").as_uri())
    geometry = from_config(cfg)
    rng = np.random.default_rng(0)
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e5), (200, 1))).astype(np.float32)
    showers = (rng.gamma(0.5, 1.0, (200, geometry.n_voxels)) * energies / 300).astype(np.float32)
    pre = Preprocessor.fit(showers, energies, rng.uniform(0, 1.5, (200, 1)), rng.choice([22, 211], (200, 1)), {})
    mc = ModelConfig(n_voxels=geometry.n_voxels, cond_dim=len(pre.condition_names), z_dim=8, g_width=16, g_depth=1)
    torch.manual_seed(0)
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "model_config": mc.to_dict(),
            "ema_state_dict": Generator(mc).state_dict(),
            "preprocessing": pre.to_dict(),
            "condition_names": pre.condition_names,
            "geometry": geometry.to_dict(),
            "step": 0,
        },
        results / "train" / "generator.pt",
    )
    record = report.run(cfg, results, tmp_path / "out")

    mlflow.set_tracking_uri(record["tracking_uri"])
    models = mlflow.search_logged_models(experiment_ids=[record["experiment_id"]], output_format="list")
    assert len(models) == 1 and models[0].source_run_id == record["run_id"]
    sampler = mlflow.pytorch.load_model(models[0].model_uri)
    conditions = torch.tensor([[5e4, 0.3, 22.0], [5e4, 0.3, 211.0], [2e3, 1.0, 22.0]])
    out = sampler(conditions)
    assert out.shape == (3, geometry.n_voxels) and (out >= 0).all() and torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1]), "the particle condition must change the showers"


def test_exported_onnx_is_logged_with_named_inputs(results, tmp_path):
    """The export stage's ONNX file lands in the run with MLflow's ONNX flavour; its signature names the graph's
    inputs, and the logged model generates showers through pyfunc."""
    import mlflow
    from test_export import NO_CRITIC_INPUTS, tiny_export_checkpoint  # tests/ is on sys.path (no package)

    from surrogate import export

    cfg = _cfg(f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=(tmp_path / "art").as_uri())
    build = load_config(ROOT / "config.yaml", [*NO_CRITIC_INPUTS, "train.generator.width=32"])
    ckpt, pre = tiny_export_checkpoint(tmp_path / "generator.pt", build, [22, 211])
    export.run(build, ckpt, results / "export" / "generator.onnx", dataset=None)
    cfg["report"]["log_model"] = True
    record = report.run(cfg, results, tmp_path / "out")

    mlflow.set_tracking_uri(record["tracking_uri"])
    models = mlflow.search_logged_models(experiment_ids=[record["experiment_id"]], output_format="list")
    assert [m.name for m in models] == ["generator_onnx"]  # no generator.pt in this tree
    info = mlflow.models.get_model_info(models[0].model_uri)
    assert [i["name"] for i in info.signature.inputs.to_dict()] == list(export.INPUT_NAMES)
    assert info.signature.outputs.to_dict()[0]["name"] == "showers"
    model = mlflow.pyfunc.load_model(models[0].model_uri)
    n = 3
    feeds = {
        "z": np.random.default_rng(0).standard_normal((n, 64)).astype(np.float32),
        "incident_energy": np.full((n, 1), 5e4, np.float32),
        "incident_eta": np.full((n, 1), 0.3, np.float32),
        "incident_pdg": np.array([[22], [211], [22]], np.int32),
    }
    out = model.predict(feeds)["showers"]
    assert out.shape == (n, 533) and (out >= 0).all()
    client_art = {a.path for a in mlflow.MlflowClient().list_artifacts(record["run_id"], "export")}
    assert client_art == {"export/generator.json"}


@pytest.mark.parametrize("heldout", [False, True])
def test_bench_fidelity_logs_a_run_with_and_without_heldout_splits(tmp_path, monkeypatch, heldout):
    """The fidelity benchmark's MLflow run carries the headline numbers, and unseen.* ones only
    when the run had held-out conditions (a run without --overlay once failed here, KeyError)."""
    import importlib.util

    from mlflow.tracking import MlflowClient

    spec = importlib.util.spec_from_file_location(
        "bench_fidelity", Path(__file__).parents[1] / "benchmarks/bench_fidelity.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    headline = {"auc_features": {"value": 0.97, "floor": 0.5}, "n_failed": {"value": 12}}
    result = {"steps": 10, "seconds": {"train": 1.5}, "headline": headline, "verdict": "FAIL", "cpu": "test"}
    if heldout:
        result["unseen"] = {"headline": {"auc_features": {"value": 0.99, "floor": 0.49}}}
    (tmp_path / "out" / "validate").mkdir(parents=True)
    run_id = bench.log_mlflow("fidelity-test", "run", {"preset": "default"}, result, tmp_path / "out")
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    assert metrics["headline.auc_features"] == 0.97 and metrics["headline.auc_features.floor"] == 0.5
    assert metrics["headline.n_failed"] == 12 and metrics["train_seconds"] == 1.5
    assert ("unseen.headline.auc_features" in metrics) == heldout
    if heldout:
        assert metrics["unseen.headline.auc_features"] == 0.99
