"""Locks: holder records, timeouts, heartbeats, the flock / lock-file mechanisms.

See also test_concurrency (real processes, kill -9, stale and racing locks).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from dataselect import locking
from dataselect.cache import lock_path, materialize
from dataselect.locking import file_lock, lock_holder, try_lock


def _hold_in_child(path, started, seconds: float, mode: str) -> subprocess.Popen:
    code = (
        "import pathlib, sys, time\n"
        "from dataselect.locking import file_lock\n"
        "with file_lock(pathlib.Path(sys.argv[1]), what='the thing'):\n"
        "    pathlib.Path(sys.argv[2]).touch()\n"
        f"    time.sleep({seconds})\n"
    )
    env = {**os.environ, "DATASELECT_LOCK": mode}
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(started)], env=env)
    deadline = time.time() + 30
    while not started.exists() and time.time() < deadline:
        time.sleep(0.01)
    return proc


@pytest.mark.parametrize("mode", ["flock", "file"])
def test_try_lock_and_timeout_name_the_holder(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("DATASELECT_LOCK", mode)
    path = tmp_path / ".x.lock"
    with try_lock(path) as mine:
        assert mine is True
        assert lock_holder(path)["pid"] == os.getpid() and lock_holder(path)["mode"] == mode
        with try_lock(path) as again:  # not re-entrant: a second taker is refused
            assert again is False
    assert not path.exists()  # released and removed

    proc = _hold_in_child(path, tmp_path / "started", 2.0, mode)
    try:
        with try_lock(path) as mine:
            assert mine is False
        with (
            pytest.raises(TimeoutError, match=f"pid {proc.pid} on host"),
            file_lock(path, timeout=0.2),
        ):
            pytest.fail("must not get the lock")
    finally:
        proc.kill()
        proc.wait()
    with file_lock(path, timeout=5):  # killed: flock dropped / dead pid broken
        assert lock_holder(path)["pid"] == os.getpid()


def test_heartbeat_is_rewritten_while_held(tmp_path):
    path = tmp_path / ".x.lock"
    with file_lock(path, heartbeat=0.05):
        first = lock_holder(path)
        time.sleep(0.3)
        now = lock_holder(path)
    assert now["heartbeat"] > first["heartbeat"] and now["started"] == first["started"]
    assert now["host"] == socket.gethostname() and now["token"] == first["token"]


def test_auto_mode_falls_back_to_lock_files_where_flock_fails(tmp_path, monkeypatch, caplog):
    calls = []

    def no_flock(fd, op):
        calls.append(op)
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locking.fcntl, "flock", no_flock)
    monkeypatch.setattr(locking, "_NO_FLOCK", set())
    monkeypatch.setenv("DATASELECT_LOCK", "auto")
    final = tmp_path / "k"
    modes = []
    with caplog.at_level(logging.INFO, logger="dataselect.locking"):
        materialize(final, lambda w: modes.append(lock_holder(lock_path(final))["mode"]))
        materialize(tmp_path / "k2", lambda w: None)
    assert modes == ["file"] and len(calls) == 1  # remembered for this file system
    assert "flock unsupported" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "k2"]

    monkeypatch.setattr(locking, "_NO_FLOCK", set())
    monkeypatch.setenv("DATASELECT_LOCK", "flock")  # forced: an error, not a fallback
    with pytest.raises(OSError, match="DATASELECT_LOCK=file"):
        materialize(tmp_path / "k3", lambda w: None)
    monkeypatch.setenv("DATASELECT_LOCK", "fcntl")
    with pytest.raises(ValueError, match="DATASELECT_LOCK"):
        materialize(tmp_path / "k4", lambda w: None)
