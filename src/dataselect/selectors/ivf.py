"""An inverted file over unit rows: approximate top-k by cosine for G2IS's ``graph=ivf``.

As faiss's IVF-Flat, in numpy. Spherical k-means on a random sample of ``train_rows`` rows
(all rows when there are no more) gives ~sqrt(n) centroids; one pass over ``X`` puts every
row in the list of its nearest centroid. A query ranks exactly the rows of its ``n_probe``
nearest lists: ~n_probe / n_lists of an exact list's cost, and no pass over the store.

Above 64 lists the lists are found in two levels: ``coarse`` ~ sqrt(n_lists) centroids, then
within each coarse cell its share of the lists (k-means on the cell's sample rows). A row goes
to the nearest fine centroid of its nearest coarse cell, so the pass over the store scores
each row against ~2 sqrt(n_lists) centroids instead of n_lists (at 270,679 x 8,192: 46
instead of 520, the pass's product 11x smaller). A query still probes the nearest lists
among all of them.

Every decision is canonical (``ranking.py``): a screen (``rowsource.dot_blocks``; float64
against up to 64 centroids of a streamed store, where its tight bound spares re-reading
rows, else float32), near-ties within its error bound decided exactly, k-means means summed
by ``tree_sum``; so the lists, and the neighbours, are the same on every BLAS kernel, block
size and for the store streamed or loaded. The raw rows of recently probed lists are kept
(up to ``cache_bytes``): a walk probes the same region again and again.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from dataselect.selectors.ranking import CANONICAL, dot_tolerance, rank_by_dot, tree_sum
from dataselect.selectors.rowsource import (
    UnitRows,
    dot_blocks,
    raw_rows,
    screen_margin,
    screen_rows,
    unit_of,
)


def _nearest(rows: np.ndarray, C64: np.ndarray, near: np.ndarray) -> np.ndarray:
    """Each row's canonical best centroid among its ``near`` ones (ties: the lower index).
    Decided by the float64 dot products where the best leads the rest by more than twice
    their error bound, else by ``rank_by_dot``."""
    F = np.asarray(rows, dtype=np.float64) @ C64.T
    F[~near] = -np.inf
    best = np.argmax(F, axis=1)
    top = F[np.arange(len(F)), best]
    F[np.arange(len(F)), best] = -np.inf
    tol = dot_tolerance(C64.shape[1], scale=1.0 + 1e-6)
    unsure = np.flatnonzero(top - F.max(axis=1) <= 2.0 * tol)
    for r in unsure:
        best[r] = rank_by_dot(C64, rows[r], np.flatnonzero(near[r]), 1)[0][0]
    return best


def _precise(X, C: np.ndarray) -> bool:
    """Screen in float64 (``rowsource.dot_blocks``) a streamed store against up to 64
    centroids: a near-tie there costs a read of the row, and float64 leaves almost none."""
    return isinstance(X, UnitRows) and len(C) <= 64


def _best(X, rows: np.ndarray, sims: np.ndarray, C64: np.ndarray) -> np.ndarray:
    """The canonical nearest centroid of rows ``rows`` of ``X``, from ``sims``, their screen
    against the centroids: only rows with near-ties are read and decided exactly."""
    best = np.argmax(sims, axis=1)
    margin = screen_margin(C64.shape[1], precise=sims.dtype == np.float64)
    near = sims >= sims.max(axis=1, keepdims=True) - margin
    amb = np.flatnonzero(near.sum(axis=1) > 1)
    if amb.size:
        best[amb] = _nearest(np.asarray(X[rows[amb]], dtype=np.float32), C64, near[amb])
    return best


def _assign(X, C: np.ndarray, block: int) -> np.ndarray:
    """Each row's nearest centroid, canonically; one pass over ``X``."""
    C64 = C.astype(np.float64)
    out = np.empty(len(X), dtype=np.int64)
    for s, sims in dot_blocks(X, C, block, precise=_precise(X, C)):
        out[s : s + len(sims)] = _best(X, np.arange(s, s + len(sims)), sims, C64)
    return out


def _assign_two_level(X, coarse: np.ndarray, fine: list[np.ndarray], block: int) -> np.ndarray:
    """Each row's list: the nearest fine centroid of its nearest coarse cell (fine lists are
    numbered cell after cell); one pass over ``X``."""
    first = np.cumsum([0] + [len(f) for f in fine])
    coarse64, fine64 = coarse.astype(np.float64), [f.astype(np.float64) for f in fine]
    out = np.empty(len(X), dtype=np.int64)
    for s, sims in dot_blocks(X, coarse, block, precise=_precise(X, coarse)):
        rows = np.arange(s, s + len(sims))
        cell = _best(X, rows, sims, coarse64)
        for g in np.unique(cell):
            r = rows[cell == g]
            sims_g = screen_rows(X, r, fine[g], precise=_precise(X, fine[g]))
            out[r] = first[g] + _best(X, r, sims_g, fine64[g])
    return out


def _kmeans(T: np.ndarray, k: int, iters: int, rng: np.random.Generator, block: int):
    """Spherical k-means on the in-memory unit rows ``T``: ``k`` rows drawn as the start,
    then assign by dot, re-center (``tree_sum``), re-normalize."""
    C = np.asarray(T[np.sort(rng.choice(len(T), k, replace=False))], dtype=np.float32)
    for _ in range(iters):
        for c, members in enumerate(_groups(_assign(T, C, block), k)):
            if members.size:
                C[c] = CANONICAL.normalize(tree_sum(T[members], axis=0)[None])[0]
    return C


def _load(X, rows: np.ndarray, block: int = 1024) -> np.ndarray:
    """Rows ``rows`` of ``X`` as one in-memory float32 array, read ``block`` at a time."""
    out = np.empty((len(rows), X.shape[1]), dtype=np.float32)
    for s in range(0, len(rows), block):
        out[s : s + block] = X[rows[s : s + block]]
    return out


def _groups(assign: np.ndarray, n_lists: int) -> list[np.ndarray]:
    """The rows of each list, ascending (``np.flatnonzero(assign == c)`` for every c)."""
    order = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[order], np.arange(n_lists + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(n_lists)]


class IVFIndex:
    """Approximate top-k by cosine: only the rows in the query's ``n_probe`` nearest lists.

    ``coarse``: None = two levels of ~sqrt(n_lists) cells above 64 lists (else one level);
    0 = one level; an int = that many coarse cells."""

    def __init__(
        self,
        X,
        n_lists: int | None = None,
        n_probe: int = 8,
        iters: int = 8,
        seed: int = 0,
        block: int = 2048,
        train_rows: int = 32768,
        cache_bytes: int = 1 << 30,
        coarse: int | None = None,
    ):
        n = len(X)
        if n_probe < 1 or iters < 0 or train_rows < 1:
            raise ValueError(
                f"ivf: need n_probe >= 1, iters >= 0, train_rows >= 1; got {n_probe}, {iters}, "
                f"{train_rows}"
            )
        self.X, self.n_probe, self.cache_bytes = X, n_probe, int(cache_bytes)
        rng = np.random.default_rng(seed)
        if n <= train_rows:  # every row
            T = X if isinstance(X, np.ndarray) else _load(X, np.arange(n))
        else:
            T = _load(X, np.sort(rng.choice(n, train_rows, replace=False)))
        n_lists = max(1, min(len(T), n_lists or int(np.sqrt(n))))
        if coarse is None:
            coarse = int(round(np.sqrt(n_lists))) if n_lists > 64 else 0
        self.coarse = min(int(coarse), n_lists)
        if self.coarse <= 1:
            C = _kmeans(T, n_lists, iters, rng, block)
            del T
            self.top, self.cell = C[:0], np.zeros(len(C), dtype=np.int64)
            assign = _assign(X, C, block)  # the pass over every row
        else:
            top = _kmeans(T, self.coarse, iters, rng, block)
            cells = _groups(_assign(T, top, block), self.coarse)
            share = np.maximum(1, np.round(n_lists * np.array([len(c) for c in cells]) / len(T)))
            fine = [  # a cell without sample rows keeps its coarse centroid as its one list
                _kmeans(T[c], min(int(m), len(c)), iters, rng, block) if len(c) else top[g : g + 1]
                for g, (c, m) in enumerate(zip(cells, share, strict=True))
            ]
            del T
            C = np.concatenate(fine)
            self.top = top  # the coarse centroids, and each list's coarse cell
            self.cell = np.repeat(np.arange(len(fine)), [len(f) for f in fine])
            assign = _assign_two_level(X, top, fine, block)  # the pass over every row
        self.C, self.C64 = C, C.astype(np.float64)
        self.lists = _groups(assign, len(C))
        self._rows: OrderedDict[int, np.ndarray] = OrderedDict()  # list -> its unit rows
        self._bytes = 0
        self.list_reads = 0

    def _list_rows(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """List ``c``'s rows as ``rowsource.raw_rows`` gives them (kept, most recent last)."""
        if c in self._rows:
            self._rows.move_to_end(c)
            return self._rows[c]
        R, norm = raw_rows(self.X, self.lists[c])
        self.list_reads += 1
        self._rows[c] = R, norm
        self._bytes += R.nbytes + norm.nbytes
        while self._bytes > self.cache_bytes and len(self._rows) > 1:
            old = self._rows.popitem(last=False)[1]
            self._bytes -= old[0].nbytes + old[1].nbytes
        return R, norm

    def neighbours(self, i: int, k: int) -> np.ndarray:
        """The canonical top ``k`` of the rows in node ``i``'s probed lists (self excluded):
        a float32 screen of the probed rows (from their raw rows), then the exact ranking of
        those within twice its bound of the screen's k-th value (``graph._rank_rows``)."""
        x = np.asarray(self.X[i], dtype=np.float32)
        near = self.C @ x  # a float32 screen of the centroids, then the near ones exactly
        p = min(self.n_probe, len(near))
        near = np.flatnonzero(near >= np.partition(near, len(near) - p)[-p] - screen_margin(len(x)))
        probes = rank_by_dot(self.C64, x, near, p)[0]
        parts = [self._list_rows(int(c)) for c in probes]
        cand = np.concatenate([self.lists[c] for c in probes])
        sims = np.concatenate([_divide(R @ x, norm) for R, norm in parts])
        sims[cand == i] = -np.inf
        k = min(int(k), cand.size - int((cand == i).any()))
        if k <= 0:
            return np.zeros(0, dtype=np.int32)
        kth = np.partition(sims, sims.size - k)[sims.size - k]
        sub = np.flatnonzero(sims >= kth - screen_margin(len(x)))
        sub = sub[np.argsort(cand[sub])]  # by row index: rank_by_dot breaks ties by position
        offsets = np.cumsum([0] + [len(R) for R, _ in parts])
        j = np.searchsorted(offsets, sub, side="right") - 1
        raw = np.empty((len(sub), len(x)), dtype=np.float32)
        for a in np.unique(j):  # the rows from each probed list at once
            at = np.flatnonzero(j == a)
            raw[at] = parts[a][0][sub[at] - offsets[a]]
        R = unit_of(self.X, cand[sub], raw)
        return cand[sub][rank_by_dot(R, x, None, k)[0]].astype(np.int32)


def _divide(sims: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """sims / norm, 0 where the norm is 0 (a zero row)."""
    return np.divide(sims, norm, out=np.zeros_like(sims), where=norm > 0)
