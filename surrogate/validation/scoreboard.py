"""The headline scoreboard of a validation: the few numbers to judge (and sort) runs by.

:func:`headline` reads them from a ``summary.json`` dict; it adds nothing to the summary, so the
report page (:mod:`~surrogate.validation.html`) and the MLflow run (:mod:`surrogate.report`) show
the same numbers.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["headline"]

#: (row name, label, test name in summary.json) of the floor-relative tests shown as they are.
_FLOOR_TESTS = (
    ("auc_features", "classifier AUC, high-level features", "classifier_auc/features"),
    ("auc_voxels", "classifier AUC, voxels", "classifier_auc/voxels"),
    ("fpd", "FPD (Fréchet distance of the standardised features)", "fpd"),
    ("kpd", "KPD (kernel distance of the standardised features)", "kpd"),
    ("precision", "PRDC precision", "prdc/precision"),
    ("recall", "PRDC recall", "prdc/recall"),
    ("density", "PRDC density", "prdc/density"),
    ("coverage", "PRDC coverage", "prdc/coverage"),
)
#: Kinds of the per-feature 1-D tests ("<kind>/<all or bin>/<feature>").
_FEATURE_TESTS = ("separation", "wasserstein", "ks")


def _row(
    name: str,
    label: str,
    value: float | None,
    *,
    error: float | None = None,
    floor: float | None = None,
    threshold: float | None = None,
    passed: bool | None = None,
    total: int | None = None,
    test: str | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "value": value,
        "error": error,
        "floor": floor,
        "threshold": threshold,
        "passed": passed,
        "total": total,
        "test": test,
    }


def _from_test(name: str, label: str, m: dict[str, Any]) -> dict[str, Any]:
    return _row(
        name,
        label,
        m["value"],
        error=m["error"],
        floor=m["floor"],
        threshold=m["threshold"],
        passed=bool(m["passed"]),
        test=m["name"],
    )


def _count(name: str, label: str, tests: list[dict[str, Any]]) -> dict[str, Any]:
    """Tests passed out of ``tests``; passed when all are."""
    n_pass = sum(bool(m["passed"]) for m in tests)
    return _row(name, label, n_pass, passed=n_pass == len(tests), total=len(tests))


def _worst(name: str, label: str, tests: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The test whose value is furthest from ``target`` (None values skipped), or None without one."""
    tests = [m for m in tests if m["value"] is not None]
    if not tests:
        return None
    m = max(tests, key=lambda m: abs(m["value"] - target))
    return _from_test(name, f"{label} ({m['name'].split('/', 1)[-1]})", m)


def _feature_group(feature: str) -> str:
    """``E_layer_12`` -> ``E_layer``: a per-layer feature's quantity; ``E_ratio`` stays itself."""
    return re.sub(r"_\d+$", "", feature)


def headline(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline rows of a validation ``summary`` (the dict of ``summary.json``), in display order.

    Each row is a dict with the keys

    - ``name``: short identifier, also the MLflow metric ``headline.<name>`` (letters, digits, ``_``, ``.``);
    - ``label``: what the row is, for people;
    - ``value``: a number (float or int; None when the summary has none);
    - ``error``, ``floor``, ``threshold``: those of the test the row shows, or None;
    - ``passed``: True/False, or None for a number that is not judged (``n_tests``);
    - ``total``: for a count (``value`` of ``total`` tests passed or failed), else None;
    - ``test``: the name of the test in ``summary["metrics"]`` the row shows, or None.

    Rows (a row whose tests are absent from the summary is left out):

    - ``verdict`` (1.0 PASS, 0.0 FAIL), ``n_tests``, ``n_failed`` (passed when 0);
    - ``auc_features``, ``auc_voxels`` (classifier AUCs), ``fpd``, ``kpd``, ``precision``,
      ``recall``, ``density``, ``coverage`` (PRDC): value, error, floor and threshold of that test;
    - ``mode_bins_passed``: mode-coverage tests passed (overall and per condition bin; k-means
      occupancy without truth modes), of ``total``;
    - ``response_shift_worst``: the response-mean test with the largest |gen/real - 1| of the mean
      E_dep/E_inc over the (particle, energy) bins; ``resolution_ratio_worst``: the resolution test
      whose gen/real ratio is furthest from 1;
    - ``failed.<group>``: failed per-feature 1-D tests (separation, W1, KS; overall and per bin)
      of each feature group (``E_layer`` for ``E_layer_0``, ``E_layer_1``, ...), of ``total``.
    """
    metrics = summary.get("metrics", [])
    by_name = {m["name"]: m for m in metrics}

    def prefixed(prefix: str) -> list[dict[str, Any]]:
        return [m for m in metrics if m["name"].startswith(prefix)]

    verdict = summary.get("verdict")
    n_tests = summary.get("n_tests", len(metrics))
    n_failed = summary.get("n_failed", sum(not m["passed"] for m in metrics))
    passed = None if verdict is None else verdict == "PASS"
    rows = [
        _row("verdict", "verdict", None if verdict is None else float(passed), passed=passed),
        _row("n_tests", "tests", n_tests),
        _row("n_failed", "failed tests (Holm-corrected)", n_failed, threshold=0, passed=n_failed == 0, total=n_tests),
    ]
    rows += [_from_test(name, label, by_name[test]) for name, label, test in _FLOOR_TESTS if test in by_name]
    modes = prefixed("mode_fraction/") or prefixed("cluster_occupancy/")
    if modes:
        what = "truth-mode fractions" if modes[0]["name"].startswith("mode_fraction/") else "k-means occupancy"
        rows.append(_count("mode_bins_passed", f"mode coverage ({what}): overall and per-bin tests passed", modes))
    worst = (
        _worst("response_shift_worst", "worst response mean shift", prefixed("response_mean/"), 0.0),
        _worst("resolution_ratio_worst", "worst resolution ratio gen/real", prefixed("resolution/"), 1.0),
    )
    rows += [row for row in worst if row is not None]
    groups: dict[str, list[dict[str, Any]]] = {}
    for m in metrics:
        parts = m["name"].split("/")
        if parts[0] in _FEATURE_TESTS and len(parts) >= 3:
            groups.setdefault(_feature_group(parts[-1]), []).append(m)
    for group, tests in groups.items():
        n_fail = sum(not m["passed"] for m in tests)
        rows.append(
            _row(
                f"failed.{group}",
                f"failed 1-D tests of {group}",
                n_fail,
                threshold=0,
                passed=n_fail == 0,
                total=len(tests),
            )
        )
    return rows
