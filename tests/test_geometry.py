"""Geometry: the inline default binning, the CaloChallenge XML files, voxel order."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from surrogate.config import load_config
from surrogate.geometry import Geometry, Layer, from_config, load_xml
from surrogate.simulate import build_params, simulate_events

REPO = Path(__file__).resolve().parents[1]
CALO_DIR = Path(__file__).resolve().parents[2] / "shared" / "calochallenge"
needs_xml = pytest.mark.skipif(
    not CALO_DIR.is_dir(), reason=f"CaloChallenge binning files not found at {CALO_DIR} (shared checkout absent)"
)
XML_VOXELS = {
    "binning_dataset_1_photons.xml": 368,
    "binning_dataset_1_pions.xml": 533,
    "binning_dataset_2.xml": 6480,
    "binning_dataset_3.xml": 40500,
}


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "config.yaml")


def test_default_geometry_is_dataset1_pions(cfg):
    geom = from_config(cfg)
    assert geom.n_voxels == 533
    assert [layer.id for layer in geom.active_layers] == [0, 1, 2, 3, 12, 13, 14]


@needs_xml
def test_inline_geometry_equals_xml(cfg):
    inline = from_config(cfg)
    xml = load_xml(CALO_DIR / "binning_dataset_1_pions.xml")
    assert inline.layers == xml.layers


@needs_xml
@pytest.mark.parametrize("name,n_voxels", sorted(XML_VOXELS.items()))
def test_xml_parses_and_simulates(cfg, name, n_voxels, caplog):
    path = CALO_DIR / name
    assert load_xml(path).n_voxels == n_voxels
    c = dict(cfg, geometry={"binning_file": str(path), "pid": None})
    with caplog.at_level(logging.WARNING, logger="surrogate.simulate"):
        params = build_params(c)
    fallback = name != "binning_dataset_1_pions.xml"
    assert params.material.fallback is fallback
    assert any("fallback" in r.getMessage() for r in caplog.records) is fallback
    for pdg in (22, 211):
        out = simulate_events(3, params, seed=1, particle=pdg, energy_mev=20_000.0)
        showers = out["showers"]
        assert showers.shape == (3, n_voxels) and showers.dtype == np.float32
        assert np.isfinite(showers).all() and (showers >= 0).all()
        assert showers.sum() > 0


def test_voxel_order_hand_check(cfg):
    """Radial bin fastest, then angle, then layer: checked against layer 0 and layer 1 by hand."""
    geom = from_config(cfg)
    layer_idx, r, alpha = geom.voxel_centres()
    # layer 0: 8 radial bins, 1 angular bin (centre 0)
    np.testing.assert_allclose(r[:8], [2.5, 7.5, 20, 40, 75, 150, 300, 500])
    assert (alpha[:8] == 0).all() and (layer_idx[:8] == 0).all()
    # layer 1 starts at column 8: 10 radial bins per angular bin, 10 angular bins
    np.testing.assert_allclose(r[8:11], [0.5, 2.5, 5.5])
    step = 2 * np.pi / 10
    assert alpha[8] == pytest.approx(-np.pi + step / 2)
    assert alpha[8 + 9] == alpha[8]  # last radial bin of the first angular bin
    assert alpha[8 + 10] == pytest.approx(-np.pi + 1.5 * step)  # next angular bin
    assert r[8 + 10] == r[8]
    assert layer_idx[8] == 1 and layer_idx[8 + 99] == 1 and layer_idx[8 + 100] == 2
    sl = geom.layer_slices
    assert sl[0] == slice(0, 8) and sl[1] == slice(8, 108) and sl[14].stop == 533


def test_orientations_turn_every_layer_by_the_same_angle():
    geo = Geometry("t", (Layer(0, (0.0, 1.0, 2.0), 4), Layer(1, (0.0, 5.0), 1), Layer(2, (0.0, 3.0), 8)))
    rot = geo.orientations()
    assert rot.shape == (4, geo.n_voxels)  # gcd(4, 8) = 4 rotations by 90 degrees
    assert (rot[0] == np.arange(geo.n_voxels)).all()
    shower = np.arange(geo.n_voxels, dtype=float)
    turned = shower[rot[1]]
    # layer 0 (4 angular bins x 2 radial): angular bin a now holds what bin a - 1 held
    np.testing.assert_array_equal(turned[:8].reshape(4, 2), np.roll(shower[:8].reshape(4, 2), 1, axis=0))
    assert turned[8] == shower[8]  # one angular bin: unchanged
    np.testing.assert_array_equal(turned[9:], np.roll(shower[9:], 2))  # 8 bins move by 2 = 90 degrees
    both = geo.orientations(reflect=True)
    assert both.shape == (8, geo.n_voxels) and len({tuple(r) for r in both}) == 8
    assert all(sorted(r) == list(range(geo.n_voxels)) for r in both)
    np.testing.assert_array_equal(shower[both[4]][:8].reshape(4, 2), shower[:8].reshape(4, 2)[::-1])
    flat = Geometry("f", (Layer(0, (0.0, 1.0), 1),))
    assert flat.orientations(reflect=True).shape == (1, 1)
