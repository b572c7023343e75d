"""LESS (Xia et al., 2024; princeton-nlp/LESS): gradient cosine with the target, Adam-aware.

    for each warmup checkpoint c (weight w_c = its mean lr, renormalized to sum 1):
        Gamma_c(z) = sketched Adam feature of pool example z
        g_c(v)     = sketched SGD gradient of validation example v
    score(z) = max over subtasks s of  mean over v in s of  sum_c w_c cos(Gamma_c(z), g_c(v))
    select the global top-k

``variant=code`` (default) is the released code: per-example cosines, averaged per subtask.
``variant=paper`` is the paper's wording: cosine with the subtask's mean validation gradient
(the mean of the raw sketched gradients; the sketch is linear, so that is the sketch of the
mean gradient). The pool store is target-agnostic: a new target costs only its validation
gradients.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np

from dataselect.data.records import Example
from dataselect.data.targets import Target
from dataselect.features.stores import FeatureSet, GradientStores
from dataselect.selectors.base import Selection, Selector, composition, subtask_groups
from dataselect.selectors.ranking import CANONICAL, FAST, Arithmetic, dot_tolerance, top_k

_CHUNK = 2048  # rows normalized in float64 at a time (128 MiB at d = 8192)


def less_scores(
    train: Iterable[np.ndarray],
    val: list[np.ndarray],
    weights: np.ndarray,
    groups: list[np.ndarray],
    variant: str,
    ar: Arithmetic = FAST,
) -> np.ndarray:
    """(rows, n_subtasks) = sum_c w_c * score_c, from raw features per checkpoint c (pool
    rows ``train[c]``, validation ``val[c]``): ``code`` averages the per-example cosines of
    a subtask, ``paper`` takes the cosine with the subtask's mean validation gradient.
    ``train`` may be a generator: one checkpoint's rows are then in memory at a time."""
    out = None
    for T, V, w in zip(train, val, weights, strict=True):
        out = np.zeros((len(T), len(groups))) if out is None else out
        if variant == "paper":
            V = np.stack([ar.mean(V[g], axis=0) for g in groups])
        Vn = ar.normalize(V)
        for a in range(0, len(T), _CHUNK):  # float64 scratch of _CHUNK rows, not of T
            cos = ar.dot(ar.normalize(T[a : a + _CHUNK]), Vn)  # (rows, n_val or n_subtasks)
            if variant == "code":
                cos = np.stack([ar.mean(cos[:, g], axis=1) for g in groups], axis=1)
            out[a : a + _CHUNK] += w * cos
    if out is None:
        raise ValueError("less: the feature set has no checkpoints")
    return out


class LESSSelector(Selector[FeatureSet]):
    """Scores the pool ``block_rows`` rows at a time, checkpoint after checkpoint, straight
    from the memory-mapped stores: memory O(block_rows x d) plus O(n x subtasks) scores."""

    name = "less"

    def __init__(self, variant: str = "code", block_rows: int = 8192):
        if variant not in ("code", "paper"):
            raise ValueError(f"less: variant must be 'code' or 'paper', got {variant!r}")
        self.variant, self.block_rows = variant, block_rows

    def request(self) -> GradientStores:
        """The shared stores as the ``features`` config sets them (LESS: Adam, every epoch)."""
        return GradientStores()

    def subtask_scores(self, pool: list[Example], target: Target, features: FeatureSet):
        """(n_pool, n_subtasks) checkpoint-weighted cosine scores, the subtask names, and
        ``rescore(positions)``: the canonical score (max over subtasks) of those pool rows."""
        names, groups = subtask_groups(target.validation)
        weights = features.lr_weights()
        val_ids = [e.id for e in target.validation]
        vals = [c.val.features(c.val.index(val_ids)) for c in features.checkpoints]
        rows = [c.train.index([e.id for e in pool]) for c in features.checkpoints]

        def scores(positions: np.ndarray, ar: Arithmetic) -> np.ndarray:
            train = (  # read lazily: one checkpoint's block at a time
                c.train.features(r[positions])
                for c, r in zip(features.checkpoints, rows, strict=True)
            )
            return less_scores(train, vals, weights, groups, self.variant, ar)

        out = np.zeros((len(pool), len(names)), dtype=np.float64)
        for start in range(0, len(pool), self.block_rows):
            block = np.arange(start, min(len(pool), start + self.block_rows))
            out[block] = scores(block, FAST)
        return out, names, lambda positions: scores(positions, CANONICAL).max(axis=1)

    def select(
        self,
        pool: list[Example],
        target: Target,
        budget: int,
        seed: int,
        features: FeatureSet | None = None,
    ) -> Selection:
        if not isinstance(features, FeatureSet):
            raise ValueError("less needs gradient features (the pipeline's features stage)")
        per_subtask, names, rescore = self.subtask_scores(pool, target, features)
        score = per_subtask.max(axis=1)
        # canonical top-k (ranking.py): ties, rounding-level ones included, go to pool order
        d = features.checkpoints[0].train.dim
        top = top_k(score, budget, dot_tolerance(d), rescore)[0]
        winners = Counter(names[j] for j in per_subtask[top].argmax(axis=1))
        chosen = [pool[i] for i in top]
        return Selection(
            ids=[e.id for e in chosen],
            scores=[float(score[i]) for i in top],
            diagnostics={
                "composition": composition(chosen),
                "subtask_of_max": dict(winners.most_common()),
                "checkpoint_weights": features.lr_weights().tolist(),
                "score_mean_pool": float(score.mean()),
                "score_mean_selected": float(score[top].mean()),
                "variant": self.variant,
            },
        )
