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
from typing import Any

import numpy as np

from dataselect.data.records import Example
from dataselect.data.targets import Target
from dataselect.selectors.base import Selection, Selector, composition
from dataselect.selectors.features import FeatureSet, subtask_groups


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


class LESSSelector(Selector):
    name = "less"
    needs_features = True

    def __init__(self, variant: str = "code", block_rows: int = 8192):
        if variant not in ("code", "paper"):
            raise ValueError(f"less: variant must be 'code' or 'paper', got {variant!r}")
        self.variant, self.block_rows = variant, block_rows

    def subtask_scores(self, pool: list[Example], target: Target, features: FeatureSet):
        """(n_pool, n_subtasks) checkpoint-weighted cosine scores, and the subtask names."""
        names, groups = subtask_groups(target.validation)
        weights = features.lr_weights()
        out = np.zeros((len(pool), len(names)), dtype=np.float64)
        for ckpt, w in zip(features.checkpoints, weights, strict=True):
            val = ckpt.val.features(ckpt.val.index([e.id for e in target.validation]))
            if self.variant == "paper":
                val = np.stack([val[g].mean(axis=0) for g in groups])
            val = _normalize(val)
            rows = ckpt.train.index([e.id for e in pool])
            for start in range(0, len(rows), self.block_rows):
                train = ckpt.train.features(rows[start : start + self.block_rows], normalize=True)
                cos = train @ val.T  # (block, n_val) or (block, n_subtasks)
                if self.variant == "code":
                    cos = np.stack([cos[:, g].mean(axis=1) for g in groups], axis=1)
                out[start : start + len(train)] += w * cos
        return out, names

    def select(
        self, pool: list[Example], target: Target, budget: int, seed: int, features: Any = None
    ) -> Selection:
        if not isinstance(features, FeatureSet):
            raise ValueError("less needs gradient features (the pipeline's features stage)")
        per_subtask, names = self.subtask_scores(pool, target, features)
        score = per_subtask.max(axis=1)
        # stable top-k: ties broken by pool order, so selections are reproducible
        top = np.argsort(-score, kind="stable")[:budget]
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
