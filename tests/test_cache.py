"""The artifact cache: keys, atomic completion, kill safety, one writer."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

from dataselect.cache import (
    COMPLETE,
    digest,
    is_complete,
    materialize,
    partial_dir,
    write_json,
)


def test_digest_ignores_dict_order_and_sees_values():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


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
