"""Content-addressed artifact cache: ``${paths.cache_dir}/<stage>/<key>/``.

A key hashes the resolved config that determines an artifact plus its upstream keys.

Guarantees of :func:`materialize`:

* **Never half-written.** An artifact directory is trusted only when it holds the
  ``COMPLETE`` marker, which is written (and fsynced) last inside a ``.<key>.partial`` work
  directory that is then renamed into place. A crash or kill at any point leaves at most
  the work directory, which no reader trusts; a ``final`` directory without the marker is
  wiped, never read. With ``resume=True`` a work directory left by a killed run is handed
  back to the builder as it is (the builder decides what in it is finished); otherwise it is
  wiped first.
* **Checked on reuse.** The marker records the size and checksum of every file (each file
  fsynced first); a reused artifact whose files differ is refused with its path and what to
  do (:mod:`dataselect.integrity`).
* **One writer.** A lock per key (``.<key>.lock`` beside the artifact, :func:`lock_path`)
  means two processes, on one host or several sharing the file system, never build the same
  artifact: the second logs once at INFO ``waiting for <artifact>: built by pid P on host H
  since T``, waits (``timeout`` seconds, None = forever, then :class:`TimeoutError` naming
  the holder), finds the artifact complete and reuses it.
* **No lock outlives its holder for long.** The locks, their mechanisms (``flock`` or lock
  files, ``DATASELECT_LOCK``) and how a dead or stale holder's lock is broken are those of
  :mod:`dataselect.locking`.

Single files are written with :func:`write_atomic` (:func:`write_json` for JSON): a reader
sees the old content or the new, never a torn write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dataselect.integrity import check, damaged, manifest, recorded
from dataselect.locking import file_lock

COMPLETE = "COMPLETE"


def digest(obj: Any, n: int = 16) -> str:
    """A short stable hash of a JSON-able object (dict key order does not matter). It names
    data (selected ids, parameter names, a model); ``keys.artifact_key`` names artifacts."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


# ---------------------------------------------------------------- artifacts


def partial_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


def lock_path(final: Path) -> Path:
    """The lock file guarding artifact ``final`` while it is built (see :func:`materialize`)."""
    return Path(final).parent / f".{Path(final).name}.lock"


def materialize(
    final: Path,
    build: Callable[[Path], Any],
    resume: bool = False,
    info: dict[str, Any] | None = None,
    timeout: float | None = None,
) -> bool:
    """Make sure ``final`` is a complete artifact; returns True on a cache hit.

    ``build(work_dir)`` fills a work directory that becomes ``final`` only after it returns.
    With ``resume``, a work directory left by a killed run is handed to ``build`` as it is
    (the builder decides what in it is finished); otherwise it is wiped first. ``timeout``
    bounds the wait for another process building the same artifact (None = forever).
    """
    final = Path(final)
    if is_complete(final):
        verify(final)
        return True
    with file_lock(lock_path(final), timeout, what=str(final)):
        if is_complete(final):  # another process built it while we waited
            verify(final)
            return True
        if final.exists():  # never trusted: no marker
            shutil.rmtree(final)
        work = partial_dir(final)
        if work.exists() and not resume:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        build(work)
        marker = {"built_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": time.time() - t0}
        files = manifest(work, skip=(COMPLETE,))  # fsyncs every file before the marker
        write_atomic(work / COMPLETE, json.dumps({**marker, **(info or {}), "files": files}))
        os.rename(work, final)
        fsync_dir(final.parent)
    return False


def verify(final: Path) -> None:
    """Refuse a complete artifact whose files differ from the checksums its marker recorded
    (``dataselect.integrity``); markers from before checksums are trusted as they are."""
    files = recorded(final / COMPLETE)
    if files is not None:
        problems = check(final, files)
        if problems:
            raise damaged(final, problems)


def verify_cache(cache_dir: Path, remove: bool = False) -> dict[str, Any]:
    """Check every complete artifact under ``cache_dir`` (``<stage>/<key>/``) against its
    recorded checksums, reading every file (``dataselect verify``). ``remove`` deletes the
    damaged ones (under their build lock), so the next run rebuilds them. Returns
    ``{"checked": n, "unverified": [paths with no checksums], "damaged": {path: problems}}``.
    """
    checked, unverified, bad = 0, [], {}
    for marker in sorted(Path(cache_dir).glob(f"*/[!.]*/{COMPLETE}")):
        art = marker.parent
        files = recorded(marker)
        if files is None:
            unverified.append(str(art))
            continue
        checked += 1
        problems = check(art, files, how="full")
        if problems:
            bad[str(art)] = problems
            if remove:
                with file_lock(lock_path(art), 60, what=str(art)):
                    shutil.rmtree(art)
    return {"checked": checked, "unverified": unverified, "damaged": bad}


# ---------------------------------------------------------------- durable writes


def fsync_dir(path: Path) -> None:
    """Flush directory ``path`` to disk, so that entries created or renamed in it persist."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace file ``path`` with ``data`` (``str`` is UTF-8 encoded), all or nothing.

    Writes a unique temp name beside ``path``, fsyncs it, renames it over ``path`` and fsyncs
    the directory: readers see the old content or the new, never a torn write, and the new
    content survives a crash once this returns. On failure the temp file is removed.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON with :func:`write_atomic`."""
    write_atomic(path, json.dumps(obj, indent=2, default=str))
