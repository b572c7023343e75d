"""Rankings that do not depend on the BLAS kernel, the block size or the machine.

The last bits of a matrix product depend on the BLAS kernel (``OPENBLAS_CORETYPE``, MKL's
code path) and on where an entry falls in the kernel's blocking: one dot product computed
at two positions of a GEMM can differ by a few ulps. Exact duplicates then get different
scores, "ties broken by the lower index" fails, and one store gives another selection on
another machine or with another block size.

The rule, for every ranking and every threshold a selector decides with: the order is by
(canonical score descending, index ascending). A canonical score is computed with
``CANONICAL`` arithmetic: float64 products summed in a fixed pairwise tree of elementwise
adds (``tree_sum``). Each operation is IEEE-exact (correctly rounded); there is no BLAS and
no reassociation, so the bits are a function of the operands alone, at every position and on
every machine. Equal vectors get equal scores, and their ties break by index.

Scoring everything canonically would forgo BLAS, so ``top_k`` takes the fast (BLAS) scores
with a bound ``tol`` on |fast - canonical| (``dot_tolerance``). Each score is an interval
[fast - tol, fast + tol] holding the canonical one. Candidates whose intervals chain into
one overlapping group (in practice exact or near-exact duplicates) are re-scored
canonically; separate groups are already in canonical order. The result equals the full
canonical sort. With float64 fast scores ``tol`` is ~1e-12 and almost every group is one
candidate, so the re-scoring costs nothing next to the product.

What this does not fix: scoring directions computed by LAPACK (GIST's eigh, G2IS's PCA) may
differ in their last bits between kernels. Two *distinct* examples whose scores agree to
~1e-15 could then swap; duplicates cannot, since they score equally along any direction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_CHUNK = 1 << 22  # elements of float64 scratch per canonical product (32 MiB)


def tree_sum(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Sum along ``axis`` in a fixed pairwise tree (zero-padded to a power of two)."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    n = x.shape[-1]
    if n <= 1:
        return x[..., 0].copy() if n else np.zeros(x.shape[:-1])
    h = (1 << (n - 1).bit_length()) // 2  # half the padded length
    # the first halving step without building the zero padding: x[i] + x[i + h], or
    # x[i] + (+0.0) where x[i + h] is padding (as the padded tree adds: -0.0 becomes +0.0)
    buf = np.array(x[..., :h])
    buf[..., : n - h] += x[..., h:]
    buf[..., n - h :] += 0.0
    while h > 1:  # halves added elementwise: one fixed order of IEEE adds
        h //= 2
        buf[..., :h] += buf[..., h : 2 * h]
    return buf[..., 0].copy()


def canonical_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot products of the rows of ``a`` (m, d) with the rows of ``b`` (n, d) -> (m, n), or
    with one vector ``b`` (d,) -> (m,), whose bits depend on the two vectors only."""
    a = np.atleast_2d(np.asarray(a))
    vec = np.ndim(b) == 1
    b = np.atleast_2d(np.asarray(b))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"canonical_dot: dims {a.shape[1]} and {b.shape[1]} differ")
    out = np.empty((a.shape[0], b.shape[0]))
    rows = max(1, _CHUNK // max(1, a.shape[1]))
    for s in range(0, a.shape[0], rows):
        block = a[s : s + rows].astype(np.float64)
        for j in range(b.shape[0]):
            out[s : s + rows, j] = tree_sum(block * b[j].astype(np.float64))
    return out[:, 0] if vec else out


@dataclass(frozen=True)
class Arithmetic:
    """The few operations a score formula needs, fast (BLAS) or canonical. A selector writes
    its formula once against this and evaluates it in either: fast for every candidate,
    canonical for the few whose order the fast scores leave open."""

    canonical: bool

    def dot(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(m, d) x (n, d) -> (m, n); (m, d) x (d,) -> (m,). float64."""
        if self.canonical:
            return canonical_dot(a, b)
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        return a @ (b if b.ndim == 1 else b.T)

    def sum(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        return tree_sum(x, axis) if self.canonical else np.sum(x, axis=axis, dtype=np.float64)

    def mean(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        return self.sum(x, axis) / np.shape(x)[axis]

    def norms(self, a: np.ndarray) -> np.ndarray:
        """Row L2 norms of ``a`` (m, d)."""
        a = np.asarray(a, dtype=np.float64)
        sq = tree_sum(a * a) if self.canonical else np.einsum("ij,ij->i", a, a)
        return np.sqrt(sq)

    def normalize(self, a: np.ndarray) -> np.ndarray:
        """Rows of ``a`` scaled to unit norm, float64; zero rows stay zero."""
        a = np.array(a, dtype=np.float64)  # a copy, divided in place
        n = self.norms(a)[:, None]
        return np.divide(a, n, out=a, where=n > 0)


FAST = Arithmetic(canonical=False)
CANONICAL = Arithmetic(canonical=True)


def dot_tolerance(d: int, dtype=np.float64, scale: float = 1.0) -> float:
    """A bound on |fast - canonical| for a score built from length-``d`` dot products whose
    terms |x_i y_i| sum to at most ``scale`` (unit vectors: 1). A dot product summed in any
    order, with or without FMA, is off by at most gamma_d = d u / (1 - d u) times that sum
    (Higham, Accuracy and Stability, 3.1); the canonical tree by gamma_log2(d). The factor 2
    and the +64 cover the few float64 operations around the products (norms, divisions,
    means and weighted sums of such dot products, which do not grow the bound)."""
    u = float(np.finfo(dtype).eps) / 2
    return 2.0 * (int(d) + 64) * u * float(scale)


def top_k(
    scores: np.ndarray,
    k: int | None,
    tol: float | np.ndarray,
    rescore: Callable[[np.ndarray], np.ndarray],
    ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The positions of the ``k`` best (all if None) by (canonical score desc, ``ids`` asc),
    and their scores: canonical where they were re-scored, fast elsewhere (non-increasing).

    ``scores`` are the fast scores, each within ``tol`` (a scalar or one per score) of its
    canonical score; ``rescore(positions)`` returns the canonical scores of those positions;
    ``ids`` (default: the positions) break exact ties.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    n = s.size
    if not np.isfinite(s).all():
        raise ValueError(f"ranking: {int((~np.isfinite(s)).sum())} of {n} scores are not finite")
    ids = np.arange(n) if ids is None else np.asarray(ids).ravel()
    t = np.broadcast_to(np.asarray(tol, dtype=np.float64), s.shape)
    if k is None or k > n:
        k = n
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    hi, lo = s + t, s - t
    order = np.lexsort((ids, -hi))  # by upper end: the sweep over an interval graph
    run_lo = np.minimum.accumulate(lo[order])
    new = np.ones(n, dtype=bool)
    new[1:] = hi[order[1:]] < run_lo[:-1]  # below every interval so far: a new group
    group = np.cumsum(new) - 1
    stop = int(np.searchsorted(group, group[k - 1], side="right"))  # the group at the cut
    order, group = order[:stop], group[:stop]
    value = s[order]
    shared = np.bincount(group)[group] > 1
    if shared.any():
        value[shared] = np.asarray(rescore(order[shared]), dtype=np.float64)
    final = np.lexsort((ids[order], -value, group))
    return order[final][:k], value[final][:k]


def rank_by_dot(
    Y,
    x: np.ndarray,
    cand: np.ndarray | None = None,
    k: int | None = None,
    block: int = 1024,  # rows converted to float64 at a time: 1024 x 8192 x 8 B = 64 MiB
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``cand`` of ``Y`` (all if None; rows of norm <= 1) ranked by dot product with
    ``x``, canonically: the best ``k`` (all if None) as (row indices, float64 scores).

    ``Y`` is an array or anything indexed like one (a ``rowsource.UnitRows``): it is read
    ``block`` rows at a time, never whole."""
    return rank_many(Y, np.asarray(x)[None], cand, k, block)[0]


def rank_many(
    Y,
    xs: np.ndarray,
    cand: np.ndarray | None = None,
    k: int | None = None,
    block: int = 1024,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``rank_by_dot`` for each row of ``xs`` (q, d), all from one pass over ``Y``: the fast
    scores of a block are one (block, d) x (d, q) product. The same rankings as q separate
    calls (each is canonical), at the cost of about one."""
    X64 = np.atleast_2d(np.asarray(xs, dtype=np.float64))
    if cand is None:
        cand = np.arange(len(Y))
        parts = (Y[s : s + block] for s in range(0, len(Y), block))
    else:
        cand = np.asarray(cand, dtype=np.int64).ravel()
        parts = (Y[cand[s : s + block]] for s in range(0, len(cand), block))
    fast = np.concatenate(
        [np.asarray(p, dtype=np.float64) @ X64.T for p in parts] or [np.zeros((0, len(X64)))]
    )
    d = np.shape(Y)[1]
    out = []
    for j, x64 in enumerate(X64):
        scale = float(np.sqrt(x64 @ x64)) * (1.0 + 1e-6)  # |y . x| terms sum to <= |y||x|
        tol = dot_tolerance(d, scale=scale)

        def rescore(p: np.ndarray, x64: np.ndarray = x64) -> np.ndarray:
            rows = cand[p]
            parts = [canonical_dot(Y[rows[s : s + block]], x64) for s in range(0, len(rows), block)]
            return np.concatenate(parts or [np.zeros(0)])

        pos, val = top_k(fast[:, j], k, tol, rescore, ids=cand)
        out.append((cand[pos], val))
    return out
