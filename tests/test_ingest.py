"""Ingest: good files become a split, preprocessed dataset; each kind of bad input is refused
with one line naming file, dataset and row, and leaves no output; inputs are never modified."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from surrogate import ingest
from surrogate.config import load_config
from surrogate.geometry import from_config
from surrogate.io import sha256_file
from surrogate.preprocess import Preprocessor

ROOT = Path(__file__).resolve().parents[1]
N = 240


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "config.yaml", ["ingest.chunk_events=64"])


def write_input(path: Path, cfg, n: int = N, seed: int = 0, superset: bool = True, **edit) -> Path:
    """A small sparse input file in our superset format (or plain CaloChallenge); ``edit`` patches arrays."""
    rng = np.random.default_rng(seed)
    v = from_config(cfg).n_voxels
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e6), (n, 1))).astype(np.float32)
    showers = (rng.gamma(0.5, 1.0, (n, v)) * (rng.random((n, v)) < 0.4) * energies / 300).astype(np.float32)
    arrays = {"incident_energies": energies, "showers": showers}
    if superset:
        arrays["incident_eta"] = rng.uniform(0, 1.5, (n, 1)).astype(np.float32)
        arrays["incident_pdg"] = rng.choice(np.array([22, 211], np.int32), (n, 1))
        arrays["truth/mode"] = rng.integers(0, 4, n).astype(np.int8)
    for key, fn in edit.items():
        arrays[key.replace("__", "/")] = fn(arrays.get(key.replace("__", "/")))
    with h5py.File(path, "w") as f:
        for key, a in arrays.items():
            if a is not None:
                f.create_dataset(key, data=a, chunks=(min(len(a), 50), *a.shape[1:]) if len(a) else None)
        if "truth/mode" in f:
            f["truth/mode"].attrs["names"] = json.dumps(["a", "b", "c", "d"])
    return path


def test_ingest_writes_the_contract(cfg, tmp_path):
    src = write_input(tmp_path / "in.h5", cfg)
    digest = sha256_file(src)
    manifest = ingest.run(cfg, [src], tmp_path / "out", progress=False)
    assert sha256_file(src) == digest, "inputs must never be modified"
    assert sum(manifest["rows"][s] for s in ingest.SPLITS) == N
    assert manifest["inputs"][0]["sha256"] == digest
    with h5py.File(tmp_path / "out" / "dataset.h5") as f, h5py.File(src) as g:
        pre = Preprocessor.from_dict(json.loads(f.attrs["preprocessing"]))
        assert json.loads(f.attrs["condition_names"]) == ["log_energy", "eta", "pdg_22", "pdg_211"]
        rows = np.concatenate([f[f"{s}/source_row"][:] for s in ingest.SPLITS])
        assert sorted(rows.tolist()) == list(range(N))  # every row exactly once
        test = f["test"]
        src_rows = test["source_row"][:]
        np.testing.assert_array_equal(test["showers"][:], g["showers"][:][src_rows])
        np.testing.assert_array_equal(test["incident_pdg"][:], g["incident_pdg"][:][src_rows])
        np.testing.assert_array_equal(test["mode"][:], g["truth/mode"][:][src_rows])
        np.testing.assert_allclose(
            test["conditions"][:],
            pre.transform_conditions(test["incident_energies"][:], test["incident_eta"][:], test["incident_pdg"][:]),
        )
        assert f.attrs["readout_threshold_mev"] == pytest.approx(float(g["showers"][:][g["showers"][:] > 0].min()))
    assert (tmp_path / "out" / "config.yaml").exists()


def test_split_is_deterministic_and_independent_of_chunking(cfg, tmp_path):
    src = write_input(tmp_path / "in.h5", cfg)
    ingest.run(cfg, [src], tmp_path / "a", progress=False)
    ingest.run(cfg, [src], tmp_path / "b", progress=False)
    assert sha256_file(tmp_path / "a" / "dataset.h5") == sha256_file(tmp_path / "b" / "dataset.h5")
    other = {**cfg, "ingest": {**cfg["ingest"], "chunk_events": 100}}
    ingest.run(other, [src], tmp_path / "c", progress=False)
    with h5py.File(tmp_path / "a" / "dataset.h5") as a, h5py.File(tmp_path / "c" / "dataset.h5") as c:
        for s in ingest.SPLITS:
            np.testing.assert_array_equal(a[f"{s}/source_row"][:], c[f"{s}/source_row"][:])


def test_plain_calochallenge_file_has_energy_as_only_condition(cfg, tmp_path):
    src = write_input(tmp_path / "cc.h5", cfg, superset=False)
    ingest.run(cfg, [src], tmp_path / "out", progress=False)
    with h5py.File(tmp_path / "out" / "dataset.h5") as f:
        assert json.loads(f.attrs["condition_names"]) == ["log_energy"]
        assert (f["train/mode"][:] == -1).all()


def test_two_inputs_are_concatenated(cfg, tmp_path):
    a = write_input(tmp_path / "a.h5", cfg, seed=1)
    b = write_input(tmp_path / "b.h5", cfg, seed=2, n=100)
    manifest = ingest.run(cfg, [a, b], tmp_path / "out", progress=False)
    assert manifest["rows"]["total_read"] == N + 100
    assert [i["rows"] for i in manifest["inputs"]] == [N, 100]


def test_inputs_must_agree_on_optional_datasets(cfg, tmp_path, caplog):
    ours = write_input(tmp_path / "ours.h5", cfg)
    cc = write_input(tmp_path / "cc.h5", cfg, superset=False)
    out = tmp_path / "out"
    code = ingest.main(
        ["--config", str(ROOT / "config.yaml"), "--input", str(ours), "--input", str(cc), "--out", str(out)]
    )
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert str(ours) in errors[0] and str(cc) in errors[0] and "optional datasets" in errors[0]
    assert not (out / "dataset.h5").exists() and not (out / "manifest.json").exists()


def test_preprocessing_is_fitted_on_the_train_split_only(cfg, tmp_path):
    src = write_input(tmp_path / "in.h5", cfg)
    ingest.run(cfg, [src], tmp_path / "out", progress=False)
    with h5py.File(tmp_path / "out" / "dataset.h5") as f, h5py.File(src) as g:
        stored = Preprocessor.from_dict(json.loads(f.attrs["preprocessing"]))
        train = np.sort(f["train/source_row"][:])
        showers, energies = g["showers"][:], g["incident_energies"][:]
    on_train = Preprocessor.fit(showers[train], energies[train], None, None, cfg["preprocess"])
    on_all = Preprocessor.fit(showers, energies, None, None, cfg["preprocess"])
    np.testing.assert_allclose(stored.mean, on_train.mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stored.std, on_train.std, rtol=1e-4)
    assert not np.allclose(stored.mean, on_all.mean, rtol=1e-5, atol=1e-5), "val/test rows leaked into the fit"
    assert stored.energy_range_mev == pytest.approx((energies[train].min(), energies[train].max()))


def test_manifest_records_inputs_splits_statistics_and_timings(cfg, tmp_path):
    src = write_input(tmp_path / "in.h5", cfg)
    ingest.run(cfg, [src], tmp_path / "out", progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["inputs"] == [{"path": str(src), "sha256": sha256_file(src), "rows": N}]
    assert manifest["rows"]["dropped"] == 0 and manifest["dropped"] == {}
    assert manifest["package_version"] and manifest["timings_s"]["total"] > 0
    stats = manifest["conditions"]
    with h5py.File(src) as g:
        e, pdg = g["incident_energies"][:], g["incident_pdg"][:]
        eta = g["incident_eta"][:]
    assert stats["energy_mev"]["min"] == pytest.approx(float(e.min()))
    assert stats["energy_mev"]["max"] == pytest.approx(float(e.max()))
    assert stats["energy_mev"]["quantiles"]["0.5"] == pytest.approx(float(np.median(e)), rel=1e-6)
    assert stats["eta"] == {"min": pytest.approx(float(eta.min())), "max": pytest.approx(float(eta.max()))}
    assert stats["particles"] == {"22": int((pdg == 22).sum()), "211": int((pdg == 211).sum())}
    assert sum(stats["modes"].values()) == N


def _nan_row(a):
    a = a.copy()
    a[17, 5] = np.nan
    return a


def _inf_row(a):
    a = a.copy()
    a[19, 2] = np.inf
    return a


def _neg_row(a):
    a = a.copy()
    a[23, 3] = -0.0005  # within the tolerance: not the voxel the message should show
    a[23, 7] = -5.0
    return a


def _zero_energy(a):
    a = a.copy()
    a[31] = 0.0
    return a


def _bad_pdg(a):
    a = a.copy()
    a[42] = 2112
    return a


# case -> (file writer, expected pieces of the one-line message)
BAD_CASES = {
    "not_hdf5": (lambda p, c: p.write_bytes(b"this is not HDF5 at all") and p, ["not a readable HDF5 file"]),
    "truncated": (None, ["not a readable HDF5 file"]),
    "missing_dataset": (lambda p, c: write_input(p, c, showers=lambda a: None), ["'showers' is missing"]),
    "wrong_rank": (lambda p, c: write_input(p, c, showers=lambda a: a[:, :, None]), ["rank 3"]),
    "row_mismatch": (lambda p, c: write_input(p, c, incident_energies=lambda a: a[:-3]), ["237 rows", "240"]),
    "voxel_count": (lambda p, c: write_input(p, c, showers=lambda a: a[:, :368]), ["368 voxels", "533"]),
    "nan": (lambda p, c: write_input(p, c, showers=_nan_row), ["dataset 'showers' row 17", "NaN"]),
    "inf": (lambda p, c: write_input(p, c, showers=_inf_row), ["dataset 'showers' row 19", "Inf"]),
    "negative": (
        lambda p, c: write_input(p, c, showers=_neg_row),
        ["dataset 'showers' row 23", "negative", "voxel 7: -5.0"],
    ),
    "energy_le_0": (
        lambda p, c: write_input(p, c, incident_energies=_zero_energy),
        ["dataset 'incident_energies' row 31", "<= 0"],
    ),
    "unknown_pdg": (
        lambda p, c: write_input(p, c, incident_pdg=_bad_pdg),
        ["dataset 'incident_pdg' row 42", "unknown particle", "2112"],
    ),
    "empty": (lambda p, c: write_input(p, c, n=0), ["0 rows", "empty"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_refused_with_one_clear_line(case, cfg, tmp_path, caplog):
    writer, expected = BAD_CASES[case]
    path = tmp_path / f"{case}.h5"
    if case == "truncated":
        write_input(path, cfg)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    else:
        writer(path, cfg)
    digest = sha256_file(path)
    out = tmp_path / "out"
    code = ingest.main(
        [
            "--config",
            str(ROOT / "config.yaml"),
            "--set",
            "ingest.chunk_events=64",
            "--input",
            str(path),
            "--out",
            str(out),
        ]
    )
    assert code != 0
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert str(path) in errors[0]
    for piece in expected:
        assert piece in errors[0], errors[0]
    assert not (out / "dataset.h5").exists() and not (out / "manifest.json").exists()
    assert not list(out.glob(".*tmp")) if out.exists() else True
    assert sha256_file(path) == digest


def test_drop_mode_counts_bad_rows(cfg, tmp_path):
    def several_bad(a):
        a = a.copy()
        a[[3, 50, 90], 0] = np.nan
        a[[4, 5], 1] = -1.0
        return a

    src = write_input(tmp_path / "in.h5", cfg, showers=several_bad)
    drop = {**cfg, "ingest": {**cfg["ingest"], "on_bad_rows": "drop"}}
    manifest = ingest.run(drop, [src], tmp_path / "out", progress=False)
    assert manifest["rows"]["dropped"] == 5
    assert manifest["dropped"] == {"NaN or Inf voxel energy": 3, f"negative voxel energy below -{0.001:g} MeV": 2}
    assert sum(manifest["rows"][s] for s in ingest.SPLITS) == N - 5
    with h5py.File(tmp_path / "out" / "dataset.h5") as f:
        kept = np.concatenate([f[f"{s}/source_row"][:] for s in ingest.SPLITS])
        assert not set(kept.tolist()) & {3, 4, 5, 50, 90}


def test_drop_mode_counts_condition_problems_per_reason(cfg, tmp_path):
    src = write_input(tmp_path / "in.h5", cfg, incident_energies=_zero_energy, incident_pdg=_bad_pdg)
    drop = {**cfg, "ingest": {**cfg["ingest"], "on_bad_rows": "drop"}}
    manifest = ingest.run(drop, [src], tmp_path / "out", progress=False)
    assert manifest["dropped"] == {"incident energy <= 0": 1, "unknown particle code (accepted: [11, 22, 211])": 1}
    assert sum(manifest["rows"][s] for s in ingest.SPLITS) == N - 2


def test_drop_mode_still_refuses_file_level_problems(cfg, tmp_path):
    src = write_input(tmp_path / "in.h5", cfg, showers=lambda a: a[:, :368])
    drop = {**cfg, "ingest": {**cfg["ingest"], "on_bad_rows": "drop"}}
    with pytest.raises(ingest.IngestError, match="368 voxels"):
        ingest.run(drop, [src], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "dataset.h5").exists()


def test_small_negative_voxels_are_zeroed(cfg, tmp_path):
    def tiny_negative(a):
        a = a.copy()
        a[:, 0] = -0.0005  # within the 0.001 MeV tolerance
        return a

    src = write_input(tmp_path / "in.h5", cfg, showers=tiny_negative)
    ingest.run(cfg, [src], tmp_path / "out", progress=False)
    with h5py.File(tmp_path / "out" / "dataset.h5") as f:
        assert (f["train/showers"][:] >= 0).all()


def test_cli_help_works(capsys):
    with pytest.raises(SystemExit) as exc:
        ingest.main(["--help"])
    assert exc.value.code == 0
    assert "--input" in capsys.readouterr().out
