"""Progress without a terminal: bounded-rate log lines with done/total, rate, elapsed, ETA;
heartbeats for work with no count. (A real run's log: tests/test_reliability.py.)"""

from __future__ import annotations

import logging
import time

from dataselect import progress as P


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_lines_come_at_most_every_interval_with_rate_and_eta(caplog):
    clock = Clock()
    lines = P.LogLines("gradients (adam)", 100, every=30, clock=clock)
    with caplog.at_level(logging.INFO, logger="dataselect.progress"):
        for _ in range(100):
            clock.t += 1.0  # one example a second
            lines.advance(1)
        lines.close()
    got = [r.getMessage() for r in caplog.records]
    assert got == [
        "gradients (adam): 30/100 (30%), 1 ex/s, 30s elapsed, ETA 1m10s",
        "gradients (adam): 60/100 (60%), 1 ex/s, 1m00s elapsed, ETA 40s",
        "gradients (adam): 90/100 (90%), 1 ex/s, 1m30s elapsed, ETA 10s",
        "gradients (adam): 100/100 (100%), 1 ex/s, 1m40s elapsed",
    ]


def test_a_resumed_count_measures_its_rate_from_where_it_started(caplog):
    clock = Clock()
    lines = P.LogLines("training", 40, unit="step", every=10, clock=clock, done=20)
    lines.note = "loss 1.2500"
    clock.t = 10.0
    with caplog.at_level(logging.INFO, logger="dataselect.progress"):
        lines.advance(5)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg == "training: 25/40 (62%), 0.5 step/s, 10s elapsed, ETA 30s, loss 1.2500"


def test_durations_read_as_a_person_writes_them():
    assert [P.duration(s) for s in (0.4, 59, 75, 3599, 3725)] == [
        "0s",
        "59s",
        "1m15s",
        "59m59s",
        "1h02m",
    ]


def test_progress_logs_only_without_a_terminal(monkeypatch, caplog):
    monkeypatch.setenv("DATASELECT_PROGRESS_EVERY", "0")
    for tty, want in ((False, 4), (True, 0)):
        monkeypatch.setattr(P, "interactive", lambda tty=tty: tty)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dataselect.progress"):
            with P.progress("pass", 3) as advance:
                for _ in range(3):
                    advance(1)
            with P.progress("off", 3, enabled=False) as advance:
                advance(3)
        assert len(caplog.records) == want  # 3 advances + the final line; rich draws a bar
        assert all(r.getMessage().startswith("pass: ") for r in caplog.records)


def test_heartbeat_beats_while_work_runs(monkeypatch, caplog):
    monkeypatch.setattr(P, "interactive", lambda: False)
    with caplog.at_level(logging.INFO, logger="dataselect.progress"):
        with P.heartbeat("converting x.gguf", every=0.05):
            time.sleep(0.3)
        with P.heartbeat("quick", every=10):
            pass
    got = [r.getMessage() for r in caplog.records]
    assert len([m for m in got if m.startswith("converting x.gguf: still running")]) >= 2
    assert got[-1] == "converting x.gguf: done in 0s" and not any("quick" in m for m in got)
