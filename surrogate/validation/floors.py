"""The real-vs-real floors: computed once per dataset (``python -m surrogate.validate floors``),
stored as JSON with the identity of everything they depend on, read back only when it matches."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from surrogate import __version__, memory
from surrogate.io import write_json
from surrogate.validation.binning import Binning
from surrogate.validation.context import seeds
from surrogate.validation.modes import sklearn_threads
from surrogate.validation.samples import GeneratedSample, RealSample, load_splits
from surrogate.validation.suite import evaluate

__all__ = [
    "FLOORS_FORMAT",
    "FLOOR_SOURCES",
    "compute_floors",
    "fill_floors",
    "floor_identity",
    "read_floors",
    "source_digest",
    "write_floors",
]

log = logging.getLogger(__name__)

#: Layout version of the floors file (its identity also covers the code that computes the floors).
FLOORS_FORMAT = 1
#: ``validate`` settings that change how the stage runs, not what any floor is.
_RUN_ONLY_SETTINGS = ("threads", "fail_pipeline", "chunk_events", "max_generated_events", "alpha", "margins")
#: The code that computes the floors (a package: every module in it). The ``validate_floors`` rule
#: hashes the same list (workflow/rules/validate.smk), so that a change to it reruns the rule.
FLOOR_SOURCES = (
    "surrogate.features",
    "surrogate.geometry",
    "surrogate.metrics",
    "surrogate.stream",
    "surrogate.validation",
)


def source_files(modules: tuple[str, ...] = FLOOR_SOURCES) -> list[Path]:
    """The source files of ``modules``: a module's file, or every ``.py`` file of a package (sorted)."""
    files: list[Path] = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ImportError(f"no module {name!r} to hash")
        if spec.submodule_search_locations:
            files += sorted(p for d in spec.submodule_search_locations for p in Path(d).rglob("*.py"))
        else:
            files.append(Path(spec.origin))
    return files


def source_digest(modules: tuple[str, ...] = FLOOR_SOURCES) -> str:
    """sha256 over the source of ``modules`` (what workflow/rules/common.smk's ``source_hash`` computes)."""
    h = hashlib.sha256()
    for path in source_files(modules):
        h.update(path.read_bytes())
    return h.hexdigest()


def floor_identity(
    real: RealSample, train: RealSample | None, binning: Binning, settings: dict[str, Any], seed: int
) -> str:
    """sha256 of everything the floors depend on: the real arrays, the condition bins (which the dataset's
    discrete energies set, not the settings alone), the settings, the seed, the code."""
    h = hashlib.sha256()
    for s in (real, train):
        if s is not None:
            # a streamed split kept only some showers, and the digest of all of them
            h.update(s.showers_sha256 if s.showers_sha256 is not None else np.ascontiguousarray(s.showers).tobytes())
            for arr in (s.energy, s.eta, s.pdg, s.mode):
                h.update(np.ascontiguousarray(arr).tobytes())
    used = {k: v for k, v in settings.items() if k not in _RUN_ONLY_SETTINGS}
    identity = {
        "seed": seed,
        "settings": used,
        "binning": binning.to_dict(),
        "format": FLOORS_FORMAT,
        "version": __version__,
    }
    h.update(json.dumps(identity, sort_keys=True).encode())
    # the code that computes them: floors written by an older version are recomputed, never trusted
    for path in source_files():
        h.update(path.read_bytes())
    return h.hexdigest()


def _floor_stand_in(real: RealSample, settings: dict[str, Any]) -> GeneratedSample:
    """The real sample in the generated sample's place, for ``evaluate(floors_only=True)``."""
    n_vox = min(settings["subsample"]["voxel_classifier_events"], len(real.showers))
    ratio = real.features[:, real.names.index("E_ratio")]
    return GeneratedSample(
        real.features,
        real.energy,
        real.eta,
        real.pdg,
        real.showers[:n_vox],
        real.energy,
        real.pdg,
        ratio,
        np.arange(len(ratio)),
        len(real.energy),
        0,
        0.0,
        None,
        0.0,
    )


def fill_floors(
    real: RealSample,
    train: RealSample | None,
    binning: Binning,
    settings: dict[str, Any],
    seed: int,
    floors: dict[str, Any],
    threads: int = 1,
) -> None:
    """Every real-vs-real floor of :func:`evaluate` into ``floors`` (those already there are kept)."""
    with sklearn_threads(settings["sklearn_threads"]):
        stand_in = _floor_stand_in(real, settings)
        evaluate(real, stand_in, train, binning, settings, seed, floors, floors_only=True, threads=threads)


def _encode(x: Any) -> Any:
    """A floor result as JSON-able data (floats round-trip exactly); TypeError for what is not plain data."""
    if isinstance(x, np.ndarray):
        return {"__array__": x.tolist(), "dtype": x.dtype.str}
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v) for v in x]}
    if isinstance(x, dict):
        return {str(k): _encode(v) for k, v in x.items()}
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        return float(x)
    raise TypeError(type(x).__name__)


def _decode(x: Any) -> Any:
    if isinstance(x, dict):
        if "__array__" in x:
            return np.asarray(x["__array__"], dtype=np.dtype(x["dtype"]))
        if "__tuple__" in x:
            return tuple(_decode(v) for v in x["__tuple__"])
        return {k: _decode(v) for k, v in x.items()}
    return x


def write_floors(path: Path, floors: dict[str, Any], identity: str, dataset: str | Path, seconds: float) -> None:
    """``floors`` as JSON in ``path`` (atomic), less what is not plain data (the fitted mode classifier)."""
    data = {}
    for key, value in floors.items():
        try:
            data[key] = _encode(value)
        except TypeError:  # the fitted mode classifier: fitted again where it is needed
            continue
    doc = {
        "format": FLOORS_FORMAT,
        "identity": identity,
        "dataset": str(dataset),
        "seconds": round(seconds, 3),
        "floors": data,
    }
    write_json(path, doc)


def read_floors(path: Path, identity: str) -> dict[str, Any] | None:
    """The floors stored in ``path``, or None (logged) when it is unreadable or for other data or settings."""
    try:
        data = json.loads(path.read_text())
        stored = data["identity"]
        floors = {k: _decode(v) for k, v in data["floors"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: cannot read the floors (%s); computing them here", path, exc)
        return None
    if stored != identity:
        log.warning(
            "%s: the floors were computed for another test split, settings, seed or code version; computing them here",
            path,
        )
        return None
    return floors


def compute_floors(
    cfg: dict[str, Any], dataset: str | Path, out: str | Path, threads: int | None = None, split: str = "test"
) -> dict[str, Any]:
    """Every real-vs-real floor of ``dataset``'s test split (or held-out ``split``), written to ``out``
    (JSON) for :func:`~surrogate.validation.stage.run`, computed in ``threads`` threads (default
    ``validate.threads``)."""
    t0 = time.perf_counter()
    settings, seed = cfg["validate"], int(cfg["seed"])
    s_eval = seeds(seed, 3)[2]
    real, train, binning = load_splits(dataset, settings, split, memory.budget_bytes(cfg), s_eval)
    floors: dict[str, Any] = {}
    fill_floors(real, train, binning, settings, s_eval, floors, threads or settings["threads"])
    identity = floor_identity(real, train, binning, settings, s_eval)
    write_floors(Path(out), floors, identity, dataset, time.perf_counter() - t0)
    log.info("%d real-vs-real floors of %s in %.1f s -> %s", len(floors), dataset, time.perf_counter() - t0, out)
    return floors
