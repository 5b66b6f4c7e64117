"""Start-up and calls by name for the validate stage's worker processes (started the "spawn" way).

Kept apart and light (threadpoolctl only): a function sent to a worker is pickled by reference,
so the worker imports its module; calling :func:`call` with a module name imports only that one
(a reader imports numpy and h5py, the plotting process matplotlib, neither scikit-learn).
"""

from __future__ import annotations

import importlib
from typing import Any

from threadpoolctl import threadpool_limits

__all__ = ["init", "ready", "call"]


def init() -> None:
    """Worker-process initializer: one BLAS/OpenMP thread, since the workers already fill the cores."""
    threadpool_limits(limits=1)


def ready() -> None:
    """No-op task: makes a fresh worker process start (and import) before the real work arrives."""


def call(module: str, name: str, *args: Any) -> Any:
    """``module.name(*args)``, importing ``module`` first."""
    return getattr(importlib.import_module(module), name)(*args)
