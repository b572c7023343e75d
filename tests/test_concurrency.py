"""Cache locks under real concurrency: separate processes, kill -9, stale and racing locks.

Every process here is a short ``python -c`` child importing only ``dataselect.cache`` or
``dataselect.locking``; waits are bounded (``timeout`` on locks, ``communicate`` and polling
deadlines), and no model is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dataselect import locking
from dataselect.cache import is_complete, lock_path, materialize
from dataselect.locking import file_lock, lock_holder, try_lock

LINE = "0123456789abcdef" * 4 + "\n"
CHUNKS = 20

WORKER = """
import json, logging, os, pathlib, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
from dataselect.cache import materialize
cfg = json.loads(sys.argv[1])
final, line = pathlib.Path(cfg["final"]), cfg["line"]
if cfg.get("barrier"):
    pathlib.Path(cfg["barrier"], f"ready-{os.getpid()}").touch()
    while not pathlib.Path(cfg["barrier"], "go").exists():
        time.sleep(0.005)

def build(work):
    with open(cfg["log"], "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    if cfg.get("keep"):
        (work / "kept").write_text(str(sorted(p.name for p in work.iterdir())))
    with open(work / "data.txt", "w") as fh:  # written slowly: a reader could catch it half-done
        for _ in range(cfg["chunks"]):
            fh.write(line)
            fh.flush()
            if cfg.get("started"):
                pathlib.Path(cfg["started"]).touch()
            time.sleep(cfg["sleep"] / cfg["chunks"])

hit = materialize(final, build, resume=cfg.get("resume", False), timeout=cfg.get("timeout", 60))
print(json.dumps({"pid": os.getpid(), "hit": hit}))
"""

POLLER = """
import json, pathlib, sys, time
from dataselect.cache import is_complete
final, want, stop = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
seen = {"absent": 0, "full": 0, "partial": 0, "complete_without_file": 0}
deadline = time.time() + 60
while not stop.exists() and time.time() < deadline:
    complete = is_complete(final)
    try:
        text = (final / "data.txt").read_text()
    except (FileNotFoundError, NotADirectoryError):
        seen["complete_without_file" if complete else "absent"] += 1
    else:
        seen["full" if text == want else "partial"] += 1
    time.sleep(0.001)
print(json.dumps(seen))
"""


def _env(mode: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "DATASELECT_LOCK": mode}
    env.update(extra)
    return env


def _spawn(code: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"child {proc.pid} did not finish in {timeout} s:\n{err}")
    assert proc.returncode == 0, err
    return out, err


def _wait_for(cond, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _workers(tmp_path: Path, n: int, mode: str, **cfg) -> list[subprocess.Popen]:
    """Start ``n`` workers on the same key, released together by a file barrier."""
    barrier = tmp_path / "barrier"
    barrier.mkdir(exist_ok=True)
    base = {
        "final": str(tmp_path / "cache" / "stage" / "key"),
        "log": str(tmp_path / "builds.log"),
        "line": LINE,
        "chunks": CHUNKS,
        "sleep": 1.0,
        "barrier": str(barrier),
        **cfg,
    }
    procs = [_spawn(WORKER, json.dumps(base), env=_env(mode)) for _ in range(n)]
    _wait_for(lambda: len(list(barrier.glob("ready-*"))) == n, what="workers to start")
    (barrier / "go").touch()
    return procs


def _builders(tmp_path: Path) -> list[int]:
    log = tmp_path / "builds.log"
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def _leftovers(final: Path) -> list[str]:
    """Anything beside the artifact: lock files, break claims, tombstones, partial dirs."""
    return sorted(p.name for p in final.parent.iterdir() if p.name != final.name)


def _fake_lock(path: Path, host: str, pid: int, age: float) -> dict:
    """A holder record as another process would leave it, heartbeat ``age`` seconds old."""
    now = time.time()
    record = {
        "host": host,
        "pid": pid,
        "pid_start": None,
        "started": now - age - 60,
        "heartbeat": now - age,
        "token": f"fake-{host}-{pid}-{age}",
        "what": "test",
        "mode": "file",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    os.utime(path, (now - age, now - age))
    return record


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture()
def lock_mode(monkeypatch):
    """Select the lock mechanism for this process (children get it from the environment)."""

    def set_mode(mode: str) -> str:
        monkeypatch.setenv("DATASELECT_LOCK", mode)
        return mode

    return set_mode


# ---------------------------------------------------------------- one build, never half-written


@pytest.mark.parametrize("mode", ["flock", "file"])
def test_two_processes_build_once_and_never_half_written(tmp_path, mode):
    final = tmp_path / "cache" / "stage" / "key"
    stop = tmp_path / "stop-poller"
    poller = _spawn(POLLER, str(final), LINE * CHUNKS, str(stop), env=_env(mode))
    procs = _workers(tmp_path, 2, mode)
    outs = [_finish(p) for p in procs]
    stop.touch()
    seen = json.loads(_finish(poller)[0])

    results = [json.loads(out) for out, _ in outs]
    assert sorted(r["hit"] for r in results) == [False, True]
    builder = next(r["pid"] for r in results if not r["hit"])
    assert _builders(tmp_path) == [builder], "exactly one build ran"
    assert (final / "data.txt").read_text() == LINE * CHUNKS and is_complete(final)
    # the waiter said once who it was waiting for
    waiter_err = next(err for (_, err), r in zip(outs, results, strict=True) if r["hit"])
    assert waiter_err.count("waiting for") == 1
    assert f"built by pid {builder} on host {socket.gethostname()} since" in waiter_err
    # the poller never saw a half-written artifact, and did see both states
    assert seen["partial"] == 0 and seen["complete_without_file"] == 0, seen
    assert seen["absent"] > 0 and seen["full"] > 0, seen
    assert _leftovers(final) == []


# ---------------------------------------------------------------- a holder killed mid-build


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "wipe"])
@pytest.mark.parametrize("mode", ["flock", "file"])
def test_killed_holder_is_recovered(tmp_path, lock_mode, caplog, mode, resume):
    lock_mode(mode)
    final = tmp_path / "cache" / "stage" / "key"
    started = tmp_path / "started"
    cfg = {
        "final": str(final),
        "log": str(tmp_path / "builds.log"),
        "line": LINE,
        "chunks": CHUNKS,
        "sleep": 600.0,  # never finishes: killed
        "started": str(started),
    }
    holder = _spawn(WORKER, json.dumps(cfg), env=_env(mode))
    _wait_for(started.exists, what="the holder to start building")
    assert lock_holder(lock_path(final))["pid"] == holder.pid
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert lock_path(final).exists() and not is_complete(final)  # the lock outlived its holder

    seen = []

    def build(work):
        seen.append(sorted(p.name for p in work.iterdir()))
        (work / "data.txt").write_text(LINE * CHUNKS)

    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="dataselect.locking"):
        assert materialize(final, build, resume=resume, timeout=10) is False
    assert time.monotonic() - t0 < 2, "the dead holder's lock must not be waited for"
    assert seen == [["data.txt"] if resume else []]  # the killed run's partial file (or not)
    assert (final / "data.txt").read_text() == LINE * CHUNKS
    breaks = [r for r in caplog.records if "breaking stale lock" in r.getMessage()]
    if mode == "flock":  # the kernel dropped the lock: nothing to break, nothing to wait for
        assert breaks == [] and "waiting for" not in caplog.text
    else:
        assert len(breaks) == 1 and breaks[0].levelno == logging.WARNING
        assert f"pid {holder.pid} on host {socket.gethostname()}" in breaks[0].getMessage()
        assert "is dead" in breaks[0].getMessage()
    assert _leftovers(final) == []


# ---------------------------------------------------------------- heartbeats


def test_stale_heartbeat_from_another_host_is_broken(tmp_path, lock_mode, caplog):
    lock_mode("file")
    final = tmp_path / "stage" / "key"
    _fake_lock(lock_path(final), "other-host.example", 4242, age=1000)
    with caplog.at_level(logging.WARNING, logger="dataselect.locking"):
        assert materialize(final, lambda w: (w / "x").write_text("1"), timeout=5) is False
    (msg,) = [r.getMessage() for r in caplog.records if "breaking stale lock" in r.getMessage()]
    assert "pid 4242 on host other-host.example" in msg and "heartbeat" in msg
    assert is_complete(final) and _leftovers(final) == []


def test_fresh_heartbeat_from_another_host_is_respected(tmp_path, lock_mode, caplog):
    lock_mode("file")
    final = tmp_path / "stage" / "key"
    record = _fake_lock(lock_path(final), "other-host.example", 4242, age=1)
    t0 = time.monotonic()
    with (
        caplog.at_level(logging.INFO, logger="dataselect.locking"),
        pytest.raises(TimeoutError, match="pid 4242 on host other-host.example"),
    ):
        materialize(final, lambda w: pytest.fail("must not build"), timeout=0.5)
    assert 0.5 <= time.monotonic() - t0 < 3
    waits = [r for r in caplog.records if "waiting for" in r.getMessage()]
    assert len(waits) == 1 and waits[0].levelno == logging.INFO
    assert f"waiting for {final}: built by pid 4242 on host other-host.example since" in (
        waits[0].getMessage()
    )
    assert "breaking" not in caplog.text
    assert lock_holder(lock_path(final)) == record  # left alone
    with try_lock(lock_path(final)) as mine:
        assert mine is False


def test_live_holder_heartbeat_keeps_its_lock(tmp_path, lock_mode, caplog):
    """A holder that heartbeats every 0.1 s is not stale for a waiter with stale_after=0.5 s,
    however long it holds the lock."""
    lock_mode("file")
    path, started = tmp_path / ".thing.lock", tmp_path / "started"
    code = (
        "import pathlib, sys, time\n"
        "from dataselect.locking import file_lock\n"
        "with file_lock(pathlib.Path(sys.argv[1])):\n"
        "    pathlib.Path(sys.argv[2]).touch()\n"
        "    time.sleep(1.5)\n"
    )
    holder = _spawn(
        code, str(path), str(started), env=_env("file", DATASELECT_LOCK_HEARTBEAT="0.1")
    )
    _wait_for(started.exists, what="the holder to take the lock")
    first = lock_holder(path)
    time.sleep(0.4)
    assert lock_holder(path)["heartbeat"] > first["heartbeat"]  # the heartbeat moves
    with (
        caplog.at_level(logging.INFO, logger="dataselect.locking"),
        file_lock(path, timeout=10, stale_after=0.5),
    ):
        assert lock_holder(path)["pid"] == os.getpid()  # after the holder let go
    _finish(holder)
    assert "breaking" not in caplog.text
    assert not path.exists()


# ---------------------------------------------------------------- racing to break a stale lock


@pytest.mark.parametrize("stale", ["dead-pid", "old-heartbeat"])
def test_waiters_racing_to_break_a_stale_lock_build_once(tmp_path, stale):
    final = tmp_path / "cache" / "stage" / "key"
    if stale == "dead-pid":
        _fake_lock(lock_path(final), socket.gethostname(), _dead_pid(), age=0)
    else:
        _fake_lock(lock_path(final), "other-host.example", 4242, age=1000)
    procs = _workers(tmp_path, 4, "file", sleep=0.5)
    outs = [_finish(p) for p in procs]
    results = [json.loads(out) for out, _ in outs]
    assert sorted(r["hit"] for r in results) == [False, True, True, True]
    assert len(_builders(tmp_path)) == 1, "exactly one build ran"
    assert sum("breaking stale lock" in err for _, err in outs) == 1
    assert is_complete(final) and _leftovers(final) == []


def test_threads_racing_to_break_a_stale_lock_take_it_once(tmp_path, lock_mode):
    lock_mode("file")
    path = tmp_path / ".shard.lock"
    for round_ in range(10):
        _fake_lock(path, "other-host.example", round_, age=1000)
        barrier, got = threading.Barrier(8), []

        def contend(barrier=barrier, got=got):
            barrier.wait()
            with try_lock(path) as mine:
                got.append(mine)
                if mine:
                    time.sleep(0.1)  # still held while the others try

        threads = [threading.Thread(target=contend) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(got) == [False] * 7 + [True], f"round {round_}"
        assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_dead_breaker_claim_does_not_block_forever(tmp_path, lock_mode):
    """A waiter that died between claiming a stale lock and removing it leaves its claim
    behind; once that claim is itself stale, the next waiter claims the next level."""
    lock_mode("file")
    path = tmp_path / ".k.lock"
    _fake_lock(path, "other-host.example", 7, age=1000)
    seen = locking._read_lock(path)
    claim = locking._claim_break(path, seen.ident, stale_after=300)
    assert claim is not None and locking._claim_break(path, seen.ident, stale_after=300) is None
    with try_lock(path, stale_after=300) as mine:
        assert mine is False  # a live breaker is at work (its claim is fresh)
    old = time.time() - 1000
    os.utime(claim, (old, old))
    with try_lock(path, stale_after=300) as mine:
        assert mine is True
    assert sorted(p.name for p in tmp_path.iterdir()) == []
