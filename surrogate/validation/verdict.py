"""One verdict-bearing test (:class:`Test`), the three ways a metric becomes one, and Holm's correction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Test", "worse_than_floor", "two_sided", "pvalue_test", "normal_sf", "apply_holm"]


@dataclass
class Test:
    """One verdict-bearing test: its metric value and the p-value that decides it."""

    name: str
    value: float
    error: float
    floor: float | None
    threshold: float | None
    pvalue: float
    kind: str
    pvalue_holm: float = 1.0
    passed: bool = True

    def as_dict(self) -> dict[str, Any]:
        def clean(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else float(x)

        return {
            "name": self.name,
            "value": clean(self.value),
            "error": clean(self.error),
            "floor": clean(self.floor),
            "threshold": clean(self.threshold),
            "passed": bool(self.passed),
            "kind": self.kind,
            "pvalue": clean(self.pvalue),
            "pvalue_holm": clean(self.pvalue_holm),
        }


def worse_than_floor(
    name: str, value: float, err: float, floor: float, floor_err: float, margin: float, higher_is_worse: bool = True
) -> Test:
    """One-sided test of H0 "value is no worse than floor + margin"; sigma = both errors in quadrature."""
    sigma = math.hypot(err, floor_err)
    sign = 1.0 if higher_is_worse else -1.0
    threshold = floor + sign * margin
    excess = sign * (value - threshold)
    if sigma > 0:
        p = normal_sf(excess / sigma)
    else:
        p = 0.0 if excess > 0 else 1.0
    return Test(name, value, err, floor, threshold, p, "floor")


def two_sided(name: str, value: float, err: float, target: float, margin: float, floor: float | None) -> Test:
    """Two-sided test of H0 "|value - target| <= margin" (p-value of the excess)."""
    excess = abs(value - target) - margin
    p = min(1.0, 2.0 * normal_sf(excess / err)) if err > 0 else (0.0 if excess > 0 else 1.0)
    return Test(name, value, err, floor, margin, p, "two_sided")


def pvalue_test(name: str, stat: float, p: float, floor_p: float | None, alpha: float) -> Test:
    """A test decided by a p-value of its own (KS, G-test): the floor is the real-vs-real p-value."""
    return Test(name, stat, 0.0, floor_p, alpha, p, "pvalue")


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z (what scipy.stats.norm.sf computes, from the standard library)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def apply_holm(tests: list[Test], alpha: float) -> None:
    """Fill in Holm-adjusted p-values and pass flags (in place)."""
    from surrogate.metrics import holm

    if not tests:
        return
    adj = holm(np.clip([t.pvalue for t in tests], 0.0, 1.0))
    for t, a in zip(tests, adj, strict=True):
        t.pvalue_holm = float(a)
        t.passed = bool(a > alpha)
