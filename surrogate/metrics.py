"""Validation metrics: pure functions of arrays, each returning ``(value, error)``.

Conventions (JetNet style):

- ``real`` and ``gen`` are the reference and generated samples: 1-D metrics take arrays of
  shape (N,) (one feature, e.g. a column of :func:`surrogate.features.feature_matrix`),
  multi-dimensional metrics take (N, F) feature matrices with the same F.
- Every metric takes a keyword ``seed`` and draws only from its own ``numpy.random.Generator``.
- The return value is ``(value, error)``: two floats, or for metrics that measure several
  numbers at once two dicts with the same keys (:func:`flatten` turns either form into
  ``{"metric.key": (value, error)}`` for the validate stage).
- A sample too small to trust is logged as a warning (``logging``, not ``warnings``), and the
  metric is still computed.
- Multi-dimensional metrics standardise both samples with the real sample's mean and std.

``METRICS`` maps a name to each function; ``fn.metric_input`` says what it takes:
``"1d"`` (real, gen) of shape (N,), ``"nd"`` (real, gen) of shape (N, F), ``"labels"``
integer labels of shape (N,). :func:`holm` is a helper for the p-values, not a metric.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from scipy import linalg, stats
from sklearn.cluster import KMeans
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import pairwise_distances, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neighbors import NearestNeighbors

__all__ = [
    "MetricError",
    "METRICS",
    "register",
    "flatten",
    "separation_power",
    "ks",
    "wasserstein_scaled",
    "response",
    "frechet_distance",
    "fpd",
    "kpd",
    "classifier_auc",
    "mode_fraction_test",
    "cluster_occupancy",
    "prdc",
    "diversity_ratio",
    "holm",
]

log = logging.getLogger(__name__)

Value = float | dict[str, float]
Result = tuple[Value, Value]
F = TypeVar("F", bound=Callable[..., Result])

#: name -> metric function; filled by :func:`register`.
METRICS: dict[str, Callable[..., Result]] = {}

# Below these sizes a result is computed but logged as untrustworthy.
MIN_EVENTS_1D = 500
MIN_EVENTS_ND = 2000
MIN_EXPECTED_COUNT = 5  # usual rule of thumb for chi-square / G-test cells


class MetricError(ValueError):
    """Input a metric cannot use (wrong shape, non-finite values, empty sample)."""


def register(name: str, *, metric_input: str = "1d") -> Callable[[F], F]:
    """Decorator adding a metric to :data:`METRICS` under ``name``; ``metric_input`` is "1d", "nd" or "labels"."""
    if metric_input not in ("1d", "nd", "labels"):
        raise ValueError(f"metric {name!r}: metric_input must be '1d', 'nd' or 'labels', not {metric_input!r}")

    def deco(fn: F) -> F:
        if name in METRICS:
            raise ValueError(f"metric {name!r} is registered twice ({METRICS[name].__qualname__}, {fn.__qualname__})")
        fn.metric_input = metric_input  # type: ignore[attr-defined]
        fn.metric_name = name  # type: ignore[attr-defined]
        METRICS[name] = fn
        return fn

    return deco


def flatten(name: str, result: Result) -> dict[str, tuple[float, float]]:
    """``{"name": (v, e)}`` for a scalar result, ``{"name.key": (v, e), ...}`` for a dict result."""
    value, error = result
    if isinstance(value, Mapping):
        return {f"{name}.{k}": (float(value[k]), float(error[k])) for k in value}  # type: ignore[index]
    return {name: (float(value), float(error))}


# ----------------------------------------------------------------------------- input checks


def _as_1d(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1 or a.size == 0:
        raise MetricError(f"{what} sample must be a non-empty 1-D array (N,), got shape {np.shape(x)}")
    bad = ~np.isfinite(a)
    if bad.any():
        raise MetricError(f"{what} sample has a non-finite value {a[bad][0]} at row {int(np.flatnonzero(bad)[0])}")
    return a


def _as_2d(real: Any, gen: Any) -> tuple[np.ndarray, np.ndarray]:
    out = []
    for x, what in ((real, "real"), (gen, "generated")):
        a = np.asarray(x, dtype=np.float64)
        if a.ndim == 1:
            a = a[:, None]
        if a.ndim != 2 or a.shape[0] < 2:
            raise MetricError(f"{what} sample must be an (N, F) array with N >= 2, got shape {np.shape(x)}")
        bad = ~np.isfinite(a)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise MetricError(f"{what} sample has a non-finite value at row {row}, feature {col}")
        out.append(a)
    if out[0].shape[1] != out[1].shape[1]:
        raise MetricError(f"real has {out[0].shape[1]} features but generated has {out[1].shape[1]}")
    return out[0], out[1]


def _standardise(real: np.ndarray, gen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = real.mean(axis=0), real.std(axis=0)
    # a constant real feature would divide by 0; leave its scale alone so differences still show
    sd = np.where(sd > 0, sd, 1.0)
    return (real - mu) / sd, (gen - mu) / sd


def _warn_small(metric: str, n_real: int, n_gen: int, minimum: int) -> None:
    if min(n_real, n_gen) < minimum:
        log.warning(
            "%s: only %d real and %d generated events (fewer than %d); treat the result as indicative",
            metric,
            n_real,
            n_gen,
            minimum,
        )


def _subsample(x: np.ndarray, n_max: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n_max else x[rng.choice(len(x), size=n_max, replace=False)]


def _bootstrap(
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray], real: np.ndarray, gen: np.ndarray, n_boot: int, seed: int
) -> np.ndarray:
    """Standard deviation over ``n_boot`` resamplings (with replacement) of both samples; ``fn`` returns an array.

    ``n_boot < 2`` gives zeros without resampling (no spread can be estimated from fewer draws).
    """
    if n_boot < 2:
        return np.zeros_like(np.atleast_1d(fn(real[:2], gen[:2])), dtype=float)
    rng = np.random.default_rng(seed)
    draws = [
        np.atleast_1d(fn(real[rng.integers(0, len(real), len(real))], gen[rng.integers(0, len(gen), len(gen))]))
        for _ in range(n_boot)
    ]
    return np.std(draws, axis=0, ddof=1)


# ----------------------------------------------------------------------------- 1-D metrics
#
# The three 1-D distances take one feature, (N,), or many at once, (N, F): the validate stage runs
# them on all ~50 features of a condition bin in one call, column by column in vectorised form (a
# Python loop over features and bootstrap draws cost 4 of its 7 s per side). For (N, F) input the
# bootstrap resamples *events*, shared by all columns, so column j of a matrix call equals the
# call on column j alone with the same seed.


def _as_columns(real: Any, gen: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """(N, F) and (M, F) float64 views of 1-D metric input, and whether it was a single (N,) column."""
    out = []
    for x, what in ((real, "real"), (gen, "generated")):
        a = np.asarray(x, dtype=np.float64)
        if a.ndim not in (1, 2) or a.shape[0] == 0 or a.size == 0:
            raise MetricError(f"{what} sample must be a non-empty (N,) or (N, F) array, got shape {np.shape(x)}")
        a2 = a[:, None] if a.ndim == 1 else a
        bad = ~np.isfinite(a2)
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            where = f"row {row}" if a.ndim == 1 else f"row {row}, feature {col}"
            raise MetricError(f"{what} sample has a non-finite value {a2[row, col]} at {where}")
        out.append((a2, a.ndim == 1))
    (r, r1), (g, g1) = out
    if r1 != g1 or r.shape[1] != g.shape[1]:
        raise MetricError(f"real has shape {np.shape(real)} but generated has {np.shape(gen)}: features differ")
    return r, g, r1


def _quantile_edges(real: np.ndarray, bins: int | Sequence[float]) -> np.ndarray:
    if np.ndim(bins) == 0:
        edges = np.unique(np.quantile(real, np.linspace(0.0, 1.0, int(bins) + 1)))
    else:
        edges = np.unique(np.asarray(bins, dtype=np.float64))
    if len(edges) == 1:
        # a constant real sample: one bin that holds exactly that value
        edges = np.array([edges[0], np.nextafter(edges[0], np.inf)])
    return edges


def _bin_index(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # Bins: underflow (0), the len(edges)-1 inner bins (last one closed), overflow. Keeping the
    # under/overflow means generated events outside the real range count against the model.
    idx = np.searchsorted(edges, x, side="right")
    idx[x == edges[-1]] = len(edges) - 1
    return idx


def _column_edges(real: np.ndarray, bins: Any) -> list[np.ndarray]:
    """Edges per column of ``real`` (N, F): ``bins`` is a count (real quantiles), one edge sequence
    for every column, or a sequence of F edge sequences."""
    n_feat = real.shape[1]
    if np.ndim(bins) == 0:
        q = np.quantile(real, np.linspace(0.0, 1.0, int(bins) + 1), axis=0)  # (bins + 1, F)
        return [_quantile_edges(real[:, j], q[:, j]) for j in range(n_feat)]
    if all(np.ndim(b) == 0 for b in bins):
        return [_quantile_edges(real[:, j], bins) for j in range(n_feat)]
    if len(bins) != n_feat:
        raise MetricError(f"separation_power: {len(bins)} edge sequences for {n_feat} features")
    return [_quantile_edges(real[:, j], b) for j, b in enumerate(bins)]


class _Histograms:
    """Bin indices of both samples in every column's binning, flattened so that one ``bincount``
    histograms all columns: column j owns the slots ``offsets[j] .. offsets[j + 1] - 1``."""

    def __init__(self, real: np.ndarray, gen: np.ndarray, edges: list[np.ndarray]) -> None:
        sizes = np.array([len(e) + 1 for e in edges])
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.n_feat = len(edges)
        self.ir = np.stack([_bin_index(real[:, j], e) for j, e in enumerate(edges)], axis=1) + self.offsets[:-1]
        self.ig = np.stack([_bin_index(gen[:, j], e) for j, e in enumerate(edges)], axis=1) + self.offsets[:-1]

    def counts(self, idx: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """(K,) counts of all columns; ``weights``: (N,) per-event multiplicities (a bootstrap draw)."""
        w = None if weights is None else np.repeat(weights, self.n_feat)
        return np.bincount(idx.ravel(), weights=w, minlength=int(self.offsets[-1])).astype(np.float64)

    def separation(self, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
        """(F,) separation powers of counts (..., K) -> (..., F)."""
        # Hand-written: CaloChallenge's definition, no library provides it.
        starts = self.offsets[:-1]
        seg = np.repeat(np.arange(self.n_feat), np.diff(self.offsets))
        h1 = c1 / np.add.reduceat(c1, starts, axis=-1)[..., seg]
        h2 = c2 / np.add.reduceat(c2, starts, axis=-1)[..., seg]
        s = h1 + h2
        term = np.divide((h1 - h2) ** 2, s, out=np.zeros_like(s), where=s > 0)
        return 0.5 * np.add.reduceat(term, starts, axis=-1)


def _resampled_counts(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) multiplicities of one bootstrap resampling of n events (the draws of :func:`_bootstrap`)."""
    return np.bincount(rng.integers(0, n, n), minlength=n)


def _draws(n_real: int, n_gen: int, n_boot: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per-event multiplicities of ``n_boot`` resamplings of both samples, the draws of :func:`_bootstrap`."""
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield _resampled_counts(n_real, rng), _resampled_counts(n_gen, rng)


class _WeightedW1:
    """W1 between two fixed samples (N, F), (M, F), column by column, under changing event weights.

    Hand-written for speed: a resampling only changes the multiplicity of each event, so both
    samples are sorted together once and each resampling is one cumulative sum of weights:
    W1 = sum_i |F_real(x_i) - F_gen(x_i)| (x_(i+1) - x_i) over the merged sorted values
    (the formula scipy.stats.wasserstein_distance evaluates; tested equal to it, weights and ties included).
    """

    def __init__(self, real: np.ndarray, gen: np.ndarray) -> None:
        real, gen = np.asarray(real, np.float64), np.asarray(gen, np.float64)
        self.one = real.ndim == 1
        real, gen = (real[:, None], gen[:, None]) if self.one else (real, gen)
        values = np.concatenate([real, gen])
        self.order = np.argsort(values, axis=0, kind="stable")
        self.deltas = np.diff(np.take_along_axis(values, self.order, axis=0), axis=0)

    def __call__(self, w_real: np.ndarray, w_gen: np.ndarray) -> Any:
        w = np.concatenate([w_real / w_real.sum(), -w_gen / w_gen.sum()])[self.order]
        d = np.sum(np.abs(np.cumsum(w, axis=0)[:-1]) * self.deltas, axis=0)
        return float(d[0]) if self.one else d


def _std(draws: list[np.ndarray], n_feat: int) -> np.ndarray:
    return np.std(draws, axis=0, ddof=1) if len(draws) > 1 else np.zeros(n_feat)


def _out(x: np.ndarray, one: bool) -> Any:
    return float(x[0]) if one else x


@register("separation_power")
def separation_power(real: np.ndarray, gen: np.ndarray, *, bins: Any = 50, n_boot: int = 100, seed: int = 0) -> Result:
    """Separation power 1/2 sum_i (h1_i - h2_i)^2 / (h1_i + h2_i) of unit-normalised histograms (CaloChallenge).

    Args:
        real, gen: (N,) and (M,) values of one feature, or (N, F) and (M, F): every column at once.
        bins: number of bins with equal real-sample population (edges at real quantiles), explicit
            edges, or (for (N, F) input) a sequence of F edge sequences. Under- and overflow bins are
            always added.
        n_boot: bootstrap resamplings of the events for the error (binning held fixed).
    Returns:
        (value in [0, 1]: 0 identical, 1 disjoint; bootstrap std): floats, or (F,) arrays for (N, F) input.
    """
    r, g, one = _as_columns(real, gen)
    _warn_small("separation_power", len(r), len(g), MIN_EVENTS_1D)
    hist = _Histograms(r, g, _column_edges(r, bins))
    value = hist.separation(hist.counts(hist.ir), hist.counts(hist.ig))
    draws = [
        hist.separation(hist.counts(hist.ir, wr), hist.counts(hist.ig, wg))
        for wr, wg in _draws(len(r), len(g), n_boot if n_boot >= 2 else 0, seed)
    ]
    return _out(value, one), _out(_std(draws, hist.n_feat), one)


def _run_ends(x: np.ndarray) -> np.ndarray:
    """For sorted ``x``: ``searchsorted(x, x, side="right")``, in one pass."""
    ends = np.flatnonzero(np.r_[x[1:] != x[:-1], True]) + 1  # end of each run of equal values
    return np.repeat(ends, np.diff(np.r_[0, ends]))


def _ks_asymptotic(r: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided two-sample KS statistic and asymptotic p-value per column of (N, F), (M, F).

    The computation of scipy.stats.ks_2samp(method="asymp") (the CDFs by searchsorted over the
    pooled values, ties included, p = kstwo.sf(D, round(N M / (N + M)))), with each sample sorted
    once for all columns and one vectorised p-value call; tested equal to scipy column by column.
    """
    rs, gs = np.sort(r, axis=0), np.sort(g, axis=0)
    n1, n2 = len(rs), len(gs)
    d = np.empty(r.shape[1])
    for j in range(r.shape[1]):
        a, b = rs[:, j], gs[:, j]
        # the CDFs at every pooled value, as searchsorted(side="right") would give them; a sample's
        # CDF at its own sorted values is the end of each run of equal values (no search needed)
        diff = np.concatenate(
            [
                _run_ends(a) / n1 - np.searchsorted(b, a, side="right") / n2,
                np.searchsorted(a, b, side="right") / n1 - _run_ends(b) / n2,
            ]
        )
        lo, hi = np.clip(-diff.min(), 0.0, 1.0), diff.max()
        d[j] = lo if lo > hi else hi
    m, n = sorted([float(n1), float(n2)], reverse=True)
    p = np.clip(stats.distributions.kstwo.sf(d, np.round(m * n / (m + n))), 0.0, 1.0)
    return d, p


@register("ks")
def ks(real: np.ndarray, gen: np.ndarray, *, n_boot: int = 100, seed: int = 0, method: str = "auto") -> Result:
    """Two-sample Kolmogorov-Smirnov test (scipy.stats.ks_2samp).

    Args:
        real, gen: (N,) and (M,) values of one feature, or (N, F) and (M, F): every column at once.
        method: scipy's p-value method ("auto": exact below 10000 events per sample, else "asymp").
            "asymp" on (N, F) input runs vectorised (same numbers as scipy).
    Returns:
        ({"statistic", "pvalue"} as from scipy; bootstrap std of each, where the resamples use the
        asymptotic p-value for speed; zeros for n_boot < 2). Floats, or (F,) arrays for (N, F) input.
    """
    r, g, one = _as_columns(real, gen)
    _warn_small("ks", len(r), len(g), MIN_EVENTS_1D)
    if method == "asymp" and n_boot < 2:
        d, p = _ks_asymptotic(r, g)
        return (
            {"statistic": _out(d, one), "pvalue": _out(p, one)},
            {"statistic": _out(np.zeros_like(d), one), "pvalue": _out(np.zeros_like(p), one)},
        )
    values, errors = [], []
    for j in range(r.shape[1]):
        res = stats.ks_2samp(r[:, j], g[:, j], method=method)
        values.append((float(res.statistic), float(res.pvalue)))
        errors.append(
            _bootstrap(
                lambda a, b: np.array(stats.ks_2samp(a, b, method="asymp")[:2], dtype=np.float64),
                r[:, j],
                g[:, j],
                n_boot,
                seed,
            )
            if n_boot >= 2
            else np.zeros(2)
        )
    v, e = np.array(values), np.array(errors)
    return (
        {"statistic": _out(v[:, 0], one), "pvalue": _out(v[:, 1], one)},
        {"statistic": _out(e[:, 0], one), "pvalue": _out(e[:, 1], one)},
    )


@register("wasserstein_scaled")
def wasserstein_scaled(real: np.ndarray, gen: np.ndarray, *, n_boot: int = 100, seed: int = 0) -> Result:
    """1-D Wasserstein-1 distance (as scipy.stats.wasserstein_distance) divided by the real sample's std.

    Args:
        real, gen: (N,) and (M,) values of one feature, or (N, F) and (M, F): every column at once.
    Returns:
        (distance in units of the real std, dimensionless; bootstrap std of the events' resamplings):
        floats, or (F,) arrays for (N, F) input. A constant real column is not scaled (and logged).
    """
    r, g, one = _as_columns(real, gen)
    _warn_small("wasserstein_scaled", len(r), len(g), MIN_EVENTS_1D)
    scale = r.std(axis=0)
    if np.any(scale == 0):
        log.warning(
            "wasserstein_scaled: the real sample is constant in %d column(s); those are not scaled",
            int(np.sum(scale == 0)),
        )
        scale = np.where(scale > 0, scale, 1.0)
    w1 = _WeightedW1(r, g)
    value = w1(np.ones(len(r)), np.ones(len(g)))
    draws = [w1(wr, wg) for wr, wg in _draws(len(r), len(g), n_boot if n_boot >= 2 else 0, seed)]
    return _out(value / scale, one), _out(_std(draws, r.shape[1]) / scale, one)


def _response_values(real: np.ndarray, gen: np.ndarray) -> np.ndarray:
    mr, mg = real.mean(), gen.mean()
    rr, rg = real.std(ddof=1) / mr, gen.std(ddof=1) / mg
    return np.array([mr, mg, rr, rg, mg / mr - 1.0, rg / rr if rr else np.inf])


_RESPONSE_KEYS = ("real_mean", "gen_mean", "real_resolution", "gen_resolution", "mean_shift", "resolution_ratio")


@register("response")
def response(real_ratio: np.ndarray, gen_ratio: np.ndarray, *, n_boot: int = 100, seed: int = 0) -> Result:
    """Energy response (mean of E_dep/E_inc) and relative resolution (std/mean) of both samples.

    Args:
        real_ratio, gen_ratio: (N,) and (M,) E_dep/E_inc per event (dimensionless, mean must be > 0).
    Returns:
        dicts with keys real_mean, gen_mean, real_resolution, gen_resolution,
        mean_shift (gen_mean/real_mean - 1), resolution_ratio (gen/real); bootstrap std as error.
    """
    real, gen = _as_1d(real_ratio, "real"), _as_1d(gen_ratio, "generated")
    _warn_small("response", len(real), len(gen), MIN_EVENTS_1D)
    if real.mean() <= 0 or gen.mean() <= 0:
        raise MetricError(f"response: mean E_dep/E_inc must be > 0 (real {real.mean():.3g}, gen {gen.mean():.3g})")
    value = _response_values(real, gen)
    err = _bootstrap(_response_values, real, gen, n_boot, seed)
    return dict(zip(_RESPONSE_KEYS, map(float, value), strict=True)), dict(
        zip(_RESPONSE_KEYS, map(float, err), strict=True)
    )


# ----------------------------------------------------------------------------- distribution distances


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) between Gaussians (F,), (F, F)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    # Tr sqrt(S1 S2) = Tr sqrt(A S2 A) with A = sqrt(S1): the latter is symmetric PSD, so eigvalsh
    # is exact and warning-free for singular covariances (a constant feature), where
    # scipy.linalg.sqrtm of the non-symmetric product warns and loses accuracy.
    w, v = linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    tr_covmean = float(np.sum(np.sqrt(np.clip(linalg.eigvalsh((inner + inner.T) / 2.0), 0.0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


@register("fpd", metric_input="nd")
def fpd(
    real: np.ndarray,
    gen: np.ndarray,
    *,
    min_samples: int = 20_000,
    max_samples: int = 50_000,
    num_points: int = 10,
    num_batches: int = 20,
    normalise: bool = True,
    seed: int = 0,
) -> Result:
    """Fréchet physics distance extrapolated to infinite sample size (Kansal et al. 2023, JetNet convention).

    For ``num_points`` sizes n from ``min_samples`` to ``max_samples`` (capped at the smaller
    sample), average the Fréchet distance over ``num_batches`` subsamples of n events drawn with
    replacement; fit FD(n) = FPD + b/n (scipy.stats.linregress) and return the intercept.

    Args:
        real, gen: (N, F) and (M, F) feature matrices.
        normalise: standardise both with the real sample's mean and std first.
    Returns:
        (FPD intercept, in squared standardised units; its standard error from the fit).
    """
    real, gen = _as_2d(real, gen)
    if normalise:
        real, gen = _standardise(real, gen)
    n_avail = min(len(real), len(gen))
    if n_avail < max_samples:
        log.warning(
            "fpd: %d events available, fewer than max_samples=%d; extrapolating from smaller subsamples",
            n_avail,
            max_samples,
        )
    hi = min(max_samples, n_avail)
    lo = min(min_samples, hi // 2)
    sizes = np.unique(np.linspace(lo, hi, num_points).astype(int))
    if len(sizes) < 3:
        raise MetricError(f"fpd: need at least 3 distinct subsample sizes, got {sizes.tolist()} ({n_avail} events)")
    rng = np.random.default_rng(seed)
    means = []
    for n in sizes:
        vals = [
            frechet_distance(
                *_moments(real[rng.integers(0, len(real), n)]), *_moments(gen[rng.integers(0, len(gen), n)])
            )
            for _ in range(num_batches)
        ]
        means.append(np.mean(vals))
    fit = stats.linregress(1.0 / sizes, means)
    return float(fit.intercept), float(fit.intercept_stderr)


def _mmd2_poly_unbiased(x: np.ndarray, y: np.ndarray, block: int = 256) -> float:
    # Hand-written unbiased MMD^2 estimator (no library has it) with the kernel of sklearn's
    # polynomial_kernel (gamma = 1/d, coef0 = 1, degree 4), also written out: sklearn raises the
    # kernel matrix to the 4th power with a float exponent, which took 90% of the time; two
    # in-place squarings are 10x faster (same values up to rounding, tested against sklearn).
    # Summed in row blocks so memory stays at block x n instead of n x n.
    d = x.shape[1]

    def kernel_sum(a: np.ndarray, b: np.ndarray) -> float:
        k = a @ b.T
        k *= 1.0 / d
        k += 1.0
        np.square(k, out=k)
        np.square(k, out=k)
        return float(k.sum())

    def ksum(a: np.ndarray, b: np.ndarray) -> float:
        if a is b:  # symmetric: each block of rows against itself and the rows after it, those twice
            blocks = [(a[i : i + block], a[i + block :]) for i in range(0, len(a), block)]
            return sum(kernel_sum(rows, rows) + 2.0 * kernel_sum(rows, rest) for rows, rest in blocks)
        return sum(kernel_sum(a[i : i + block], b) for i in range(0, len(a), block))

    def kdiag(a: np.ndarray) -> float:
        return float(np.sum((np.einsum("ij,ij->i", a, a) / d + 1.0) ** 4))

    m, n = len(x), len(y)
    kxx = (ksum(x, x) - kdiag(x)) / (m * (m - 1))
    kyy = (ksum(y, y) - kdiag(y)) / (n * (n - 1))
    kxy = ksum(x, y) / (m * n)
    return kxx + kyy - 2.0 * kxy


@register("kpd", metric_input="nd")
def kpd(
    real: np.ndarray,
    gen: np.ndarray,
    *,
    num_batches: int = 10,
    batch_size: int = 5000,
    normalise: bool = True,
    seed: int = 0,
) -> Result:
    """Kernel physics distance: unbiased MMD^2 with kernel k(x, y) = (x.y / F + 1)^4 (Kansal et al. 2023).

    Computed on ``num_batches`` pairs of ``batch_size``-event subsamples (each without replacement).

    Args:
        real, gen: (N, F) and (M, F) feature matrices.
        normalise: standardise both with the real sample's mean and std first.
    Returns:
        (median over batches; its error), in kernel units; the value can be slightly negative for
        identical distributions, since the estimator is unbiased. The error is the batches'
        spread measured robustly (1.4826 x median absolute deviation: with the degree-4 kernel a
        few far-out events can blow up single batches, and the half 16-84% spread then hid a
        KPD 15 times the floor behind an error larger than itself), scaled by
        sqrt(batch_size / events) from the spread of one batch to that of the whole sample (the
        statistic's spread falls like 1/sqrt(n)). With identical 10-D Gaussians (4500 events,
        batches of 2000, 40 seeds) it is 0.96x the spread of the value over independent samples
        (the raw batch spread was 1.8x).
    """
    real, gen = _as_2d(real, gen)
    if normalise:
        real, gen = _standardise(real, gen)
    if min(len(real), len(gen)) < batch_size:
        log.warning("kpd: fewer events (%d, %d) than batch_size=%d", len(real), len(gen), batch_size)
    rng = np.random.default_rng(seed)

    # each batch without replacement: a point drawn twice into one batch pairs with itself in the
    # "i != j" sums and biases the unbiased estimator upwards (+0.12 for identical 3-D Gaussians,
    # batches of 500 from 1000, against a full-sample value of 0.001)
    def draw(x: np.ndarray) -> np.ndarray:
        return x[rng.choice(len(x), size=min(batch_size, len(x)), replace=False)]

    vals = [_mmd2_poly_unbiased(draw(real), draw(gen)) for _ in range(num_batches)]
    spread = 1.4826 * float(stats.median_abs_deviation(vals))
    return float(np.median(vals)), spread * math.sqrt(min(1.0, batch_size / min(len(real), len(gen))))


@register("classifier_auc", metric_input="nd")
def classifier_auc(
    real: np.ndarray,
    gen: np.ndarray,
    *,
    max_events: int = 20_000,
    max_iter: int = 100,
    max_bins: int = 255,
    n_boot: int = 100,
    seed: int = 0,
) -> Result:
    """ROC AUC of a classifier separating real from generated events (0.5: indistinguishable).

    At most ``max_events`` of each sample are used (keeps it to seconds); half of them train a
    sklearn HistGradientBoostingClassifier, the other half is scored.

    Args:
        real, gen: (N, F) and (M, F) feature matrices.
        max_iter, max_bins: the classifier's boosting iterations (at most) and bins per feature.
    Returns:
        (AUC on the held-out half; std over ``n_boot`` bootstrap resamplings of that test set).
    """
    real, gen = _as_2d(real, gen)
    rng = np.random.default_rng(seed)
    real, gen = _subsample(real, max_events, rng), _subsample(gen, max_events, rng)
    _warn_small("classifier_auc", len(real), len(gen), MIN_EVENTS_ND)
    x = np.concatenate([real, gen])
    y = np.concatenate([np.zeros(len(real)), np.ones(len(gen))])
    seeds = rng.integers(0, 2**31 - 1, size=2)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, stratify=y, random_state=int(seeds[0]))
    # early stopping on a tenth of the training half: samples the classifier cannot tell apart stop
    # after a few trees (no fitting of noise), separable ones keep boosting up to max_iter
    clf = HistGradientBoostingClassifier(
        max_iter=max_iter, max_bins=max_bins, early_stopping=True, random_state=int(seeds[1])
    )
    clf.fit(x_tr, y_tr)
    p = clf.predict_proba(x_te)[:, 1]
    auc = roc_auc_score(y_te, p)
    auc_of = _WeightedAUC(y_te, p)
    boot = []
    for _ in range(n_boot):
        w = _resampled_counts(len(y_te), rng)
        if 0 < w[y_te == 1].sum() < len(y_te):  # both classes needed for an AUC
            boot.append(auc_of(w))
    err = float(np.std(boot, ddof=1)) if len(boot) > 1 else 0.0
    return float(auc), err


class _WeightedAUC:
    """ROC AUC of fixed scores under changing event weights (bootstrap multiplicities).

    Hand-written for speed (sklearn's roc_auc_score takes no weights shortcut and costs ms of
    checks per call): AUC = sum over positives of w (W_neg below + W_neg tied / 2) / (W_pos W_neg),
    the Mann-Whitney form, over the distinct scores found once. Tested equal to roc_auc_score on
    the resampled events.
    """

    def __init__(self, y: np.ndarray, score: np.ndarray) -> None:
        self.levels, self.group = np.unique(score, return_inverse=True)
        self.pos = np.asarray(y) == 1

    def __call__(self, w: np.ndarray) -> float:
        k = len(self.levels)
        wp = np.bincount(self.group[self.pos], weights=w[self.pos], minlength=k)
        wn = np.bincount(self.group[~self.pos], weights=w[~self.pos], minlength=k)
        below = np.cumsum(wn) - wn
        return float(np.sum(wp * (below + 0.5 * wn)) / (wp.sum() * wn.sum()))


# ----------------------------------------------------------------------------- mode coverage


def _g_test(real_counts: np.ndarray, gen_counts: np.ndarray, metric: str) -> tuple[float, float, int]:
    table = np.stack([real_counts, gen_counts]).astype(np.float64)
    table = table[:, table.sum(axis=0) > 0]  # a category neither sample has carries no information
    if table.shape[1] < 2:
        return 0.0, 1.0, 0
    expected = stats.contingency.expected_freq(table)
    if expected.min() < MIN_EXPECTED_COUNT:
        log.warning(
            "%s: smallest expected count %.2g < %d; the G-test p-value is approximate",
            metric,
            expected.min(),
            MIN_EXPECTED_COUNT,
        )
    # chi2_contingency with lambda_="log-likelihood" is the G-test (scipy.stats.power_divergence inside)
    res = stats.chi2_contingency(table, correction=False, lambda_="log-likelihood")
    return float(res.statistic), float(res.pvalue), int(res.dof)


def _occupancy_result(real_counts: np.ndarray, gen_counts: np.ndarray, metric: str) -> Result:
    g, p, dof = _g_test(real_counts, gen_counts, metric)
    fr, fg = real_counts / real_counts.sum(), gen_counts / gen_counts.sum()
    # per-category fraction errors (binomial), combined for the largest difference
    i = int(np.argmax(np.abs(fr - fg)))
    err_i = np.sqrt(fr[i] * (1 - fr[i]) / real_counts.sum() + fg[i] * (1 - fg[i]) / gen_counts.sum())
    value = {"statistic": g, "pvalue": p, "dof": float(dof), "max_fraction_diff": float(abs(fr[i] - fg[i]))}
    # the test statistic and p-value are exact functions of the counts: no error is attached to them
    error = {"statistic": 0.0, "pvalue": 0.0, "dof": 0.0, "max_fraction_diff": float(err_i)}
    return value, error


@register("mode_fraction_test", metric_input="labels")
def mode_fraction_test(real_labels: np.ndarray, gen_labels: np.ndarray, n_modes: int, *, seed: int = 0) -> Result:
    """G-test that real and generated events populate the ``n_modes`` modes in the same proportions.

    Args:
        real_labels, gen_labels: (N,) and (M,) integer mode labels in [0, n_modes).
        seed: unused (the test is deterministic); kept so every metric has the same signature.
    Returns:
        dicts with keys statistic (G), pvalue, dof and max_fraction_diff (largest |f_real - f_gen|
        over modes); only max_fraction_diff has a (binomial) error, the others have 0.
    """
    counts = []
    for labels, what in ((real_labels, "real"), (gen_labels, "generated")):
        lab = np.asarray(labels)
        if lab.ndim != 1 or lab.size == 0 or not np.issubdtype(lab.dtype, np.integer):
            raise MetricError(f"{what} labels must be a non-empty 1-D integer array, got {lab.dtype} {lab.shape}")
        out = (lab < 0) | (lab >= n_modes)
        if out.any():
            row = int(np.flatnonzero(out)[0])
            raise MetricError(f"{what} label {lab[row]} at row {row} is outside [0, {n_modes})")
        counts.append(np.bincount(lab, minlength=n_modes))
    return _occupancy_result(counts[0], counts[1], "mode_fraction_test")


@register("cluster_occupancy", metric_input="nd")
def cluster_occupancy(
    real: np.ndarray, gen: np.ndarray, k: int = 20, *, max_events: int = 20_000, seed: int = 0
) -> Result:
    """Binned mode coverage: k-means with ``k`` clusters fitted on the (standardised) real sample,
    then the G-test of :func:`mode_fraction_test` on the cluster occupancies of both samples.

    Args:
        real, gen: (N, F) and (M, F) feature matrices; at most ``max_events`` of each are used.
    Returns:
        as :func:`mode_fraction_test`.
    """
    real, gen = _as_2d(real, gen)
    rng = np.random.default_rng(seed)
    real, gen = _subsample(real, max_events, rng), _subsample(gen, max_events, rng)
    _warn_small("cluster_occupancy", len(real), len(gen), MIN_EXPECTED_COUNT * 10 * k)
    real, gen = _standardise(real, gen)
    km = KMeans(n_clusters=k, n_init=3, random_state=int(rng.integers(0, 2**31 - 1))).fit(real)
    real_counts = np.bincount(km.labels_, minlength=k)
    gen_counts = np.bincount(km.predict(gen), minlength=k)
    return _occupancy_result(real_counts, gen_counts, "cluster_occupancy")


#: k-NN radii by sample content (see :func:`_knn_radius`); a few entries, oldest dropped first.
_RADII: dict[tuple[Any, ...], np.ndarray] = {}
_RADII_LOCK = threading.Lock()


def _knn_radius(x: np.ndarray, k: int) -> np.ndarray:
    """(N,) distance of each row of ``x`` to its k-th nearest neighbour in ``x`` (sklearn NearestNeighbors;
    the query point itself is the 0th neighbour).

    Remembered by content (a hash of the array): the validate stage compares one real sample with
    both the other real half and the generated sample, at the same sizes and seeds, so the real
    radii (a third of the PRDC time) are found once. The result depends only on ``x`` and ``k``.
    """
    key = (hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest(), x.shape, x.dtype.str, k)
    with _RADII_LOCK:
        radius = _RADII.get(key)
    if radius is None:
        radius = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)[0][:, k]
        with _RADII_LOCK:  # the validate stage runs metrics in threads
            while len(_RADII) >= 16:
                del _RADII[next(iter(_RADII))]
            _RADII[key] = radius
    return radius


def _prdc_values(real: np.ndarray, gen: np.ndarray, k: int, block: int = 2048) -> np.ndarray:
    # Naeem et al. 2020 (arXiv:2002.09797); written here because scikit-learn has no PRDC. Radii are
    # distances to the k-th nearest neighbour within the same sample (sklearn NearestNeighbors; the
    # query point itself is the 0th neighbour). The real x generated distance matrix is walked in
    # blocks of generated rows so memory stays at block x N.
    r_real, r_gen = _knn_radius(real, k), _knn_radius(gen, k)
    precise = np.zeros(len(gen), dtype=bool)
    density_hits = np.zeros(len(gen))
    recalled = np.zeros(len(real), dtype=bool)
    nearest_gen = np.full(len(real), np.inf)
    for i in range(0, len(gen), block):
        d = pairwise_distances(gen[i : i + block], real)  # (b, N_real)
        inside = d < r_real[None, :]
        precise[i : i + block] = inside.any(axis=1)
        density_hits[i : i + block] = inside.sum(axis=1)
        recalled |= (d < r_gen[i : i + block, None]).any(axis=0)
        nearest_gen = np.minimum(nearest_gen, d.min(axis=0))
    return np.array([precise.mean(), recalled.mean(), density_hits.mean() / k, np.mean(nearest_gen < r_real)])


_PRDC_KEYS = ("precision", "recall", "density", "coverage")


@register("prdc", metric_input="nd")
def prdc(
    real: np.ndarray,
    gen: np.ndarray,
    k: int = 5,
    *,
    max_events: int = 10_000,
    n_repeats: int = 5,
    seed: int = 0,
) -> Result:
    """Precision, recall, density and coverage (Naeem et al. 2020) with k-NN balls, on standardised features.

    Args:
        real, gen: (N, F) and (M, F) feature matrices; at most ``max_events`` of each are used.
        k: nearest-neighbour order of the ball radii.
        n_repeats: half-samples (drawn without replacement) used for the error: a bootstrap would
            put duplicate points in the sample and shrink the k-NN radii to 0.
    Returns:
        dicts with keys precision, recall, density, coverage (1 for identical samples, density
        around 1); error = std over the half-samples / sqrt(2) (variance ~ 1/N).
    """
    real, gen = _as_2d(real, gen)
    rng = np.random.default_rng(seed)
    real, gen = _subsample(real, max_events, rng), _subsample(gen, max_events, rng)
    _warn_small("prdc", len(real), len(gen), MIN_EVENTS_ND)
    if min(len(real), len(gen)) < 2 * (k + 1):
        raise MetricError(f"prdc: need at least {2 * (k + 1)} events per sample for k={k}")
    real, gen = _standardise(real, gen)
    value = _prdc_values(real, gen, k)
    halves = [
        _prdc_values(_subsample(real, len(real) // 2, rng), _subsample(gen, len(gen) // 2, rng), k)
        for _ in range(n_repeats)
    ]
    err = np.std(halves, axis=0, ddof=1) / np.sqrt(2.0) if n_repeats > 1 else np.zeros(4)
    return dict(zip(_PRDC_KEYS, map(float, value), strict=True)), dict(zip(_PRDC_KEYS, map(float, err), strict=True))


@register("diversity_ratio", metric_input="nd")
def diversity_ratio(real: np.ndarray, gen: np.ndarray, *, n_boot: int = 100, seed: int = 0) -> Result:
    """Mode-collapse diagnostic: mean per-feature std of the generated sample over that of the real one,
    both in units of the real std (so the real sample's value is 1 for every non-constant feature).

    Args:
        real, gen: (N, F) and (M, F) feature matrices.
    Returns:
        (ratio: 1 for the same spread, 0 for a collapsed sample, > 1 for a too broad one; bootstrap std).
    """
    real, gen = _as_2d(real, gen)
    _warn_small("diversity_ratio", len(real), len(gen), MIN_EVENTS_1D)
    real, gen = _standardise(real, gen)

    def ratio(r: np.ndarray, g: np.ndarray) -> np.ndarray:
        den = r.std(axis=0).mean()
        return np.array(g.std(axis=0).mean() / den if den > 0 else np.nan)

    err = _bootstrap(ratio, real, gen, n_boot, seed)
    return float(ratio(real, gen)), float(err[0])


# ----------------------------------------------------------------------------- multiple testing


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, shape as the input; reject where adjusted <= alpha.

    Hand-written: scipy.stats.false_discovery_control only offers Benjamini-Hochberg/-Yekutieli.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1 or np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise MetricError(f"holm: p-values must be a 1-D array of numbers in [0, 1], got {p!r}")
    order = np.argsort(p)
    m = len(p)
    # step-down: the i-th smallest p is multiplied by (m - i); monotonicity via the running maximum
    adj_sorted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj_sorted
    return out
