"""Cosine similarity to the target's validation examples, for representation baselines
(sentence embeddings, RDS): the aggregations their papers use, ranked canonically.

    mean_cosine      s(x) = mean over v of cos(x, v)                 = x^ . mean(v^)
    subtask_mean_max s(x) = max over subtasks S of mean over v in S of cos(x, v)  (LESS's)
    max_cosine       s(x) = max over v of cos(x, v), top-k by a faiss k-NN search over the
                     pool: x is in the top-k of max_v cos only if it is in the top-k of
                     cos(., v) for its best v, so the union of the queries' k-NN lists
                     (searched to depth 2k + 32) holds the answer. The flat inner-product
                     index (float32) finds the lists; the candidates are re-scored in float64
                     and checked: an example outside every list scores at most the deepest
                     list entry (+ float32 error), and when that bound is not below the
                     selection's cut, the whole pool is scored instead. The result equals
                     the dense computation.
    round_robin      RDS+ over several target tasks: each task's ranked list (max over its
                     validation examples) in turn gives its best example not yet taken.

Scores are computed fast (BLAS, float64) and every ranking goes through ``ranking.top_k``
with the canonical re-scoring of near-ties, so selections do not depend on the BLAS kernel.
"""

from __future__ import annotations

import numpy as np

from dataselect.selectors.ranking import CANONICAL, FAST, Arithmetic, dot_tolerance, top_k

FLOAT32_SLACK = 1e-4  # |faiss float32 cosine - float64 cosine| for unit vectors, generously


def unit(a: np.ndarray, ar: Arithmetic = FAST) -> np.ndarray:
    return ar.normalize(np.asarray(a, dtype=np.float64))


def mean_cosine(P: np.ndarray, Q: np.ndarray, k: int, ids=None):
    """The top ``k`` rows of ``P`` by mean cosine with the rows of ``Q``: (positions, scores)."""
    return subtask_mean_max(P, Q, [np.arange(len(Q))], k, ids)


def subtask_mean_max(P: np.ndarray, Q: np.ndarray, groups: list[np.ndarray], k: int, ids=None):
    """The top ``k`` rows of ``P`` by max over groups of the mean cosine with the group's rows
    of ``Q``, and (for diagnostics) the winning group of each: (positions, scores, group)."""

    def scores(rows: np.ndarray | None, ar: Arithmetic) -> np.ndarray:
        X = unit(P if rows is None else P[rows], ar)
        V = unit(Q, ar)
        centers = np.stack([ar.mean(V[g].T, axis=-1) for g in groups])  # (groups, d)
        return ar.dot(X, centers)  # (rows, groups)

    per_group = scores(None, FAST)
    fast = per_group.max(axis=1)
    tol = dot_tolerance(P.shape[1])
    pos, val = top_k(fast, k, tol, lambda p: scores(p, CANONICAL).max(axis=1), ids)
    return pos, val, per_group[pos].argmax(axis=1)


def _max_scores(P: np.ndarray, Q: np.ndarray, rows: np.ndarray, ar: Arithmetic) -> np.ndarray:
    return ar.dot(unit(P[rows], ar), unit(Q, ar)).max(axis=1)


def max_cosine(P: np.ndarray, Q: np.ndarray, k: int, ids=None, block: int = 4096):
    """The top ``k`` rows of ``P`` by max cosine over the rows of ``Q``: (positions, scores,
    how) where ``how`` says whether the k-NN candidates sufficed ("knn") or the whole pool
    was scored ("dense")."""
    import faiss

    n = len(P)
    k = min(k, n)
    Pf = unit(P).astype(np.float32)
    Qf = unit(Q).astype(np.float32)
    index = faiss.IndexFlatIP(Pf.shape[1])
    index.add(Pf)
    depth = min(n, 2 * k + 32)  # deeper than k: the bound below then clears the cut
    sims, nbrs = index.search(Qf, depth)  # (m, depth), each row descending
    cand = np.unique(nbrs[nbrs >= 0])
    fast = _max_scores(P, Q, cand, FAST)
    tol = dot_tolerance(P.shape[1])
    cid = cand if ids is None else np.asarray(ids)[cand]
    pos, val = top_k(fast, k, tol, lambda p: _max_scores(P, Q, cand[p], CANONICAL), cid)
    outside = float(sims[:, -1].max()) + FLOAT32_SLACK  # the best an unlisted row can score
    if depth == n or val[-1] - tol > outside:
        return cand[pos], val, "knn"
    rows = np.arange(n)
    fast = np.concatenate(
        [_max_scores(P, Q, rows[s : s + block], FAST) for s in range(0, n, block)]
    )
    pos, val = top_k(fast, k, tol, lambda p: _max_scores(P, Q, p, CANONICAL), ids)
    return pos, val, "dense"


def round_robin(
    P: np.ndarray, Q: np.ndarray, tasks: list[np.ndarray], k: int, ids=None
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """RDS+ across target tasks: each task t ranks the pool by max cosine with its validation
    rows ``Q[tasks[t]]``; in turn, each task adds its best row not yet taken, until ``k``.
    One task: the top ``k`` by max cosine. A task pops at most ``k`` rows (its own adds plus
    the others'), so its top-``k`` list suffices. Returns (positions, scores, task of each)."""
    lists = [max_cosine(P, Q[t], k, ids)[:2] for t in tasks]
    taken: dict[int, float] = {}
    owner: list[int] = []
    heads = [0] * len(tasks)
    while len(taken) < min(k, len(P)):
        progressed = False
        for t, (pos, val) in enumerate(lists):
            if len(taken) >= k:
                break
            while heads[t] < len(pos) and int(pos[heads[t]]) in taken:
                heads[t] += 1
            if heads[t] < len(pos):
                taken[int(pos[heads[t]])] = float(val[heads[t]])
                owner.append(t)
                heads[t] += 1
                progressed = True
        if not progressed:
            break
    order = list(taken)
    return np.array(order, dtype=np.int64), np.array([taken[i] for i in order]), owner
