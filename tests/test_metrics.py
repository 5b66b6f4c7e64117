"""Validation metrics: a known answer for every metric, seeded, on tiny samples."""

import logging

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from sklearn.metrics.pairwise import polynomial_kernel
from threadpoolctl import threadpool_limits

from surrogate import metrics as M


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the test machine's cores are shared: OpenMP/BLAS thread pools only add contention here
    with threadpool_limits(1):
        yield


def _normal(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) if d else np.random.default_rng(seed).normal(size=n)


# ----------------------------------------------------------------------------- registry


def test_registry_holds_every_metric_with_its_input_kind():
    expected = {
        "separation_power": "1d",
        "ks": "1d",
        "wasserstein_scaled": "1d",
        "response": "1d",
        "fpd": "nd",
        "kpd": "nd",
        "classifier_auc": "nd",
        "mode_fraction_test": "labels",
        "cluster_occupancy": "nd",
        "prdc": "nd",
        "diversity_ratio": "nd",
    }
    assert {name: fn.metric_input for name, fn in M.METRICS.items()} == expected
    with pytest.raises(ValueError, match="registered twice"):
        M.register("ks")(lambda real, gen, seed=0: (0.0, 0.0))


def test_flatten():
    assert M.flatten("a", (1.0, 0.5)) == {"a": (1.0, 0.5)}
    assert M.flatten("b", ({"x": 1, "y": 2}, {"x": 0.1, "y": 0.2})) == {"b.x": (1.0, 0.1), "b.y": (2.0, 0.2)}


def test_bad_input_is_named():
    with pytest.raises(M.MetricError, match="row 3"):
        M.ks(np.array([0.0, 1, 2, np.nan]), np.zeros(4))
    with pytest.raises(M.MetricError, match="features"):
        M.diversity_ratio(np.zeros((5, 2)), np.zeros((5, 3)))


def test_small_sample_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="surrogate.metrics"):
        M.wasserstein_scaled(_normal(50, 0, 1), _normal(50, 0, 2), n_boot=5)
    assert "only 50 real and 50 generated events" in caplog.text


def test_seeded_and_independent_of_global_rng():
    a, b = _normal(300, 0, 1), _normal(300, 0, 2)
    np.random.seed(1)
    first = M.separation_power(a, b, n_boot=20, seed=7)
    np.random.seed(2)
    assert M.separation_power(a, b, n_boot=20, seed=7) == first
    assert M.separation_power(a, b, n_boot=20, seed=8)[1] != first[1]


# ----------------------------------------------------------------------------- 1-D metrics


def test_separation_power_known_answers():
    a = _normal(2000, 0, 1)
    assert M.separation_power(a, a, n_boot=20)[0] == 0.0
    same, same_err = M.separation_power(a, _normal(2000, 0, 2), n_boot=20)
    assert same < 0.03
    shifted, err = M.separation_power(a, a + 1.0, n_boot=20)
    assert shifted > 0.15 and shifted > 10 * err
    # generated entirely above the real range: only the overflow bin is filled -> disjoint
    assert M.separation_power(a, a + 100.0, n_boot=5)[0] == pytest.approx(1.0)
    # explicit edges, hand computation: h1 = [0, .5, .5, 0], h2 = [0, 1, 0, 0] -> 1/2 (1/4/1.5 + 1/4/.5) = 1/3
    assert M.separation_power([0.5, 1.5], [0.5, 0.5], bins=[0, 1, 2], n_boot=5)[0] == pytest.approx(1 / 3)
    # a constant real sample still has a bin for its value
    assert M.separation_power(np.zeros(10), np.zeros(10), n_boot=5)[0] == 0.0
    assert M.separation_power(np.zeros(10), np.ones(10), n_boot=5)[0] == pytest.approx(1.0)


def test_fast_bootstrap_errors_equal_the_resampling_loop():
    # the separation-power and W1 errors re-weight one sort/binning instead of resampling values;
    # with the same seed they must equal the plain loop over resampled arrays
    a, b = _normal(700, 0, 11), _normal(500, 0, 12) + 0.3
    edges = M._quantile_edges(a, 12)

    def plain(r: np.ndarray, g: np.ndarray) -> np.ndarray:  # the CaloChallenge formula on resampled values
        h1 = np.bincount(M._bin_index(r, edges), minlength=len(edges) + 1) / len(r)
        h2 = np.bincount(M._bin_index(g, edges), minlength=len(edges) + 1) / len(g)
        nz = h1 + h2 > 0
        return np.array(0.5 * np.sum((h1[nz] - h2[nz]) ** 2 / (h1[nz] + h2[nz])))

    loop = M._bootstrap(plain, a, b, 15, seed=3)[0]
    assert M.separation_power(a, b, bins=12, n_boot=15, seed=3)[1] == pytest.approx(loop, rel=1e-12)
    loop = M._bootstrap(lambda r, g: np.array(stats.wasserstein_distance(r, g)), a, b, 15, seed=4)[0]
    assert M.wasserstein_scaled(a, b, n_boot=15, seed=4)[1] * a.std() == pytest.approx(loop, rel=1e-9)
    # the weighted form is scipy's weighted W1, ties included
    rng = np.random.default_rng(5)
    x, y = np.round(a, 1), np.round(b, 1)
    wx, wy = rng.integers(0, 4, len(x)), rng.integers(0, 4, len(y))
    ref = stats.wasserstein_distance(x, y, u_weights=wx, v_weights=wy)
    assert M._WeightedW1(x, y)(wx, wy) == pytest.approx(ref, rel=1e-12)


def test_matrix_input_equals_each_column_alone():
    # (N, F) input runs every column at once; the bootstrap resamples events, shared by the
    # columns, so each column equals the 1-D call with the same seed
    rng = np.random.default_rng(40)
    a = np.column_stack([rng.normal(size=900), rng.exponential(size=900), np.round(rng.normal(size=900), 1)])
    b = np.column_stack([rng.normal(size=700) + 0.2, rng.exponential(size=700), np.round(rng.normal(size=700), 1)])
    edges = [M._quantile_edges(a[:, j], 9) for j in range(3)]
    sep, sep_err = M.separation_power(a, b, bins=edges, n_boot=7, seed=2)
    w1, w1_err = M.wasserstein_scaled(a, b, n_boot=7, seed=3)
    for j in range(3):
        assert (sep[j], sep_err[j]) == pytest.approx(
            M.separation_power(a[:, j], b[:, j], bins=edges[j], n_boot=7, seed=2), rel=1e-12
        )
        assert (w1[j], w1_err[j]) == pytest.approx(M.wasserstein_scaled(a[:, j], b[:, j], n_boot=7, seed=3), rel=1e-12)
        assert w1[j] * a[:, j].std() == pytest.approx(stats.wasserstein_distance(a[:, j], b[:, j]), rel=1e-12)
    # the vectorised asymptotic KS is scipy's, ties (the rounded column) included
    value, err = M.ks(a, b, n_boot=0, method="asymp")
    for j in range(3):
        ref = stats.ks_2samp(a[:, j], b[:, j], method="asymp")
        assert value["statistic"][j] == ref.statistic
        assert value["pvalue"][j] == pytest.approx(ref.pvalue, rel=1e-12, abs=1e-300)
    assert err["statistic"].tolist() == [0.0, 0.0, 0.0]
    # the default binning of a matrix is each column's own real quantiles
    assert M.separation_power(a, b, bins=9, n_boot=0)[0] == pytest.approx(sep, rel=1e-12)
    with pytest.raises(M.MetricError, match="row 5, feature 1"):
        bad = a.copy()
        bad[5, 1] = np.inf
        M.ks(bad, b)


def test_ks_equals_scipy_and_separates():
    a, b = _normal(800, 0, 3), _normal(600, 0, 4)
    value, err = M.ks(a, b, n_boot=20)
    ref = stats.ks_2samp(a, b)
    assert value == {"statistic": ref.statistic, "pvalue": ref.pvalue}
    assert value["pvalue"] > 0.05 and err["statistic"] > 0
    shifted, _ = M.ks(a, b + 1.0, n_boot=20)
    assert shifted["pvalue"] < 1e-10 and shifted["statistic"] > 0.3


def test_wasserstein_scaled_known_answers():
    a = _normal(2000, 0, 5)
    assert M.wasserstein_scaled(a, a, n_boot=10)[0] == 0.0
    value, err = M.wasserstein_scaled(a, a + 0.5 * a.std(), n_boot=20)
    assert value == pytest.approx(0.5) and err > 0
    # dimensionless: rescaling both samples changes nothing
    assert M.wasserstein_scaled(10 * a, 10 * (a + 0.5 * a.std()), n_boot=2)[0] == pytest.approx(0.5)


def test_response_known_answers():
    real = 0.8 + 0.08 * _normal(3000, 0, 6)  # mean 0.8, resolution 0.1
    value, err = M.response(real, real, n_boot=20)
    assert value["real_mean"] == pytest.approx(0.8, abs=3 * err["real_mean"] + 1e-3)
    assert value["real_resolution"] == pytest.approx(0.1, abs=3 * err["real_resolution"] + 1e-3)
    assert value["mean_shift"] == 0.0 and value["resolution_ratio"] == 1.0
    gen = 0.88 + 0.176 * _normal(3000, 0, 7)  # mean +10 %, resolution 0.2 (twice)
    value, err = M.response(real, gen, n_boot=20)
    assert value["mean_shift"] == pytest.approx(0.1, abs=3 * err["mean_shift"] + 1e-3)
    assert value["resolution_ratio"] == pytest.approx(2.0, abs=3 * err["resolution_ratio"] + 1e-2)
    with pytest.raises(M.MetricError, match="must be > 0"):
        M.response(-real, gen)


# ----------------------------------------------------------------------------- distribution distances


def test_frechet_distance_analytic():
    eye = np.eye(2)
    assert M.frechet_distance(np.zeros(2), eye, np.array([1.0, 0.0]), eye) == pytest.approx(1.0)
    assert M.frechet_distance(np.zeros(2), eye, np.array([1.0, 1.0]), eye) == pytest.approx(2.0)
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2
    assert M.frechet_distance(np.zeros(1), np.array([[4.0]]), np.ones(1), np.array([[1.0]])) == pytest.approx(2.0)


FPD_FAST = {"min_samples": 400, "max_samples": 2000, "num_points": 5, "num_batches": 5, "normalise": False}


def test_fpd_known_answers():
    real, gen = _normal(2000, 2, 8), _normal(2000, 2, 9)
    value, err = M.fpd(real, gen, **FPD_FAST)
    assert abs(value) < 3 * err + 0.01
    one, err1 = M.fpd(real, gen + [1.0, 0.0], **FPD_FAST)
    assert one == pytest.approx(1.0, abs=3 * err1 + 0.05)
    two, err2 = M.fpd(real, gen + [1.0, 1.0], **FPD_FAST)
    assert two == pytest.approx(2.0, abs=3 * err2 + 0.1)  # JetNet's known answer
    # real-sample standardisation: real std is ~1, so the answer barely moves
    assert M.fpd(real, gen + [1.0, 1.0], **{**FPD_FAST, "normalise": True})[0] == pytest.approx(2.0, abs=0.15)


def test_kpd_known_answers():
    real, gen = _normal(1000, 3, 10), _normal(1000, 3, 11)
    value, err = M.kpd(real, gen, batch_size=500, num_batches=5)
    assert abs(value) < 3 * err + 0.02
    shifted, err_s = M.kpd(real, gen + 1.0, batch_size=500, num_batches=5)
    assert shifted > 1.0 and shifted > 5 * err_s
    # no bias from drawing a point twice into a batch (batches of half the sample; with
    # replacement this gave +0.12 here), and the error matches the spread over seeds
    values, errors = zip(
        *(
            M.kpd(_normal(1000, 3, 30 + s), _normal(1000, 3, 60 + s), batch_size=500, num_batches=10, seed=s)
            for s in range(12)
        ),
        strict=True,
    )
    assert abs(np.mean(values)) < 3 * np.std(values) / np.sqrt(12)
    assert 0.5 < np.mean(errors) / np.std(values) < 2.0
    # the unbiased estimator on two copies of the same batch equals the hand formula
    x = _normal(20, 3, 12)
    k = (x @ x.T / 3 + 1) ** 4
    hand = 2 * (k.sum() - np.trace(k)) / (20 * 19) - 2 * k.mean()
    assert M._mmd2_poly_unbiased(x, x, block=7) == pytest.approx(hand)
    # the written-out kernel is scikit-learn's polynomial kernel
    y = _normal(15, 3, 13)
    kxy = polynomial_kernel(x, y, degree=4, gamma=1 / 3, coef0=1)
    kyy = polynomial_kernel(y, y, degree=4, gamma=1 / 3, coef0=1)
    ref = 2 * (k.sum() - np.trace(k)) / (20 * 19) / 2 + (kyy.sum() - np.trace(kyy)) / (15 * 14) - 2 * kxy.mean()
    assert M._mmd2_poly_unbiased(x, y, block=4) == pytest.approx(ref, rel=1e-12)


def test_classifier_auc_known_answers():
    real, gen = _normal(600, 2, 13), _normal(600, 2, 14)
    value, err = M.classifier_auc(real, gen, max_iter=20, n_boot=30)
    assert abs(value - 0.5) < 4 * err + 0.03 and err > 0
    shifted, _ = M.classifier_auc(real, gen + 1.5, max_iter=20, n_boot=5)
    assert shifted > 0.75
    # the bootstrap's weighted AUC is sklearn's AUC of the resampled events, tied scores included
    rng = np.random.default_rng(41)
    y, score = rng.integers(0, 2, 400), np.round(rng.normal(size=400), 1)
    auc_of = M._WeightedAUC(y, score)
    assert auc_of(np.ones(400)) == pytest.approx(roc_auc_score(y, score), rel=1e-12)
    idx = rng.integers(0, 400, 400)
    assert auc_of(np.bincount(idx, minlength=400)) == pytest.approx(roc_auc_score(y[idx], score[idx]), rel=1e-12)


# ----------------------------------------------------------------------------- mode coverage


def test_mode_fraction_test_known_answers():
    rng = np.random.default_rng(15)
    labels = rng.integers(0, 4, 2000)
    value, _ = M.mode_fraction_test(labels, labels.copy(), 4)
    assert value["statistic"] == pytest.approx(0.0, abs=1e-9) and value["pvalue"] == pytest.approx(1.0)
    assert value["dof"] == 3
    missing_mode = np.where(labels == 3, 0, labels)  # generator never makes mode 3
    value, err = M.mode_fraction_test(labels, missing_mode, 4)
    assert value["pvalue"] < 1e-10 and value["max_fraction_diff"] > 10 * err["max_fraction_diff"]
    # G = 2 sum O ln(O/E) against scipy's power_divergence on the same table
    table = np.array([np.bincount(labels, minlength=4), np.bincount(missing_mode, minlength=4)])
    expected = stats.contingency.expected_freq(table)
    g_ref = stats.power_divergence(table.ravel(), expected.ravel(), lambda_="log-likelihood").statistic
    assert value["statistic"] == pytest.approx(g_ref)
    with pytest.raises(M.MetricError, match="label 4 at row"):
        M.mode_fraction_test(labels, np.full(5, 4), 4)


def test_cluster_occupancy_known_answers():
    real, gen = _normal(1500, 2, 16), _normal(1500, 2, 17)
    value, _ = M.cluster_occupancy(real, gen, 5)
    assert value["pvalue"] > 0.01 and value["dof"] == 4
    half = gen.copy()
    half[:, 0] = np.abs(half[:, 0])  # generator covers only x > 0: the x < 0 clusters are empty
    value, _ = M.cluster_occupancy(real, half, 5)
    assert value["pvalue"] < 1e-10


def test_prdc_known_answers():
    real = _normal(600, 2, 18)
    copy, _ = M.prdc(real, real.copy(), n_repeats=2)
    assert (copy["precision"], copy["recall"], copy["coverage"]) == (1.0, 1.0, 1.0)
    # each real ball holds k points of an exact copy, +1 where rounding puts the k-th neighbour inside
    assert 1.0 <= copy["density"] <= 1.2
    same, err = M.prdc(real, _normal(600, 2, 19), n_repeats=3)
    for key in ("precision", "recall", "coverage"):
        assert same[key] > 0.85, key
    assert same["density"] == pytest.approx(1.0, abs=0.15) and all(e > 0 for e in err.values())
    collapsed = np.repeat(real.mean(axis=0, keepdims=True), 600, axis=0)
    low, _ = M.prdc(real, collapsed, n_repeats=2)
    assert low["precision"] == 1.0  # the one point is realistic ...
    assert low["recall"] == 0.0 and low["coverage"] < 0.05  # ... but covers nothing


def test_diversity_ratio_known_answers():
    real = _normal(1000, 3, 20)
    value, err = M.diversity_ratio(real, _normal(1000, 3, 21), n_boot=20)
    assert value == pytest.approx(1.0, abs=3 * err + 0.02)
    collapsed = np.repeat(real[:1], 1000, axis=0)
    assert M.diversity_ratio(real, collapsed, n_boot=5)[0] == pytest.approx(0.0, abs=1e-9)
    assert M.diversity_ratio(real, 2 * real, n_boot=5)[0] == pytest.approx(2.0)


# ----------------------------------------------------------------------------- multiple testing


def test_holm_known_vector():
    # sorted p = .005 .01 .03 .04 -> x4 x3 x2 x1 = .02 .03 .06 .04 -> running max .02 .03 .06 .06
    np.testing.assert_allclose(M.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(M.holm([0.5, 0.9]), [1.0, 1.0])  # capped at 1
    assert M.holm([]).shape == (0,)
    with pytest.raises(M.MetricError, match="p-values"):
        M.holm([0.1, 1.5])
