"""Progress of long work, in a terminal and in batch logs.

In a terminal: a rich bar (transient). Without one (Slurm, ``nohup``, CI), a bar is either
silent or a wall of carriage returns, so ``progress`` logs a line instead, at most every
``DATASELECT_PROGRESS_EVERY`` seconds (default 30) and once at the end::

    gradients (adam): 384/1,050 (37%), 2.9 ex/s, 2m12s elapsed, ETA 3m50s

``heartbeat`` covers work that has no count to report (a model conversion, an index
build): a line every interval while it runs, and its time when it ends.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("dataselect.progress")


def interactive() -> bool:
    """Whether stdout is a terminal (bars) or not (log lines)."""
    return sys.stdout.isatty()


def interval() -> float:
    """Seconds between progress lines in a log: ``DATASELECT_PROGRESS_EVERY`` (default 30)."""
    return float(os.environ.get("DATASELECT_PROGRESS_EVERY", "30"))


def duration(seconds: float) -> str:
    """``75.0`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LogLines:
    """``advance(n)`` counts work done and logs a line when ``every`` seconds have passed
    since the last one; ``close()`` logs the final line. ``clock`` is injectable for tests."""

    def __init__(
        self,
        description: str,
        total: int,
        unit: str = "ex",
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        done: int = 0,
    ):
        self.description, self.total, self.unit = description, total, unit
        self.every = interval() if every is None else every
        self.clock = clock
        self.start = self.last = clock()
        self.done = self.first = done  # a resumed job starts at ``done``; its rate from here
        self.note = ""  # appended to each line, e.g. "loss 1.53"

    def line(self) -> str:
        elapsed = self.clock() - self.start
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        head = f"{self.description}: {self.done:,}/{self.total:,}{pct}, {rate:.3g} {self.unit}/s"
        left = self.total - self.done
        eta = f", ETA {duration(left / rate)}" if rate > 0 and left > 0 else ""
        note = f", {self.note}" if self.note else ""
        return f"{head}, {duration(elapsed)} elapsed{eta}{note}"

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            log.info(self.line())

    def close(self) -> None:
        log.info(self.line())


@contextmanager
def progress(
    description: str, total: int, enabled: bool = True, unit: str = "ex"
) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``: a rich bar with its rate in a terminal, log lines at a bounded
    rate without one, nothing when ``enabled`` is false."""
    if not enabled:
        yield lambda n: None
        return
    if not interactive():
        lines = LogLines(description, total, unit)
        yield lines.advance
        lines.close()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(f"{{task.fields[rate]:.1f}} {unit}/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total, rate=0.0)

        def advance(n: int) -> None:
            t = bar.tasks[0]
            bar.update(task, advance=n, rate=(t.completed + n) / max(t.elapsed or 1e-9, 1e-9))

        yield advance


@contextmanager
def heartbeat(description: str, every: float | None = None) -> Iterator[None]:
    """For work with no count: without a terminal, a line every ``every`` seconds while it
    runs and one with its time when it ends (only if it outlived one interval)."""
    every = interval() if every is None else every
    if interactive():
        yield
        return
    start, stop = time.monotonic(), threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            elapsed = duration(time.monotonic() - start)
            log.info("%s: still running, %s elapsed", description, elapsed)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        took = time.monotonic() - start
        if took >= every:
            log.info("%s: done in %s", description, duration(took))
