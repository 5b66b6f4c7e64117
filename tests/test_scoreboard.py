"""The headline scoreboard: known rows of a known summary, and the report page shows it first."""

from __future__ import annotations

from typing import Any

import pytest

from surrogate.validation import headline
from surrogate.validation.html import render


def _m(
    name: str,
    value: float,
    passed: bool = True,
    floor: float | None = None,
    threshold: float | None = None,
    error: float = 0.0,
) -> dict[str, Any]:
    return {
        "name": name,
        "value": value,
        "error": error,
        "floor": floor,
        "threshold": threshold,
        "passed": passed,
        "kind": "floor",
        "pvalue": 0.5,
        "pvalue_holm": 1.0 if passed else 0.0,
    }


SUMMARY = {
    "verdict": "FAIL",
    "alpha": 0.01,
    "n_tests": 16,
    "n_failed": 5,
    "real_events": 100,
    "generated_events_in_file": 1000,
    "generated_events_matched": 900,
    "subsample": {"prdc_events": 50},
    "metrics": [
        _m("separation/all/E_layer_0", 0.01),
        _m("ks/all/E_layer_12", 0.3, passed=False),
        _m("wasserstein/pdg22_E0-10GeV_eta0-0.75/E_layer_1", 0.2, passed=False),
        _m("ks/all/E_ratio", 0.02),
        _m("response_mean/pdg22_Ebin0", 0.004, floor=0.001, threshold=0.01, error=0.002),
        _m("response_mean/pdg211_Ebin1", -0.03, passed=False, floor=-0.002, threshold=0.01, error=0.005),
        _m("resolution/pdg22_Ebin0", 1.2, floor=1.01, threshold=0.05),
        _m("resolution/pdg211_Ebin1", 0.7, passed=False, floor=0.99, threshold=0.05),
        _m("fpd", 3.0, passed=False, floor=0.01, threshold=0.06, error=0.1),
        _m("kpd", 0.001, floor=0.0005, threshold=0.0055),
        _m("classifier_auc/features", 0.51, floor=0.5, threshold=0.52, error=0.01),
        _m("classifier_auc/voxels", 0.53, floor=0.505, threshold=0.525),
        _m("prdc/coverage", 0.9, floor=0.95, threshold=0.9),
        _m("diversity/all", 0.97),
        _m("mode_fraction/all", 3.0),
        _m("mode_fraction/pdg22_E0-10GeV_eta0-0.75", 9.0),
    ],
}


def test_headline_of_a_known_summary() -> None:
    rows = {r["name"]: r for r in headline(SUMMARY)}
    assert list(rows)[:3] == ["verdict", "n_tests", "n_failed"]
    assert rows["verdict"]["value"] == 0.0 and rows["verdict"]["passed"] is False
    assert (rows["n_tests"]["value"], rows["n_tests"]["passed"]) == (16, None)
    assert (rows["n_failed"]["value"], rows["n_failed"]["total"], rows["n_failed"]["passed"]) == (5, 16, False)
    fpd = rows["fpd"]
    assert (fpd["value"], fpd["error"], fpd["floor"], fpd["threshold"], fpd["passed"]) == (3.0, 0.1, 0.01, 0.06, False)
    assert fpd["test"] == "fpd"
    assert rows["auc_features"]["value"] == 0.51 and rows["auc_features"]["passed"] is True
    assert rows["auc_voxels"]["floor"] == 0.505 and rows["auc_voxels"]["test"] == "classifier_auc/voxels"
    assert rows["coverage"]["value"] == 0.9 and rows["kpd"]["value"] == 0.001
    assert "precision" not in rows  # absent from the summary: no row
    assert (rows["mode_bins_passed"]["value"], rows["mode_bins_passed"]["total"]) == (2, 2)
    assert rows["mode_bins_passed"]["passed"] is True
    shift = rows["response_shift_worst"]  # the largest |shift|, with its sign
    assert (shift["value"], shift["test"], shift["passed"]) == (-0.03, "response_mean/pdg211_Ebin1", False)
    res = rows["resolution_ratio_worst"]  # 0.7 is further from 1 than 1.2
    assert (res["value"], res["floor"], res["test"]) == (0.7, 0.99, "resolution/pdg211_Ebin1")
    # per feature group: E_layer_0, E_layer_1, E_layer_12 are one group; E_ratio its own
    assert (rows["failed.E_layer"]["value"], rows["failed.E_layer"]["total"]) == (2, 3)
    assert rows["failed.E_layer"]["passed"] is False
    assert (rows["failed.E_ratio"]["value"], rows["failed.E_ratio"]["total"], rows["failed.E_ratio"]["passed"]) == (
        0,
        1,
        True,
    )
    for r in rows.values():
        assert set(r) == {"name", "label", "value", "error", "floor", "threshold", "passed", "total", "test"}


def test_headline_without_truth_modes_or_tests() -> None:
    rows = {r["name"]: r for r in headline({"verdict": "PASS", "metrics": [_m("cluster_occupancy/all", 1.0)]})}
    assert rows["verdict"]["value"] == 1.0 and rows["n_failed"]["value"] == 0 and rows["n_tests"]["value"] == 1
    assert (rows["mode_bins_passed"]["value"], rows["mode_bins_passed"]["total"]) == (1, 1)
    assert "k-means" in rows["mode_bins_passed"]["label"]
    assert set(rows) == {"verdict", "n_tests", "n_failed", "mode_bins_passed"}


@pytest.mark.parametrize("verdict", ["PASS", "FAIL"])
def test_report_page_opens_with_the_scoreboard(verdict: str) -> None:
    page = render({**SUMMARY, "verdict": verdict}, [])
    assert page.index("<table") == page.index("<table class='scoreboard'")
    board = page[page.index("<table class='scoreboard'") :]
    board = board[: board.index("</table>")]
    assert "<tr class='fail'><td>FPD" in board
    assert "<td>3</td><td>0.1</td><td>0.01</td><td>0.06</td><td>FAIL</td>" in board  # value, error, floor, threshold
    assert "<td>2 of 3</td>" in board  # E_layer: failed of total
    assert f"<td>verdict</td><td>{verdict}</td>" in board
