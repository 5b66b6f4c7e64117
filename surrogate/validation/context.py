"""What every test family works from: the samples, the settings, the seed, every random draw
(made once, in a fixed order, before any family runs) and the cache of real-vs-real floors."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from surrogate.validation.binning import Binning
from surrogate.validation.samples import GeneratedSample, RealSample

__all__ = ["Context", "Draws", "BinRows", "Sizes", "FloorCache", "make_context", "seeds", "seed_of", "subsample"]

log = logging.getLogger(__name__)


def seeds(seed: int, n: int) -> list[int]:
    """``n`` independent seeds from one (the stage uses three: unused, matching, evaluation)."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


def seed_of(seed: int, name: str) -> int:
    """Seed of one named computation, independent of the order the tests run in (and of the generated sample)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


def subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``x`` itself when it has at most ``n`` entries, else ``n`` of them drawn without replacement (sorted)."""
    return x if len(x) <= n else x[np.sort(rng.choice(len(x), n, replace=False))]


@dataclass(frozen=True)
class BinRows:
    """The rows of one condition bin (row indices into the real test split and the feature subsample)."""

    bin: int
    real: np.ndarray  # every real row of the bin
    real_a: np.ndarray  # those in half A
    real_b: np.ndarray  # those in half B
    gen_floor_size: np.ndarray  # generated rows at the size of real_b (the floor's sizes)
    gen_test: np.ndarray  # generated rows for the KS tests, capped like them


@dataclass(frozen=True)
class Sizes:
    """Subsample sizes of the metrics that are slow in N (events), as recorded in ``summary.json``."""

    fpd_events: int
    kpd_batch_size: int
    classifier_events: int
    voxel_classifier_events: int
    prdc_events: int
    voxel_classifier_voxels: int = 0  # voxels the voxel classifier reads (0: every one)


@dataclass(frozen=True)
class Draws:
    """Every random draw of the tests: the real halves A and B (the floors compare them) and the
    generated subsamples, plus the bin of every real and feature-subsample event."""

    half_a: np.ndarray
    half_b: np.ndarray
    real_bins: np.ndarray  # (N,) condition bin of each real event
    gen_bins: np.ndarray  # (m,) condition bin of each feature-subsample event
    gen_b: np.ndarray  # generated events at the size of half B, with the real bin mix
    gen_ks: np.ndarray  # generated events of the overall KS tests (capped by gen_cap)
    gen_mode: np.ndarray  # generated events of the mode test (capped the same way)
    per_bin: tuple[BinRows, ...]  # the bins with at least min_bin_events real events
    sizes: Sizes


class FloorCache:
    """Real-vs-real results by name (they depend only on the real sample, the settings and the seed),
    kept in ``store``; with ``floors_only`` the generated side is skipped and given the floor's value."""

    def __init__(self, store: dict[str, Any], floors_only: bool = False) -> None:
        self.store, self.floors_only = store, floors_only

    def floor(self, key: str, metric: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``metric(*args, **kwargs)`` for a real-vs-real comparison, computed once per ``key``."""
        if key not in self.store:
            self.store[key] = metric(*args, **kwargs)
        return self.store[key]

    def generated(self, stand_in: Any, metric: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``metric(*args, **kwargs)`` on the generated sample; ``stand_in`` (the floor) when floors_only."""
        return stand_in if self.floors_only else metric(*args, **kwargs)


@dataclass(frozen=True)
class Context:
    """The inputs of a test family (:mod:`surrogate.validation.families`)."""

    real: RealSample
    gen: GeneratedSample
    train: RealSample | None  # the mode classifier's events; None without truth modes
    binning: Binning
    settings: dict[str, Any]  # the ``validate`` section of the config
    seed: int
    draws: Draws
    floors: FloorCache


def gen_cap(sub: dict[str, Any], n_real: int) -> int:
    """Generated events in a KS or G-test beside ``n_real`` real ones: the power is set by the
    effective size n_r n_g / (n_r + n_g), already 0.91 n_r at n_g = 10 n_r."""
    return min(sub["gen_test_events"], sub["gen_test_ratio"] * n_real)


def _draw(real: RealSample, gen: GeneratedSample, binning: Binning, settings: dict[str, Any], seed: int) -> Draws:
    """Every random draw, in a fixed order (the results do not depend on the order the families run in)."""
    sub = settings["subsample"]
    rng = np.random.default_rng(seed)
    n, m = len(real.energy), len(gen.energy)
    perm = rng.permutation(n)
    half_a, half_b = np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])
    real_bins = binning.index(real.energy, real.eta, real.pdg)
    gen_bins = binning.index(gen.energy, gen.eta, gen.pdg)
    gen_b = subsample(np.arange(m), len(half_b), rng)
    gen_ks = subsample(np.arange(m), gen_cap(sub, n), rng)
    per_bin = []
    for b in range(binning.n_bins):
        rb_all = np.flatnonzero(real_bins == b)
        if len(rb_all) < settings["min_bin_events"]:
            continue
        ra, rb = np.intersect1d(half_a, rb_all), np.intersect1d(half_b, rb_all)
        g_all = np.flatnonzero(gen_bins == b)
        g_sub = subsample(g_all, len(rb), rng)
        per_bin.append(BinRows(b, rb_all, ra, rb, g_sub, subsample(g_all, gen_cap(sub, len(rb_all)), rng)))
    # generated events capped like the KS tests: the G-test's power is set by the real counts
    gen_mode = subsample(np.arange(m), gen_cap(sub, n), rng)
    na, nb = len(half_a), len(half_b)
    sizes = Sizes(
        fpd_events=min(sub["fpd_events"], na, nb),
        # at most half of each sample per KPD batch: batches of the whole sample would all be the same
        # events, and their spread (the KPD error) zero
        kpd_batch_size=max(2, min(sub["kpd_batch_size"], na // 2, nb // 2)),
        classifier_events=min(sub["classifier_events"], na, nb),
        # a streamed real split keeps the showers of some rows only
        voxel_classifier_events=min(
            sub["voxel_classifier_events"], real.n_voxel_rows(half_a), real.n_voxel_rows(half_b), len(gen.voxels)
        ),
        prdc_events=min(sub["prdc_events"], na, nb),
        voxel_classifier_voxels=min(sub.get("voxel_classifier_voxels", 0), real.geometry.n_voxels),
    )
    return Draws(half_a, half_b, real_bins, gen_bins, gen_b, gen_ks, gen_mode, tuple(per_bin), sizes)


def make_context(
    real: RealSample,
    gen: GeneratedSample,
    train: RealSample | None,
    binning: Binning,
    settings: dict[str, Any],
    seed: int,
    floors: dict[str, Any],
    floors_only: bool = False,
) -> Context:
    """The context of one evaluation: draws made, a small-bin warning logged, ``floors`` as the cache."""
    from surrogate.metrics import MIN_EVENTS_1D

    draws = _draw(real, gen, binning, settings, seed)
    counts = np.bincount(draws.real_bins[draws.real_bins >= 0], minlength=binning.n_bins)
    small = [binning.label(b) for b in range(binning.n_bins) if 0 < counts[b] < MIN_EVENTS_1D]
    if small:
        log.warning(
            "%d condition bins have fewer than %d real events (%s...): per-bin tests are indicative; "
            "their errors include the small size",
            len(small),
            MIN_EVENTS_1D,
            small[0],
        )
    skipped = [binning.label(b) for b in range(binning.n_bins) if 0 < counts[b] < settings["min_bin_events"]]
    if skipped:  # one bin per discrete energy splits a small test split thinly
        log.warning(
            "%d of %d condition bins with real events have fewer than validate.min_bin_events = %d (%s...): "
            "no per-bin tests there (the response tests pool the |eta| bins)",
            len(skipped),
            int(np.sum(counts > 0)),
            settings["min_bin_events"],
            skipped[0],
        )
    return Context(real, gen, train, binning, settings, seed, draws, FloorCache(floors, floors_only))
