"""The gradient graph of G2IS: each pool example's top-K neighbours by cosine, descending.

The authors did not release their builder, and a full N x N is impossible at 270k examples,
so the graph keeps K neighbours a node. ``X`` is an (n, d) float32 matrix of L2-normalized
features (``unit_rows``), so cosine = dot product. Ranking: similarity descending, ties
broken by the lower index first; a node is never its own neighbour. The order is canonical
(``ranking.py``): the same lists on every BLAS kernel and with every ``block``.

``knn_graph`` builds every list exactly, ``block`` rows at a time: a float32 ``block @ X.T``
screens each row to the candidates that can reach its top K (those within twice the float32
error bound of the K-th), which are then ranked in float64 with canonical tie-breaking.
Memory O(block * n). ``neighbours_on_demand`` computes one node's list; the walk visits only
~budget nodes, so it needs ~budget lists, not n (each a pass over ``X``: ``NeighbourLists``
batches the walk's likely next nodes into one pass). ``ivf.IVFIndex`` is the approximate
option: an inverted file; a query scores only the rows of its ``n_probe`` nearest lists.
``X`` may be a ``rowsource.UnitRows``: the store streamed, never loaded.
"""

from __future__ import annotations

import numpy as np

from dataselect.selectors.ivf import IVFIndex
from dataselect.selectors.ranking import CANONICAL, rank_by_dot
from dataselect.selectors.rowsource import screen, screen_margin


def unit_rows(X: np.ndarray, out: np.ndarray | None = None, block: int = 1024) -> np.ndarray:
    """Rows of ``X`` L2-normalized canonically, as float32 (zero rows stay zero; ``out=X``
    works in place): duplicates stay bitwise duplicates, whatever their position and kernel."""
    out = np.empty(X.shape, dtype=np.float32) if out is None else out
    for s in range(0, len(X), block):
        out[s : s + block] = CANONICAL.normalize(X[s : s + block])
    return out


def _rank_rows(X, rows: np.ndarray, Q: np.ndarray, screen: np.ndarray, k: int, group: int = 64):
    """Each row's top ``k`` (self excluded): ``Q`` holds the rows' unit vectors, ``screen``
    (len(rows), n) their float32 dot products with every row, self at -inf. Any row that can
    be in the canonical top k lies within twice the float32 bound of the screen's k-th value;
    only those are ranked in float64. They are read from ``X`` once per ``group`` rows (the
    union of their candidates, in index order, so that ties still break by index)."""
    n = screen.shape[1]
    idx = np.empty((len(rows), k), dtype=np.int64)
    sims = np.empty((len(rows), k), dtype=np.float64)
    if k == 0:
        return idx, sims
    margin = screen_margin(X.shape[1])
    kth = np.partition(screen, n - k, axis=1)[:, n - k]  # the k-th largest of each row
    cands = [np.flatnonzero(screen[r] >= kth[r] - margin) for r in range(len(rows))]
    cands = [c[c != i] for c, i in zip(cands, rows, strict=True)]
    for g in range(0, len(rows), group):
        union = np.unique(np.concatenate(cands[g : g + group]))
        Y = X[union] if len(union) <= 8192 else None  # else read per row (bounded memory)
        for r in range(g, min(g + group, len(rows))):
            if Y is None:
                idx[r], sims[r] = rank_by_dot(X, Q[r], cands[r], k)
            else:
                local, sims[r] = rank_by_dot(Y, Q[r], np.searchsorted(union, cands[r]), k)
                idx[r] = union[local]
    return idx, sims


def knn_graph(X, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(indices int32 (n, K), sims float32 (n, K)), K = min(k, n - 1), built exactly.
    ``X`` streamed (a ``UnitRows``) costs one pass over the store per ``block`` rows."""
    n = X.shape[0]
    k = max(0, min(int(k), n - 1))
    indices = np.empty((n, k), dtype=np.int32)
    sims = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        Q = np.asarray(X[start:stop], dtype=np.float32)
        S = screen(X, Q)  # (block, n), float32: the screen
        S[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # not its own neighbour
        indices[start:stop], sims[start:stop] = _rank_rows(X, np.arange(start, stop), Q, S, k)
    return indices, sims


def neighbours_many(X, nodes, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows ``nodes`` of ``knn_graph(X, k)`` from one pass over ``X``: (indices int32
    (m, K), sims float32 (m, K))."""
    nodes = np.asarray(nodes, dtype=np.int64).ravel()
    n = X.shape[0]
    k = max(0, min(int(k), n - 1))
    Q = np.asarray(X[nodes], dtype=np.float32)
    S = screen(X, Q)
    S[np.arange(len(nodes)), nodes] = -np.inf
    idx, sims = _rank_rows(X, nodes, Q, S, k)
    return idx.astype(np.int32), sims.astype(np.float32)


def neighbours_on_demand(X, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Node ``i``'s row of ``knn_graph(X, k)``: (indices int32 (K,), sims float32 (K,))."""
    idx, sims = neighbours_many(X, [i], k)
    return idx[0], sims[0]


class NeighbourLists:
    """``graph[i]`` -> node i's sorted neighbour indices, from a built graph or on demand.

    On demand, a list costs one pass over ``X`` whatever the number of lists it computes, so
    ``batch`` > 1 computes, in the same pass, the lists of up to ``batch - 1`` nodes the walk
    ``hint``ed it may visit next (the same lists: only the work changes)."""

    def __init__(
        self,
        X,
        k: int,
        mode: str = "on_demand",
        block: int = 1024,
        indices: np.ndarray | None = None,
        batch: int = 1,
        ivf: dict | None = None,
    ):
        """``indices``: a graph built before (the cached one); else built here if exact.
        ``ivf``: approximate lists on demand from an ``IVFIndex`` (``ivf`` its keyword
        arguments), built here."""
        if mode not in ("exact", "on_demand", "ivf"):
            raise ValueError(f"graph mode must be 'exact', 'on_demand' or 'ivf', got {mode!r}")
        if batch < 1:
            raise ValueError(f"graph batch must be >= 1, got {batch}")
        self.X, self.k, self.mode, self.batch = X, k, mode, int(batch)
        self.ivf = IVFIndex(X, **(ivf or {})) if mode == "ivf" else None
        if mode == "exact" and indices is None:
            indices = knn_graph(X, k, block)[0]
        self.indices = indices if mode == "exact" else None
        self._cache: dict[int, np.ndarray] = {}
        self._hint: list[int] = []
        self.passes = 0  # passes over X for on-demand lists
        self.visited: set[int] = set()

    @property
    def nodes_computed(self) -> int:
        return len(self.X) if self.mode == "exact" else len(self._cache)

    def hint(self, nodes) -> None:
        """Nodes the walk may visit soon, most likely first (used when ``batch`` > 1)."""
        self._hint = [int(v) for v in np.asarray(nodes).ravel()[: 4 * self.batch]]

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        self.visited.add(i)
        if self.indices is not None:
            return self.indices[i]
        if i not in self._cache:
            if self.ivf is not None:
                self._cache[i] = self.ivf.neighbours(i, self.k)
            else:
                extra = [h for h in dict.fromkeys(self._hint) if h != i and h not in self._cache]
                nodes = [i, *extra[: self.batch - 1]]
                for node, row in zip(nodes, neighbours_many(self.X, nodes, self.k)[0], strict=True):
                    self._cache[node] = row
                self.passes += 1
        return self._cache[i]
