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
~budget nodes, so it needs ~budget rows, not n. ``IVFIndex`` is the approximate option (an
inverted file, as in faiss's IVF-Flat, in numpy): spherical k-means into ~sqrt(n) lists; a
query scores only the rows of its ``n_probe`` nearest lists, ~n_probe / n_lists of the cost.
"""

from __future__ import annotations

import numpy as np

from dataselect.selectors.ranking import CANONICAL, dot_tolerance, rank_by_dot, tree_sum


def unit_rows(X: np.ndarray, out: np.ndarray | None = None, block: int = 1024) -> np.ndarray:
    """Rows of ``X`` L2-normalized canonically, as float32 (zero rows stay zero; ``out=X``
    works in place): duplicates stay bitwise duplicates, whatever their position and kernel."""
    out = np.empty(X.shape, dtype=np.float32) if out is None else out
    for s in range(0, len(X), block):
        out[s : s + block] = CANONICAL.normalize(X[s : s + block])
    return out


def _rank_rows(X: np.ndarray, rows: np.ndarray, screen: np.ndarray, k: int):
    """Each row's top ``k`` (self excluded): ``screen`` (len(rows), n) holds the float32 dot
    products, self at -inf. Any row that can be in the canonical top k lies within twice the
    float32 bound of the screen's k-th value; only those are ranked in float64."""
    n = screen.shape[1]
    idx = np.empty((len(rows), k), dtype=np.int64)
    sims = np.empty((len(rows), k), dtype=np.float64)
    if k == 0:
        return idx, sims
    margin = 2.0 * dot_tolerance(X.shape[1], np.float32, scale=1.0 + 1e-6)
    kth = np.partition(screen, n - k, axis=1)[:, n - k]  # the k-th largest of each row
    for r, i in enumerate(rows):
        cand = np.flatnonzero(screen[r] >= kth[r] - margin)
        idx[r], sims[r] = rank_by_dot(X, X[i], cand[cand != i], k)
    return idx, sims


def knn_graph(X: np.ndarray, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(indices int32 (n, K), sims float32 (n, K)), K = min(k, n - 1), built exactly."""
    n = X.shape[0]
    k = max(0, min(int(k), n - 1))
    indices = np.empty((n, k), dtype=np.int32)
    sims = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        S = X[start:stop] @ X.T  # (block, n), float32: the screen
        S[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # not its own neighbour
        indices[start:stop], sims[start:stop] = _rank_rows(X, np.arange(start, stop), S, k)
    return indices, sims


def neighbours_on_demand(X: np.ndarray, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Node ``i``'s row of ``knn_graph(X, k)``: (indices int32 (K,), sims float32 (K,))."""
    n = X.shape[0]
    k = max(0, min(int(k), n - 1))
    S = X[i : i + 1] @ X.T
    S[0, i] = -np.inf
    idx, sims = _rank_rows(X, np.array([i]), S, k)
    return idx[0].astype(np.int32), sims[0].astype(np.float32)


class IVFIndex:
    """Approximate top-k by cosine: only the rows in the query's ``n_probe`` nearest lists."""

    def __init__(
        self,
        X: np.ndarray,
        n_lists: int | None = None,
        n_probe: int = 8,
        iters: int = 8,
        seed: int = 0,
        block: int = 8192,
    ):
        n = len(X)
        self.X, self.n_probe = X, n_probe
        n_lists = max(1, min(n, n_lists or int(np.sqrt(n))))
        rng = np.random.default_rng(seed)
        C = X[np.sort(rng.choice(n, n_lists, replace=False))].astype(np.float32)
        for _ in range(iters):  # spherical k-means: assign by dot, re-center, re-normalize
            assign = self._assign(C, block)
            for c in range(n_lists):
                members = np.flatnonzero(assign == c)
                if members.size:
                    C[c] = unit_rows(tree_sum(X[members], axis=0)[None])[0]
        self.C = C
        assign = self._assign(C, block)
        self.lists = [np.flatnonzero(assign == c) for c in range(n_lists)]

    def _assign(self, C: np.ndarray, block: int) -> np.ndarray:
        """Each row's nearest centroid; near-ties (within the float32 bound) go canonical."""
        margin = 2.0 * dot_tolerance(self.X.shape[1], np.float32, scale=1.0 + 1e-6)
        out = []
        for s in range(0, len(self.X), block):
            sims = self.X[s : s + block] @ C.T
            best = np.argmax(sims, axis=1)
            near = sims >= sims.max(axis=1, keepdims=True) - margin
            for r in np.flatnonzero(near.sum(axis=1) > 1):
                best[r] = rank_by_dot(C, self.X[s + r], np.flatnonzero(near[r]), 1)[0][0]
            out.append(best)
        return np.concatenate(out)

    def neighbours(self, i: int, k: int) -> np.ndarray:
        probes = rank_by_dot(self.C, self.X[i], np.arange(len(self.C)), self.n_probe)[0]
        cand = np.sort(np.concatenate([self.lists[c] for c in probes]))
        cand = cand[cand != i]
        return rank_by_dot(self.X, self.X[i], cand, min(k, cand.size))[0].astype(np.int32)


class NeighbourLists:
    """``graph[i]`` -> node i's sorted neighbour indices, from a built graph or on demand."""

    def __init__(
        self,
        X: np.ndarray,
        k: int,
        mode: str = "on_demand",
        block: int = 1024,
        indices: np.ndarray | None = None,
    ):
        """``indices``: a graph built before (the cached one); else built here if exact.
        ``ivf``: approximate lists on demand from an ``IVFIndex`` (built on first use)."""
        if mode not in ("exact", "on_demand", "ivf"):
            raise ValueError(f"graph mode must be 'exact', 'on_demand' or 'ivf', got {mode!r}")
        self.X, self.k, self.mode = X, k, mode
        self.ivf = IVFIndex(X) if mode == "ivf" else None
        if mode == "exact" and indices is None:
            indices = knn_graph(X, k, block)[0]
        self.indices = indices if mode == "exact" else None
        self._cache: dict[int, np.ndarray] = {}

    @property
    def nodes_computed(self) -> int:
        return len(self.X) if self.mode == "exact" else len(self._cache)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.indices is not None:
            return self.indices[i]
        if i not in self._cache:
            self._cache[i] = (
                self.ivf.neighbours(i, self.k)
                if self.ivf is not None
                else neighbours_on_demand(self.X, i, self.k)[0]
            )
        return self._cache[i]
