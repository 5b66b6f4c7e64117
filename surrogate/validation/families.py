"""The test families of the validate stage, registered in :data:`FAMILIES`.

A family is a function of a :class:`~surrogate.validation.context.Context` returning its tests
(before Holm) and its part of the stage's ``info`` (what the plots and ``summary.json`` need). Each
says, when registered, which metrics of :data:`surrogate.metrics.METRICS` it runs and the prefixes
of its test names; the stage runs every registered family, and the tests check that together they
use the whole metrics registry. :data:`FAMILIES` is in the order of the tests in ``summary.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from surrogate.validation.context import Context, seed_of
from surrogate.validation.modes import mode_classifier, predict_modes
from surrogate.validation.verdict import Test, pvalue_test, two_sided, worse_than_floor

__all__ = ["Family", "FAMILIES", "RUN_ORDER", "USED_METRICS", "register"]

FamilyResult = tuple[list[Test], dict[str, Any]]


@dataclass(frozen=True)
class Family:
    """A registered test family: its function, the metrics it runs, the prefixes of its test names."""

    name: str
    fn: Callable[[Context], FamilyResult]
    metrics: frozenset[str]
    tests: tuple[str, ...]


#: name -> family, in the order of the tests in ``summary.json``; filled by :func:`register`.
FAMILIES: dict[str, Family] = {}


def register(name: str, *, metrics: tuple[str, ...], tests: tuple[str, ...]) -> Callable:
    """Decorator adding a family to :data:`FAMILIES`: ``metrics`` are names in
    :data:`surrogate.metrics.METRICS`, ``tests`` the prefixes of the names of its tests."""

    def deco(fn: Callable[[Context], FamilyResult]) -> Callable[[Context], FamilyResult]:
        if name in FAMILIES:
            raise ValueError(f"test family {name!r} is registered twice")
        FAMILIES[name] = Family(name, fn, frozenset(metrics), tests)
        return fn

    return deco


def _one_d(
    ctx: Context, prefix: str, ra: np.ndarray, rb: np.ndarray, rfull: np.ndarray, g: np.ndarray, gsub: np.ndarray
) -> list[Test]:
    """Separation power, scaled W1 and KS of every feature at once (the metrics take (N, F)): real
    halves ``ra`` and ``rb`` give the floors, ``rfull`` vs ``g`` the KS test, ``ra`` vs ``gsub`` the rest."""
    from surrogate import metrics as M

    st, fl = ctx.settings, ctx.floors
    n_boot, mar = st["n_boot"], st["margins"]
    edges = list(np.quantile(rfull, np.linspace(0, 1, st["hist_bins"] + 1), axis=0).T)  # per feature, real quantiles
    s = seed_of(ctx.seed, f"1d/{prefix}")
    sep_f = fl.floor(f"separation/{prefix}", M.separation_power, ra, rb, bins=edges, n_boot=n_boot, seed=s)
    sep_g = fl.generated(sep_f, M.separation_power, ra, gsub, bins=edges, n_boot=n_boot, seed=s)
    w1_f = fl.floor(f"wasserstein/{prefix}", M.wasserstein_scaled, ra, rb, n_boot=n_boot, seed=s)
    w1_g = fl.generated(w1_f, M.wasserstein_scaled, ra, gsub, n_boot=n_boot, seed=s)
    # n_boot=0: the p-value decides. ``g`` is capped by gen_cap: with n_gen >> n_real the test's
    # power is set by n_real (effective size n_r n_g / (n_r + n_g)), not by n_gen. Asymptotic
    # p-values: the exact ones cost ms per test, and the asymptotic law is slightly conservative
    # at these sizes (effective size hundreds or more)
    ks_f = fl.floor(f"ks/{prefix}", M.ks, ra, rb, n_boot=0, seed=s, method="asymp")[0]
    ks_g = fl.generated((ks_f,), M.ks, rfull, g, n_boot=0, seed=s, method="asymp")[0]
    varying = np.std(ra, axis=0) > 0  # W1 is scaled by the real std: no test for a constant feature
    out = []
    for j, name in enumerate(ctx.real.names):
        out.append(
            worse_than_floor(
                f"separation/{prefix}/{name}", sep_g[0][j], sep_g[1][j], sep_f[0][j], sep_f[1][j], mar["separation"]
            )
        )
        if varying[j]:
            out.append(
                worse_than_floor(
                    f"wasserstein/{prefix}/{name}", w1_g[0][j], w1_g[1][j], w1_f[0][j], w1_f[1][j], mar["wasserstein"]
                )
            )
        out.append(
            pvalue_test(f"ks/{prefix}/{name}", ks_g["statistic"][j], ks_g["pvalue"][j], ks_f["pvalue"][j], st["alpha"])
        )
    return out


@register(
    "1-D tests",
    metrics=("separation_power", "wasserstein_scaled", "ks", "diversity_ratio"),
    tests=("separation/", "wasserstein/", "ks/", "diversity/pdg"),
)
def distributions(ctx: Context) -> FamilyResult:
    """Every feature overall and per condition bin; the diversity of the features inside each bin."""
    from surrogate import metrics as M

    d, rf, gf = ctx.draws, ctx.real.features, ctx.gen.features
    n_boot, margin = ctx.settings["n_boot"], ctx.settings["margins"]["diversity"]
    out = _one_d(ctx, "all", rf[d.half_a], rf[d.half_b], rf, gf[d.gen_ks], gf[d.gen_b])
    for rows in d.per_bin:
        label = ctx.binning.label(rows.bin)
        out += _one_d(
            ctx, label, rf[rows.real_a], rf[rows.real_b], rf[rows.real], gf[rows.gen_test], gf[rows.gen_floor_size]
        )
        # diversity at fixed conditions: spread of the generated features inside one condition bin
        key = f"diversity/{label}"
        s = seed_of(ctx.seed, key)
        fv, fe = ctx.floors.floor(key, M.diversity_ratio, rf[rows.real_a], rf[rows.real_b], n_boot=n_boot, seed=s)
        dv, de = ctx.floors.generated(
            (fv, fe), M.diversity_ratio, rf[rows.real_a], gf[rows.gen_floor_size], n_boot=n_boot, seed=s
        )
        out.append(worse_than_floor(key, dv, de, fv, fe, margin, False))
    return out, {"bins_used": [ctx.binning.label(rows.bin) for rows in d.per_bin]}


@register("response", metrics=("response",), tests=("response_mean/", "resolution/"))
def response(ctx: Context) -> FamilyResult:
    """Conditional response per energy bin and particle (pooling |eta| bins), every matched event."""
    from surrogate import metrics as M

    real, gen, binning, st = ctx.real, ctx.gen, ctx.binning, ctx.settings
    mar, n_boot = st["margins"], st["n_boot"]
    out, resp = [], {}
    ne = len(binning.energy_edges_mev) + 1
    ie_r = np.digitize(real.energy, binning.energy_edges_mev)
    ie_g = np.digitize(gen.all_energy, binning.energy_edges_mev)
    ratio_r, ratio_g = real.features[:, real.names.index("E_ratio")], gen.all_e_ratio
    for p in binning.particles:
        for ie in range(ne):
            mr, mg = (ie_r == ie) & (real.pdg == p), (ie_g == ie) & (gen.all_pdg == p)
            if mr.sum() < st["min_bin_events"] or mg.sum() < 2:
                continue
            label = binning.response_label(p, ie)
            s = seed_of(ctx.seed, f"response/{label}")
            ma, mb = mr.copy(), mr.copy()
            ma[ctx.draws.half_b], mb[ctx.draws.half_a] = False, False
            v, e = M.response(ratio_r[mr], ratio_g[mg], n_boot=n_boot, seed=s)
            fv, _ = ctx.floors.floor(f"response/{label}", M.response, ratio_r[ma], ratio_r[mb], n_boot=2, seed=s)
            energy_gev = float(np.median(real.energy[mr]) / 1000.0)
            resp[label] = {
                "pdg": p,
                "particle": binning.particle_label(p),
                "ebin": ie,
                "energy_gev": energy_gev,
                "discrete": binning.energies_mev is not None,
                "value": v,
                "error": e,
            }
            out.append(
                two_sided(
                    f"response_mean/{label}",
                    v["mean_shift"],
                    e["mean_shift"],
                    0.0,
                    mar["response_mean"],
                    fv["mean_shift"],
                )
            )
            out.append(
                two_sided(
                    f"resolution/{label}",
                    v["resolution_ratio"],
                    e["resolution_ratio"],
                    1.0,
                    mar["resolution"],
                    fv["resolution_ratio"],
                )
            )
    return out, {"response": resp}


@register("FPD/KPD", metrics=("fpd", "kpd"), tests=("fpd", "kpd"))
def distances(ctx: Context) -> FamilyResult:
    """FPD and KPD on the standardised features (the metrics standardise with the real sample)."""
    from surrogate import metrics as M

    d, fl, mar = ctx.draws, ctx.floors, ctx.settings["margins"]
    ra, rb, g = ctx.real.features[d.half_a], ctx.real.features[d.half_b], ctx.gen.features[d.gen_b]
    nf = d.sizes.fpd_events
    fpd_kw = {"min_samples": max(nf // 4, 10), "max_samples": nf, "num_points": 5, "num_batches": 10}
    s = seed_of(ctx.seed, "fpd")
    # generated value from the same sample sizes as the floor (half A vs |B| generated events): the
    # extrapolation removes the resampling bias, not the finite-sample distance between two samples
    fv = fl.floor("fpd", M.fpd, ra, rb, seed=s, **fpd_kw)
    gv = fl.generated(fv, M.fpd, ra, g, seed=s, **fpd_kw)
    out = [worse_than_floor("fpd", gv[0], gv[1], fv[0], fv[1], mar["fpd"])]
    kpd_kw = {"num_batches": ctx.settings["subsample"]["kpd_batches"], "batch_size": d.sizes.kpd_batch_size}
    s = seed_of(ctx.seed, "kpd")
    fv = fl.floor("kpd", M.kpd, ra, rb, **kpd_kw, seed=s)
    gv = fl.generated(fv, M.kpd, ra, g, **kpd_kw, seed=s)
    out.append(worse_than_floor("kpd", gv[0], gv[1], fv[0], fv[1], mar["kpd"]))
    return out, {}


def _classifier_voxels(real: Any, cap: int) -> np.ndarray | None:
    """The voxels the voxel classifier reads: every one (None) up to ``cap`` of them (0: no cap), else the
    ``cap`` most often hit in the real showers kept (sorted). The classifier's time grows with its inputs
    (2000 events a class: 10 s at 6,480 voxels for 21 boosting iterations); the voxels a shower rarely
    reaches carry little of what tells samples apart, and the floor is taken on the same voxels."""
    n = real.showers.shape[1]
    if cap <= 0 or cap >= n:
        return None
    hits = np.count_nonzero(real.showers > 0, axis=0)
    return np.sort(np.argsort(-hits, kind="stable")[:cap])


def _classifier(ctx: Context, on_voxels: bool) -> FamilyResult:
    """Classifier two-sample test at the floor's sample sizes, on high-level features or on voxels."""
    from surrogate import metrics as M

    d, sub = ctx.draws, ctx.settings["subsample"]
    nv = d.sizes.voxel_classifier_events
    kw = {
        "max_events": nv if on_voxels else d.sizes.classifier_events,
        "max_iter": sub["classifier_iterations"],
        "n_boot": ctx.settings["n_boot"],
        "seed": seed_of(ctx.seed, "classifier_auc"),
    }
    if on_voxels:
        # 63 bins per voxel, not 255: ~30 training events a bin here. Measured (2000 events a class,
        # 533 voxels, 3 seeds): the same AUCs (real vs real 0.499/0.502, energy x1.1 0.511/0.509, the
        # quality preset's generator 0.9969/0.9975) in half the time (2.2 s instead of 5.5 s for the
        # 100 iterations a distinguishable sample takes)
        kw["max_bins"] = 63
        cols = _classifier_voxels(ctx.real, d.sizes.voxel_classifier_voxels)
        key, ra, rb, g = (
            f"classifier_auc/voxels@{nv}" + ("" if cols is None else f"x{len(cols)}"),
            ctx.real.voxels_of(d.half_a, cols),
            ctx.real.voxels_of(d.half_b, cols),
            ctx.gen.voxels if cols is None else ctx.gen.voxels[:, cols],
        )
    else:
        rf = ctx.real.features
        key, ra, rb, g = "classifier_auc/features", rf[d.half_a], rf[d.half_b], ctx.gen.features[d.gen_b]
    fv = ctx.floors.floor(key, M.classifier_auc, ra, rb, **kw)
    gv = ctx.floors.generated(fv, M.classifier_auc, ra, g, **kw)
    return [worse_than_floor(key.split("@")[0], gv[0], gv[1], fv[0], fv[1], ctx.settings["margins"]["auc"])], {}


@register("classifier AUC, features", metrics=("classifier_auc",), tests=("classifier_auc/features",))
def classifier_features(ctx: Context) -> FamilyResult:
    """Classifier AUC on the high-level features."""
    return _classifier(ctx, on_voxels=False)


@register("classifier AUC, voxels", metrics=("classifier_auc",), tests=("classifier_auc/voxels",))
def classifier_voxels(ctx: Context) -> FamilyResult:
    """Classifier AUC on the voxel showers."""
    return _classifier(ctx, on_voxels=True)


@register("PRDC/diversity", metrics=("prdc", "diversity_ratio"), tests=("prdc/", "diversity/all"))
def coverage(ctx: Context) -> FamilyResult:
    """PRDC at equal sizes and the overall diversity."""
    from surrogate import metrics as M

    d, fl, mar = ctx.draws, ctx.floors, ctx.settings["margins"]
    ra, rb, g = ctx.real.features[d.half_a], ctx.real.features[d.half_b], ctx.gen.features[d.gen_b]
    kw = {
        "k": ctx.settings["subsample"]["prdc_k"],
        "max_events": d.sizes.prdc_events,
        "seed": seed_of(ctx.seed, "prdc"),
    }
    fv = fl.floor("prdc", M.prdc, ra, rb, **kw)
    gv = fl.generated(fv, M.prdc, ra, g, **kw)
    out = [
        worse_than_floor(f"prdc/{key}", gv[0][key], gv[1][key], fv[0][key], fv[1][key], mar["prdc"], False)
        for key in ("precision", "recall", "density", "coverage")
    ]
    s = seed_of(ctx.seed, "diversity/all")
    n_boot = ctx.settings["n_boot"]
    fv = fl.floor("diversity/all", M.diversity_ratio, ra, rb, n_boot=n_boot, seed=s)
    dv = fl.generated(fv, M.diversity_ratio, ra, g, n_boot=n_boot, seed=s)
    out.append(worse_than_floor("diversity/all", dv[0], dv[1], fv[0], fv[1], mar["diversity"], False))
    return out, {}


@register(
    "mode coverage",
    metrics=("mode_fraction_test", "cluster_occupancy"),
    tests=("mode_fraction/", "cluster_occupancy/"),
)
def modes(ctx: Context) -> FamilyResult:
    """Mode coverage: predicted truth-mode fractions (or k-means occupancy without truth modes)."""
    clf = mode_classifier(ctx.floors.store, ctx.train, ctx.settings, ctx.seed, ctx.binning.particles)
    if clf is None:
        return _cluster_occupancy(ctx)
    g_mode = ctx.draws.gen_mode
    lr = ctx.floors.floor("mode_labels/real", predict_modes, clf, ctx.real)
    if ctx.floors.floors_only:
        lg = lr[: len(g_mode)]
    elif ctx.gen.modes is not None:  # predicted while the file streamed
        lg = ctx.gen.modes[g_mode]
    else:
        lg = predict_modes(clf, ctx.gen, g_mode)
    return _mode_fractions(ctx, lr, lg)


def _mode_fractions(ctx: Context, lr: np.ndarray, lg: np.ndarray) -> FamilyResult:
    """G-tests of the predicted-mode fractions ``lr`` (real, (N,)) vs ``lg`` (generated, the mode
    test's events), overall and per condition bin."""
    from surrogate import metrics as M

    d, binning, n = ctx.draws, ctx.binning, len(ctx.real.energy)
    n_modes = max(len(ctx.real.mode_names), 1, int(max(lr.max(), lg.max())) + 1)
    result: dict[str, Any] = {"names": ctx.real.mode_names, "bins": {}}
    out: list[Test] = []
    for b in [None, *(rows.bin for rows in d.per_bin)]:
        mr = np.ones(n, bool) if b is None else d.real_bins == b
        mg = np.ones(len(lg), bool) if b is None else d.gen_bins[d.gen_mode] == b
        v, _ = M.mode_fraction_test(lr[mr], lg[mg], n_modes)
        ma, mb = mr.copy(), mr.copy()
        ma[d.half_b], mb[d.half_a] = False, False
        label = "all" if b is None else binning.label(b)
        fv, _ = ctx.floors.floor(f"mode_fraction/{label}", M.mode_fraction_test, lr[ma], lr[mb], n_modes)
        out.append(
            pvalue_test(f"mode_fraction/{label}", v["statistic"], v["pvalue"], fv["pvalue"], ctx.settings["alpha"])
        )
        result["bins"][label] = {
            "real": np.bincount(lr[mr], minlength=n_modes).tolist(),
            "gen": np.bincount(lg[mg], minlength=n_modes).tolist(),
            "ebin": None if b is None else binning.energy_bin(b),
            "etabin": None if b is None else binning.eta_bin(b),
            "pdg": None if b is None else binning.particle(b),
        }
    result["method"] = "truth-mode classifier per particle (HistGradientBoosting on train-split features)"
    return out, {"modes": result}


def _cluster_occupancy(ctx: Context) -> FamilyResult:
    """Without truth modes: k-means occupancy of the real clusters."""
    from surrogate import metrics as M

    d, rf, gf = ctx.draws, ctx.real.features, ctx.gen.features
    k, s = ctx.settings["subsample"]["clusters"], seed_of(ctx.seed, "cluster_occupancy")
    fv, _ = ctx.floors.floor("cluster_occupancy", M.cluster_occupancy, rf[d.half_a], rf[d.half_b], k=k, seed=s)
    v, _ = ctx.floors.generated((fv, None), M.cluster_occupancy, rf, gf, k=k, seed=s)
    test = pvalue_test("cluster_occupancy/all", v["statistic"], v["pvalue"], fv["pvalue"], ctx.settings["alpha"])
    result = {
        "names": ctx.real.mode_names,
        "bins": {},
        "method": "k-means occupancy (no truth modes in the test split)",
    }
    return [test], {"modes": result}


#: The order the families run in, in a thread pool: the short ones whose results are plotted first,
#: then the longest first (the classifiers of a distinguishable sample boost to the last iteration:
#: the voxel one then takes seconds).
RUN_ORDER = (
    "response",
    "mode coverage",
    "classifier AUC, voxels",
    "PRDC/diversity",
    "1-D tests",
    "classifier AUC, features",
    "FPD/KPD",
)
#: The families of :data:`RUN_ORDER` that feed the plots (run before the plotting process is waited for).
PLOTTED = 2
#: Names in :data:`surrogate.metrics.METRICS` that the families run; the tests check that it covers
#: the whole registry, so a metric added there is not silently left out of the verdict.
USED_METRICS = frozenset().union(*(f.metrics for f in FAMILIES.values()))
