"""Plain CaloChallenge files, first class: only ``incident_energies`` and ``showers`` (no η, no PDG
code, no truth modes), at dataset 1's discrete photon energies, from a small generator unlike our
simulator (tests/calochallenge_files.py). Ingest detects the discrete energies and records them;
train, generate and the ONNX export work from energies alone; validation bins by the discrete
energies and labels the bins with the configured particle name (or "all"), never ``pdg0``; and
ingest refuses bad input in the dataset-2 and -3 geometries (6,480 and 40,500 voxels).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import calochallenge_files as C  # tests/ is on sys.path (no package)
import h5py
import numpy as np
import pytest
import yaml
from test_train import TINY

from surrogate import export, generate, ingest, report, train
from surrogate import validate as V
from surrogate.config import load_config
from surrogate.geometry import load_xml
from surrogate.validation.binning import Binning
from surrogate.validation.floors import floor_identity
from surrogate.validation.samples import load_splits

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not C.SHARED.is_dir(), reason=C.MISSING)

PER_ENERGY = 40  # events at each of the 15 energies: 600 events
#: A plain CaloChallenge photon file as the README's "Your own CaloChallenge files" configures it.
PLAIN = [
    f"geometry.binning_file={C.DS1_PHOTONS}",
    "ingest.datasets.incident_eta=null",
    "ingest.datasets.incident_pdg=null",
    "ingest.datasets.mode=null",
    "ingest.particle_name=photon",
    "train.generator.symmetry=none",
]
#: test_train.py's tiny model, a few steps: enough to prove that training runs on a plain file
TINY_TRAIN = [*TINY, "train.steps=4"]
TINY_VALIDATE = [
    "ingest.split={train: 0.45, val: 0.05, test: 0.5}",  # ~20 test events per energy: every bin tested
    "validate.min_bin_events=10",
    "validate.n_boot=3",
    "validate.subsample.classifier_events=100",
    "validate.subsample.voxel_classifier_events=100",
    "validate.subsample.classifier_iterations=5",
    "validate.subsample.fpd_events=100",
    "validate.subsample.kpd_batch_size=20",
    "validate.subsample.kpd_batches=2",
    "validate.subsample.prdc_events=50",
    "validate.subsample.clusters=3",
]
LABELS = [f"photon_E{e / 1000:.7g}GeV" for e in C.DS1_ENERGIES_MEV]


def _cfg(*overrides: str) -> dict[str, Any]:
    return load_config(ROOT / "config.yaml", [*PLAIN, *TINY_TRAIN, *TINY_VALIDATE, *overrides])


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[str, Any]:
    """The plain file (gzip-compressed, as the CaloChallenge files are), ingested, a generator trained on it
    (a few steps), and events generated at the test split's conditions."""
    d = tmp_path_factory.mktemp("plain")
    src = C.write_plain(d / "photons.h5", C.ds1_photons(), C.discrete_energies(PER_ENERGY, 1), 2, "gzip")
    cfg = _cfg()
    manifest = ingest.run(cfg, [src], d / "ingest", progress=False)
    dataset = d / "ingest" / "dataset.h5"
    train.run(cfg, dataset, d / "train", progress=False)
    events = d / "events.h5"
    generate.run(cfg, d / "train" / "generator.pt", events, events=3000, dataset=dataset, progress=False)
    return {"dir": d, "src": src, "cfg": cfg, "manifest": manifest, "dataset": dataset, "events": events}


# ----------------------------------------------------------------------------- ingest: discrete energies


def test_manifest_records_the_discrete_energies(plain) -> None:
    cond = plain["manifest"]["conditions"]
    assert cond["names"] == ["log_energy"] and cond["eta"] is None and cond["particles"] == {}
    assert cond["particle_name"] == "photon"
    discrete = cond["discrete_energies"]
    assert discrete["values_mev"] == list(C.DS1_ENERGIES_MEV)
    assert discrete["events"] == [PER_ENERGY] * 15
    assert discrete["rule"] == "at most 30 distinct values, each with at least 20 events"
    with h5py.File(plain["dataset"]) as f:
        info = json.loads(f.attrs["condition_info"])
    assert info == {
        "eta": False,
        "pdg": False,
        "particle_name": "photon",
        "discrete_energies_mev": list(C.DS1_ENERGIES_MEV),
    }


@pytest.mark.parametrize(
    ("energies", "rule", "discrete"),
    [
        ("ds1", {}, True),
        ("ds1", {"min_events": PER_ENERGY}, True),  # the bound itself is enough
        ("ds1", {"min_events": PER_ENERGY + 1}, False),  # too few events per energy
        ("ds1", {"max_values": 14}, False),  # too many values
        ("continuous", {}, False),  # log-uniform energies, as the simulator's or datasets 2 and 3
    ],
)
def test_discrete_energy_rule(tmp_path, energies, rule, discrete) -> None:
    if energies == "ds1":
        e = C.discrete_energies(PER_ENERGY, 3)
    else:
        e = np.exp(np.random.default_rng(3).uniform(np.log(1e3), np.log(1e6), 15 * PER_ENERGY))
    src = C.write_plain(tmp_path / "in.h5", C.ds1_photons(), e, 4)
    cfg = _cfg(*(f"ingest.discrete_energies.{k}={v}" for k, v in rule.items()))
    manifest = ingest.run(cfg, [src], tmp_path / "out", progress=False)
    got = manifest["conditions"]["discrete_energies"]
    assert (got is not None) == discrete
    with h5py.File(tmp_path / "out" / "dataset.h5") as f:
        info = json.loads(f.attrs["condition_info"])
    assert info["discrete_energies_mev"] == (list(C.DS1_ENERGIES_MEV) if discrete else [])


def test_particle_name_is_ignored_for_inputs_with_codes(tmp_path, caplog) -> None:
    """Inputs that carry incident_pdg label their bins by the codes: the name is not applied (a warning says so)."""
    e = C.discrete_energies(PER_ENERGY, 5)
    src = C.write_plain(tmp_path / "in.h5", C.ds1_photons(), e, 6)
    with h5py.File(src, "a") as f:
        f["incident_pdg"] = np.full((len(e), 1), 22, np.int32)
    cfg = _cfg("ingest.datasets.incident_pdg=incident_pdg")
    manifest = ingest.run(cfg, [src], tmp_path / "out", progress=False)
    assert "ingest.particle_name 'photon' is ignored" in caplog.text
    assert manifest["conditions"]["particle_name"] is None and manifest["conditions"]["particles"] == {"22": len(e)}
    _, _, binning = load_splits(tmp_path / "out" / "dataset.h5", cfg["validate"])
    assert binning.label(0) == "pdg22_E0.256GeV"


# ----------------------------------------------------------------------------- the bins


def test_binning_known_answers() -> None:
    settings = load_config(ROOT / "config.yaml")["validate"]
    energies = list(C.DS1_ENERGIES_MEV)
    b = Binning.from_settings(settings, (0,), {"eta": False, "pdg": False, "particle_name": "photon", **_d(energies)})
    assert b.n_bins == 15 and [b.label(i) for i in range(15)] == LABELS
    np.testing.assert_allclose(b.energy_edges_mev, np.sqrt(np.array(energies[1:]) * energies[:-1]))
    # every discrete energy in its own bin, whatever the (absent) eta
    np.testing.assert_array_equal(b.index(np.array(energies), np.full(15, 0.9), np.zeros(15)), np.arange(15))
    assert b.axis_labels() == ([f"{e / 1000:.7g} GeV" for e in energies], ["all (no eta)"])
    assert b.response_label(0, 8) == "photon_E65.536GeV"
    assert b.to_dict()["particles"] == {"photon": 0} and b.to_dict()["energies_gev"][-1] == 4194.304
    # no name configured: "all"; edges asked for: the ranges, still without eta
    unnamed = Binning.from_settings(settings, (0,), {"eta": False, "pdg": False, "particle_name": None, **_d(energies)})
    assert unnamed.label(8) == "all_E65.536GeV"
    plain = {"eta": False, "pdg": False, **_d(energies)}
    edges = Binning.from_settings({**settings, "energy_bins": "edges"}, (0,), plain)
    assert [edges.label(i) for i in range(edges.n_bins)] == ["all_E0-10GeV", "all_E10-100GeV", "all_E100-infGeV"]
    assert edges.response_label(0, 1) == "all_Ebin1"
    # a file without condition_info (written before it existed, or by hand): the labels of old
    old = Binning.from_settings(settings, (22, 211), None)
    assert old.label(0) == "pdg22_E0-10GeV_eta0-0.75" and old.n_bins == 12
    assert old.response_label(211, 2) == "pdg211_Ebin2"
    # discrete energies with eta and codes: eta bins and codes kept
    both = Binning.from_settings(settings, (22, 211), {"eta": True, "pdg": True, **_d(energies[:3])})
    assert both.n_bins == 3 * 2 * 2 and both.label(3) == "pdg22_E0.256GeV_eta0.75-inf"


def _d(energies: list[float]) -> dict[str, Any]:
    return {"discrete_energies_mev": energies}


def test_floors_identity_changes_with_the_binning(plain, tmp_path) -> None:
    """The same test split ingested under another discrete-energy rule bins differently: the floors' identity
    (their cache key) differs, so floors of the one are never used for the other."""
    cfg = plain["cfg"]
    settings = cfg["validate"]
    again = _cfg("ingest.discrete_energies.max_values=10")  # 15 energies: continuous now
    ingest.run(again, [plain["src"]], tmp_path / "edges", progress=False)
    real_a, train_a, bins_a = load_splits(plain["dataset"], settings)
    real_b, train_b, bins_b = load_splits(tmp_path / "edges" / "dataset.h5", settings)
    np.testing.assert_array_equal(real_a.showers, real_b.showers)  # the same events
    assert bins_a.energies_mev is not None and bins_b.energies_mev is None
    assert floor_identity(real_a, train_a, bins_a, settings, 1) != floor_identity(real_b, train_b, bins_b, settings, 1)
    assert floor_identity(real_a, train_a, bins_a, settings, 1) == floor_identity(real_b, train_b, bins_a, settings, 1)


def test_holdout_keeps_the_discrete_bins(plain, tmp_path) -> None:
    """Holding out 30-70 GeV (two of the energies) moves them to the unseen split; both splits bin by the same
    15 energies, the unseen one holding exactly the two held out."""
    cfg = _cfg("ingest.holdout=[{name: mid, energy_gev: [30, 70]}]")
    manifest = ingest.run(cfg, [plain["src"]], tmp_path / "out", progress=False)
    assert manifest["rows"]["unseen"] == 2 * PER_ENERGY
    assert manifest["conditions"]["discrete_energies"]["values_mev"] == list(C.DS1_ENERGIES_MEV)
    dataset = tmp_path / "out" / "dataset.h5"
    unseen, _, bins = load_splits(dataset, cfg["validate"], "unseen")
    held = bins.index(unseen.energy, unseen.eta, unseen.pdg)
    assert sorted({bins.label(b) for b in held}) == ["photon_E32.768GeV", "photon_E65.536GeV"]
    test, _, test_bins = load_splits(dataset, cfg["validate"], "test")
    assert test_bins.to_dict() == bins.to_dict()
    in_test = {bins.label(b) for b in bins.index(test.energy, test.eta, test.pdg)}
    assert in_test == set(LABELS) - {"photon_E32.768GeV", "photon_E65.536GeV"}


# ----------------------------------------------------------------------------- energies alone


def test_generates_from_energies_alone(plain, tmp_path) -> None:
    """A conditions file with nothing but incident_energies (the generator was trained without a PDG code)."""
    energies = np.array([[1024.0], [65536.0], [4194304.0]] * 4, np.float32)
    cond = tmp_path / "energies.h5"
    with h5py.File(cond, "w") as f:
        f["incident_energies"] = energies
    out = tmp_path / "showers.h5"
    generate.run(plain["cfg"], plain["dir"] / "train" / "generator.pt", out, conditions_file=cond, progress=False)
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["incident_energies"][()], energies)
        assert np.all(f["incident_pdg"][()] == 0)  # the code ingest filled in for the training data
        showers = f["showers"][()]
    assert showers.shape == (12, 368) and np.isfinite(showers).all() and showers.sum(axis=1).min() > 0
    assert generate.default_particle(()) == 0 and generate.default_particle((22,)) == 22
    assert generate.default_particle((22, 211)) is None


def test_onnx_export_generates_from_energies_alone(plain, tmp_path) -> None:
    summary = export.run(plain["cfg"], plain["dir"] / "train" / "generator.pt", tmp_path / "g.onnx", dataset=None)
    assert summary["check"]["ok"]
    model = export.OnnxShowerModel(tmp_path / "g.onnx")
    assert json.loads(model.metadata["particles"]) == [] and json.loads(model.metadata["eta_range"]) is None
    e = np.array([[1024.0], [65536.0]], np.float32)
    alone = model.sample(e, seed=4)
    z = np.random.default_rng(4).standard_normal((2, model.z_dim)).astype(np.float32)
    assert alone.shape == (2, 368) and np.array_equal(alone, model(z, e, np.zeros((2, 1)), np.zeros((2, 1), np.int32)))


# ----------------------------------------------------------------------------- validation by discrete energy


@pytest.fixture(scope="module")
def validated(plain) -> dict[str, Any]:
    out = plain["dir"] / "validate"
    summary = V.run(plain["cfg"], plain["dataset"], plain["events"], out, threads=1)
    return {"summary": summary, "out": out}


def test_validation_bins_by_discrete_energy_and_names_the_particle(validated) -> None:
    summary = validated["summary"]
    binning = summary["binning"]
    assert binning["energy"] == "discrete" and binning["labels"] == LABELS and binning["eta_edges"] is None
    assert binning["particles"] == {"photon": 0}
    assert summary["bins_used"] == LABELS  # one bin per energy, each with enough real events
    names = [m["name"] for m in summary["metrics"]]
    assert [n.split("/", 1)[1] for n in names if n.startswith("response_mean/")] == LABELS
    per_bin = {n.split("/")[1] for n in names if n.startswith("ks/") and n.split("/")[1] != "all"}
    assert per_bin == set(summary["bins_used"])
    text = (validated["out"] / "report.html").read_text() + json.dumps(summary)
    assert "pdg0" not in text and "pdg 0" not in text and "photon_E65.536GeV" in text
    assert (validated["out"] / "plots" / "response.png").exists()


def test_mlflow_names_follow_the_labels(validated, plain) -> None:
    metrics = [n for n, _, _ in report._metrics({**_nothing(), "validate_summary": validated["summary"]})]
    assert metrics and not [n for n in metrics if "pdg0" in n]
    assert any(n.startswith("validate.response_mean/photon_E") for n in metrics)
    params = report.flatten(plain["cfg"])
    assert params["ingest.particle_name"] == "photon" and not [k for k in params if "pdg0" in k]


def test_thin_bins_are_named_in_a_warning(plain, tmp_path, caplog) -> None:
    """Bins below validate.min_bin_events are left out of the per-bin tests, and a warning says so."""
    cfg = {**plain["cfg"], "validate": {**plain["cfg"]["validate"], "min_bin_events": 10_000}}
    V.compute_floors(cfg, plain["dataset"], tmp_path / "floors.json", threads=1)
    assert "15 of 15 condition bins with real events have fewer than validate.min_bin_events = 10000" in caplog.text


def _nothing() -> dict[str, Any]:
    return {"history": [], "stage_seconds": {}, "generate_summary": None, "train_summary": None}


# ----------------------------------------------------------------------------- bad input, datasets 2 and 3


def _ingest_cfg(binning: Path) -> dict[str, Any]:
    return load_config(ROOT / "config.yaml", [f"geometry.binning_file={binning}", *PLAIN[1:4]])


@pytest.mark.parametrize("compression", [None, "gzip"])
@pytest.mark.parametrize(
    ("binning", "columns"),
    [("ds2", 6481), ("ds2", 40500), ("ds3", 6480), ("ds3", 40499)],
)
def test_wrong_voxel_count_is_refused(tmp_path, binning, columns, compression) -> None:
    path = C.DS2 if binning == "ds2" else C.DS3
    want = load_xml(path).n_voxels
    src = tmp_path / "in.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("incident_energies", data=np.full((3, 1), 5e4), compression=compression)
        f.create_dataset("showers", data=np.ones((3, columns), np.float32), compression=compression)
    with pytest.raises(ingest.IngestError) as err:
        ingest.run(_ingest_cfg(path), [src], tmp_path / "out", progress=False)
    assert str(err.value) == (
        f"{src}: dataset 'showers' has {columns} voxels per row, geometry {path.stem!r} has {want}"
    )
    assert not (tmp_path / "out" / "dataset.h5").exists() and not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("compression", [None, "gzip"])
@pytest.mark.parametrize("voxel", [0, 40499])
def test_nan_in_a_40500_voxel_row_is_refused(tmp_path, compression, voxel) -> None:
    geometry = load_xml(C.DS3)
    assert geometry.n_voxels == 40500
    e = np.geomspace(1e4, 1e6, 12)  # a few rows (2 MB)
    showers = C.showers(geometry, e, np.random.default_rng(7))
    showers[2, voxel] = np.nan
    src = tmp_path / "in.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("incident_energies", data=e.reshape(-1, 1), compression=compression)
        f.create_dataset("showers", data=showers, chunks=(2, 40500), compression=compression)
    digest = src.read_bytes()
    with pytest.raises(ingest.IngestError) as err:
        ingest.run(_ingest_cfg(C.DS3), [src], tmp_path / "out", progress=False)
    assert str(err.value) == f"{src}: dataset 'showers' row 2: NaN or Inf voxel energy (voxel {voxel}: nan)"
    assert not (tmp_path / "out" / "dataset.h5").exists()
    assert src.read_bytes() == digest, "inputs are never modified"
    # the same file without the NaN ingests
    with h5py.File(src, "a") as f:
        f["showers"][2, voxel] = 0.0
    cfg = {**_ingest_cfg(C.DS3)}
    cfg["ingest"] = {**cfg["ingest"], "split": {"train": 0.4, "val": 0.3, "test": 0.3}}
    manifest = ingest.run(cfg, [src], tmp_path / "out", progress=False)
    assert manifest["rows"]["total_read"] == 12 and manifest["rows"]["dropped"] == 0


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_plain_file_through_snakemake(tmp_path) -> None:
    """The README's recipe for one's own CaloChallenge files, on a tiny plain ds1-photon file: every stage runs,
    validation bins by the 15 energies, names them after the photon, and so does the MLflow run."""
    from test_workflow import TINY_LATER, snakemake

    work = tmp_path / "w"
    work.mkdir()
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(ROOT / name, work / name)
    shutil.copytree(ROOT / "workflow", work / "workflow")
    src = C.write_plain(work / "photons.h5", C.ds1_photons(), C.discrete_energies(100, 8), 9, "gzip")
    tiny = json.loads(json.dumps(TINY_LATER))  # a deep copy
    tiny["report"] = {"log_model": False, "tracking_uri": f"sqlite:///{work / 'mlflow.db'}"}
    tiny["geometry"] = {"binning_file": str(C.DS1_PHOTONS)}
    tiny["ingest"] = {
        "inputs": [str(src)],
        "datasets": {"incident_eta": None, "incident_pdg": None, "mode": None},
        "particle_name": "photon",
        "chunk_events": 500,
    }
    tiny["train"]["generator"]["symmetry"] = "none"
    (work / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    out = snakemake(work)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    assert "rule simulate" not in text
    manifest = json.loads((work / "results/ingest/manifest.json").read_text())
    assert manifest["conditions"]["discrete_energies"]["values_mev"] == list(C.DS1_ENERGIES_MEV)
    summary = json.loads((work / "results/validate/summary.json").read_text())
    assert summary["binning"]["labels"] == LABELS and set(summary["bins_used"]) <= set(LABELS)
    assert "pdg0" not in (work / "results/validate/report.html").read_text()
    from mlflow.tracking import MlflowClient

    record = json.loads((work / "results/report/mlflow_run.json").read_text())
    run = MlflowClient(record["tracking_uri"]).get_run(record["run_id"])
    assert not [k for k in (*run.data.metrics, *run.data.params) if "pdg0" in k]
    assert any(k.startswith("validate.response_mean/photon_E") for k in run.data.metrics)
    assert (work / "results/export/generator.onnx").stat().st_size > 0
    again = snakemake(work, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
