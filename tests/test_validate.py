"""The validate stage, proven on simulator data: a good sample passes, three planted faults fail.

Session fixtures simulate a small contract-format ``dataset.h5`` (train + test splits with truth
modes) and an independent "generated" sample; each test derives its generated file from that.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from surrogate import validate as V
from surrogate.config import load_config
from surrogate.simulate import MODE_NAMES, build_params, simulate_events
from surrogate.validation import families, processes, stage
from surrogate.validation import floors as VF

N_REAL = 6000  # half train (mode classifier), half test (the reference)
N_GEN = 6000
# Fewer energy spots than the default simulator (same physics for real and generated, cheaper); n_boot lowered for
# speed only (errors are a little noisier, thresholds untouched).
OVERRIDES = [
    "simulate.spots.max=1000",
    "validate.n_boot=10",
    "validate.subsample.classifier_iterations=30",
    "validate.subsample.voxel_classifier_events=1500",
]
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
    assert names >= {
        "separation",
        "wasserstein",
        "ks",
        "response_mean",
        "resolution",
        "fpd",
        "kpd",
        "classifier_auc",
        "prdc",
        "diversity",
        "mode_fraction",
    }
    # every registered family is in the verdict, with tests of each of its kinds
    for family in V.FAMILIES.values():
        for prefix in family.tests:
            if prefix != "cluster_occupancy/":  # the fallback without truth modes (tested below)
                assert any(m["name"].startswith(prefix) for m in on_disk["metrics"]), (family.name, prefix)
    assert set(V.FAMILIES) <= set(on_disk["seconds"])
    assert on_disk["subsample"]["prdc_events"] > 0
    plots = {p.name for p in (tmp_path / "out" / "plots").glob("*.png")}
    assert {"response.png", "modes.png", "mean_shower_per_layer.png", "training_curves.png"} <= plots
    page = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in page and "PASS" in page
    assert page.index("<table") == page.index("<table class='scoreboard'")  # the headline numbers first


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
    binning = V.Binning(
        np.asarray(cfg["validate"]["energy_edges_gev"]) * 1000.0,
        np.asarray(cfg["validate"]["eta_edges"], float),
        (22, 211),
    )
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
    monkeypatch.setattr(stage, "run", lambda *a, **k: {"verdict": "FAIL"})
    assert V.main(argv) == 0
    assert V.main([*argv, "--set", "validate.fail_pipeline=true"]) == 1
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exc:
        V.main([*argv[:2], "--dataset", str(tmp_path / "nope.h5"), *argv[4:]])
    assert exc.value.code == 1


def test_unusable_input_leaves_no_process_behind(cfg, dataset, tmp_path: Path) -> None:
    """A bad generated file (or dataset) is one error naming it; the reader and plotting processes are gone."""
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    for data, gen, match in (
        (dataset, tmp_path / "bad.h5", "bad.h5: cannot open as HDF5"),
        (tmp_path / "bad.h5", tmp_path / "bad.h5", "bad.h5: cannot open as HDF5"),
    ):
        with pytest.raises(V.ValidateError, match=match):
            V.run(cfg, data, gen, tmp_path / "out", threads=2)
        assert multiprocessing.active_children() == []
    assert not (tmp_path / "out" / "summary.json").exists()


def test_every_registered_metric_is_used() -> None:
    """The stage walks the metrics registry: a metric added there without a test family using it is caught."""
    from surrogate import metrics as M

    assert set(M.METRICS) <= V.USED_METRICS, set(M.METRICS) - V.USED_METRICS


#: The test families of the verdict, in the order of summary.json: one left out of the registry fails here.
EXPECTED_FAMILIES = (
    "1-D tests",
    "response",
    "FPD/KPD",
    "classifier AUC, features",
    "classifier AUC, voxels",
    "PRDC/diversity",
    "mode coverage",
)


def test_every_family_is_registered_and_run() -> None:
    from surrogate.validation.families import RUN_ORDER

    assert tuple(V.FAMILIES) == EXPECTED_FAMILIES
    assert sorted(RUN_ORDER) == sorted(EXPECTED_FAMILIES)
    with pytest.raises(ValueError, match="registered twice"):
        families.register("response", metrics=(), tests=())(lambda ctx: ([], {}))


def test_floors_rule_hashes_the_code_the_floors_identity_covers() -> None:
    """The validate_floors rule reruns when the code in the floors' identity changes: same modules, same digest."""
    import re

    root = Path(__file__).resolve().parents[1]
    call = re.search(r"code=source_hash\(([^)]*)\)", (root / "workflow" / "rules" / "validate.smk").read_text())
    assert tuple(re.findall(r'"([\w.]+)"', call.group(1))) == VF.FLOOR_SOURCES
    common = (root / "workflow" / "rules" / "common.smk").read_text()
    namespace: dict[str, Any] = {"Path": Path}
    exec(common[common.index("def source_hash") :], namespace)
    assert namespace["source_hash"](*VF.FLOOR_SOURCES) == VF.source_digest()
    package = sorted((root / "surrogate" / "validation").glob("*.py"))
    assert len(package) > 5 and set(package) <= set(VF.source_files())


# small subsamples and no per-bin tests: for tests of bookkeeping, not of statistics
SMALL = [
    *OVERRIDES,
    "validate.min_bin_events=1000000",
    "validate.subsample.classifier_events=300",
    "validate.subsample.voxel_classifier_events=300",
    "validate.subsample.fpd_events=300",
    "validate.subsample.kpd_batch_size=200",
    "validate.subsample.prdc_events=300",
    "validate.subsample.mode_classifier_events=500",
]
ROOT_CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"


def test_floors_file_reused_or_recomputed_changes_no_result(dataset, independent, tmp_path: Path, caplog) -> None:
    """Floors read from the `floors` file, floors computed in the stage, floors reused in one process
    and a run with reader processes and test threads all give the same metrics; a floors file for
    another seed (or a damaged one) is not trusted: the stage says so and computes its own."""
    cfg = load_config(ROOT_CONFIG, SMALL)
    floors = tmp_path / "floors.json"
    assert (
        V.main(
            [
                "floors",
                "--config",
                str(ROOT_CONFIG),
                *sum((["--set", o] for o in SMALL), []),
                "--dataset",
                str(dataset),
                "--out",
                str(floors),
            ]
        )
        == 0
    )
    assert json.loads(floors.read_text())["format"] == V.FLOORS_FORMAT
    first, second = {k: v[:2000] for k, v in independent.items()}, {k: v[2000:4000] for k, v in independent.items()}
    runs = {}
    for name, ev, kw in (
        ("inline", second, {}),
        ("file", second, {"floors_path": floors}),
        ("workers", second, {"floors_path": floors, "threads": 2}),
    ):
        (tmp_path / name).mkdir()
        runs[name] = _run(cfg, dataset, ev, tmp_path / name, None, plots=False, **kw)
    assert runs["inline"]["floors"] == "computed here" and runs["file"]["floors"] == str(floors)
    assert runs["workers"]["reader_processes"] == 2
    assert runs["file"]["metrics"] == runs["inline"]["metrics"] == runs["workers"]["metrics"]
    reuse: dict[Any, Any] = {}
    for name, ev in (("reuse-first", first), ("reuse-second", second)):
        (tmp_path / name).mkdir()
        runs[name] = _run(cfg, dataset, ev, tmp_path / name, reuse, plots=False)
    assert runs["reuse-second"]["floors"] == "reused" and runs["reuse-second"]["metrics"] == runs["inline"]["metrics"]

    other = tmp_path / "other-seed.json"
    V.compute_floors(load_config(ROOT_CONFIG, [*SMALL, "seed=99"]), dataset, other)
    damaged = tmp_path / "damaged.json"
    damaged.write_text(floors.read_text()[:1000])
    for path, why in ((other, "computed for another test split, settings, seed"), (damaged, "cannot read")):
        caplog.clear()
        (tmp_path / path.stem).mkdir()
        summary = _run(cfg, dataset, second, tmp_path / path.stem, None, plots=False, floors_path=path)
        assert why in caplog.text and summary["floors"] == "computed here"
        assert summary["metrics"] == runs["inline"]["metrics"]


def test_failed_plotting_process_falls_back(dataset, independent, tmp_path: Path, monkeypatch, caplog) -> None:
    """If the plotting process dies, the plots are drawn in this process: all of them, no error."""

    class Dying(processes.Plotter):
        def __init__(self, separate: bool) -> None:
            super().__init__(False)
            self.pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            self.pool.submit(os._exit, 3)

    cfg = load_config(ROOT_CONFIG, SMALL)
    ev = {k: v[:2000] for k, v in independent.items()}
    (tmp_path / "h.jsonl").write_text('{"step": 1, "loss_d": 0.5}\n')
    monkeypatch.setattr(processes, "Plotter", Dying)
    _run(cfg, dataset, ev, tmp_path, None, threads=2, history=tmp_path / "h.jsonl")
    assert "the plotting process failed" in caplog.text
    plots = {p.name for p in (tmp_path / "out" / "plots").glob("*.png")}
    pages = -(-len(V.load_real(dataset).names) // 16)
    # every plot these settings give (no per-bin results: no response or mode plot)
    expected = {*(f"features_{i:02d}.png" for i in range(pages)), "mean_shower_per_layer.png", "training_curves.png"}
    assert plots == expected


def test_stage_module_imports_no_heavy_library() -> None:
    """A worker process started the "spawn" way imports the stage's main module again: under
    `python -m surrogate.validate` that is surrogate.validate, which must not drag in scikit-learn,
    scipy or matplotlib (2-3 s of CPU per process)."""
    code = (
        "import sys, surrogate.validate; print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'sklearn', 'scipy', 'matplotlib', 'torch', 'mlflow'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_mode_classifier_per_particle() -> None:
    """One classifier per particle; a particle with one mode gets it; one without train events gets
    the prediction of a classifier of all particles."""
    rng = np.random.default_rng(5)
    n = 600
    pdg = np.where(np.arange(n) < 400, 22, 211)
    x = rng.normal(size=(n, 3))
    mode = np.where(pdg == 22, (x[:, 0] > 0).astype(int), 2)  # photons: two modes by feature 0; pions: one
    train = V.RealSample(
        x,
        np.full(n, 1e4),
        np.zeros(n),
        pdg,
        mode,
        np.zeros((n, 1), np.float32),
        ["a", "b", "c"],
        None,
        ["f0", "f1", "f2"],
    )
    clf = V.ModeClassifier(train, n, 30, 1, particles=(22, 211, 11))
    assert clf.models[211] == 2 and not isinstance(clf.models[22], int) and not isinstance(clf.models[11], int)
    test_x = np.array([[2.0, 0, 0], [-2.0, 0, 0], [2.0, 0, 0]])
    got = clf.predict(test_x, np.full(3, 1e4), np.zeros(3), np.array([22, 22, 211]))
    assert got.tolist() == [1, 0, 2]
    assert clf.predict(test_x[:1], np.full(1, 1e4), np.zeros(1), np.array([11]))[0] in (0, 1, 2)


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
    return V.load_generated(
        path,
        real.geometry,
        real.names,
        binning,
        binning.index(real.energy, real.eta, real.pdg),
        cap=0,
        feature_events=1500,
        chunk_events=700,
        voxel_events=333,
        rng=np.random.default_rng(4),
        pool=pool,
        workers=2,
        **kw,
    )


def test_reader_processes_equal_reading_in_line(dataset, independent, tmp_path: Path) -> None:
    """E_dep of every matched event, the feature subsample and the kept voxels read by two worker
    processes equal those read in this process, bit for bit; every row is checked, matched or not,
    and a bad value is reported with the file and its rows."""
    path = _write_generated(tmp_path / "events.h5", independent)
    pool = processes.start_readers(2)
    try:
        inline, workers = _matched(dataset, path, None), _matched(dataset, path, pool)
        assert len(inline.all_energy) > 0.8 * N_GEN and inline.features.shape[0] == 1500
        assert inline.voxels.shape == (333, independent["showers"].shape[1])
        for field in ("features", "voxels", "energy", "all_energy", "all_e_ratio"):
            np.testing.assert_array_equal(getattr(workers, field), getattr(inline, field))
        assert (workers.reader_processes, inline.reader_processes) == (2, 0)
        # every matched event's E_dep/E_inc is, for the feature subsample, its E_ratio feature (summed in
        # another order)
        np.testing.assert_array_equal(inline.all_energy[inline.feature_rows], inline.energy)
        ratio = inline.features[:, V.load_real(dataset).names.index("E_ratio")]
        np.testing.assert_allclose(inline.all_e_ratio[inline.feature_rows], ratio, rtol=1e-12)
        bad = {**independent, "showers": independent["showers"].copy()}
        bad["showers"][4300:4400, 7] = np.nan  # a hundred rows: some of them are among the matched ones
        with pytest.raises(V.ValidateError, match=r"bad\.h5: 'showers' rows 4096\.\.4607: shower row \d+, voxel 7 "):
            _matched(dataset, _write_generated(tmp_path / "bad.h5", bad), pool)
        one = {**independent, "showers": independent["showers"].copy()}
        one["showers"][5000, 3] = -1.0  # a single row, whether matched or not
        with pytest.raises(V.ValidateError, match=r"one\.h5: 'showers' rows 4608\.\.5119: shower row 392, voxel 3 "):
            _matched(dataset, _write_generated(tmp_path / "one.h5", one), None)
    finally:
        pool.shutdown()


def test_failed_reader_process_falls_back(dataset, independent, tmp_path: Path, monkeypatch, caplog) -> None:
    """If a reader process dies, the stage reads the file itself: same metrics, no error."""

    def dying(workers: int) -> cf.ProcessPoolExecutor:
        pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(os._exit, 3)
        return pool

    ev = {k: v[:2000] for k, v in independent.items()}
    for name in ("inline", "fallback"):
        (tmp_path / name).mkdir()
    cfg = load_config(ROOT_CONFIG, SMALL)
    inline = _run(cfg, dataset, ev, tmp_path / "inline", None, plots=False, threads=1)
    monkeypatch.setattr(processes, "start_readers", dying)
    fallback = _run(cfg, dataset, ev, tmp_path / "fallback", None, plots=False, threads=2)
    assert "a reader process failed" in caplog.text and fallback["reader_processes"] == 0
    assert fallback["metrics"] == inline["metrics"]


# ----------------------------------------------------------------------------- golden outputs

#: Digests of ``summary.json`` and ``floors.json`` for the recipe below, produced by the code before
#: surrogate/validate.py became the surrogate.validation package (commit cbb4a72): a refactor must
#: give the same bytes. Regenerate (after a change meant to alter results) with
#: ``SURROGATE_UPDATE_GOLDEN=1 pytest tests/test_validate.py -k golden``. Regenerated once since, when
#: summary.json gained its ``binning`` key (issue 18): without that key the summary had the recorded digest.
GOLDEN = Path(__file__).resolve().parent / "data" / "validate_golden.json"
#: SMALL with per-bin tests (every family runs), on the session fixtures: real = simulate_events(N_REAL,
#: OVERRIDES, seed=101) split half train / half test, generated = the first 2000 of simulate_events(N_GEN,
#: OVERRIDES, seed=202); floors with compute_floors(threads=1), the stage with run(threads=1, plots=False).
GOLDEN_OVERRIDES = [*SMALL, "validate.min_bin_events=100"]
#: What may differ: wall times, the floors' identity (a hash of the source code, so it changes with
#: any edit, by design) and the dataset's path (a temporary folder).
SUMMARY_VOLATILE = ("seconds",)
FLOORS_VOLATILE = ("seconds", "identity", "dataset")


def _canonical(doc: dict[str, Any], volatile: tuple[str, ...], sort_keys: bool = False) -> str:
    """The JSON text without the volatile fields; key order kept unless ``sort_keys`` (the floors are
    stored in the order their test families finish, which depends on the thread timing)."""
    return json.dumps({k: v for k, v in doc.items() if k not in volatile}, indent=2, sort_keys=sort_keys)


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _golden_record(summary: dict[str, Any], floors: dict[str, Any]) -> dict[str, Any]:
    families: dict[str, list[dict[str, Any]]] = {}
    for m in summary["metrics"]:
        families.setdefault(m["name"].split("/")[0], []).append(m)
    return {
        "recipe": "tests/test_validate.py: GOLDEN_OVERRIDES on the session fixtures dataset and independent[:2000]",
        "overrides": GOLDEN_OVERRIDES,
        "summary_sha256": _digest(_canonical(summary, SUMMARY_VOLATILE)),
        "floors_sha256": _digest(_canonical(floors, FLOORS_VOLATILE, sort_keys=True)),
        "n_tests": summary["n_tests"],
        "n_failed": summary["n_failed"],
        # per test family, to say which one changed
        "families_sha256": {k: _digest(json.dumps(v)) for k, v in sorted(families.items())},
        "floor_keys": len(floors["floors"]),
    }


def test_outputs_equal_the_golden_ones(dataset, independent, tmp_path: Path) -> None:
    """summary.json and floors.json (less wall times, code hash and paths) are those of the recorded run."""
    cfg = load_config(ROOT_CONFIG, GOLDEN_OVERRIDES)
    V.compute_floors(cfg, dataset, tmp_path / "floors.json", threads=1)
    _run(cfg, dataset, {k: v[:2000] for k, v in independent.items()}, tmp_path, None, plots=False, threads=1)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    got = _golden_record(summary, json.loads((tmp_path / "floors.json").read_text()))
    if os.environ.get("SURROGATE_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=2) + "\n")
    want = json.loads(GOLDEN.read_text())
    changed = [k for k in want["families_sha256"] if got["families_sha256"].get(k) != want["families_sha256"][k]]
    assert got == want, f"test families that changed: {changed}"
