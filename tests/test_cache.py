"""The artifact cache: keys, atomic completion, kill safety, one writer."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dataselect import cache
from dataselect.cache import (
    COMPLETE,
    content_key,
    file_lock,
    is_complete,
    lock_holder,
    lock_path,
    materialize,
    partial_dir,
    try_lock,
    write_json,
)


def test_content_key_ignores_dict_order_and_sees_values():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_materialize_builds_once_then_hits(tmp_path):
    calls = []

    def build(work):
        calls.append(work)
        (work / "x.txt").write_text("data")

    final = tmp_path / "stage" / "k1"
    assert materialize(final, build) is False
    assert materialize(final, build) is True
    assert len(calls) == 1 and (final / "x.txt").read_text() == "data"
    assert is_complete(final) and not partial_dir(final).exists()


def test_failed_build_leaves_nothing_trusted(tmp_path):
    final = tmp_path / "k"

    def bad(work):
        (work / "half.bin").write_bytes(b"12")
        raise OSError("disk full")

    with contextlib.suppress(OSError):
        materialize(final, bad)
    assert not final.exists() and not is_complete(final)
    # the next run rebuilds from scratch (the partial work dir is wiped)
    materialize(final, lambda w: (w / "ok").write_text("1"))
    assert sorted(p.name for p in final.iterdir()) == [COMPLETE, "ok"]


def test_killed_build_is_not_trusted_and_rerun_rebuilds(tmp_path):
    """kill -9 mid-build: the rerun must not read the half-written artifact."""
    final = tmp_path / "stage" / "key"
    script = textwrap.dedent(
        f"""
        import time, pathlib
        from dataselect.cache import materialize
        def build(work):
            (work / "part1").write_text("half")
            pathlib.Path({str(tmp_path / "started")!r}).write_text("1")
            time.sleep(60)
            (work / "part2").write_text("rest")
        materialize(pathlib.Path({str(final)!r}), build)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 30
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not is_complete(final) and partial_dir(final).exists()
    built = []
    assert materialize(final, lambda w: built.append(sorted(p.name for p in w.iterdir()))) is False
    assert built == [[]], "the rerun must start from an empty work dir, not the killed one"


def test_two_writers_build_once(tmp_path):
    final = tmp_path / "k"
    calls = []

    def slow(work):
        calls.append(1)
        time.sleep(0.3)
        (work / "v").write_text("1")

    with ThreadPoolExecutor(2) as ex:
        hits = sorted(ex.map(lambda _: materialize(final, slow), range(2)))
    assert calls == [1] and hits == [False, True]


# ---------------------------------------------------------------- locks (see also test_concurrency)


def _hold_in_child(path, started, seconds: float, mode: str) -> subprocess.Popen:
    code = (
        "import pathlib, sys, time\n"
        "from dataselect.cache import file_lock\n"
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

    monkeypatch.setattr(cache.fcntl, "flock", no_flock)
    monkeypatch.setattr(cache, "_NO_FLOCK", set())
    monkeypatch.setenv("DATASELECT_LOCK", "auto")
    final = tmp_path / "k"
    modes = []
    with caplog.at_level(logging.INFO, logger="dataselect.cache"):
        materialize(final, lambda w: modes.append(lock_holder(lock_path(final))["mode"]))
        materialize(tmp_path / "k2", lambda w: None)
    assert modes == ["file"] and len(calls) == 1  # remembered for this file system
    assert "flock unsupported" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "k2"]

    monkeypatch.setattr(cache, "_NO_FLOCK", set())
    monkeypatch.setenv("DATASELECT_LOCK", "flock")  # forced: an error, not a fallback
    with pytest.raises(OSError, match="DATASELECT_LOCK=file"):
        materialize(tmp_path / "k3", lambda w: None)
    monkeypatch.setenv("DATASELECT_LOCK", "fcntl")
    with pytest.raises(ValueError, match="DATASELECT_LOCK"):
        materialize(tmp_path / "k4", lambda w: None)


def test_resume_keeps_the_partial_dir_and_stale_final_is_wiped(tmp_path):
    final = tmp_path / "k"
    partial_dir(final).mkdir(parents=True)
    (partial_dir(final) / "shard0").write_text("done")
    final.mkdir()
    (final / "junk").write_text("no marker: never trusted")
    seen = []
    assert materialize(final, lambda w: seen.append(sorted(os.listdir(w))), resume=True) is False
    assert seen == [["shard0"]]
    assert sorted(os.listdir(final)) == [COMPLETE, "shard0"]


def test_write_json_is_atomic_and_leaves_no_temp(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2} and os.listdir(tmp_path) == ["m.json"]
