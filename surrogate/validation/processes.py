"""The validate stage's worker processes: readers of the generated file and one plotting process.

Both are started the "spawn" way, which imports the calling script again (under ``python -m
surrogate.validate``, that module and this package: neither imports scikit-learn, scipy or
matplotlib at module level).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from surrogate import workers as W

__all__ = ["Plotter", "start_readers", "plot_rank"]

log = logging.getLogger(__name__)

#: Order of the plots in the report, by file-name prefix.
PLOT_ORDER = ("features_", "response", "modes", "mean_shower_per_layer", "training_curves")


def plot_rank(path: Path) -> tuple[int, str]:
    """Sort key of a plot in the report: by :data:`PLOT_ORDER`, then by name."""
    return next((i for i, p in enumerate(PLOT_ORDER) if path.stem.startswith(p)), len(PLOT_ORDER)), path.stem


def start_readers(workers: int) -> cf.ProcessPoolExecutor:
    """``workers`` fresh ("spawn") processes for :func:`surrogate.stream.run_task`, one BLAS/OpenMP
    thread each, asked to start now (a worker imports numpy and h5py in about 0.2 s)."""
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=W.init)
    for _ in range(workers):
        pool.submit(W.ready)
    return pool


class Plotter:
    """Plots drawn in one separate ("spawn") process while this one runs the tests, or here.

    :meth:`submit` takes a function name of :mod:`surrogate.plots` and its arguments; :meth:`paths`
    returns every written PNG in submission order. If the process fails, the plots are drawn here.
    """

    def __init__(self, separate: bool) -> None:
        self.pool = None
        if separate:
            self.pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=W.init)
            self.pool.submit(W.call, "surrogate.plots", "ready")  # matplotlib is imported while the file streams
        self.jobs: list[tuple[str, tuple[Any, ...], cf.Future | None]] = []

    def submit(self, name: str, *args: Any) -> None:
        fut = None
        if self.pool is not None:
            try:
                fut = self.pool.submit(W.call, "surrogate.plots", name, *args)
            except BrokenProcessPool:  # it died already: drawn here, by paths() (which also logs why)
                fut = cf.Future()
                fut.set_exception(BrokenProcessPool("the plotting process is gone"))
        self.jobs.append((name, args, fut))

    def drain(self) -> None:
        """Wait until every plot submitted so far is drawn (or failed: :meth:`paths` handles that)."""
        cf.wait([fut for *_, fut in self.jobs if fut is not None])

    def paths(self) -> list[Path]:
        out: list[Path] = []
        for name, args, fut in self.jobs:
            result = None
            if fut is not None:
                try:
                    result = fut.result()
                except BrokenProcessPool as exc:
                    log.warning("the plotting process failed (%s); drawing %s here", exc, name)
                    fut = None
            if fut is None:
                result = W.call("surrogate.plots", name, *args)
            out.extend(result if isinstance(result, list) else [] if result is None else [result])
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
