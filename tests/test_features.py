"""High-level features: known answers on hand-built showers, a naive per-event cross-check, HDF5 streaming."""

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from surrogate.features import (
    FeaturesError,
    compute_features,
    feature_matrix,
    feature_names,
    features_from_hdf5,
    iter_features_hdf5,
)
from surrogate.geometry import Geometry, Layer, from_config

ROOT = Path(__file__).resolve().parents[1]

# layer 0: 2 radial x 4 angular bins (alpha centres -3pi/4, -pi/4, pi/4, 3pi/4); layer 1 not read out;
# layer 2: one voxel with centre r = 2.5 mm at alpha = 0
SMALL = Geometry("small", (Layer(0, (0.0, 10.0, 20.0), 4), Layer(1, (0.0,), 1), Layer(2, (0.0, 5.0), 1)))


@pytest.fixture(scope="module")
def default_geometry() -> Geometry:
    return from_config(yaml.safe_load((ROOT / "config.yaml").read_text()), ROOT)


def _random_showers(geometry: Geometry, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    showers = rng.exponential(50.0, size=(n, geometry.n_voxels)) * (rng.random((n, geometry.n_voxels)) < 0.3)
    energies = rng.uniform(1e3, 1e5, size=(n, 1))
    return showers.astype(np.float32), energies.astype(np.float32)


def test_names_and_dtypes():
    showers, energies = _random_showers(SMALL, 5, seed=0)
    feats = compute_features(showers, energies, SMALL)
    assert list(feats) == feature_names(SMALL)
    assert feature_names(SMALL)[:4] == ["E_dep", "E_ratio", "E_layer_0", "E_layer_2"]
    assert "E_layer_1" not in feats  # empty layers have no features
    assert all(v.dtype == np.float64 and v.shape == (5,) for v in feats.values())


def test_single_hot_voxel_has_centre_at_voxel_and_zero_width():
    x, y = SMALL.voxel_xy()
    showers = np.eye(SMALL.n_voxels, dtype=np.float32) * 7.0  # event i: 7 MeV in voxel i only
    feats = compute_features(showers, np.full((SMALL.n_voxels, 1), 70.0), SMALL)
    in_layer0 = np.arange(SMALL.n_voxels) < 8
    np.testing.assert_allclose(feats["E_dep"], 7.0)
    np.testing.assert_allclose(feats["E_ratio"], 0.1)
    np.testing.assert_allclose(feats["centre_x_0"], np.where(in_layer0, x, 0.0), atol=1e-12)
    np.testing.assert_allclose(feats["centre_y_0"], np.where(in_layer0, y, 0.0), atol=1e-12)
    np.testing.assert_allclose(feats["centre_x_2"], np.where(in_layer0, 0.0, 2.5))
    for key in ("width_x_0", "width_y_0", "width_x_2", "width_y_2"):
        assert np.all(feats[key] == 0.0), key  # exactly 0: computed about the centre, no cancellation
    np.testing.assert_allclose(feats["sparsity_0"], np.where(in_layer0, 1 / 8, 0.0))
    np.testing.assert_allclose(feats["sparsity_2"], np.where(in_layer0, 0.0, 1.0))
    np.testing.assert_allclose(feats["frac_layer_0"], in_layer0.astype(float))


def test_two_equal_opposite_voxels_centre_zero_width_half_distance():
    # voxel index = alpha_bin * n_r + r_bin: (r 5 mm, alpha pi/4) and (r 5 mm, alpha -3pi/4) are opposite
    shower = np.zeros((1, SMALL.n_voxels))
    shower[0, 2 * 2 + 0] = shower[0, 0 * 2 + 0] = 3.0
    feats = compute_features(shower, [[10.0]], SMALL)
    half = 5.0 * math.cos(math.pi / 4)
    assert feats["centre_x_0"][0] == pytest.approx(0.0, abs=1e-12)
    assert feats["centre_y_0"][0] == pytest.approx(0.0, abs=1e-12)
    assert feats["width_x_0"][0] == pytest.approx(half)
    assert feats["width_y_0"][0] == pytest.approx(half)
    assert feats["sparsity_0"][0] == pytest.approx(2 / 8)


def test_empty_shower_and_empty_layer_give_zeros_not_nan():
    showers = np.zeros((2, SMALL.n_voxels), dtype=np.float32)
    showers[1, 8] = 1.0  # only layer 2 hit
    feats = compute_features(showers, np.ones((2, 1)), SMALL)
    for key, v in feats.items():
        assert np.all(np.isfinite(v)), key
    for key in ("E_dep", "frac_layer_0", "centre_x_0", "width_y_0", "sparsity_0"):
        assert feats[key][0] == 0.0
    assert feats["frac_layer_2"].tolist() == [0.0, 1.0]
    assert feats["centre_x_0"][1] == 0.0 and feats["width_x_0"][1] == 0.0


def test_sparsity_threshold():
    shower = np.zeros((1, SMALL.n_voxels))
    shower[0, :3] = [0.5, 2.0, 3.0]
    assert compute_features(shower, [[1.0]], SMALL)["sparsity_0"][0] == pytest.approx(3 / 8)
    assert compute_features(shower, [[1.0]], SMALL, threshold=1.0)["sparsity_0"][0] == pytest.approx(2 / 8)


def test_matches_naive_per_event_loop(default_geometry):
    """The matrix formulation agrees with a plain loop over events and layers (float64 reference)."""
    showers, energies = _random_showers(default_geometry, 20, seed=1)
    showers[3] = 0.0
    feats = compute_features(showers, energies, default_geometry)
    x, y = default_geometry.voxel_xy()
    for i in range(len(showers)):
        s = showers[i].astype(np.float64)
        assert feats["E_ratio"][i] == pytest.approx(s.sum() / float(energies[i, 0]), rel=1e-12)
        for layer_id, sl in default_geometry.layer_slices.items():
            e = s[sl]
            if e.sum() > 0:
                cx = np.average(x[sl], weights=e)
                wy = math.sqrt(np.average((y[sl] - np.average(y[sl], weights=e)) ** 2, weights=e))
            else:
                cx = wy = 0.0
            assert feats[f"centre_x_{layer_id}"][i] == pytest.approx(cx, rel=1e-10, abs=1e-9)
            assert feats[f"width_y_{layer_id}"][i] == pytest.approx(wy, rel=1e-10, abs=1e-9)
            assert feats[f"sparsity_{layer_id}"][i] == pytest.approx(np.count_nonzero(e) / e.size)
    fracs = np.column_stack([feats[f"frac_layer_{lid}"] for lid in default_geometry.layer_slices])
    np.testing.assert_allclose(fracs.sum(axis=1), np.where(np.arange(20) == 3, 0.0, 1.0), rtol=1e-12)


def test_chunking_does_not_change_results(default_geometry):
    showers, energies = _random_showers(default_geometry, 30, seed=2)
    whole = compute_features(showers, energies, default_geometry)
    parts = [compute_features(showers[a:b], energies[a:b], default_geometry) for a, b in [(0, 7), (7, 30)]]
    for key in whole:
        # equal to the last bits or so: BLAS sums a matmul's rows in an order that can depend on the
        # number of rows (measured: at most 1 ulp, 1.2e-16 relative)
        np.testing.assert_allclose(whole[key], np.concatenate([p[key] for p in parts]), rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    ("showers", "energies", "match"),
    [
        (np.zeros((2, 8)), np.ones((2, 1)), r"expected \(N, 9\)"),
        (np.zeros((2, 9)), np.ones((3, 1)), "expected"),
        (np.full((2, 9), -1.0), np.ones((2, 1)), "row 0, voxel 0"),
        (np.where(np.arange(9) == 4, np.nan, 0.0)[None].repeat(2, 0), np.ones((2, 1)), "voxel 4"),
        (np.where(np.arange(9) == 6, np.inf, 0.0)[None].repeat(2, 0), np.ones((2, 1)), "row 0, voxel 6 has energy inf"),
        (np.zeros((2, 9)), np.array([[1.0], [0.0]]), "row 1"),
    ],
)
def test_bad_input_is_named(showers, energies, match):
    with pytest.raises(FeaturesError, match=match):
        compute_features(showers, energies, SMALL)


def test_feature_matrix_orders_columns():
    showers, energies = _random_showers(SMALL, 4, seed=3)
    feats = compute_features(showers, energies, SMALL)
    mat, names = feature_matrix(feats, ["E_ratio", "E_dep"])
    assert names == ["E_ratio", "E_dep"] and mat.shape == (4, 2)
    np.testing.assert_array_equal(mat[:, 1], feats["E_dep"])
    full, all_names = feature_matrix(feats)
    assert all_names == feature_names(SMALL) and full.shape == (4, len(all_names))
    with pytest.raises(FeaturesError, match="unknown feature names"):
        feature_matrix(feats, ["nope"])


def _write_h5(path: Path, showers: np.ndarray, energies: np.ndarray, group: str = "train") -> None:
    with h5py.File(path, "w") as f:
        f.attrs["geometry"] = json.dumps(SMALL.to_dict())
        g = f.create_group(group)
        g.create_dataset("showers", data=showers, chunks=(7, showers.shape[1]), compression="lzf")
        g.create_dataset("incident_energies", data=energies, chunks=(7, 1))


def test_hdf5_streaming_matches_in_memory(tmp_path):
    showers, energies = _random_showers(SMALL, 50, seed=4)
    path = tmp_path / "d.h5"
    _write_h5(path, showers, energies)
    out = features_from_hdf5(path, group="train", batch_rows=12, start=3, stop=45)
    ref = compute_features(showers[3:45], energies[3:45], SMALL)
    assert list(out) == list(ref)
    for key in ref:
        # to the last bits only: BLAS may sum a row in another order depending on how many rows the
        # product has (1 ulp seen with OpenBLAS on AMD EPYC); a misplaced row would differ by far more
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-13, atol=0)
    bounds = [(lo, hi) for lo, hi, _ in iter_features_hdf5(path, group="train", batch_rows=12, start=3, stop=45)]
    # 12 rows rounds to two 7-row chunks; every boundary after the first lies on the chunk grid
    assert bounds == [(3, 14), (14, 28), (28, 42), (42, 45)]
    empty = features_from_hdf5(path, group="train", start=50)
    assert all(v.shape == (0,) for v in empty.values()) and list(empty) == feature_names(SMALL)


def test_hdf5_errors_name_file_and_rows(tmp_path):
    showers, energies = _random_showers(SMALL, 20, seed=5)
    showers[16, 2] = -3.0
    path = tmp_path / "bad.h5"
    _write_h5(path, showers, energies)
    with pytest.raises(FeaturesError, match=r"bad\.h5: 'train/showers' rows 14\.\.19: shower row 2, voxel 2"):
        features_from_hdf5(path, group="train", batch_rows=7)
    with pytest.raises(FeaturesError, match="no dataset 'val/showers'"):
        features_from_hdf5(path, group="val")
    with pytest.raises(FeaturesError, match="cannot open"):
        features_from_hdf5(tmp_path / "missing.h5")
