"""Atomic outputs: nothing at the target on failure; temporaries of killed writers are cleaned up."""

import os
import socket
import subprocess
import sys

import pytest

from surrogate.io import atomic_path


def test_failure_leaves_no_file(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert not target.exists() and not list(tmp_path.iterdir())


def test_dead_writers_temporary_is_removed_live_ones_kept(tmp_path):
    target = tmp_path / "out.json"
    host = socket.gethostname().replace(".", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.json.{host}.{int(dead.stdout)}.abc123.tmp"
    live = tmp_path / f".out.json.{host}.{os.getppid()}.def456.tmp"  # a running process (pytest's parent)
    other_host = tmp_path / f".out.json.elsewhere.{int(dead.stdout)}.ghi789.tmp"
    for p in (stale, live, other_host):
        p.write_text("partial")
    with atomic_path(target) as tmp:
        tmp.write_text("{}")
    assert target.read_text() == "{}"
    assert not stale.exists()
    assert live.exists() and other_host.exists()
