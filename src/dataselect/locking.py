"""Exclusive locks on files, shared by processes on one host or on several hosts.

:func:`file_lock` (blocking) and :func:`try_lock` (non-blocking, yields whether it got the
lock) take the lock ``path``; the artifact cache (:mod:`dataselect.cache`) takes one per
artifact, the gradient store one per shard. A lock is not re-entrant.

**No lock outlives its holder for long.** The lock file holds a JSON record of its holder
(host, pid, start time, and a heartbeat that a daemon thread rewrites every
``HEARTBEAT_SECONDS`` while the lock is held); :func:`lock_holder` reads it. A waiter logs
once at INFO ``waiting for <what>: built by pid P on host H since T`` and, given a
``timeout``, raises :class:`TimeoutError` naming the holder when it runs out.

Two lock mechanisms, chosen by :data:`LOCK_MODE` or else the ``DATASELECT_LOCK``
environment variable (``flock``, ``file`` or ``auto``, the default):

``flock``
    ``fcntl.flock`` on the lock file. The kernel drops the lock the moment its holder dies
    (even on ``kill -9``), so a dead holder never blocks anyone; the record is informative.
``file``
    for file systems where ``flock`` fails (``ENOLCK``/``EOPNOTSUPP``/``ENOSYS``, some NFS
    mounts) or is not shared across hosts: the lock is held by whoever creates the lock
    file with ``O_CREAT | O_EXCL`` and removed on release. A waiter breaks it, with a
    WARNING, when the holder is on the same host and its pid is dead (or reused), or when
    its heartbeat is older than ``stale_after`` seconds (``STALE_AFTER``, 300 by default),
    judged both by the record's and the file's modification time and by the waiter's own
    clock (a heartbeat it has watched not move for ``stale_after`` seconds). Breaking is
    race-free: the breaker first claims that particular lock instance (its record's unique
    token) with an exclusive-create claim file, re-reads the lock under the claim and only
    then renames it to a unique name and deletes it, so of any number of waiters exactly
    one removes a given stale lock, and none ever removes a live one; all then compete for
    the exclusive create as usual, so exactly one builds.
``auto``
    ``flock``, falling back to ``file`` (remembered per file system) when ``flock`` fails.

All processes sharing a cache directory must use the same mechanism; ``auto`` resolves the
same way on the same file system. Set ``DATASELECT_LOCK=file`` everywhere where ``flock``
succeeds but is not shared between hosts. ``DATASELECT_LOCK_HEARTBEAT`` and
``DATASELECT_LOCK_STALE_AFTER`` override the two intervals (seconds).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_MODE: str | None = None  # "flock" | "file" | "auto"; None: $DATASELECT_LOCK, else auto
HEARTBEAT_SECONDS = 30.0  # how often a holder rewrites its heartbeat
STALE_AFTER = 300.0  # file mode: a heartbeat older than this marks the lock stale
POLL_MAX = 1.0  # longest pause between two attempts of a waiting process

_MODES = ("flock", "file", "auto")
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_NO_FLOCK: set[int] = set()  # st_dev of file systems where flock failed (auto mode)
HOST = socket.gethostname()


# ---------------------------------------------------------------- settings


def lock_mode() -> str:
    """The lock mechanism in force: ``LOCK_MODE``, else ``$DATASELECT_LOCK``, else auto."""
    mode = (LOCK_MODE or os.environ.get("DATASELECT_LOCK") or "auto").strip().lower()
    if mode not in _MODES:
        raise ValueError(f"DATASELECT_LOCK must be one of {_MODES}, got {mode!r}")
    return mode


def _setting(value: float | None, env: str, default: float) -> float:
    if value is not None:
        return float(value)
    return float(os.environ.get(env) or default)


# ---------------------------------------------------------------- holder records


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int, start: int | None) -> bool:
    """Whether process ``pid`` of this host still runs (and is the one that started at
    ``start``, when known). Zombies count as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: trust kill(0)
    if state in ("Z", "X"):
        return False
    now_start = _proc_start(pid)
    return start is None or now_start is None or now_start == start


def _new_record(what: str, mode: str) -> dict[str, Any]:
    now = time.time()
    return {
        "host": HOST,
        "pid": os.getpid(),
        "pid_start": _proc_start(os.getpid()),
        "started": now,
        "heartbeat": now,
        "token": uuid.uuid4().hex,
        "what": what,
        "mode": mode,
    }


def _write_record(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record).encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def _parse_record(data: bytes) -> dict[str, Any] | None:
    """The record at the start of ``data`` (tolerates a torn read's trailing bytes)."""
    try:
        rec, _ = json.JSONDecoder().raw_decode(data.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


@dataclass
class _Seen:
    """A lock file as read by a waiter: its record (None if unreadable) and identity."""

    record: dict[str, Any] | None
    ino: int
    mtime: float

    @property
    def ident(self) -> str:
        token = (self.record or {}).get("token")
        raw = f"token:{token}" if token else f"ino:{self.ino}"
        return hashlib.sha256(raw.encode()).hexdigest()[:16]  # safe in a file name

    @property
    def heartbeat(self) -> float:
        """The latest sign of life: the record's heartbeat or the file's mtime."""
        hb = (self.record or {}).get("heartbeat")
        return max(float(hb) if isinstance(hb, (int, float)) else 0.0, self.mtime)


def _read_lock(path: Path) -> _Seen | None:
    """The lock file at ``path``, or None when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        data = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    return _Seen(_parse_record(data), st.st_ino, st.st_mtime)


def lock_holder(path: Path) -> dict[str, Any] | None:
    """The holder record in lock file ``path`` (None if there is none or it is unreadable)."""
    seen = _read_lock(Path(path))
    return None if seen is None else seen.record


def _describe(seen: _Seen | None) -> str:
    rec = seen.record if seen is not None else None
    if not rec:
        return "an unknown process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("started", 0)))
    return f"pid {rec.get('pid')} on host {rec.get('host')} since {since}"


# ---------------------------------------------------------------- acquiring and releasing


@dataclass
class _Held:
    path: Path
    fd: int
    mode: str  # "flock" | "file"
    record: dict[str, Any]
    interval: float
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def owns_path(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except OSError:
            return False


class _FlockUnsupported(Exception):
    pass


def _flock_try(path: Path, block: bool) -> int | None:
    """An fd on ``path`` holding its flock, or None when another process holds it."""
    while True:
        created = False
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:  # released and removed in between
                continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as err:
            os.close(fd)
            if err.errno in _UNSUPPORTED:
                if created:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                raise _FlockUnsupported(err) from err
            raise
        try:  # the holder before us removes the file on release: ours must still be it
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _claim_break(path: Path, ident: str, stale_after: float) -> Path | None:
    """Claim the right to remove lock instance ``ident``; None if someone else has it.

    A claim is an exclusively created file; a claim older than ``stale_after`` (its maker
    died mid-break) is passed over for the next level, so a dead breaker blocks no one."""
    for level in range(1000):
        claim = path.with_name(f"{path.name}.break-{ident}-{level}")
        try:
            os.close(os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return claim
        except FileExistsError:
            try:
                age = time.time() - os.stat(claim).st_mtime
            except FileNotFoundError:
                return None  # that break just finished; look at the lock again
            if age < stale_after:
                return None
    return None


def _break_stale(path: Path, seen: _Seen, why: str, stale_after: float) -> bool:
    """Remove the stale lock instance ``seen``; True if this call removed it."""
    claim = _claim_break(path, seen.ident, stale_after)
    if claim is None:
        return False
    broke = False
    try:
        now = _read_lock(path)  # under the claim no other waiter can remove this instance
        if now is None or now.ident != seen.ident:
            return False  # already broken (and maybe re-taken) by someone else
        tomb = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(path, tomb)
        except FileNotFoundError:
            return False
        os.unlink(tomb)
        broke = True
        log.warning("breaking stale lock %s held by %s: %s", path, _describe(seen), why)
        return True
    finally:
        names = [claim.name]
        if broke:  # with any claims of dead breakers before us
            prefix = f"{path.name}.break-{seen.ident}-"
            with contextlib.suppress(OSError):
                names = [n for n in os.listdir(path.parent) if n.startswith(prefix)]
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)


def _stale_reason(seen: _Seen, stale_after: float, watched: dict[str, tuple]) -> str | None:
    rec = seen.record or {}
    pid = rec.get("pid")
    if (
        rec.get("host") == HOST
        and isinstance(pid, int)
        and not _pid_alive(pid, rec.get("pid_start"))
    ):
        return f"its holder (pid {pid}, this host) is dead"
    age = time.time() - seen.heartbeat
    if age > stale_after:
        return f"its last heartbeat is {age:.0f} s old (stale_after={stale_after:g} s)"
    # A heartbeat that has not moved while we watched it, whatever the clocks say.
    beat = (seen.ident, seen.heartbeat)
    first = watched.setdefault(seen.ident, (beat, time.monotonic()))
    if first[0] != beat:
        watched[seen.ident] = (beat, time.monotonic())
    elif time.monotonic() - first[1] > stale_after:
        return f"its heartbeat has not moved for {stale_after:g} s"
    return None


def _file_try(path: Path, what: str, stale_after: float, watched: dict) -> _Held | None:
    """One attempt at the exclusive-create lock, breaking it first if it is stale."""
    for _ in range(3):  # at most a couple of retries right after a break
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            seen = _read_lock(path)
            if seen is None:
                continue  # released in between
            why = _stale_reason(seen, stale_after, watched)
            if why is None or not _break_stale(path, seen, why, stale_after):
                return None
            continue
        record = _new_record(what, "file")
        try:
            _write_record(fd, record)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return _Held(path, fd, "file", record, 0.0)
    return None


def _attempt(path: Path, what: str, block: bool, stale_after: float, watched: dict) -> _Held | None:
    mode = lock_mode()
    if mode == "auto":
        with contextlib.suppress(OSError):
            if os.stat(path.parent).st_dev in _NO_FLOCK:
                mode = "file"
    if mode != "file":
        try:
            fd = _flock_try(path, block)
        except _FlockUnsupported as err:
            if mode == "flock":
                raise OSError(
                    err.args[0].errno,
                    f"flock is not supported for {path} ({err}); set DATASELECT_LOCK=file",
                ) from err
            _NO_FLOCK.add(os.stat(path.parent).st_dev)
            log.info("flock unsupported under %s (%s): using lock files", path.parent, err)
        else:
            if fd is None:
                return None
            record = _new_record(what, "flock")
            _write_record(fd, record)
            return _Held(path, fd, "flock", record, 0.0)
    return _file_try(path, what, stale_after, watched)


def _beat(held: _Held) -> None:
    warned = False
    while not held.stop.wait(held.interval):
        held.record["heartbeat"] = time.time()
        try:
            _write_record(held.fd, held.record)  # our own inode, even if it was broken
        except OSError as err:
            log.debug("heartbeat of %s failed: %s", held.path, err)
        if held.mode == "file" and not warned and not held.owns_path():
            warned = True
            log.error(
                "lock %s was broken by another process while this one (pid %d) held it: "
                "was this process suspended for longer than stale_after?",
                held.path,
                os.getpid(),
            )


def _acquire(
    path: Path,
    *,
    block: bool,
    timeout: float | None,
    what: str | None,
    stale_after: float | None,
    heartbeat: float | None,
) -> _Held | None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    what = what or str(path)
    stale = _setting(stale_after, "DATASELECT_LOCK_STALE_AFTER", STALE_AFTER)
    interval = _setting(heartbeat, "DATASELECT_LOCK_HEARTBEAT", HEARTBEAT_SECONDS)
    deadline = None if timeout is None else time.monotonic() + timeout
    watched: dict[str, tuple] = {}
    delay, logged, t0 = 0.02, False, time.monotonic()
    while True:
        held = _attempt(path, what, False, stale, watched)
        if held is None and block and logged and deadline is None and lock_mode() != "file":
            # flock with no deadline: sleep in the kernel until the holder lets go
            held = _attempt(path, what, True, stale, watched)
        if held is not None:
            held.interval = interval
            held.thread = threading.Thread(
                target=_beat, args=(held,), name=f"lock-heartbeat {path.name}", daemon=True
            )
            held.thread.start()
            return held
        if not block:
            return None
        if not logged:
            seen = _read_lock(path)
            # a holder writes its record just after taking the lock: give it a moment
            if (seen is not None and seen.record) or time.monotonic() - t0 > 0.5:
                log.info("waiting for %s: built by %s", what, _describe(seen))
                logged = True
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"gave up after {timeout:g} s waiting for {what}: lock {path} is held by "
                    f"{_describe(_read_lock(path))}"
                )
            time.sleep(min(delay, left))
        else:
            time.sleep(delay)
        delay = min(delay * 1.5, POLL_MAX)


def _release(held: _Held) -> None:
    held.stop.set()
    if held.thread is not None:
        held.thread.join()
    try:
        if held.owns_path():  # flock: always ours; file: unless it was broken
            os.unlink(held.path)
    finally:
        os.close(held.fd)  # drops the flock


@contextmanager
def file_lock(
    path: Path,
    timeout: float | None = None,
    *,
    what: str | None = None,
    stale_after: float | None = None,
    heartbeat: float | None = None,
) -> Iterator[None]:
    """Hold the exclusive lock ``path`` for the block, waiting for it as long as needed.

    ``timeout`` seconds (None = forever) bound the wait, then :class:`TimeoutError` names
    the holder. ``what`` names the guarded thing in the log; ``stale_after`` and
    ``heartbeat`` override ``STALE_AFTER`` and ``HEARTBEAT_SECONDS``.
    """
    held = _acquire(
        path, block=True, timeout=timeout, what=what, stale_after=stale_after, heartbeat=heartbeat
    )
    assert held is not None
    try:
        yield
    finally:
        _release(held)


@contextmanager
def try_lock(
    path: Path,
    *,
    what: str | None = None,
    stale_after: float | None = None,
    heartbeat: float | None = None,
) -> Iterator[bool]:
    """Take the lock ``path`` if it is free (or stale), without waiting.

    Yields True when this block holds the lock (released at its end), False when another
    live process holds it.
    """
    held = _acquire(
        path, block=False, timeout=None, what=what, stale_after=stale_after, heartbeat=heartbeat
    )
    try:
        yield held is not None
    finally:
        if held is not None:
            _release(held)
