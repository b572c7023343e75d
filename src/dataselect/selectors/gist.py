"""GIST (arXiv 2602.18584; GuanghuiMin/GIST): select in the target's gradient subspace.

    1. G = validation SGD gradients at one warmup checkpoint (N x D, full D, no sketch)
    2. K = G G^T (N x N, never D x D); eigh -> U, lambda; S = sqrt(lambda)
    3. keep k (fixed, or the fewest explaining ``variance`` of the energy);
       P = G^T U_k S_k^-1 (D x k): the top-k right singular vectors, an isometry onto the
       task subspace (not a whitening)
    4. validation coordinates U_k S_k (= G P); training coordinates P^T g (SGD g), one
       streaming pass over the pool per target
    5. per subtask (``grouping``): mean of the raw validation coordinates, L2-normalized;
       training coordinates L2-normalized; score = max over subtasks of the cosine; global
       top-k

``grouping=subtask`` groups the validation examples by their subtask labels.
``grouping=authors`` is ``matching_gist.py``'s rule: the N rows, in order, reshaped into
``n_subtasks`` consecutive groups of N / n_subtasks (their table: BBH 23, MMLU 57, TydiQA 9,
any other target 1), or, when n_subtasks does not divide N, one group per example (so BBH's
81 = 27 x 3 exemplars are scored by a per-example max). ``space=sketch`` runs the same
algorithm on the shared gradient store's sketched features: no per-target pool pass.
``energy_weight`` multiplies the cosine by |P^T g| / |g|, the share of g's norm inside the
subspace, which the plain cosine ignores.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from dataselect.data.records import Example
from dataselect.data.targets import Target
from dataselect.features.request import FeatureRequest
from dataselect.features.stores import FeatureSet, GradientStores
from dataselect.selectors.base import Selection, Selector, composition, subtask_groups
from dataselect.selectors.gist_pass import GISTPass
from dataselect.selectors.gist_subspace import (
    GISTCoords,
    effective_rank,
    gist_scores,
    task_subspace,
)
from dataselect.selectors.ranking import (
    CANONICAL,
    FAST,
    Arithmetic,
    canonical_dot,
    dot_tolerance,
    top_k,
)

# matching_gist.py's TASK_CONFIG: the subtask count it assumes per target (else 1)
AUTHORS_SUBTASKS = {"bbh": 23, "mmlu": 57, "tydiqa": 9}


def authors_groups(
    validation: list[Example], n_subtasks: int
) -> tuple[list[str], list[np.ndarray]]:
    """``matching_gist.py``'s groups: ``n_subtasks`` runs of N / n_subtasks consecutive rows,
    or one group per example when n_subtasks does not divide N. Each group is named by its
    rows' subtask label (``rows a-b`` when they mix labels)."""
    n = len(validation)
    size = max(n // n_subtasks, 1) if n % n_subtasks == 0 else 1
    groups = [np.arange(s, s + size) for s in range(0, n, size)]
    names = []
    for g in groups:
        labels = {validation[i].subtask for i in g}
        names.append(labels.pop() if len(labels) == 1 else f"rows {g[0]}-{g[-1]}")
    return names, groups


class GISTSelector(Selector[GISTCoords | FeatureSet]):
    name = "gist"

    def __init__(
        self,
        space: str = "exact",
        k: int | None = 150,
        variance: float | None = None,
        checkpoint: int = 1,
        energy_weight: bool = False,
        train_gradient: str = "sgd",
        grouping: str = "subtask",
        n_subtasks: int | None = None,
        block_rows: int = 2048,
    ):
        """``block_rows``: pool rows read from the store at a time (``space=sketch``;
        memory ~ block_rows x d x 8 B, 128 MiB at 2048 x 8192)."""
        if space not in ("exact", "sketch"):
            raise ValueError(f"gist: space must be 'exact' or 'sketch', got {space!r}")
        if grouping not in ("subtask", "authors"):
            raise ValueError(f"gist: grouping must be 'subtask' or 'authors', got {grouping!r}")
        if n_subtasks is not None and n_subtasks < 1:
            raise ValueError(f"gist: n_subtasks must be >= 1 or null, got {n_subtasks}")
        self.space, self.k, self.variance = space, k, variance
        self.checkpoint, self.energy_weight = checkpoint, energy_weight
        self.train_gradient = train_gradient
        self.grouping, self.n_subtasks = grouping, n_subtasks
        if block_rows < 1:
            raise ValueError(f"gist: block_rows must be >= 1, got {block_rows}")
        self.block_rows = int(block_rows)

    def request(self) -> FeatureRequest:
        """Exact: full-D validation gradients and a pass over the pool in their subspace.
        Sketch: the shared stores at one checkpoint, pool gradients of ``train_gradient``
        type (SGD, as in GIST)."""
        if self.space == "exact":
            return GISTPass(self.checkpoint, self.k, self.variance, self.train_gradient)
        return GradientStores(self.train_gradient, (int(self.checkpoint),))

    def _from_sketch(self, pool: list[Example], target: Target, features: FeatureSet):
        """The subspace of the sketched validation gradients, the pool's coordinates and
        norms in float64, and ``exact(positions)``: the same two, canonically."""
        (ckpt,) = features.checkpoints
        val = ckpt.val.features(ckpt.val.index([e.id for e in target.validation]))
        sub = task_subspace(val.astype(np.float64), self.k, self.variance)
        rows = ckpt.train.index([e.id for e in pool])
        P = sub.P.astype(np.float64)
        coords, norms = [], []  # O(n k): the store is read a block at a time
        for s in range(0, len(rows), self.block_rows):
            block = ckpt.train.features(rows[s : s + self.block_rows], dtype=np.float64)
            coords.append(FAST.dot(block, P.T))
            norms.append(FAST.norms(block))

        def exact(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            raw = ckpt.train.features(rows[positions])
            return canonical_dot(raw, P.T), CANONICAL.norms(raw)

        return sub, np.concatenate(coords), np.concatenate(norms), exact

    def groups(self, target: Target) -> tuple[list[str], list[np.ndarray]]:
        """The validation groups whose mean coordinates are scored against (``grouping``)."""
        if self.grouping == "subtask":
            return subtask_groups(target.validation)
        n = self.n_subtasks or AUTHORS_SUBTASKS.get(target.name, 1)
        return authors_groups(target.validation, n)

    def select(
        self,
        pool: list[Example],
        target: Target,
        budget: int,
        seed: int,
        features: GISTCoords | FeatureSet | None = None,
    ) -> Selection:
        if self.space == "exact":
            if not isinstance(features, GISTCoords):
                raise ValueError("gist (exact) needs the pipeline's GIST pass over the pool")
            sub = features.subspace
            pos = {i: n for n, i in enumerate(features.ids)}
            rows = np.array([pos[e.id] for e in pool])
            coords, norms = features.coords[rows], features.grad_norms[rows]
            d = None  # the coordinates are stored: exact as they are

            def exact(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return coords[positions], norms[positions]
        else:
            if not isinstance(features, FeatureSet):
                raise ValueError("gist (sketch) needs gradient features")
            sub, coords, norms, exact = self._from_sketch(pool, target, features)
            d = features.checkpoints[0].train.dim
        names, groups = self.groups(target)

        def scores(c: np.ndarray, g_norms: np.ndarray, ar: Arithmetic) -> np.ndarray:
            energy = None
            if self.energy_weight:
                energy = ar.norms(c) / np.where(g_norms > 0, g_norms, 1.0)
            return gist_scores(c, sub.val_coords, groups, energy, ar)

        per_subtask = scores(coords, norms, FAST)
        score = per_subtask.max(axis=1)
        top = top_k(
            score,
            budget,
            self._tolerance(coords, norms, d),
            lambda p: scores(*exact(p), CANONICAL).max(axis=1),
        )[0]
        chosen = [pool[i] for i in top]
        share = np.cumsum(sub.eigvals) / sub.eigvals.sum()
        return Selection(
            ids=[e.id for e in chosen],
            scores=[float(score[i]) for i in top],
            diagnostics={
                "composition": composition(chosen),
                "subtask_of_max": dict(Counter(names[j] for j in per_subtask[top].argmax(1))),
                "space": self.space,
                "grouping": self.grouping,
                "n_groups": len(groups),
                "k": sub.k,
                "explained_variance": float(share[sub.k - 1]),
                "effective_rank": effective_rank(sub.eigvals),
                "eigvals": sub.eigvals.tolist(),
            },
        )

    @staticmethod
    def _tolerance(coords: np.ndarray, norms: np.ndarray, d: int | None) -> np.ndarray:
        """Per-row bound on |fast - canonical| score. Coordinates computed from d-dim
        gradients carry ~sqrt(k) gamma_d |g| of error, which normalizing them scales by
        |g| / |P^T g|: large where g barely touches the subspace. Capped at 2, the range."""
        k = coords.shape[1]
        tol = np.full(len(coords), 2.0 * dot_tolerance(k))
        if d is not None:
            c = FAST.norms(coords)
            rel = np.divide(norms, c, out=np.full_like(c, np.inf), where=c > 0)
            rel[norms == 0] = 0.0  # a zero gradient scores exactly 0 either way
            tol += 2.0 * np.sqrt(k) * dot_tolerance(d) * rel
        return np.minimum(tol, 2.0)
