"""The gradient store: per-example feature vectors (N x d) in memory-mapped ``.npy`` shards.

Layout (``S`` = shard_size; shard ``i`` holds rows ``[i*S, (i+1)*S)``, the last one fewer)::

    meta.json             {"format": 1, "dim", "dtype", "shard_size", "n_total", "spec"}
    shard_00000.npy       raw .npy of shape (rows, dim), float16 or float32
    shard_00000.json      {"ids", "n_tokens", "grad_norms", "rows", "extra"}
    shard_00000.COMPLETE  written last, after the fsync of both files: only then is it trusted;
                          it holds their sizes and checksums (a resumed writer recomputes a
                          shard that no longer matches them)

Shards are independent: any process may write any shard (``write_shard``), so the ranks of a
DDP run or the tasks of a Slurm array fill one store side by side, each its own shards (temp
names carry the writer's pid, and ``featurize`` takes a per-shard lock). A killed writer leaves
complete shards and at most one untrusted one per writer; a resuming writer keeps every complete
shard, deletes the rest and computes only what is missing: the result is byte-identical to an
uninterrupted write. ``spec`` (model, checkpoint, gradient type, sketch) is opaque here;
``check_compatible`` compares two stores, ``expect`` a store with what a run needs.
270,679 x 8192 x 2 B (fp16) = 4.4 GB a checkpoint, read via ``mmap_mode="r"``.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dataselect.cache import fsync_dir
from dataselect.integrity import check, file_digest, recorded
from dataselect.locking import try_lock

log = logging.getLogger(__name__)

FORMAT = 1
DTYPES = ("float16", "float32")
_MISSING = "<missing>"


class StoreMismatch(ValueError):
    """A store's metadata or spec differs from what the caller expects, or a shard is corrupt."""


class StoreIncomplete(FileNotFoundError):
    """A store has no meta.json, or a shard lacks its COMPLETE marker."""


def store_bytes_per_example(dim: int, dtype: str = "float16") -> int:
    """Payload bytes of one row, headers excluded: dim x itemsize (8192 x 2 B = 16 KiB in fp16)."""
    return int(dim) * np.dtype(_dtype_name(dtype)).itemsize


def _dtype_name(dtype: Any) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:  # e.g. "bfloat16", which numpy does not know
        name = str(dtype)
    if name not in DTYPES:
        raise ValueError(f"store dtype must be one of {DTYPES}, got {dtype!r}")
    return name


def _shard(path: Path, i: int, suffix: str) -> Path:
    return path / f"shard_{i:05d}.{suffix}"


def _tmp(path: Path) -> Path:
    """A temp name private to this process: two writers never share one."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def _fsync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` atomically and durably: temp file, fsync, rename."""
    with open(_tmp(path), "wb") as fh:
        fh.write(data)
        _fsync(fh)
    os.replace(_tmp(path), path)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested dicts, keyed by dotted path."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, _MISSING), b.get(k, _MISSING)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} != {vb!r}")
    return out


def _some(ids: Sequence[str], mask: np.ndarray) -> str:
    bad = [ids[i] for i in np.flatnonzero(mask)]
    return f"{len(bad)} example(s): {bad[:10]}" + (" ..." if len(bad) > 10 else "")


def _to_numpy(feats: Any) -> np.ndarray:
    if hasattr(feats, "detach"):  # a torch.Tensor, possibly bf16 or on an accelerator
        t = feats.detach().cpu()
        return (t.float() if str(t.dtype) == "torch.bfloat16" else t).numpy()
    return np.asarray(feats)


class StoreWriter:
    """Writes a store shard by shard; created again on the same directory, it resumes."""

    def __init__(
        self,
        path: Path,
        dim: int,
        n_total: int,
        spec: dict,
        dtype: str = "float16",
        shard_size: int = 1024,
        tidy: bool = True,
    ) -> None:
        """Create the store, or reopen one with the same metadata (else ``StoreMismatch``).

        ``tidy`` deletes the files of unfinished shards left by killed writers; only the one
        process that coordinates a store may tidy (a worker beside others passes False: a
        sibling's half-written shard is not stale)."""
        if dim < 1 or shard_size < 1 or n_total < 0:
            raise ValueError(f"bad store shape: dim={dim} shard_size={shard_size} n={n_total}")
        self.path = Path(path)
        meta = {"format": FORMAT, "dim": int(dim), "dtype": _dtype_name(dtype)}
        meta |= {"shard_size": int(shard_size), "n_total": int(n_total), "spec": dict(spec)}
        self.meta: dict = json.loads(json.dumps(meta, default=str))  # as it reads back
        self.dim, self.n_total, self.shard_size = int(dim), int(n_total), int(shard_size)
        self.dtype = np.dtype(self.meta["dtype"])
        self._feats: list[np.ndarray] = []  # buffered rows (cast), and below their columns
        self._cols: dict[str, list] = {"ids": [], "n_tokens": [], "grad_norms": []}
        self._extra: dict[str, list] | None = None  # per-row columns; keys fixed by the 1st add
        self._seen: set[str] = set()
        self._closed = False
        self.path.mkdir(parents=True, exist_ok=True)
        meta_path = self.path / "meta.json"
        resumed = meta_path.is_file()
        if resumed:
            diff = _diff(json.loads(meta_path.read_text()), self.meta)
            if diff:
                raise StoreMismatch(f"{self.path} holds a different store: {'; '.join(diff)}")
        self.n_shards = math.ceil(self.n_total / self.shard_size)
        self._done = self._scan(resumed, tidy)
        if not resumed:
            _write_file(meta_path, json.dumps(self.meta, indent=2, sort_keys=True).encode())
            fsync_dir(self.path)

    def _scan(self, trusted: bool, tidy: bool) -> int:
        """Note the complete shards (all kept); with ``tidy`` delete every other shard file.
        Returns the rows of the leading run of complete shards (the sequential ``add`` goes on
        from there)."""
        complete = self.complete_shards() if trusted else []
        if tidy:  # a shard changed since it was written is recomputed, not trusted
            damaged = {i: p for i in complete if (p := self.shard_problems(i))}
            for i, problems in damaged.items():
                log.warning("store %s: shard %d is damaged (%s): recomputing it",
                            self.path, i, "; ".join(problems))  # fmt: skip
                _shard(self.path, i, "COMPLETE").unlink()
            complete = [i for i in complete if i not in damaged]
        k = 0
        while k < len(complete) and complete[k] == k:
            k += 1
        for j in range(k):  # the ids the sequential ``add`` must not see again
            info = json.loads(_shard(self.path, j, "json").read_text())
            self._seen.update(info["ids"])
            if self._extra is None:
                self._extra = {key: [] for key in info["extra"]}
        stale = []
        if tidy:  # a shard whose lock is held is being written by a live process: not stale
            keep = set(complete)
            files = self.path.glob("shard_[0-9][0-9][0-9][0-9][0-9].*")
            stale = [f for f in files if int(f.name[6:11]) not in keep or ".tmp" in f.name]
            for f in stale:
                with try_lock(self.shard_lock(int(f.name[6:11]))) as free:
                    if free:
                        f.unlink(missing_ok=True)
        if complete or stale:
            log.info(
                "store %s: kept %d shards, deleted %d files", self.path, len(complete), len(stale)
            )
        return min(k * self.shard_size, self.n_total)

    def shard_rows(self, i: int) -> range:
        """The example positions shard ``i`` holds."""
        if not 0 <= i < self.n_shards:
            raise IndexError(f"shard {i} out of range [0, {self.n_shards}) for store {self.path}")
        return range(i * self.shard_size, min((i + 1) * self.shard_size, self.n_total))

    def shard_problems(self, i: int) -> list[str]:
        """What in complete shard ``i`` differs from the checksums its marker recorded."""
        files = recorded(_shard(self.path, i, "COMPLETE"))
        return [] if files is None else check(self.path, files)

    def shard_lock(self, i: int) -> Path:
        """The lock a process holds while it computes shard ``i`` (``locking.try_lock``)."""
        return self.path / f".shard_{i:05d}.lock"

    def is_complete(self, i: int) -> bool:
        return _shard(self.path, i, "COMPLETE").is_file()

    def complete_shards(self) -> list[int]:
        """Shards with their COMPLETE marker, read from disk now (other writers may add)."""
        return [i for i in range(self.n_shards) if self.is_complete(i)]

    def pending_shards(self) -> list[int]:
        """Shards without their COMPLETE marker, read from disk now."""
        return [i for i in range(self.n_shards) if not self.is_complete(i)]

    @property
    def done_rows(self) -> int:
        """Rows covered by complete shards (a multiple of shard_size except at the very end)."""
        return self._done

    def pending(self) -> range:
        """Example positions still to compute (neither in a complete shard nor buffered)."""
        return range(self._done + len(self._cols["ids"]), self.n_total)

    def add(
        self,
        ids: Sequence[str],
        feats: Any,
        n_tokens: Sequence[int],
        grad_norms: Sequence[float],
        extra: dict[str, Sequence] | None = None,
    ) -> None:
        """Buffer rows (the next positions in order); write each full shard as it fills.

        ``extra`` holds per-row columns (e.g. ``{"eps_share": [...]}``), with the same keys at
        every call. Non-finite rows, or rows that overflow the store's dtype, raise
        ``FloatingPointError`` naming their ids, and nothing of this call is buffered.
        """
        if self._closed:
            raise RuntimeError(f"store {self.path} is closed")
        cast, cols, extra = self._checked(ids, feats, n_tokens, grad_norms, extra)
        ids, n = cols["ids"], len(cols["ids"])
        if self._extra is not None and set(extra) != set(self._extra):
            raise ValueError(f"add: extra keys {sorted(extra)} != {sorted(self._extra)}")
        if self._done + len(self._cols["ids"]) + n > self.n_total:
            raise ValueError(f"add: more rows than n_total={self.n_total}")
        dups = {i for i in ids if i in self._seen} | {i for i, c in Counter(ids).items() if c > 1}
        if dups:
            raise ValueError(f"add: duplicate example ids {sorted(dups)[:10]}")
        self._extra = self._extra if self._extra is not None else {k: [] for k in extra}
        for store, new in ((self._cols, cols), (self._extra, extra)):
            for k, v in new.items():
                store[k] += v
        self._seen.update(ids)
        self._feats.append(cast)
        while len(self._cols["ids"]) >= self.shard_size:
            self._flush(self.shard_size)

    def _checked(self, ids, feats, n_tokens, grad_norms, extra):
        """(rows cast to the store dtype, columns, extra columns), or raise naming bad ids."""
        ids, arr, n = [str(i) for i in ids], _to_numpy(feats), len(ids)
        cols = {"ids": ids, "n_tokens": [int(t) for t in n_tokens]}
        cols["grad_norms"] = [float(g) for g in grad_norms]
        extra = {k: list(v) for k, v in (extra or {}).items()}
        lens = {len(v) for v in [*cols.values(), *extra.values()]}
        if arr.shape != (n, self.dim) or lens != {n}:
            raise ValueError(f"{n} ids and feats {arr.shape}; every column needs {n} values")
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            raise FloatingPointError(f"non-finite (NaN/inf) features for {_some(ids, bad)}")
        with np.errstate(over="ignore"):
            cast = arr.astype(self.dtype)
        over = ~np.isfinite(cast).all(axis=1)
        if over.any():
            raise FloatingPointError(
                f"features overflow {self.dtype.name} (|x| up to {np.abs(arr[over]).max():.4g} > "
                f"{float(np.finfo(self.dtype).max):.6g}) for {_some(ids, over)}; "
                "create the store with dtype='float32'"
            )
        return cast, cols, extra

    def write_shard(
        self,
        i: int,
        ids: Sequence[str],
        feats: Any,
        n_tokens: Sequence[int],
        grad_norms: Sequence[float],
        extra: dict[str, Sequence] | None = None,
    ) -> None:
        """Write shard ``i`` whole (rows ``shard_rows(i)``), atomically; any process may write
        any shard. The same checks as ``add``: non-finite or overflowing rows raise naming
        their ids, and nothing is written."""
        want = len(self.shard_rows(i))
        arr, cols, extra = self._checked(ids, feats, n_tokens, grad_norms, extra)
        if len(cols["ids"]) != want:
            raise ValueError(f"write_shard: shard {i} holds {want} rows, got {len(cols['ids'])}")
        dups = [x for x, c in Counter(cols["ids"]).items() if c > 1]
        if dups:
            raise ValueError(f"write_shard: duplicate example ids {sorted(dups)[:10]}")
        self._write_shard(i, arr, {**cols, "rows": want, "extra": extra})

    def _flush(self, rows: int) -> None:
        """Write the first ``rows`` buffered rows as the next shard, then drop them."""
        self._feats = [np.concatenate(self._feats)]
        info = {k: v[:rows] for k, v in self._cols.items()}
        info |= {"rows": rows, "extra": {k: v[:rows] for k, v in self._extra.items()}}
        self._write_shard(self._done // self.shard_size, self._feats[0][:rows], info)
        self._done += rows
        self._feats = [self._feats[0][rows:]]
        for v in [*self._cols.values(), *self._extra.values()]:
            del v[:rows]

    def _write_shard(self, i: int, feats: np.ndarray, info: dict) -> None:
        """.npy then .json (each temp + fsync + rename), then the marker; all or nothing."""
        npy, js, marker = (_shard(self.path, i, s) for s in ("npy", "json", "COMPLETE"))
        try:
            with open(_tmp(npy), "wb") as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(feats), allow_pickle=False)
                _fsync(fh)
            os.replace(_tmp(npy), npy)
            _write_file(js, _dumps(info))
            files = {f.name: [f.stat().st_size, file_digest(f)] for f in (npy, js)}
            _write_file(marker, _dumps({"rows": info["rows"], "files": files}))
            fsync_dir(self.path)
        except BaseException as err:  # disk full, kill signal as exception, ...: leave no trace
            for f in (marker, js, npy, _tmp(marker), _tmp(js), _tmp(npy)):
                f.unlink(missing_ok=True)
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                need = feats.nbytes / 2**20
                raise OSError(
                    err.errno,
                    f"{os.strerror(err.errno)} while writing shard {i} of {self.path} "
                    f"({need:.1f} MiB); no partial shard was kept: free space and run again, "
                    "it resumes from the finished shards",
                ) from err
            raise

    def close(self) -> GradientStore:
        """Write the last partial shard, check that all n_total rows are there, open a reader.

        A store filled by ``write_shard`` (from any processes) is closed the same way: it
        checks that every shard is complete."""
        have = self._done + len(self._cols["ids"])
        if have != self.n_total and self.pending_shards():
            raise ValueError(f"store {self.path}: {have} of n_total={self.n_total} rows written")
        if self._cols["ids"]:
            self._flush(len(self._cols["ids"]))
        missing = self.pending_shards()
        if missing:
            raise ValueError(f"store {self.path}: shards {missing[:10]} are not written")
        for f in [*self.path.glob("shard_*.tmp*"), *self.path.glob(".shard_*.lock")]:
            f.unlink(missing_ok=True)  # temp files of killed writers; the shard locks
        self._closed = True
        return GradientStore(self.path)


class GradientStore:
    """Read-only view of a complete store; rows are read from memory-mapped shards on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise StoreIncomplete(f"no gradient store at {self.path}: meta.json is missing")
        self.meta: dict = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise StoreMismatch(f"{self.path}: store format {self.meta.get('format')} != {FORMAT}")
        self.spec: dict = self.meta["spec"]
        self.dim: int = self.meta["dim"]
        self.dtype = np.dtype(self.meta["dtype"])
        self.shard_size: int = self.meta["shard_size"]
        n_total = self.meta["n_total"]
        self._n_shards = math.ceil(n_total / self.shard_size)
        infos = []
        for i in range(self._n_shards):
            if not _shard(self.path, i, "COMPLETE").is_file():
                raise StoreIncomplete(
                    f"{self.path}: shard {i:05d} of {self._n_shards} has no COMPLETE marker "
                    "(its writer was interrupted); finish it with StoreWriter, which resumes"
                )
            info = json.loads(_shard(self.path, i, "json").read_text())
            rows = min(self.shard_size, n_total - i * self.shard_size)
            shape = self._open(i).shape
            if (rows, self.dim) != shape or info["rows"] != rows or len(info["ids"]) != rows:
                raise StoreMismatch(f"{self.path}: shard {i:05d} is corrupt: {shape}, {rows} rows")
            infos.append(info)
        self.ids: list[str] = [x for info in infos for x in info["ids"]]
        self.n_tokens = np.array([t for info in infos for t in info["n_tokens"]], dtype=np.int64)
        self.grad_norms = np.array([g for info in infos for g in info["grad_norms"]], np.float64)
        self._extras: list[dict] = [info["extra"] for info in infos]
        self._pos = {x: r for r, x in enumerate(self.ids)}
        self._offsets: dict[int, int] = {}  # shard -> byte offset of its rows (``take``)
        if len(self._pos) != len(self.ids):
            raise StoreMismatch(f"{self.path}: duplicate example ids")

    def _open(self, i: int) -> np.ndarray:
        """Shard ``i`` memory-mapped (nothing read until indexed; mapped again per call)."""
        mm = np.load(_shard(self.path, i, "npy"), mmap_mode="r", allow_pickle=False)
        if mm.dtype != self.dtype:
            raise StoreMismatch(f"{self.path}: shard {i:05d} is {mm.dtype}, meta says {self.dtype}")
        return mm

    def __len__(self) -> int:
        return len(self.ids)

    def extras(self) -> list[dict]:
        """Per-shard ``extra`` columns, in shard order (``{}`` where none were given)."""
        return self._extras

    def index(self, ids: Iterable[str]) -> np.ndarray:
        """Row positions of ``ids``; KeyError naming any missing."""
        ids = list(ids)
        missing = [x for x in ids if x not in self._pos]
        if missing:
            raise KeyError(f"{len(missing)} id(s) not in store {self.path}: {missing[:10]}")
        return np.fromiter((self._pos[x] for x in ids), dtype=np.int64, count=len(ids))

    def rows(self, start: int, stop: int, dtype: Any = np.float32) -> np.ndarray:
        """Rows ``[start, stop)`` as ``dtype`` (``take`` of a range: one read per shard)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"rows [{start}, {stop}) out of range [0, {len(self)}] ({self.path})")
        return self.take(np.arange(start, stop), dtype)

    def take(self, rows: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """Rows ``rows`` (positions, any order, repeats allowed) as ``dtype``, read with plain
        positioned reads (``os.preadv``), one per run of consecutive rows of a shard. Nothing
        is mapped, so no file pages count in this process's RSS, and a scattered read costs a
        system call per row, not a mapping per shard (several times cheaper than
        ``features`` for rows spread over many shards)."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows out of range [0, {len(self)}) for store {self.path}")
        out = np.empty((rows.size, self.dim), dtype)
        row_bytes = self.dim * self.dtype.itemsize
        shard, local = np.divmod(rows, self.shard_size)
        order = np.argsort(shard, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(shard[order])) + 1) if rows.size else []
        for group in groups:  # the requested rows of one shard, in request order
            s, loc = int(shard[group[0]]), local[group]
            offset = self._payload(s)
            raw = np.empty((len(group), self.dim), self.dtype)
            view = memoryview(raw).cast("B")
            fd = os.open(_shard(self.path, s, "npy"), os.O_RDONLY)
            try:
                for a, b in _runs(loc):
                    at = offset + int(loc[a]) * row_bytes
                    _pread(fd, view[a * row_bytes : b * row_bytes], at, self.path, s)
            finally:
                os.close(fd)
            out[group] = raw
        return out

    def _payload(self, i: int) -> int:
        """The byte offset of shard ``i``'s rows in its .npy; the header is read (and checked
        against the metadata) once."""
        offset = self._offsets.get(i)
        if offset is None:
            fmt = np.lib.format
            with open(_shard(self.path, i, "npy"), "rb") as fh:
                version = fmt.read_magic(fh)
                if version not in ((1, 0), (2, 0)):
                    raise StoreMismatch(f"{self.path}: shard {i:05d} has .npy version {version}")
                read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, fortran, dtype = read(fh)
                offset = fh.tell()
            rows = min(self.shard_size, len(self) - i * self.shard_size)
            if dtype != self.dtype or fortran or tuple(shape) != (rows, self.dim):
                raise StoreMismatch(
                    f"{self.path}: shard {i:05d} holds {dtype} {shape} (fortran={fortran}), "
                    f"meta says {self.dtype} ({rows}, {self.dim})"
                )
            self._offsets[i] = offset
        return offset

    def _read(self, start: int, stop: int, dtype: Any = np.float32) -> np.ndarray:
        """Rows ``[start, stop)``, copied out of the shards they span."""
        out = np.empty((stop - start, self.dim), dtype)
        pos = start
        while pos < stop:
            s, off = divmod(pos, self.shard_size)
            take = min(stop - pos, self.shard_size - off)
            out[pos - start : pos - start + take] = self._open(s)[off : off + take]
            pos += take
        return out

    def features(
        self, rows: np.ndarray | None = None, normalize: bool = False, dtype: Any = np.float32
    ) -> np.ndarray:
        """All rows, or ``rows`` (positions or a boolean mask) in the given order, as ``dtype``.

        Only the shards that hold the requested rows are touched. ``normalize`` L2-normalizes
        each row (zero rows stay zero).
        """
        if rows is None:
            out = self._read(0, len(self), dtype)
        else:
            rows = np.asarray(rows)
            rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64).ravel()
            if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
                raise IndexError(f"rows out of range [0, {len(self)}) for store {self.path}")
            out = np.empty((rows.size, self.dim), dtype)
            shard, local = np.divmod(rows, self.shard_size)
            for s in np.unique(shard):
                sel = shard == s
                out[sel] = self._open(int(s))[local[sel]]
        return _normalize(out) if normalize else out

    def iter_blocks(
        self, block_rows: int = 4096, normalize: bool = False
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(start_row, float32 block)`` over the whole store, one block in memory at a time."""
        for start in range(0, len(self), block_rows):
            block = self._read(start, min(len(self), start + block_rows))
            yield start, _normalize(block) if normalize else block

    def bytes_on_disk(self) -> int:
        """Bytes of every file in the store directory (payload + .npy headers + JSON)."""
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def expect(self, expected: dict) -> None:
        """Raise StoreMismatch unless ``spec`` holds every (nested) value of ``expected``: a
        cached store must be the one this run's key stands for (not a copy from another model
        or sketch)."""

        def sub(a: Any, b: Any) -> Any:  # b restricted to a's keys
            if isinstance(a, dict) and isinstance(b, dict):
                return {k: sub(v, b.get(k, _MISSING)) for k, v in a.items()}
            return b

        diff = _diff(sub(expected, self.spec), expected)
        if diff:
            raise StoreMismatch(
                f"gradient store {self.path} was not written for this run ({'; '.join(diff)}; "
                "store != run): a copied or stale cache entry; delete it to rebuild"
            )

    def check_compatible(self, other: GradientStore, keys: Iterable[str]) -> None:
        """Raise StoreMismatch naming the ``keys`` whose values differ between the two stores.

        A key is looked up in ``spec``, then in the top-level meta (so ``"dim"`` works too).
        """
        diff = []
        for k in keys:
            a, b = (s.spec.get(k, s.meta.get(k, _MISSING)) for s in (self, other))
            if a != b:
                diff.append(f"{k}: {a!r} vs {b!r}")
        if diff:
            msg = f"stores {self.path} and {other.path} are incompatible: {'; '.join(diff)}"
            raise StoreMismatch(msg)


def _runs(loc: np.ndarray) -> list[tuple[int, int]]:
    """``[a, b)`` spans of ``loc`` whose values go up by one (one read each)."""
    cut = (np.flatnonzero(np.diff(loc) != 1) + 1).tolist()
    return list(zip([0, *cut], [*cut, len(loc)], strict=True))


def _pread(fd: int, view: memoryview, offset: int, path: Path, shard: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` (a short read is retried; EOF is corruption)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise StoreMismatch(f"{path}: shard {shard:05d} is truncated")
        done += n


def _normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalize rows in place; zero rows stay zero. (einsum, not np.linalg.norm: the
    latter materializes x * x, a second copy of the whole array.)"""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    np.divide(x, norms, out=x, where=norms > 0)
    return x
