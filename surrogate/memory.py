"""The memory budget of a stage (config ``memory_gb``): hold a split whole, or stream it.

Each stage estimates what holding its data whole would take (a stage's own factor: train keeps the
raw showers, their network-space copy and the fits' temporaries, so seven times the train split)
and compares it with the budget. Within it, nothing changes: the default 533-voxel run holds its
60k showers in RAM, as it always did. Above it, the stage streams:

- ingest writes ``dataset.h5`` lzf-compressed (when ``ingest.compression`` is ``none``) in chunks of
  whole rows, at most :data:`CHUNK_BYTES` each (:func:`surrogate.ingest.chunk_rows`), the unit the
  other stages read;
- train reads the train split in shuffled chunks (:class:`surrogate.data.ShuffledChunks`) and fits
  the response template and the critic's physics inputs on a random part of it;
- validate streams the real splits as it streams the generated file, keeping the voxels of only the
  rows the voxel classifier uses.

Block, window and batch sizes are shares of the budget (:func:`rows_within`), so the peak RSS of a
streaming stage stays a fraction of ``memory_gb`` whatever the voxel count.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["GIB", "CHUNK_BYTES", "budget_bytes", "fits", "rows_within", "train_bytes", "validate_bytes"]

log = logging.getLogger(__name__)

GIB = 1 << 30
#: HDF5 chunk of showers ingest writes when it streams (whole rows): a compressed chunk is decompressed
#: whole by any read that touches it, so readers read whole chunks, and a chunk must be small enough to
#: be one of a hundred in a training window (2 MiB: 12 rows at 40,500 voxels, 80 at 6,480).
CHUNK_BYTES = 2 << 20


def budget_bytes(cfg: dict[str, Any]) -> int:
    """The ``memory_gb`` budget in bytes."""
    return int(float(cfg.get("memory_gb", 8.0)) * GIB)


def fits(nbytes: int, cfg: dict[str, Any], what: str) -> bool:
    """Whether holding ``nbytes`` (an estimate) stays within the budget; logs the decision."""
    budget = budget_bytes(cfg)
    ok = nbytes <= budget
    log.info(
        "%s: %.2f GB whole against memory_gb %.2f GB: %s",
        what,
        nbytes / GIB,
        budget / GIB,
        "held in RAM" if ok else "streamed",
    )
    return ok


def rows_within(row_bytes: int, share: float, cfg: dict[str, Any], at_least: int = 1) -> int:
    """Rows of ``row_bytes`` each that take at most ``share`` of the budget (never fewer than ``at_least``)."""
    return max(int(at_least), int(budget_bytes(cfg) * share) // max(int(row_bytes), 1))


def train_bytes(n_train: int, n_val: int, n_voxels: int) -> int:
    """What the train stage holds at its peak with its splits whole: the train showers and their
    network-space copy, and while the critic's inputs are fitted their shares E/E_inc, another network-space
    copy and the transform's temporaries (7 x the train showers), and the val showers."""
    return (7 * int(n_train) + int(n_val)) * int(n_voxels) * 4


def validate_bytes(n_real: int, n_mode_train: int, n_voxels: int) -> int:
    """What the validate stage holds with the real splits whole: the reference split's showers and the
    voxel classifier's copy of its halves (2 x), and the train rows of the mode classifier."""
    return (2 * int(n_real) + int(n_mode_train)) * int(n_voxels) * 4
