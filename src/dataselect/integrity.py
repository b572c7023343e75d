"""Checksums of completed artifacts, verified when they are reused.

A ``COMPLETE`` marker says the build finished; it cannot say the files are still what the
build wrote (a copy gone wrong, a failing disk, a sync tool). So every completed artifact
records ``{relative path: [size, xxh3-64]}`` of its files in its marker (``manifest``, which
also fsyncs each file and directory before the marker is written), and a run checks what it
reuses against it (``check``); a damaged entry is refused (``DamagedArtifact``) with its path
and what to do. ``dataselect verify [cache dir] [--remove]`` checks a whole cache.

The cost stays small next to the stage that reads the files: xxh3 hashes at several GB/s
(``experiments/benchmarks/RESULTS.md``), each file is hashed at most once per process (a
sweep's 100 jobs reuse one store: hashed once), and ``DATASELECT_VERIFY=size`` checks sizes
only (``off``: nothing) where even one read of a large store per process is too much.
Markers written before checksums existed have no ``files`` and are trusted as before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import xxhash

CHUNK = 8 << 20  # bytes per read while hashing
MODES = ("full", "size", "off")
_good: set[tuple] = set()  # (path, size, mtime_ns, inode, digest) checked in this process


class DamagedArtifact(RuntimeError):
    """A completed artifact whose files differ from the checksums it recorded."""


def mode() -> str:
    m = os.environ.get("DATASELECT_VERIFY", "full")
    if m not in MODES:
        raise ValueError(f"DATASELECT_VERIFY must be one of {MODES}, got {m!r}")
    return m


def file_digest(path: Path, sync: bool = False) -> str:
    """xxh3-64 of the file's bytes (hex); ``sync`` also fsyncs it."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
        if sync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def files_under(root: Path, skip: Iterable[str] = ()) -> list[Path]:
    """Files under ``root``, sorted, except names in ``skip`` and dot-files (temps, locks)."""
    skip = set(skip)
    return sorted(
        p
        for p in Path(root).rglob("*")
        if p.is_file() and p.name not in skip and not p.name.startswith(".")
    )


def manifest(root: Path, skip: Iterable[str] = ()) -> dict[str, list]:
    """``{relative path: [size, digest]}`` of the files under ``root``; every file and
    directory is fsynced on the way, so what the marker vouches for is on disk first."""
    root = Path(root)
    out = {}
    for p in files_under(root, skip):
        out[str(p.relative_to(root))] = [p.stat().st_size, file_digest(p, sync=True)]
    for d in sorted({p.parent for p in root.rglob("*")} | {root}):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return out


def check(
    root: Path, files: dict[str, list], optional: Iterable[str] = (), how: str | None = None
) -> list[str]:
    """What differs from the recorded ``files`` (empty: intact). Names in ``optional`` may
    be gone (a training-time file deleted on purpose), never changed. ``how``: one of
    ``MODES`` (default ``DATASELECT_VERIFY``)."""
    how = how or mode()
    if how == "off":
        return []
    problems, optional = [], set(optional)
    for rel, (size, digest) in files.items():
        p = Path(root) / rel
        if not p.is_file():
            if Path(rel).name not in optional:
                problems.append(f"{rel}: missing")
            continue
        st = p.stat()
        if st.st_size != size:
            problems.append(f"{rel}: {st.st_size:,} bytes, {size:,} when built (truncated?)")
            continue
        seen = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, digest)
        if how == "size" or seen in _good:
            continue
        if file_digest(p) != digest:
            problems.append(f"{rel}: contents changed since it was built (checksum differs)")
        else:
            _good.add(seen)
    return problems


def recorded(marker: Path) -> dict[str, list] | None:
    """The ``files`` a marker recorded; None for a marker from before checksums (or empty)."""
    text = Path(marker).read_text()
    if not text.strip():
        return None
    try:
        files = json.loads(text).get("files")
    except (json.JSONDecodeError, AttributeError):
        return None
    return files if isinstance(files, dict) else None


def damaged(path: Path, problems: list[str], what: str = "cache entry") -> DamagedArtifact:
    shown = "; ".join(problems[:3]) + (
        f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    )
    return DamagedArtifact(
        f"damaged {what} {path}: {shown}. Its files changed after it was completed (a copy "
        f"gone wrong, a failing disk, a sync tool?), so it is not used. Remove it and run "
        f"again to rebuild it: rm -r '{path}' (or `dataselect verify {Path(path).parent.parent}"
        " --remove` for every damaged entry in the cache)"
    )
