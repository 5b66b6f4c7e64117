"""Held-out conditions (ingest.holdout): no event of a region reaches train/val/test, every stage
refuses inputs made with another holdout, and validation in the held-out bins has known answers:
an independent simulator sample passes there, showers from 20% lower energies fail there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from surrogate import generate, ingest, train
from surrogate import validate as V
from surrogate.config import load_config
from surrogate.generate import GenerateError
from surrogate.geometry import from_config
from surrogate.holdout import HoldoutError, canonical, region_index, regions_from_config
from surrogate.simulate import MODE_NAMES, build_params, simulate_events
from surrogate.train import TrainError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config.yaml"
#: an energy hole and an |eta| hole (interpolation), the top of the range (extrapolation)
HOLDOUT = (
    "ingest.holdout=[{name: E40-70, energy_gev: [40, 70]},"
    " {name: eta, energy_gev: [0, 500], eta: [1.05, 1.2]},"
    " {name: E500+, kind: extrapolation, energy_gev: [500, null]}]"
)
N_IN = 3000


def _input(path: Path, cfg: dict[str, Any], n: int = N_IN, seed: int = 0) -> Path:
    """A small sparse input in our superset format, energies log-uniform 1 GeV-1 TeV, |eta| < 1.5."""
    rng = np.random.default_rng(seed)
    v = from_config(cfg).n_voxels
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e6), (n, 1))).astype(np.float32)
    showers = (rng.gamma(0.5, 1.0, (n, v)) * (rng.random((n, v)) < 0.3) * energies / 300).astype(np.float32)
    with h5py.File(path, "w") as f:
        f["incident_energies"] = energies
        f["showers"] = showers
        f["incident_eta"] = rng.uniform(0, 1.5, (n, 1)).astype(np.float32)
        f["incident_pdg"] = rng.choice(np.array([22, 211], np.int32), (n, 1))
        f["truth/mode"] = rng.integers(0, 4, n).astype(np.int8)
    return path


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> dict[str, Any]:
    """One input ingested without a holdout and with HOLDOUT (twice: same seed, same split)."""
    d = tmp_path_factory.mktemp("holdout")
    plain = load_config(CONFIG, ["ingest.chunk_events=500"])
    held = load_config(CONFIG, ["ingest.chunk_events=500", HOLDOUT])
    src = _input(d / "in.h5", plain)
    return {
        "dir": d,
        "src": src,
        "plain_cfg": plain,
        "cfg": held,
        "plain": ingest.run(plain, [src], d / "plain", progress=False),
        "held": ingest.run(held, [src], d / "held", progress=False),
        "again": ingest.run(held, [src], d / "again", progress=False),
    }


def _conditions(g: h5py.Group) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return g["incident_energies"][:, 0], g["incident_eta"][:, 0], g["incident_pdg"][:, 0]


def test_no_held_out_event_reaches_train_val_or_test(ingested) -> None:
    regions = regions_from_config(ingested["cfg"])
    rows = ingested["held"]["rows"]
    assert rows["unseen"] > 300 and rows["extrapolation"] > 200
    assert sum(rows[s] for s in (*ingest.SPLITS, *ingest.HELDOUT_SPLITS)) == N_IN
    assert [r["events"] > 0 for r in ingested["held"]["holdout"]] == [True] * 3
    with h5py.File(ingested["dir"] / "held" / "dataset.h5") as f, h5py.File(ingested["src"]) as src:
        assert f.attrs["holdout"] == canonical(regions)
        for split in ingest.SPLITS:
            assert np.all(region_index(regions, *_conditions(f[split])) == -1), split
        for split, kind in (("unseen", "interpolation"), ("extrapolation", "extrapolation")):
            where = region_index(regions, *_conditions(f[split]))
            assert np.array_equal(where, f[split]["region"][:])
            assert all(regions[i].kind == kind for i in np.unique(where))
        # every event of the input inside a region is in a held-out split
        inside = region_index(
            regions, src["incident_energies"][:, 0], src["incident_eta"][:, 0], src["incident_pdg"][:, 0]
        )
        held = np.concatenate([f[s]["source_row"][:] for s in ingest.HELDOUT_SPLITS])
        assert sorted(held.tolist()) == np.flatnonzero(inside >= 0).tolist()
        # the preprocessing (and so the generator's trained range) saw no held-out event
        assert f["train"]["incident_energies"][:].max() < 500e3


def test_holdout_moves_events_and_reshuffles_nothing(ingested) -> None:
    """Same seed, same split; every event outside the regions keeps the split it had without a holdout;
    without a holdout the file has no trace of the feature."""
    with (
        h5py.File(ingested["dir"] / "held" / "dataset.h5") as a,
        h5py.File(ingested["dir"] / "again" / "dataset.h5") as b,
        h5py.File(ingested["dir"] / "plain" / "dataset.h5") as p,
    ):
        assert "holdout" not in p.attrs and set(p) == set(ingest.SPLITS)
        assert "holdout" not in ingested["plain"] and "unseen" not in ingested["plain"]["rows"]
        held = np.concatenate([a[s]["source_row"][:] for s in ingest.HELDOUT_SPLITS])
        for split in (*ingest.SPLITS, *ingest.HELDOUT_SPLITS):
            assert np.array_equal(a[split]["source_row"][:], b[split]["source_row"][:])
        for split in ingest.SPLITS:
            kept = p[split]["source_row"][:]
            assert np.array_equal(a[split]["source_row"][:], kept[~np.isin(kept, held)])


def test_ingest_refuses_overlapping_kinds_and_empty_regions(ingested, tmp_path) -> None:
    overlap = "ingest.holdout=[{name: a, energy_gev: [40, 70]}, {name: b, kind: extrapolation, energy_gev: [60, null]}]"
    cfg = load_config(CONFIG, [overlap])
    with pytest.raises(HoldoutError, match="overlaps"):
        regions_from_config(cfg)
    with pytest.raises(ingest.IngestError, match="overlaps"):
        ingest.run(cfg, [ingested["src"]], tmp_path / "o", progress=False)
    empty = load_config(CONFIG, ["ingest.holdout=[{name: far, energy_gev: [2000, 3000]}]"])
    with pytest.raises(ingest.IngestError, match="far"):
        ingest.run(empty, [ingested["src"]], tmp_path / "e", progress=False)
    assert not (tmp_path / "e" / "dataset.h5").exists()


def test_ingest_refuses_to_write_a_leak(ingested, tmp_path, monkeypatch) -> None:
    """Its last check before the file is final: were held-out events ever routed to train/val/test
    (here: the routing forgets the |eta| region), no dataset is written."""
    route = ingest._hold_out
    monkeypatch.setattr(ingest, "_hold_out", lambda item, labels, r, splits: route(item, labels, r[::2], splits))
    with pytest.raises(ingest.IngestError, match="held-out region 'eta': refusing to write a dataset that leaks"):
        ingest.run(ingested["cfg"], [ingested["src"]], tmp_path / "leak", progress=False)
    assert not (tmp_path / "leak" / "dataset.h5").exists() and not (tmp_path / "leak" / "manifest.json").exists()


def test_train_refuses_a_dataset_with_another_holdout(ingested, tmp_path) -> None:
    held = ingested["dir"] / "held" / "dataset.h5"
    with pytest.raises(TrainError, match="E40-70"):  # the config holds out nothing, the dataset E40-70, ...
        train.run(ingested["plain_cfg"], held, tmp_path / "a", progress=False)
    # a dataset made without the holdout: its train split holds the events the config holds out
    plain = ingested["dir"] / "plain" / "dataset.h5"
    with pytest.raises(TrainError, match="holds out nothing"):
        train.run(ingested["cfg"], plain, tmp_path / "b", progress=False)
    assert not (tmp_path / "a" / "generator.pt").exists() and not (tmp_path / "b" / "generator.pt").exists()


def _checkpoint(path: Path, cfg: dict[str, Any], dataset: Path, holdout: str | None) -> Path:
    """A tiny random generator in the train stage's format, with the dataset's preprocessing."""
    from surrogate.models import FORMAT_VERSION, Generator, ModelConfig
    from surrogate.preprocess import Preprocessor

    with h5py.File(dataset) as f:
        pre = Preprocessor.from_dict(json.loads(f.attrs["preprocessing"]))
    geometry = from_config(cfg)
    torch.manual_seed(0)
    mc = ModelConfig(n_voxels=geometry.n_voxels, cond_dim=len(pre.condition_names), z_dim=8, g_width=32, g_depth=1)
    ckpt = {
        "format_version": FORMAT_VERSION,
        "model_config": mc.to_dict(),
        "ema_state_dict": Generator(mc).state_dict(),
        "preprocessing": pre.to_dict(),
        "condition_names": pre.condition_names,
        "geometry": geometry.to_dict(),
        "step": 0,
    }
    if holdout is not None:
        ckpt["holdout"] = holdout
    torch.save(ckpt, path)
    return path


def test_generate_at_held_out_conditions_and_refuse_another_holdout(ingested, tmp_path) -> None:
    cfg = load_config(CONFIG, [HOLDOUT, "generate.holdout_events=200", "generate.threads=1"])
    dataset = ingested["dir"] / "held" / "dataset.h5"
    regions = regions_from_config(cfg)
    good = _checkpoint(tmp_path / "good.pt", cfg, dataset, canonical(regions))
    for split, kind in (("unseen", "interpolation"), ("extrapolation", "extrapolation")):
        out = tmp_path / f"{split}.h5"
        generate.run(cfg, good, out, dataset=dataset, split=split, progress=False)
        with h5py.File(out) as f:
            assert len(f["showers"]) == 200 and f.attrs["condition_source"] == split
            assert f.attrs["holdout"] == canonical(regions)
            where = region_index(regions, *(f[k][:, 0] for k in ("incident_energies", "incident_eta", "incident_pdg")))
            assert np.all(where >= 0) and all(regions[i].kind == kind for i in np.unique(where))
    stale = _checkpoint(tmp_path / "stale.pt", cfg, dataset, None)  # trained on a dataset without the holdout
    with pytest.raises(GenerateError, match="holds out E40-70"):
        generate.run(cfg, stale, tmp_path / "x.h5", dataset=dataset, split="unseen", progress=False)
    with pytest.raises(GenerateError, match="holds out E40-70"):  # its test split differs too
        generate.run(cfg, stale, tmp_path / "y.h5", dataset=dataset, events=10, progress=False)
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "y.h5").exists()


# ----------------------------------------------------------------------------- validation, known answers

#: Simulator settings as in tests/test_validate.py (cheaper showers, fewer resamplings), sizes cut down.
OVERRIDES = [
    "simulate.spots.max=1000",
    "validate.n_boot=10",
    "validate.subsample.classifier_iterations=30",
    "validate.min_bin_events=100",
    "validate.subsample.classifier_events=300",
    "validate.subsample.voxel_classifier_events=300",
    "validate.subsample.fpd_events=300",
    "validate.subsample.kpd_batch_size=200",
    "validate.subsample.prdc_events=300",
    "validate.subsample.mode_classifier_events=500",
]
VAL_HOLDOUT = (
    "ingest.holdout=[{name: E40-70, energy_gev: [40, 70]}, {name: E500+, kind: extrapolation, energy_gev: [500, null]}]"
)
N_SEEN, N_HELD = 2400, 1200


def _sim(cfg: dict[str, Any], n: int, seed: int, lo: float = 1.0, hi: float = 1000.0) -> dict[str, np.ndarray]:
    c = load_config(CONFIG, [*OVERRIDES, f"simulate.energy.min_gev={lo}", f"simulate.energy.max_gev={hi}"])
    return simulate_events(n, c, seed=seed)


def _outside(ev: dict[str, np.ndarray], cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """The events of ``ev`` outside every held-out region (the seen conditions)."""
    keep = region_index(regions_from_config(cfg), ev["incident_energies"], ev["incident_eta"], ev["incident_pdg"]) < 0
    return {k: v[keep] for k, v in ev.items()}


def _group(f: h5py.File, name: str, ev: dict[str, np.ndarray]) -> None:
    g = f.create_group(name)
    for key in ("showers", "incident_energies", "incident_eta", "incident_pdg"):
        g[key] = ev[key]
    g["conditions"] = np.log(ev["incident_energies"]).astype(np.float32)
    g["mode"] = ev["truth/mode"]
    g["source_row"] = np.arange(len(ev["showers"]), dtype=np.int64)


def _write_generated(path: Path, ev: dict[str, np.ndarray], holdout: str, source: str) -> Path:
    with h5py.File(path, "w") as f:
        for key in ("incident_energies", "incident_eta", "incident_pdg"):
            f[key] = ev[key]
        f.create_dataset("showers", data=ev["showers"], chunks=(min(512, len(ev["showers"])), ev["showers"].shape[1]))
        f.attrs["holdout"] = holdout
        f.attrs["condition_source"] = source
    return path


@pytest.fixture(scope="module")
def heldout_data(tmp_path_factory) -> dict[str, Any]:
    """A contract-format dataset with a seen test split (outside the regions), an ``unseen`` split at
    40-70 GeV and an ``extrapolation`` split above 500 GeV, all simulated; independent samples of each."""
    d = tmp_path_factory.mktemp("holdout_validate")
    cfg = load_config(CONFIG, [*OVERRIDES, VAL_HOLDOUT])
    holdout = canonical(regions_from_config(cfg))
    seen = _outside(_sim(cfg, N_SEEN, 101), cfg)
    path = d / "dataset.h5"
    with h5py.File(path, "w") as f:
        f.attrs["geometry"] = json.dumps(build_params(cfg).geometry.to_dict())
        f.attrs["preprocessing"] = "{}"
        f.attrs["condition_names"] = json.dumps(["log_energy"])
        f.attrs["mode_names"] = json.dumps(list(MODE_NAMES))
        f.attrs["format_version"] = 1
        f.attrs["seed"] = 1
        f.attrs["holdout"] = holdout
        half = len(seen["showers"]) // 2
        _group(f, "train", {k: v[:half] for k, v in seen.items()})
        _group(f, "val", {k: v[:0] for k, v in seen.items()})
        _group(f, "test", {k: v[half:] for k, v in seen.items()})
        _group(f, "unseen", _sim(cfg, N_HELD, 303, 40.0, 70.0))
        _group(f, "extrapolation", _sim(cfg, N_HELD // 2, 304, 500.0, 1000.0))
    seen_gen = _outside(_sim(cfg, N_SEEN, 202), cfg)
    return {
        "dir": d,
        "cfg": cfg,
        "holdout": holdout,
        "dataset": path,
        "seen": _write_generated(d / "seen.h5", {k: v[: len(v) // 2] for k, v in seen_gen.items()}, holdout, "test"),
        "unseen": _sim(cfg, N_HELD, 404, 40.0, 70.0),
        "extrapolation": _sim(cfg, N_HELD // 2, 405, 500.0, 1000.0),
        # showers of 20% lower energies, labelled with the held-out energies: a generator that ignores the
        # energy condition inside the hole (answers with the nearest trained energy below it)
        "low": _sim(cfg, N_HELD, 406, 32.0, 56.0),
    }


def _relabel(ev: dict[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    return dict(ev, incident_energies=(ev["incident_energies"] * np.float32(factor)).astype(np.float32))


def _validate(data: dict[str, Any], tmp: Path, unseen: dict, extrapolation: dict, reuse: dict) -> dict[str, Any]:
    heldout = {
        "unseen": _write_generated(tmp / "unseen.h5", unseen, data["holdout"], "unseen"),
        "extrapolation": _write_generated(tmp / "extrapolation.h5", extrapolation, data["holdout"], "extrapolation"),
    }
    return V.run(data["cfg"], data["dataset"], data["seen"], tmp / "out", plots=False, reuse=reuse, heldout=heldout)


@pytest.fixture(scope="module")
def reuse() -> dict[Any, Any]:
    return {}


def test_independent_sample_passes_in_the_unseen_bins(heldout_data, reuse, tmp_path) -> None:
    summary = _validate(heldout_data, tmp_path, heldout_data["unseen"], heldout_data["extrapolation"], reuse)
    assert summary["verdicts"]["seen"] == "PASS", summary["failed"]
    assert summary["unseen"]["verdict"] == "PASS", summary["unseen"]["failed"]
    assert summary["verdict"] == "PASS"
    unseen = summary["unseen"]
    assert unseen["real_events"] == N_HELD and unseen["regions"][0]["name"] == "E40-70"
    assert {m["name"].split("/")[0] for m in unseen["metrics"]} >= {"response_mean", "resolution", "ks", "fpd"}
    assert summary["extrapolation"]["informational"] is True
    assert "seen conditions: PASS" in summary["verdict_line"]
    assert "conditions never seen in training: PASS" in summary["verdict_line"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Conditions never seen in training" in page and "informational: not in the verdict" in page
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["unseen"]["verdict"] == "PASS"


def test_energy_ignored_inside_the_hole_fails_there(heldout_data, reuse, tmp_path) -> None:
    """Showers from 20% lower energies at the unseen conditions fail the unseen response tests (the
    seen ones still pass); the same fault above 500 GeV fails the extrapolation section, not the verdict."""
    low = _relabel(heldout_data["low"], 1.25)  # simulated at 32-56 GeV, labelled 40-70 GeV
    extrap = _relabel(heldout_data["extrapolation"], 1.25)
    summary = _validate(heldout_data, tmp_path, low, extrap, reuse)
    assert summary["verdicts"]["seen"] == "PASS", summary["failed"]
    assert summary["unseen"]["verdict"] == "FAIL"
    assert [m for m in summary["unseen"]["failed"] if m.startswith("response_mean/")], summary["unseen"]["failed"]
    assert summary["verdict"] == "FAIL" and "conditions never seen in training: FAIL" in summary["verdict_line"]
    assert summary["extrapolation"]["verdict"] == "FAIL"
    # extrapolation alone does not decide the verdict
    verdicts = dict(summary["verdicts"], unseen="PASS")
    assert all(v == "PASS" for k, v in verdicts.items() if k != "extrapolation")


def test_validate_refuses_another_holdout(heldout_data, tmp_path) -> None:
    plain = load_config(CONFIG, OVERRIDES)  # holds out nothing, the dataset holds out two regions
    with pytest.raises(V.ValidateError, match="holds out E40-70"):
        V.run(plain, heldout_data["dataset"], heldout_data["seen"], tmp_path / "a", plots=False)
    stale = _write_generated(tmp_path / "stale.h5", heldout_data["unseen"], "[]", "unseen")
    with pytest.raises(V.ValidateError, match="holds out nothing"):
        V.run(
            heldout_data["cfg"],
            heldout_data["dataset"],
            heldout_data["seen"],
            tmp_path / "b",
            plots=False,
            heldout={"unseen": stale},
        )
    assert not (tmp_path / "a" / "summary.json").exists() and not (tmp_path / "b" / "summary.json").exists()
