"""The validate stage, proven on simulator data: a good sample passes, three planted faults fail.

Session fixtures simulate a small contract-format ``dataset.h5`` (train + test splits with truth
modes) and an independent "generated" sample; each test derives its generated file from that.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from surrogate import validate as V
from surrogate.config import load_config
from surrogate.simulate import MODE_NAMES, build_params, simulate_events

N_REAL = 6000  # half train (mode classifier), half test (the reference)
N_GEN = 6000
# Fewer energy spots than the default simulator (same physics for real and generated, cheaper); n_boot lowered for
# speed only (errors are a little noisier, thresholds untouched).
OVERRIDES = ["simulate.spots.max=1000", "validate.n_boot=10", "validate.subsample.classifier_iterations=30",
             "validate.subsample.voxel_classifier_events=1500"]
TILE = MODE_NAMES.index("pion_tile_start")


@pytest.fixture(scope="session")
def cfg() -> dict[str, Any]:
    return load_config(Path(__file__).resolve().parents[1] / "config.yaml", OVERRIDES)


def _write_dataset(path: Path, ev: dict[str, np.ndarray], cfg: dict[str, Any]) -> None:
    """A contract-format ingest file (train/val/test groups) from simulated events."""
    n = len(ev["showers"])
    splits = {"train": slice(0, n // 2), "val": slice(n // 2, n // 2), "test": slice(n // 2, n)}
    geometry = build_params(cfg).geometry
    with h5py.File(path, "w") as f:
        f.attrs["geometry"] = json.dumps(geometry.to_dict())
        f.attrs["preprocessing"] = "{}"
        f.attrs["condition_names"] = json.dumps(["log_energy"])
        f.attrs["mode_names"] = json.dumps(list(MODE_NAMES))
        f.attrs["format_version"] = 1
        f.attrs["seed"] = 1
        for name, sl in splits.items():
            g = f.create_group(name)
            g["showers"] = ev["showers"][sl]
            g["incident_energies"] = ev["incident_energies"][sl]
            g["incident_eta"] = ev["incident_eta"][sl]
            g["incident_pdg"] = ev["incident_pdg"][sl]
            g["conditions"] = np.log(ev["incident_energies"][sl]).astype(np.float32)
            g["mode"] = ev["truth/mode"][sl]
            g["source_row"] = np.arange(n, dtype=np.int64)[sl]


def _write_generated(path: Path, ev: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as f:
        for key in ("incident_energies", "incident_eta", "incident_pdg"):
            f[key] = ev[key]
        f.create_dataset("showers", data=ev["showers"], chunks=(min(512, len(ev["showers"])), ev["showers"].shape[1]))
    return path


@pytest.fixture(scope="session")
def dataset(cfg: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("validate") / "dataset.h5"
    _write_dataset(path, simulate_events(N_REAL, cfg, seed=101), cfg)
    return path


@pytest.fixture(scope="session")
def independent(cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    return simulate_events(N_GEN, cfg, seed=202)


@pytest.fixture(scope="session")
def reuse() -> dict[Any, Any]:
    """Real samples and real-vs-real floors shared by the runs against ``dataset`` (they are identical)."""
    return {}


def _run(cfg: dict[str, Any], dataset: Path, ev: dict[str, np.ndarray], tmp: Path, reuse: dict, **kw: Any) -> dict:
    gen = _write_generated(tmp / "events.h5", ev)
    return V.run(cfg, dataset, gen, tmp / "out", reuse=reuse, **kw)


def _failed(summary: dict[str, Any], prefix: str) -> list[str]:
    return [m["name"] for m in summary["metrics"] if m["name"].startswith(prefix) and not m["passed"]]


def test_independent_sample_passes(cfg, dataset, independent, reuse, tmp_path: Path) -> None:
    hist = tmp_path / "history.jsonl"
    hist.write_text("".join(json.dumps({"step": s, "loss_d": -1.0 / (s + 1), "loss_g": 0.5}) + "\n" for s in range(5)))
    summary = _run(cfg, dataset, independent, tmp_path, reuse, history=hist)
    assert summary["verdict"] == "PASS", summary["failed"]
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["verdict"] == "PASS"
    for m in on_disk["metrics"]:
        assert set(m) >= {"name", "value", "error", "floor", "threshold", "passed"}
    names = {m["name"].split("/")[0] for m in on_disk["metrics"]}
    assert names >= {"separation", "wasserstein", "ks", "response_mean", "resolution", "fpd", "kpd",
                     "classifier_auc", "prdc", "diversity", "mode_fraction"}  # fmt: skip
    assert on_disk["subsample"]["prdc_events"] > 0
    plots = {p.name for p in (tmp_path / "out" / "plots").glob("*.png")}
    assert {"response.png", "modes.png", "mean_shower_per_layer.png", "training_curves.png"} <= plots
    page = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in page and "PASS" in page


def test_missing_tile_start_pions_fail_mode_coverage(cfg, dataset, independent, reuse, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    mode = independent["truth/mode"]
    pions = independent["incident_pdg"][:, 0] == 211
    bad = np.flatnonzero(pions & (mode == TILE))
    good = np.flatnonzero(pions & (mode != TILE))
    assert len(bad) > 100
    take = np.arange(len(mode))
    take[bad] = rng.choice(good, size=len(bad))
    ev = {k: v[take] for k, v in independent.items()}
    summary = _run(cfg, dataset, ev, tmp_path, reuse, plots=False)
    assert summary["verdict"] == "FAIL"
    assert _failed(summary, "mode_fraction/"), summary["failed"]


def test_energy_scale_1p05_fails_response(cfg, dataset, independent, reuse, tmp_path: Path) -> None:
    ev = dict(independent, showers=independent["showers"] * np.float32(1.05))
    summary = _run(cfg, dataset, ev, tmp_path, reuse, plots=False)
    assert summary["verdict"] == "FAIL"
    assert _failed(summary, "response_mean/"), summary["failed"]


def test_collapsed_generator_fails_coverage_and_diversity(cfg, dataset, independent, reuse, tmp_path: Path) -> None:
    e = independent["incident_energies"][:, 0].astype(np.float64)
    binning = V.Binning(np.asarray(cfg["validate"]["energy_edges_gev"]) * 1000.0,
                        np.asarray(cfg["validate"]["eta_edges"], float), (22, 211))  # fmt: skip
    bins = binning.index(e, independent["incident_eta"][:, 0], independent["incident_pdg"][:, 0])
    showers = np.empty_like(independent["showers"])
    for b in np.unique(bins):
        rows = np.flatnonzero(bins == b)
        template = rows[0]
        showers[rows] = independent["showers"][template] * (e[rows] / e[template])[:, None].astype(np.float32)
    ev = dict(independent, showers=showers)
    summary = _run(cfg, dataset, ev, tmp_path, reuse, plots=False)
    assert summary["verdict"] == "FAIL"
    assert _failed(summary, "prdc/coverage"), summary["failed"]
    assert _failed(summary, "diversity/"), summary["failed"]


def test_cli_exit_codes(cfg, dataset, independent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _write_generated(tmp_path / "events.h5", {k: v[:100] for k, v in independent.items()})
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(Path(__file__).resolve().parents[1].joinpath("config.yaml").read_text())
    argv = ["--config", str(cfg_path), "--dataset", str(dataset), "--generated", str(gen), "--out", str(tmp_path / "o")]
    # the verdict logic only: a FAIL exits 0 unless validate.fail_pipeline
    monkeypatch.setattr(V, "run", lambda *a, **k: {"verdict": "FAIL"})
    assert V.main(argv) == 0
    assert V.main([*argv, "--set", "validate.fail_pipeline=true"]) == 1
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exc:
        V.main([*argv[:2], "--dataset", str(tmp_path / "nope.h5"), *argv[4:]])
    assert exc.value.code == 1


def test_every_registered_metric_is_used() -> None:
    """The stage walks the metrics registry: a metric added there without a test here is caught."""
    assert set(V.M.METRICS) <= V.USED_METRICS, set(V.M.METRICS) - V.USED_METRICS


# small subsamples and no per-bin tests: for tests of bookkeeping, not of statistics
SMALL = [*OVERRIDES, "validate.min_bin_events=1000000", "validate.subsample.classifier_events=300",
         "validate.subsample.voxel_classifier_events=300", "validate.subsample.fpd_events=300",
         "validate.subsample.kpd_batch_size=200", "validate.subsample.prdc_events=300",
         "validate.subsample.mode_classifier_events=500"]  # fmt: skip


def test_reused_floors_change_no_result(dataset, independent, tmp_path: Path) -> None:
    """Floors computed for one generated sample and reused for another equal freshly computed ones
    (their seeds derive from the test names, not from the order of computation), and floors
    computed in the second process equal those computed in line."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "config.yaml", [*SMALL, "validate.floor_process=true"])
    serial = load_config(Path(__file__).resolve().parents[1] / "config.yaml", [*SMALL, "validate.floor_process=false"])
    reuse: dict[Any, Any] = {}
    first, second = {k: v[:2000] for k, v in independent.items()}, {k: v[2000:4000] for k, v in independent.items()}
    for name in ("first", "second", "fresh"):
        (tmp_path / name).mkdir()
    _run(cfg, dataset, first, tmp_path / "first", reuse, plots=False)
    cached = _run(cfg, dataset, second, tmp_path / "second", reuse, plots=False)
    fresh = _run(serial, dataset, second, tmp_path / "fresh", None, plots=False)
    assert cached["metrics"] == fresh["metrics"]


def test_failed_second_process_falls_back(dataset, independent, tmp_path: Path, monkeypatch) -> None:
    """If the floors' second process dies, the stage computes them itself: same metrics, no error."""

    def dying(*args: Any) -> tuple[cf.ProcessPoolExecutor, cf.Future]:
        pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        return pool, pool.submit(os._exit, 3)

    root = Path(__file__).resolve().parents[1] / "config.yaml"
    ev = {k: v[:2000] for k, v in independent.items()}
    for name in ("inline", "fallback"):
        (tmp_path / name).mkdir()
    inline = _run(load_config(root, [*SMALL, "validate.floor_process=false"]), dataset, ev, tmp_path / "inline", None,
                  plots=False)  # fmt: skip
    monkeypatch.setattr(V, "_start_floors", dying)
    fallback = _run(load_config(root, [*SMALL, "validate.floor_process=true"]), dataset, ev, tmp_path / "fallback",
                    None, plots=False)  # fmt: skip
    assert fallback["metrics"] == inline["metrics"]


def test_without_truth_modes_uses_cluster_occupancy(dataset, independent, tmp_path: Path) -> None:
    """Data without mode labels (CaloChallenge files) fall back to k-means occupancy; the collapsed
    sample of a single repeated shower fails it."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "config.yaml", SMALL)
    unlabeled = tmp_path / "unlabeled.h5"
    unlabeled.write_bytes(dataset.read_bytes())
    with h5py.File(unlabeled, "r+") as f:
        f.attrs["mode_names"] = "[]"
        for split in ("train", "val", "test"):
            f[split]["mode"][...] = -1
    ev = {k: v[:2000] for k, v in independent.items()}
    ok = _run(cfg, unlabeled, ev, tmp_path, None, plots=False)
    assert ok["mode_method"].startswith("k-means")
    assert [m["passed"] for m in ok["metrics"] if m["name"].startswith("cluster_occupancy")] == [True]
    ev["showers"] = np.repeat(ev["showers"][:1], 2000, axis=0) * (ev["incident_energies"] / ev["incident_energies"][0])
    bad = _run(cfg, unlabeled, ev, tmp_path, None, plots=False)
    assert _failed(bad, "cluster_occupancy/"), bad["failed"]


def _matched(dataset: Path, path: Path, pool: cf.Executor | None, **kw: Any) -> V.GeneratedSample:
    real = V.load_real(dataset, "test")
    binning = V.Binning(np.array([10e3, 100e3]), np.array([0.75]), tuple(int(p) for p in np.unique(real.pdg)))
    return V.load_generated(path, real.geometry, real.names, binning, binning.index(real.energy, real.eta, real.pdg),
                            cap=0, chunk_events=700, voxel_events=333, rng=np.random.default_rng(4), pool=pool,
                            workers=2, **kw)  # fmt: skip


def test_reader_processes_equal_reading_in_line(dataset, independent, tmp_path: Path) -> None:
    """Features and kept voxels read by two worker processes equal those read in this process, bit for bit;
    a bad shower value found there is reported with the file and its rows."""
    path = _write_generated(tmp_path / "events.h5", independent)
    pool = V._start_readers(2)
    try:
        inline, workers = _matched(dataset, path, None), _matched(dataset, path, pool)
        assert len(inline.features) > 0.8 * N_GEN and inline.voxels.shape == (333, independent["showers"].shape[1])
        np.testing.assert_array_equal(workers.features, inline.features)
        np.testing.assert_array_equal(workers.voxels, inline.voxels)
        np.testing.assert_array_equal(workers.energy, inline.energy)
        assert (workers.reader_processes, inline.reader_processes) == (2, 0)
        bad = {**independent, "showers": independent["showers"].copy()}
        bad["showers"][4300:4400, 7] = np.nan  # a hundred rows: some of them are among the matched ones
        with pytest.raises(V.ValidateError, match=r"bad\.h5: 'showers' rows 4096\.\.4607: shower row \d+, voxel 7 "):
            _matched(dataset, _write_generated(tmp_path / "bad.h5", bad), pool)
    finally:
        pool.shutdown()


def test_failed_reader_process_falls_back(dataset, independent, tmp_path: Path, monkeypatch, caplog) -> None:
    """If a reader process dies, the stage reads the file itself: same metrics, no error."""

    def dying(workers: int) -> cf.ProcessPoolExecutor:
        pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(os._exit, 3)
        return pool

    root = Path(__file__).resolve().parents[1] / "config.yaml"
    ev = {k: v[:2000] for k, v in independent.items()}
    for name in ("inline", "fallback"):
        (tmp_path / name).mkdir()
    cfg = load_config(root, [*SMALL, "validate.floor_process=false"])
    inline = _run(cfg, dataset, ev, tmp_path / "inline", None, plots=False, threads=1)
    monkeypatch.setattr(V, "_start_readers", dying)
    fallback = _run(cfg, dataset, ev, tmp_path / "fallback", None, plots=False, threads=2)
    assert "a reader process failed" in caplog.text and fallback["reader_processes"] == 0
    assert fallback["metrics"] == inline["metrics"]
