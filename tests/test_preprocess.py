"""Preprocessing: exact round trip, empty voxels stay empty, storage round trip, condition encoding."""

import numpy as np
import pytest

from surrogate.preprocess import PreprocessError, Preprocessor


@pytest.fixture(scope="module")
def sample():
    rng = np.random.default_rng(3)
    n, v = 400, 60
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e6), (n, 1))).astype(np.float32)
    showers = (rng.gamma(0.5, 1.0, (n, v)) * (rng.random((n, v)) < 0.4) * energies / 100).astype(np.float32)
    eta = rng.uniform(0, 1.5, (n, 1)).astype(np.float32)
    pdg = rng.choice(np.array([22, 211]), (n, 1))
    return showers, energies, eta, pdg


@pytest.mark.parametrize("transform", ["log", "logit"])
def test_round_trip(sample, transform):
    showers, energies, eta, pdg = sample
    pre = Preprocessor.fit(showers, energies, eta, pdg, {"voxel_transform": transform})
    back = pre.inverse_showers(pre.transform_showers(showers, energies), energies)
    above = showers > 1e-6 * energies  # above the floor (epsilon = alpha = 1e-6 of E_inc)
    assert above.sum() > 0.3 * showers.size
    np.testing.assert_allclose(back[above], showers[above], rtol=1e-5)  # float32: measured 1e-6
    assert (back[showers == 0] == 0).all(), "empty voxels must come back exactly empty"
    assert (back >= 0).all()


def test_transform_is_standardised_on_the_fit_sample(sample):
    showers, energies, eta, pdg = sample
    pre = Preprocessor.fit(showers, energies, eta, pdg, {})
    x = pre.transform_showers(showers, energies)
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-3)
    assert np.all(x.std(axis=0) <= 1 + 1e-3)


def test_streaming_fit_equals_one_shot(sample):
    showers, energies, eta, pdg = sample
    one = Preprocessor.fit(showers, energies, eta, pdg, {})
    pre = Preprocessor.from_settings({})
    for i in range(0, len(showers), 70):
        pre.partial_fit(showers[i : i + 70], energies[i : i + 70], eta[i : i + 70], pdg[i : i + 70])
    pre.finalize()
    np.testing.assert_allclose(pre.mean, one.mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pre.std, one.std, rtol=1e-4)


def test_dict_round_trip_gives_identical_transforms(sample):
    showers, energies, eta, pdg = sample
    pre = Preprocessor.fit(showers, energies, eta, pdg, {"voxel_transform": "logit"}, particles=[211, 22])
    again = Preprocessor.from_dict(pre.to_dict())
    np.testing.assert_array_equal(again.transform_showers(showers, energies), pre.transform_showers(showers, energies))
    np.testing.assert_array_equal(
        again.transform_conditions(energies, eta, pdg), pre.transform_conditions(energies, eta, pdg)
    )


def test_condition_encoding(sample):
    showers, energies, eta, pdg = sample
    pre = Preprocessor.fit(showers, energies, eta, pdg, {}, particles=[22, 11, 211])
    assert pre.condition_names == ["log_energy", "eta", "pdg_22", "pdg_211"]  # 11 never seen: no column
    c = pre.transform_conditions(energies, eta, pdg)
    assert c.shape == (len(energies), 4)
    assert c[:, :2].min() == pytest.approx(-1, abs=1e-6) and c[:, :2].max() == pytest.approx(1, abs=1e-6)
    np.testing.assert_array_equal(c[:, 2] + c[:, 3], 1)
    np.testing.assert_array_equal(c[:, 3] == 1, pdg[:, 0] == 211)
    with pytest.raises(PreprocessError, match="unknown particle code"):
        pre.transform_conditions(energies[:2], eta[:2], np.array([[22], [2112]]))


def test_energy_only_conditions(sample):
    showers, energies, _, _ = sample
    pre = Preprocessor.fit(showers, energies, None, None, {})
    assert pre.condition_names == ["log_energy"]
    assert pre.transform_conditions(energies).shape == (len(energies), 1)


def test_inverse_of_wild_generator_output_is_finite_and_non_negative(sample):
    showers, energies, eta, pdg = sample
    pre = Preprocessor.fit(showers, energies, eta, pdg, {})
    x = np.zeros(showers.shape, np.float32)
    x[0, :3] = [np.nan, 1e30, -1e30]  # a diverged generator must not warn (warnings are errors) or poison sums
    back = pre.inverse_showers(x, energies)
    assert np.isfinite(back).all() and (back >= 0).all()
    assert back[0, 0] == 0 and back[0, 2] == 0


def test_streaming_fit_matches_float64_reference(sample):
    showers, energies, eta, pdg = sample
    pre = Preprocessor.from_settings({})
    for i in range(0, len(showers), 300):  # blocks of 256 rows plus remainders
        pre.partial_fit(
            showers[i : i + 300].copy(), energies[i : i + 300], eta[i : i + 300], pdg[i : i + 300], overwrite=True
        )
    pre.finalize()
    y = np.log(showers.astype(np.float64) / energies + np.float64(np.float32(1e-6)))
    np.testing.assert_allclose(pre.mean, y.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pre.std, np.maximum(y.std(axis=0), 1e-3), rtol=1e-3)
