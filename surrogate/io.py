"""File helpers shared by the stages: atomic outputs, hashing, JSON, logging set-up."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_json", "sha256_file", "setup_logging", "ProgressBar"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or exception inside the block leaves no file at ``path`` (and no temporary
    file either), so a reader never sees a half-written output. The temporary name carries the
    host and process id, ``.NAME.HOST.PID.XXXX.tmp``: one left behind by a writer that was killed
    (``kill -9``, OOM) on this host is removed the next time ``path`` is written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace(".", "_")
    _remove_dead_temporaries(path, host)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{host}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes the file private (0600); outputs get the permissions a plain open() would give
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _remove_dead_temporaries(path: Path, host: str) -> None:
    """Delete ``atomic_path`` temporaries of ``path`` written on ``host`` by processes that no longer run."""
    prefix = f".{path.name}.{host}."
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix) :].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        logging.getLogger(__name__).warning("removing %s, left by killed process %s", tmp, pid)
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, paths
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr with timestamps (Snakemake rules redirect stderr to the rule's log)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def ProgressBar(**kwargs: Any):  # noqa: N802 - reads like a class at call sites
    """A tqdm bar on stderr; quiet when stderr is not a terminal unless SURROGATE_PROGRESS=1.

    Under Snakemake stderr goes to a log file, where tqdm still writes a line per update
    interval (``mininterval`` is raised so logs stay short).
    """
    from tqdm.auto import tqdm

    interactive = os.isatty(2)
    kwargs.setdefault("mininterval", 0.5 if interactive else 10.0)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("disable", os.environ.get("SURROGATE_PROGRESS", "1") == "0")
    return tqdm(**kwargs)
