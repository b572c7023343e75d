"""G2IS (Zhao et al., ACL 2025, arXiv 2502.11062; zy125413/G2IS): a constrained walk on the
gradient graph, along the principal directions of the target's validation gradients.

    T  = pool Adam features (LESS, sketched) at one warmup checkpoint, L2-normalized
    V  = validation SGD gradients (all subtasks together: the components are the multi-task rule)
    kv_1..kv_c = PCA(V, centered (``center=False``, not the paper: the SVD of V itself); rows
                 L2-normalized first, as LESS saves them, unless
                 ``normalize_validation`` is off): the fewest components explaining
                 ``val_variance`` (or ``n_components``); w_j = explained-variance ratio,
                 renormalized to sum 1
    b_j = budget split by w with the largest-remainder method (sums exactly to the budget)
    graph: each pool example's top-K neighbours by cosine, descending (graph.py)
    for each component j (strongest first), S = {}:
        anchor = the best of kv_j's top ``anchor_pool`` by dot product, not yet taken
        while |S| < b_j:
            from the last added node, take its first neighbour z not yet taken with
              (a) no conflict:   g_z . g_s >= 0 for every s in S
              (b) consistency:   |cos(sum_S g + g_z, kv_j)| >= delta |cos(sum_S g, kv_j)|
            none: fallback, scan every remaining example by dot with kv_j under (a), (b)
            none: stop this component (under-fill, reported)

The selection is listed in the order examples were added; an example's score is its dot
product with its component's kv (with the weighted direction sum_j w_j kv_j for ``topup``).
"Taken" is global (no example twice); conflicts are checked inside a component only, as in
the released code. The running sum makes each consistency check O(d); the checks are
vectorized over candidates. ``graph=none`` is the paper's no-graph ablation: per component,
the top b_j by dot product, no rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataselect.cache import materialize
from dataselect.data.records import Example
from dataselect.data.targets import Target
from dataselect.features.stores import FeatureSet, GradientStores
from dataselect.selectors.base import Selection, Selector, composition
from dataselect.selectors.graph import NeighbourLists, knn_graph
from dataselect.selectors.ranking import CANONICAL, canonical_dot, dot_tolerance, tree_sum
from dataselect.selectors.rowsource import UnitRows, dot_orders


@dataclass
class CoreKnowledge:
    """The validation gradients' principal directions and their weights."""

    components: np.ndarray  # (c, d) float64, orthonormal rows
    weights: np.ndarray  # (c,) explained-variance ratios renormalized to sum 1
    explained: np.ndarray  # (c,) explained-variance ratios (of the total variance)
    note: str = ""


def core_knowledge(
    V: np.ndarray,
    val_variance: float | None = 0.5,
    n_components: int | None = None,
    orient: str = "mean",
    normalize: bool = False,
    center: bool = True,
) -> CoreKnowledge:
    """PCA of V (m, d), centered (``center=False``: the SVD of V itself, so the first
    component is the validation gradients' common direction, not their spread). Threshold
    rule as sklearn's PCA(n_components=float): the fewest components whose cumulative ratio
    exceeds ``val_variance``; or ``n_components``. ``normalize`` L2-normalizes V's rows first
    (zero rows stay zero).

    PCA signs are arbitrary, but the anchor and the fallback rank by signed dot product:
    ``orient=mean`` points each kv where the (uncentered) mean validation gradient points,
    ``max_abs`` makes its largest-magnitude coordinate positive (the first one on a tie):
    sklearn's PCA since 1.5, ``svd_flip(u_based_decision=False)`` on the rows of Vt.
    Degenerate PCA (one validation example, or identical ones): the single component is the
    normalized mean validation gradient.
    """
    V = CANONICAL.normalize(V) if normalize else np.asarray(V, dtype=np.float64)
    mean = V.mean(axis=0)
    _, s, Vt = np.linalg.svd(V - mean if center else V, full_matrices=False)
    var = s**2
    rank = int((var > var[0] * 1e-12).sum()) if var.size and var[0] > 0 else 0
    if rank == 0:
        norm = np.linalg.norm(mean)
        if norm == 0:
            raise ValueError("g2is: the validation gradients are all zero")
        one = np.ones(1)
        return CoreKnowledge((mean / norm)[None], one, one, "degenerate PCA: mean gradient")
    ratio = var / var.sum()
    if n_components is not None:
        if n_components < 1:
            raise ValueError(f"g2is: n_components must be >= 1, got {n_components}")
        c = min(int(n_components), rank)
    else:
        if val_variance is None or not 0.0 < val_variance <= 1.0:
            raise ValueError(f"g2is: val_variance must be in (0, 1], got {val_variance}")
        c = min(int(np.searchsorted(np.cumsum(ratio), val_variance, side="right")) + 1, rank)
    comps = Vt[:c].copy()
    for j in range(c):
        if orient == "mean":
            flip = comps[j] @ mean < 0 or (
                comps[j] @ mean == 0 and comps[j][np.argmax(np.abs(comps[j]))] < 0
            )
        elif orient == "max_abs":
            flip = comps[j][np.argmax(np.abs(comps[j]))] < 0
        else:
            raise ValueError(f"g2is: orient must be 'mean' or 'max_abs', got {orient!r}")
        if flip:
            comps[j] = -comps[j]
    return CoreKnowledge(comps, ratio[:c] / ratio[:c].sum(), ratio[:c])


def largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``weights``, summing exactly to ``total``:
    floors first, then one more to the largest fractional parts (ties: lower index first)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"largest_remainder: bad weights {w}")
    exact = total * w / w.sum()
    shares = np.floor(exact).astype(np.int64)
    frac = exact - shares
    order = np.lexsort((np.arange(w.size), -frac))
    for r in range(int(total - shares.sum())):
        shares[order[r % w.size]] += 1
    return shares


@dataclass
class WalkResult:
    order: list[int] = field(default_factory=list)  # pool rows, in the order added
    component: list[int] = field(default_factory=list)  # -1 = topup
    via: list[str] = field(default_factory=list)  # anchor | graph | fallback | top | topup
    per_component: list[dict] = field(default_factory=list)


class _Component:
    """One component's growing set: members, running sum, and the two rules, vectorized.

    Candidates are checked in chunks that start at ``first`` rows and double up to ``chunk``:
    the first valid one is usually early, and each chunk reads its rows from ``X``."""

    def __init__(self, X, kv, budget, delta, conflict_rule, consistency_rule, chunk=4096, first=16):
        self.X, self.kv, self.delta, self.chunk, self.first = X, kv, delta, chunk, first
        self.conflict_rule, self.consistency_rule = conflict_rule, consistency_rule
        self.members = np.empty((max(budget, 1), X.shape[1]), dtype=np.float64)
        self.size = 0
        self.sum = np.zeros(X.shape[1], dtype=np.float64)
        self.blocked = np.zeros(len(X), dtype=bool)  # conflicts only grow with the set
        self.checked = np.zeros(len(X), dtype=np.int64)  # members a row is known not to oppose

    def add(self, z: int) -> None:
        g = self.X[z].astype(np.float64)
        self.members[self.size] = g
        self.size += 1
        self.sum += g

    def first_valid(self, cand: np.ndarray) -> int | None:
        """The first of ``cand`` (in order) passing both rules, or None.

        Both rules compare float64 products with a threshold. A decision whose margin is
        within the float64 error bound is taken again on canonical values (``ranking.py``),
        so the walk is the same on every BLAS kernel and chunking."""
        sn2 = float(canonical_dot(self.sum, self.sum)[0])
        sk = float(canonical_dot(self.sum, self.kv)[0])
        old = abs(sk) / np.sqrt(sn2) if sn2 > 1e-20 else 0.0
        e, s1 = dot_tolerance(self.X.shape[1], scale=1.0 + 1e-6), np.sqrt(sn2) + 1.0
        s, size = 0, self.first
        while s < len(cand):  # chunks grow: conflicts found on the way are kept (blocked)
            c = cand[s : s + size]
            s, size = s + size, min(2 * size, self.chunk)
            c = c[~self.blocked[c]]
            if c.size == 0:
                continue
            C = self.X[c].astype(np.float64)
            ok = np.ones(len(c), dtype=bool)
            if self.conflict_rule and self.size:
                ok &= ~self._conflicts(c, C, e)
            if self.consistency_rule:
                num = sk + C @ self.kv  # (sum_S g + g_z) . kv
                n2 = sn2 + 2.0 * (C @ self.sum) + np.einsum("ij,ij->i", C, C)
                new = _consistency(num, n2)
                safe = np.maximum(n2, 1e-300)  # a zero norm is decided canonically below
                err = 2.0 * e * s1 * (1.0 / np.sqrt(safe) + s1 / safe)
                unsure = np.flatnonzero((np.abs(new - self.delta * old) <= err) | (n2 <= 1e-19))
                if unsure.size:
                    Cu = C[unsure]
                    num_u = sk + canonical_dot(Cu, self.kv)
                    n2_u = sn2 + 2.0 * canonical_dot(Cu, self.sum) + tree_sum(Cu * Cu)
                    new[unsure] = _consistency(num_u, n2_u)
                ok &= new >= self.delta * old
            hit = np.flatnonzero(ok)
            if hit.size:
                return int(c[hit[0]])
        return None

    def _conflicts(self, c: np.ndarray, C: np.ndarray, e: float) -> np.ndarray:
        """Which rows ``c`` (values ``C``) have a negative dot product with a member; a dot
        within ``e`` of 0 is decided canonically. A row found free of conflict is not checked
        again against the same members (the set only grows): it costs the new members only."""
        out = np.zeros(len(c), dtype=bool)
        done = self.checked[c]
        for rows in (np.flatnonzero(done == 0), np.flatnonzero(done > 0)):
            lo = int(done[rows].min()) if rows.size else self.size
            if lo >= self.size:
                continue
            dots = C[rows] @ self.members[lo : self.size].T
            fresh = np.arange(lo, self.size)[None, :] >= done[rows][:, None]
            r, m = np.nonzero(fresh & (np.abs(dots) <= e))  # sign unsure: decide canonically
            dots[r, m] = tree_sum(C[rows[r]] * self.members[lo + m])
            out[rows] = ((dots < 0) & fresh).any(axis=1)
        self.blocked[c[out]] = True
        self.checked[c[~out]] = self.size
        return out


def _consistency(num: np.ndarray, n2: np.ndarray) -> np.ndarray:
    """|cos(sum_S g + g_z, kv)| from its numerator and squared norm (0 for a zero sum)."""
    return np.where(n2 > 1e-20, np.abs(num) / np.sqrt(np.maximum(n2, 1e-300)), 0.0)


def g2is_walk(
    X: np.ndarray,
    components: np.ndarray,
    budgets: np.ndarray,
    graph: NeighbourLists | None,
    anchor_pool: int = 1000,
    delta: float = 0.8,
    conflict_rule: bool = True,
    consistency_rule: bool = True,
    topup_direction: np.ndarray | None = None,
    excluded: np.ndarray | None = None,
) -> WalkResult:
    """The walk over all components (``graph=None``: the no-graph top-b ablation); then, if
    ``topup_direction`` is given, fill the global remainder by dot product with it.
    ``excluded`` (bool, n) marks rows that are never picked (not candidates for this target:
    the graph is built over the whole store, so one graph serves every target)."""
    n = len(X)
    taken = np.zeros(n, dtype=bool) if excluded is None else excluded.copy()
    out = WalkResult()
    # every order by dot product the walk may need, from one screen pass over X; each is
    # ranked exactly as far as the walk reads it (rowsource.DotOrder)
    directions = [kv for kv, b in zip(components, budgets, strict=True) if int(b) > 0]
    if topup_direction is not None:
        directions.append(topup_direction)
    ranked = dot_orders(X, np.array(directions)) if directions else []
    ranked.reverse()  # popped in order

    def take(z: int, j: int, how: str) -> None:
        taken[z] = True
        out.order.append(z)
        out.component.append(j)
        out.via.append(how)

    for j, (kv, b) in enumerate(zip(components, budgets, strict=True)):
        b = int(b)
        stats = {"budget": b, "picked": 0, "fallbacks": 0, "underfill": 0}
        out.per_component.append(stats)
        if b <= 0:
            continue
        by_kv = ranked.pop()  # dot with kv, descending (canonical order)
        if graph is None:
            top = by_kv.first_free(taken, b)
            for z in top:
                take(int(z), j, "top")
            stats["picked"] = len(top)
            stats["underfill"] = b - stats["picked"]
            continue
        head = by_kv.prefix(anchor_pool)
        free_top = head[~taken[head]]
        free = free_top if free_top.size else by_kv.first_free(taken, 1)  # the global anchor
        if free.size == 0:
            stats["underfill"] = b
            continue
        comp = _Component(X, kv, b, delta, conflict_rule, consistency_rule)
        last = int(free[0])
        take(last, j, "anchor")
        comp.add(last)
        while comp.size < b:
            nb = np.asarray(graph[last], dtype=np.int64)
            z = comp.first_valid(nb[~taken[nb]])
            how = "graph"
            if z is None:  # every remaining example, by dot with kv
                how = "fallback"
                for part in by_kv.free(taken):
                    if (z := comp.first_valid(part)) is not None:
                        break
                if z is None:
                    break
                stats["fallbacks"] += 1
            take(z, j, how)
            comp.add(z)
            if how == "graph":  # z's list is next; the rest of nb may follow (batched lists)
                graph.hint(nb[~taken[nb] & ~comp.blocked[nb]])
            last = z
        stats["picked"] = comp.size
        stats["underfill"] = b - comp.size
    if topup_direction is not None:
        missing = int(sum(budgets)) - len(out.order)
        if missing > 0:
            for z in ranked.pop().first_free(taken, missing):
                take(int(z), -1, "topup")
    return out


def mean_pairwise_cosine(X, rows: np.ndarray, block: int = 1024) -> float | None:
    """Mean cosine over distinct pairs of the L2-normalized rows ``rows`` of ``X`` (None
    below two rows), read ``block`` rows at a time."""
    m = len(rows)
    if m < 2:
        return None
    total, squares = np.zeros(X.shape[1]), 0.0
    for s in range(0, m, block):
        Xs = np.asarray(X[rows[s : s + block]], dtype=np.float64)
        total += Xs.sum(axis=0)
        squares += float(np.einsum("ij,ij->", Xs, Xs))
    return float((total @ total - squares) / (m * (m - 1)))


GRAPH_ORDER = "canonical"


def cached_graph(store, X: np.ndarray, k: int, block: int) -> np.ndarray:
    """The store's exact top-k graph, built once and kept beside it in the cache
    (``<cache>/graph/<store key>-k<k>-<order>/``), reused across targets, budgets and seeds.
    ``GRAPH_ORDER`` names the neighbour order: graphs built before canonical ranking are not
    served."""
    name = f"{Path(store.path).name}-k{k}-{GRAPH_ORDER}"
    path = Path(store.path).parent.parent / "graph" / name
    materialize(path, lambda work: np.save(work / "indices.npy", knn_graph(X, k, block)[0]))
    return np.load(path / "indices.npy")


class G2ISSelector(Selector[FeatureSet]):
    name = "g2is"

    def __init__(
        self,
        checkpoint: int | None = None,
        val_variance: float | None = 0.5,
        n_components: int | None = None,
        orient: str = "mean",
        normalize_validation: bool = True,
        center: bool = True,
        k_neighbors: int = 100,
        graph: str = "on_demand",
        graph_block: int = 1024,
        anchor_pool: int = 1000,
        delta: float = 0.8,
        fill: str = "strict",
        conflict_rule: bool = True,
        consistency_rule: bool = True,
        graph_batch: int = 1,
        ivf: dict | None = None,
    ):
        """``graph_batch``: on-demand lists computed per pass over the store (the walk's
        likely next nodes; the same lists). ``ivf``: ``graph.IVFIndex`` keyword arguments
        (n_lists, n_probe, train_rows, ...) for ``graph=ivf``."""
        if graph not in ("exact", "on_demand", "ivf", "none"):
            raise ValueError(f"g2is: graph must be exact | on_demand | ivf | none, got {graph!r}")
        if fill not in ("strict", "topup"):
            raise ValueError(f"g2is: fill must be strict | topup, got {fill!r}")
        if orient not in ("mean", "max_abs"):
            raise ValueError(f"g2is: orient must be mean | max_abs, got {orient!r}")
        if k_neighbors < 1 or anchor_pool < 1:
            raise ValueError("g2is: k_neighbors and anchor_pool must be >= 1")
        self.checkpoint, self.val_variance, self.n_components = (
            checkpoint,
            val_variance,
            n_components,
        )
        self.orient, self.k_neighbors, self.graph = orient, k_neighbors, graph
        self.normalize_validation, self.center = normalize_validation, center
        self.graph_block, self.anchor_pool, self.delta, self.fill = (
            graph_block,
            anchor_pool,
            delta,
            fill,
        )
        self.conflict_rule, self.consistency_rule = conflict_rule, consistency_rule
        self.graph_batch, self.ivf = graph_batch, dict(ivf or {})

    def request(self) -> GradientStores:
        """LESS's Adam features; one warmup epoch if ``checkpoint`` is set (else all are built,
        the shared LESS store, and the last one is used)."""
        ckpts = None if self.checkpoint is None else (int(self.checkpoint),)
        return GradientStores("adam", ckpts)

    def _checkpoint(self, features: FeatureSet):
        if not features.checkpoints:
            raise ValueError("g2is: the feature set has no checkpoints")
        if self.checkpoint is None:
            return features.checkpoints[-1]
        name = f"epoch_{int(self.checkpoint)}"
        for c in features.checkpoints:
            if c.name == name:
                return c
        have = [c.name for c in features.checkpoints]
        raise ValueError(f"g2is: no checkpoint {name} in the features ({have})")

    def select(
        self,
        pool: list[Example],
        target: Target,
        budget: int,
        seed: int,
        features: FeatureSet | None = None,
    ) -> Selection:
        if not isinstance(features, FeatureSet):
            raise ValueError("g2is needs gradient features (the pipeline's features stage)")
        ckpt = self._checkpoint(features)
        # the whole store (every target's candidates are a subset): one graph per store;
        # streamed, canonically normalized as read (rowsource.py): never loaded whole
        X = UnitRows(ckpt.train)
        cand = ckpt.train.index([e.id for e in pool])
        excluded = np.ones(len(X), dtype=bool)
        excluded[cand] = False
        V = ckpt.val.features(ckpt.val.index([e.id for e in target.validation]))
        core = core_knowledge(
            V,
            self.val_variance,
            self.n_components,
            self.orient,
            self.normalize_validation,
            self.center,
        )
        budgets = largest_remainder(budget, core.weights)
        nbrs = None
        if self.graph != "none":
            indices = (
                cached_graph(ckpt.train, X, self.k_neighbors, self.graph_block)
                if (self.graph == "exact")
                else None
            )
            nbrs = NeighbourLists(
                X,
                self.k_neighbors,
                self.graph,
                self.graph_block,
                indices,
                self.graph_batch,
                self.ivf,
            )
        direction = None
        if self.fill == "topup":  # sum_j w_j kv_j, in a fixed order of adds
            direction = tree_sum(core.weights[:, None] * core.components, axis=0)
        walk = g2is_walk(
            X,
            core.components,
            budgets,
            nbrs,
            self.anchor_pool,
            self.delta,
            self.conflict_rule,
            self.consistency_rule,
            direction,
            excluded,
        )
        rows = np.array(walk.order, dtype=np.int64)
        # score: the dot with the example's component kv (topup: with sum_j w_j kv_j)
        kvs = [direction if j < 0 else core.components[j] for j in walk.component]
        kvs = np.stack(kvs) if kvs else np.zeros((0, X.shape[1]))
        scores = np.concatenate(
            [
                np.einsum("ij,ij->i", X[rows[s : s + 1024]].astype(np.float64), kvs[s : s + 1024])
                for s in range(0, len(rows), 1024)
            ]
            or [np.zeros(0)]
        )
        pool_pos = {int(r): i for i, r in enumerate(cand)}
        chosen = [pool[pool_pos[int(r)]] for r in rows]
        underfill = sum(s["underfill"] for s in walk.per_component)
        return Selection(
            ids=[e.id for e in chosen],
            scores=[float(s) for s in scores],
            diagnostics={
                "composition": composition(chosen),
                "checkpoint": ckpt.name,
                "n_components": len(core.weights),
                "explained_variance": float(core.explained.sum()),
                "component_weights": core.weights.tolist(),
                "pca_note": core.note,
                "normalize_validation": self.normalize_validation,
                "center": self.center,
                "components": walk.per_component,
                "fallbacks": sum(s["fallbacks"] for s in walk.per_component),
                "underfill": underfill,
                "topup": sum(1 for v in walk.via if v == "topup"),
                "selected": len(rows),
                "budget": int(budget),
                "via": {v: walk.via.count(v) for v in dict.fromkeys(walk.via)},
                "mean_pairwise_cosine": mean_pairwise_cosine(X, rows),
                "graph": self.graph,
                "k_neighbors": self.k_neighbors,
                "graph_nodes_computed": nbrs.nodes_computed if nbrs is not None else 0,
                "graph_lists_used": len(nbrs.visited) if nbrs is not None else 0,
                "graph_passes": nbrs.passes if nbrs is not None else 0,
                "store_rows_read": X.rows_read,
                "fill": self.fill,
                "delta": self.delta,
                "rules": {"conflict": self.conflict_rule, "consistency": self.consistency_rule},
            },
        )
