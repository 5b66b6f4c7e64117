"""All the tests of one evaluation: the registered families run (in threads), their results assembled."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from threadpoolctl import threadpool_limits

from surrogate.validation.binning import Binning
from surrogate.validation.context import Context, make_context
from surrogate.validation.families import FAMILIES, PLOTTED, RUN_ORDER, USED_METRICS
from surrogate.validation.samples import GeneratedSample, RealSample
from surrogate.validation.verdict import Test

__all__ = ["evaluate"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_metrics() -> Iterator[None]:
    """Silence the metrics' per-call small-sample warnings (one summary line is logged instead)."""
    mlog = logging.getLogger("surrogate.metrics")
    level = mlog.level
    mlog.setLevel(logging.ERROR)
    try:
        yield
    finally:
        mlog.setLevel(level)


def evaluate(
    real: RealSample,
    gen: GeneratedSample,
    train: RealSample | None,
    binning: Binning,
    settings: dict[str, Any],
    seed: int,
    floors: dict[str, Any] | None = None,
    floors_only: bool = False,
    threads: int = 1,
    on_family: Callable[[str, dict[str, Any]], None] | None = None,
    busy_until: Callable[[], Any] | None = None,
) -> tuple[list[Test], dict[str, Any]]:
    """All tests (before Holm) and the data the plots need.

    ``floors`` caches the real-vs-real results by name: they depend only on the real sample, the
    settings and the seed, so validating several generated files against one dataset reuses them.
    ``floors_only``: fill ``floors`` and skip the expensive generated-side computations (their
    tests then carry the floor's value and are meaningless): :func:`compute_floors` does this.

    The generated side uses ``gen.features`` (the feature subsample) for every distribution test
    and ``gen.all_*`` (every matched event) for the response. The test families
    (:data:`~surrogate.validation.families.FAMILIES`) run in ``threads`` threads (numpy and
    scikit-learn release the GIL in their heavy loops); every random draw is made before they
    start, so the results do not depend on ``threads``. ``on_family(name, info_part)`` is called as
    each family finishes (from its thread), e.g. to plot its results. ``busy_until()``, with
    ``threads > 1``: returns when other work of the caller (a plotting process) frees its core; one
    thread waits for it, after the families that feed the plots.
    """
    from surrogate import metrics as M

    if not USED_METRICS <= set(M.METRICS):
        raise ImportError(f"surrogate.metrics no longer registers {sorted(USED_METRICS - set(M.METRICS))}")
    if sorted(RUN_ORDER) != sorted(FAMILIES):
        raise ImportError(f"RUN_ORDER {RUN_ORDER} does not name every registered test family {list(FAMILIES)}")
    ctx = make_context(real, gen, train, binning, settings, seed, {} if floors is None else floors, floors_only)
    omp_threads = settings["sklearn_threads"]

    def timed(name: str) -> tuple[list[Test], dict[str, Any], float]:
        t0 = time.perf_counter()
        # OpenMP's thread count belongs to each thread (BLAS's is the process's, set by the caller)
        with threadpool_limits(limits=omp_threads, user_api="openmp"):
            out, part = FAMILIES[name].fn(ctx)
        if on_family is not None:
            on_family(name, part)
        return out, part, time.perf_counter() - t0

    with _quiet_metrics():
        if threads > 1:
            with cf.ThreadPoolExecutor(threads, thread_name_prefix="validate") as pool:
                futures = {name: pool.submit(timed, name) for name in RUN_ORDER[:PLOTTED]}
                if busy_until is not None:
                    pool.submit(busy_until)
                futures.update({name: pool.submit(timed, name) for name in RUN_ORDER[PLOTTED:]})
                results = {name: fut.result() for name, fut in futures.items()}
        else:
            results = {name: timed(name) for name in RUN_ORDER}
    return _assemble(ctx, results)


def _assemble(ctx: Context, results: dict[str, tuple[list[Test], dict[str, Any], float]]) -> tuple[list[Test], dict]:
    """The tests in the order of :data:`FAMILIES`, and ``info``: the families' parts, their wall
    times and the subsample sizes."""
    d, sub = ctx.draws, ctx.settings["subsample"]
    tests: list[Test] = []
    info: dict[str, Any] = {
        "halves": [len(d.half_a), len(d.half_b)],
        "generated_matched": len(ctx.gen.all_energy),
        "seconds": {},
    }
    for name in FAMILIES:
        out, part, seconds = results[name]
        tests += out
        info.update(part)
        info["seconds"][name] = seconds
        log.info("%s: %.1f s", name, seconds)
    info["subsample"] = {
        "fpd_max_events": d.sizes.fpd_events,
        "kpd_batch_size": d.sizes.kpd_batch_size,
        "kpd_batches": sub["kpd_batches"],
        "classifier_events_per_class": d.sizes.classifier_events,
        "voxel_classifier_events_per_class": d.sizes.voxel_classifier_events,
        "prdc_events": d.sizes.prdc_events,
        "floor_half_sizes": [len(d.half_a), len(d.half_b)],
        "generated_at_floor_size": len(d.gen_b),
        "generated_feature_events": len(ctx.gen.energy),
        "gen_test_events": sub["gen_test_events"],
        "gen_test_ratio": sub["gen_test_ratio"],
        "n_boot": ctx.settings["n_boot"],
        "mode_classifier_events": sub["mode_classifier_events"],
        "clusters": sub["clusters"],
    }
    # only where they apply (a summary of the default 533-voxel run keeps its bytes)
    if 0 < d.sizes.voxel_classifier_voxels < ctx.real.geometry.n_voxels:
        info["subsample"]["voxel_classifier_voxels"] = d.sizes.voxel_classifier_voxels  # the most often hit
    if ctx.real.shower_rows is not None:  # memory_gb: the real split read in blocks, some showers kept
        info["subsample"]["real_showers_kept"] = len(ctx.real.showers)
    return tests, info
