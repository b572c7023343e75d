"""Pool features as unit rows, streamed from the memory-mapped store (G2IS and its graph).

G2IS and its neighbour lists work on the pool's features L2-normalized canonically
(``graph.unit_rows``: a float64 norm summed by ``tree_sum``, the division in float64, the
result rounded to float32). At the LESS paper's scale, 270,679 x 8,192, that matrix is 8.9 GB
in float32 (the fp16 store is 4.4 GB). ``UnitRows`` never builds it: it is a read-only (n, d)
matrix holding the same float32 values, computed from the store as they are read.

- ``rows[a:b]``, ``rows[i]``, ``rows[idx]``: a block, a row, rows in any order; bitwise the
  rows of ``unit_rows(store.features())``. Normalizing is row-local, so a row's value does not
  depend on the block it is read in; each row's canonical norm is computed the first time the
  row is read and kept (n float64: 2 MB at 270k), later reads only divide.
- ``dot_blocks(rows, Q)``: ``rows @ Q.T`` block by block, as a *screen*: every entry within
  a known bound of the exact product of the unit rows (``screen_margin``). On an fp16 store
  it is computed from the raw rows, ``(raw @ Q.T) / norm``, without normalizing the block:
  the extra error is the float32 rounding of the unit row (<= u |q| |x| = u for unit q) and
  of the norm and the division (2 u). In float32 that is far inside the bound's slack (the
  bound is 2 (d + 64) u; a float32 product of length d errs by at most ~d u); in float64
  (``precise``) it is the bound. The callers use a screen only to discard what cannot reach
  a top k or a nearest centroid, and decide what is left (near-ties) exactly.

Memory: one block of ``block`` rows (64 MiB of float64 at 1024 x 8192) and the norms. Rows
are read with plain positioned reads (``GradientStore.take``): nothing is mapped, so no file
pages count in RSS (mapped pages would, as long as they stay mapped). Every caller indexes it
as a numpy array (``X[i]``, ``X[a:b]``, ``X[idx]``, ``len``, ``shape``): the walk, the
rankings and the graph take an in-memory array or a ``UnitRows`` alike, with one result.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from dataselect.features.store import GradientStore
from dataselect.selectors.ranking import CANONICAL, dot_tolerance, rank_by_dot


class UnitRows:
    """The store's rows, canonically L2-normalized, as a read-only float32 (n, d) matrix."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, store: GradientStore, block: int = 1024, cache_rows: int = 8192):
        """``cache_rows``: the most recently read rows of small reads (<= 512 rows) are kept,
        up to this many (8192 x 8192 x 4 B = 256 MiB): a walk reads the same neighbourhoods
        again and again."""
        if block < 1:
            raise ValueError(f"UnitRows: block must be >= 1, got {block}")
        self.store, self.block, self.cache_rows = store, int(block), int(cache_rows)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.shape = (len(store), int(store.dim))
        self._norm = np.full(len(store), np.nan)  # canonical norms, filled as rows are read
        self._last: tuple[int, np.ndarray] = (0, np.zeros((0, self.shape[1]), np.float32))
        self.rows_read = 0  # rows read from the store so far (the I/O, in rows)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"UnitRows({self.store.path}, shape={self.shape})"

    def norms(self, pos: np.ndarray, raw64: np.ndarray) -> np.ndarray:
        """Canonical norms of the rows at ``pos`` (raw values ``raw64``, float64), cached."""
        norm = self._norm[pos]
        todo = np.flatnonzero(np.isnan(norm))
        for s in range(0, todo.size, self.block):  # bounded scratch: CANONICAL copies rows
            t = todo[s : s + self.block]
            norm[t] = CANONICAL.norms(raw64[t])
        self._norm[pos[todo]] = norm[todo]
        return norm

    def _unit(self, pos: np.ndarray, raw64: np.ndarray) -> np.ndarray:
        """``CANONICAL.normalize`` of the raw rows, as float32 (divides ``raw64`` in place)."""
        self.rows_read += len(pos)
        n = self.norms(pos, raw64)[:, None]
        np.divide(raw64, n, out=raw64, where=n > 0)
        return raw64.astype(np.float32)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (int positions, any order, repeats allowed) as float32 unit rows."""
        idx = np.asarray(idx, dtype=np.int64).ravel()
        out = np.empty((idx.size, self.shape[1]), dtype=np.float32)
        small = 0 < idx.size <= 512 and self.cache_rows > 0
        miss = np.arange(idx.size)
        if small:
            hit = np.fromiter((i in self._cache for i in idx.tolist()), bool, idx.size)
            for p in np.flatnonzero(hit).tolist():
                out[p] = self._cache[int(idx[p])]
                self._cache.move_to_end(int(idx[p]))
            miss = np.flatnonzero(~hit)
        for s in range(0, miss.size, self.block):  # float64 scratch of one block
            at = miss[s : s + self.block]
            part = idx[at]
            start, raw = self._last
            if start <= part.min() and part.max() < start + len(raw):
                raw64 = raw[part - start].astype(np.float64)  # in the block just screened
            else:
                raw64 = self.store.take(part, np.float64)
            out[at] = self._unit(part, raw64)
            if small:
                self._keep(part, out[at])
        return out

    def _keep(self, rows: np.ndarray, unit: np.ndarray) -> None:
        for i, row in zip(rows.tolist(), unit, strict=True):
            self._cache[i] = row.copy()  # a view would keep its whole block alive
            self._cache.move_to_end(i)
        while len(self._cache) > self.cache_rows:
            self._cache.popitem(last=False)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {key} out of range for {len(self)} rows ({self.store.path})")
            return self.take(np.array([i]))[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self.take(np.arange(start, stop, step))
            stop = max(start, stop)
            return self._unit(np.arange(start, stop), self.store.rows(start, stop, np.float64))
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return self.take(idx)

    def blocks(self, block: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, float32 unit rows)`` over the whole store, one block in memory at a time."""
        b = block or self.block
        for s in range(0, len(self), b):
            yield s, self[s : s + b]

    def dot_blocks(self, Q: np.ndarray, block: int | None = None, precise: bool = False):
        """``(start, S)`` over the store, S ~ ``self[start:start + len(S)] @ Q.T``, each entry
        within ``screen_margin(d, precise=precise) / 2`` of the exact product of unit rows."""
        b = block or self.block
        for s in range(0, len(self), b):
            raw = self.store.rows(s, min(len(self), s + b), np.float32)  # fp16 -> f32: exact
            self._last, self.rows_read = (s, raw), self.rows_read + len(raw)
            yield s, self._screen(np.arange(s, s + len(raw)), raw, Q, precise)

    def screen_rows(self, rows: np.ndarray, Q: np.ndarray, precise: bool = False) -> np.ndarray:
        """``self[rows] @ Q.T`` as a screen (``dot_blocks``'s bound); rows of the block just
        screened are not read again."""
        rows = np.asarray(rows, dtype=np.int64)
        start, raw = self._last
        if rows.size and start <= rows.min() and rows.max() < start + len(raw):
            return self._screen(rows, raw[rows - start], Q, precise)
        self.rows_read += len(rows)
        return self._screen(rows, self.store.take(rows, np.float32), Q, precise)

    def raw(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``rows`` as (float32 rows R, float32 norms n): R / n is a float32 screen of
        the unit rows (``dot_blocks``'s bound) and ``unit(rows, R)`` gives them exactly. From
        an fp16 store, R holds the raw rows: no canonical norm is computed."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.store.dtype != np.float16:
            return self.take(rows), np.ones(len(rows), dtype=np.float32)
        self.rows_read += len(rows)
        R = self.store.take(rows, np.float32)
        return R, np.sqrt(np.einsum("ij,ij->i", R, R, dtype=np.float64)).astype(np.float32)

    def unit(self, rows: np.ndarray, R: np.ndarray) -> np.ndarray:
        """The unit rows ``rows``, exactly, from their ``raw`` R."""
        if self.store.dtype != np.float16:
            return R
        rows = np.asarray(rows, dtype=np.int64)
        if self.cache_rows <= 0:
            return self._unit(rows, R.astype(np.float64))
        unit = np.empty(R.shape, dtype=np.float32)
        hit = np.fromiter((i in self._cache for i in rows.tolist()), bool, rows.size)
        for p in np.flatnonzero(hit).tolist():  # kept rows: the same canonical bytes
            unit[p] = self._cache[int(rows[p])]
        miss = np.flatnonzero(~hit)
        if miss.size:
            unit[miss] = self._unit(rows[miss], R[miss].astype(np.float64))
            keep = miss[-self.cache_rows :]
            self._keep(rows[keep], unit[keep])
        return unit

    def _screen(self, rows: np.ndarray, raw: np.ndarray, Q: np.ndarray, precise: bool):
        """(raw @ Q.T) / |raw|, without normalizing the rows (the module text's bound)."""
        if self.store.dtype != np.float16:  # float32 rows may underflow: normalize them first
            return _product(self._unit(rows, raw.astype(np.float64)), Q, precise)
        r = raw.astype(np.float64) if precise else raw
        norm = np.sqrt(np.einsum("ij,ij->i", raw, raw, dtype=np.float64))  # rel. error ~1e-16
        S = _product(r, Q, precise)
        n = norm[:, None] if precise else norm.astype(np.float32)[:, None]
        np.divide(S, n, out=S, where=n > 0)  # a zero row scores 0 either way
        return S


def _product(rows: np.ndarray, Q: np.ndarray, precise: bool) -> np.ndarray:
    """rows @ Q.T in float64 (``precise``) or float32."""
    t = np.float64 if precise else np.float32
    return np.asarray(rows, dtype=t) @ np.asarray(Q, dtype=t).T


def dot_blocks(
    X, Q: np.ndarray, block: int = 1024, precise: bool = False
) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, S)`` with S ~ ``X[start:start + len(S)] @ Q.T`` for an in-memory array of
    unit rows or a ``UnitRows``: each entry within ``screen_margin(d, precise) / 2``.

    float32 (the default) for many columns; ``precise`` (float64 arithmetic) for a few: it
    costs ~2x the product, and its bound is ~10^4 times tighter, so almost nothing falls in
    the margin and has to be read and decided exactly."""
    if isinstance(X, UnitRows):
        yield from X.dot_blocks(Q, block, precise)
        return
    for s in range(0, len(X), block):
        yield s, _product(X[s : s + block], Q, precise)


def screen_rows(X, rows: np.ndarray, Q: np.ndarray, precise: bool = False) -> np.ndarray:
    """``X[rows] @ Q.T`` as a screen (``dot_blocks``'s bound)."""
    if isinstance(X, UnitRows):
        return X.screen_rows(rows, Q, precise)
    return _product(X[rows], Q, precise)


def raw_rows(X, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``UnitRows.raw`` for any ``X``: an array's unit rows come with norms 1."""
    if isinstance(X, UnitRows):
        return X.raw(rows)
    return np.asarray(X[rows], dtype=np.float32), np.ones(len(rows), dtype=np.float32)


def unit_of(X, rows: np.ndarray, R: np.ndarray) -> np.ndarray:
    """``UnitRows.unit`` for any ``X``: the exact unit rows from what ``raw_rows`` gave."""
    return X.unit(rows, R) if isinstance(X, UnitRows) else R


def screen(X, Q: np.ndarray, block: int = 1024) -> np.ndarray:
    """(len(Q), n) float32 ~ ``Q @ X.T``, within the float32 bound; one pass over ``X``."""
    Q = np.atleast_2d(np.asarray(Q, dtype=np.float32))
    if isinstance(X, np.ndarray):
        return Q @ X.T
    S = np.empty((len(Q), len(X)), dtype=np.float32)
    for s, part in dot_blocks(X, Q, block):
        S[:, s : s + len(part)] = part.T
    return S


def screen_margin(d: int, scale: float = 1.0, precise: bool = False) -> float:
    """How far below a screen's k-th value a row of the exact top k can score: twice the
    bound on |screen - exact| (the row's value and the k-th may each be off by one bound).

    float32: the float32 bound of a length-d product. ``precise``: the float32 rounding of
    the unit row (u32 = 2^-24 relative per coordinate, doubled for the norm and the division)
    plus the float64 bound of the product."""
    s = scale * (1.0 + 1e-6)
    if precise:
        return 2.0 * (2.0 * 2.0**-24 * s + dot_tolerance(d, np.float64, scale=s))
    return 2.0 * dot_tolerance(d, np.float32, scale=s)


class DotOrder:
    """The rows of ``X`` by dot product with ``x``, descending: ``rank_by_dot(X, x)``'s
    canonical order, computed a prefix at a time from a precise screen of every row (n
    float64, held): the top m is ranked exactly among the rows the screen cannot rule out,
    read from ``X``. A walk reads only the top of each order (anchors, the rare fallback), so
    one screen pass for every direction replaces a canonical ranking of the whole store."""

    def __init__(self, X, x: np.ndarray, screen: np.ndarray):
        self.X, self.x = X, np.asarray(x, dtype=np.float64)
        self.scores = np.asarray(screen, dtype=np.float64)
        self.margin = screen_margin(X.shape[1], float(np.sqrt(self.x @ self.x)), precise=True)
        self._order = np.zeros(0, dtype=np.int64)

    def prefix(self, m: int) -> np.ndarray:
        """The first ``m`` rows of the order (all if m >= n)."""
        n = len(self.scores)
        m = min(int(m), n)
        if m > len(self._order):
            want = min(n, max(m, 2 * len(self._order)))  # grow geometrically
            cand = None  # all rows
            if want < n:
                kth = np.partition(self.scores, n - want)[n - want]
                cand = np.flatnonzero(self.scores >= kth - self.margin)
            self._order = rank_by_dot(self.X, self.x, cand, want)[0]
        return self._order[:m]

    def free(self, taken: np.ndarray, first: int = 1024) -> Iterator[np.ndarray]:
        """The rows not ``taken``, in order, in consecutive chunks (``taken`` read as each
        chunk is made): ``np.concatenate`` of them all is ``order[~taken[order]]``."""
        done, m = 0, first
        while done < len(self.scores):
            part = self.prefix(m)[done:]
            done, m = done + len(part), 2 * m
            yield part[~taken[part]]

    def first_free(self, taken: np.ndarray, count: int) -> np.ndarray:
        """The first ``count`` rows not ``taken``, in order."""
        out, have = [], 0
        for part in self.free(taken, max(count, 1)):
            out.append(part)
            have += len(part)
            if have >= count:
                break
        return np.concatenate(out or [np.zeros(0, dtype=np.int64)])[:count]


def dot_orders(X, directions: np.ndarray, block: int = 1024) -> list[DotOrder]:
    """A ``DotOrder`` per direction, from one screen pass over ``X``."""
    D = np.atleast_2d(np.asarray(directions, dtype=np.float64))
    S = np.empty((len(X), len(D)))
    for s, part in dot_blocks(X, D, block, precise=True):
        S[s : s + len(part)] = part
    return [DotOrder(X, D[j], S[:, j].copy()) for j in range(len(D))]
