"""Validate stage entry point: ``python -m surrogate.validate [floors] ...``.

The stage lives in the package :mod:`surrogate.validation` (one module per concern, its
docstring says which); this module keeps the command line and re-exports its public names.

``python -m surrogate.validate --config C --dataset results/ingest/dataset.h5
--generated results/generate/events.h5 --out results/validate [--floors F] [--history H] [--threads N]``
and ``python -m surrogate.validate floors --config C --dataset results/ingest/dataset.h5 --out F``.

A worker process started the "spawn" way imports the parent's main module again (under ``python -m
surrogate.validate``, this one): neither it nor the package imports scikit-learn, scipy or
matplotlib at module level.
"""

from __future__ import annotations

from surrogate.validation import (
    FAMILIES,
    FLOORS_FORMAT,
    USED_METRICS,
    Binning,
    GeneratedSample,
    ModeClassifier,
    RealSample,
    Test,
    ValidateError,
    apply_holm,
    compute_floors,
    evaluate,
    load_generated,
    load_real,
    main,
    match_rows,
    run,
)

__all__ = [
    "FAMILIES",
    "USED_METRICS",
    "FLOORS_FORMAT",
    "ValidateError",
    "RealSample",
    "GeneratedSample",
    "Binning",
    "ModeClassifier",
    "Test",
    "load_real",
    "load_generated",
    "match_rows",
    "evaluate",
    "apply_holm",
    "compute_floors",
    "run",
    "main",
]

if __name__ == "__main__":
    raise SystemExit(main())
