"""G2IS on hand-worked and small random stores: the walk, its two rules, budgets, the graph."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from dataselect.data.records import make_example
from dataselect.data.targets import Target
from dataselect.features.store import StoreWriter
from dataselect.features.stores import CheckpointFeatures, FeatureSet, GradientStores
from dataselect.selectors.g2is import (
    G2ISSelector,
    core_knowledge,
    g2is_walk,
    largest_remainder,
)
from dataselect.selectors.graph import NeighbourLists, knn_graph, neighbours_on_demand, unit_rows

SPEC = {"model": "m", "sketch": {"kind": "none"}, "layout": {"dim": 2}, "checkpoint": "c"}


def ex(i: str, subtask: str = "t"):
    return make_example(
        i,
        "s",
        [{"role": "user", "content": i}, {"role": "assistant", "content": "a"}],
        {"subtask": subtask},
    )


def store(path, ids, rows):
    rows = np.asarray(rows, dtype=np.float32)
    w = StoreWriter(path, rows.shape[1], len(ids), {**SPEC, "dim": rows.shape[1]}, "float32", 4)
    w.add(ids, rows, [1] * len(ids), [1.0] * len(ids))
    return w.close()


def unit(deg: float) -> tuple[float, float]:
    return (math.cos(math.radians(deg)), math.sin(math.radians(deg)))


# The hand-worked case: unit vectors in the plane at these angles; kv = (1, 0) = 0 degrees.
# Angle between two nodes = the gap in degrees; dot < 0 (conflict) iff the gap is > 90.
ANGLES = {"a": 0, "b": 40, "f": 88, "c": 95, "d": 140, "e": -60, "g": -170, "h": -45}
NAMES = list(ANGLES)
# K = 3 neighbours, by gap:  a: b 40, h 45, e 60      b: a 40, f 48, c 55
#                            h: e 15, a 45, b 85
# budget 4, delta 0.8:
# 1. anchor: best dot with kv -> a.  S = {a}, |cos(sum, kv)| = 1
# 2. from a: b (gap 40, no conflict); sum at 20 deg, cos 0.940 >= 0.8 * 1 -> take b
# 3. from b: a taken; f: no conflict (88 from a, 48 from b) but sum(a, b, f) = (1.801, 1.642),
#    cos 0.739 < 0.8 * 0.940 = 0.752 -> rejected; c: 95 from a -> conflict.
#    Fallback, remaining by dot with kv: h (0.707): 45 from a, 85 from b, no conflict;
#    sum (2.473, -0.064), cos 0.9997 -> take h (fallback 1)
# 4. from h: e conflicts with b (gap 100); a, b taken. Fallback by dot with kv: e (conflict),
#    f (133 from h: conflict), c (95 from a), d (140 from a), g (170 from a) -> stop.
# Result: [a, b, h], under-fill 1.  fill=topup adds the best remaining by dot with kv: e.
HAND_ORDER = ["a", "b", "h"]


@pytest.fixture()
def hand(tmp_path):
    pool = [ex(n) for n in NAMES]
    train = store(tmp_path / "train", NAMES, [unit(a) for a in ANGLES.values()])
    # validation: (2, 0) and (0, 0): centered -> +-(1, 0), one component; mean (1, 0) orients it
    val = [ex("v1"), ex("v2")]
    vstore = store(tmp_path / "val", ["v1", "v2"], [(2.0, 0.0), (0.0, 0.0)])
    feats = FeatureSet([CheckpointFeatures("epoch_1", 1e-5, train, vstore)])
    return pool, Target.single("t", val, val[:1]), feats


def test_walk_matches_hand_worked_order():
    X = np.array([unit(a) for a in ANGLES.values()], dtype=np.float32)
    walk = g2is_walk(X, np.array([[1.0, 0.0]]), np.array([4]), NeighbourLists(X, 3, "exact"))
    assert [NAMES[i] for i in walk.order] == HAND_ORDER
    assert walk.via == ["anchor", "graph", "fallback"]
    assert walk.per_component == [{"budget": 4, "picked": 3, "fallbacks": 1, "underfill": 1}]


@pytest.mark.parametrize("graph", ["exact", "on_demand"])
def test_selector_reports_underfill_and_topup_fills(hand, graph):
    pool, target, feats = hand
    strict = G2ISSelector(graph=graph, k_neighbors=3).select(pool, target, 4, 0, feats)
    assert strict.ids == HAND_ORDER
    d = strict.diagnostics
    assert (d["underfill"], d["fallbacks"], d["selected"], d["n_components"]) == (1, 1, 3, 1)
    assert d["components"][0]["underfill"] == 1
    np.testing.assert_allclose(strict.scores, [1.0, unit(40)[0], unit(-45)[0]], rtol=1e-6)
    topup = G2ISSelector(graph=graph, k_neighbors=3, fill="topup").select(pool, target, 4, 0, feats)
    assert topup.ids == [*HAND_ORDER, "e"]
    assert topup.diagnostics["topup"] == 1
    assert topup.scores[-1] == pytest.approx(0.5, rel=1e-6)


def test_rule_ablations_and_no_graph(hand):
    pool, target, feats = hand
    # no conflict rule: step 3 still rejects f and c (c: sum cos 0.716 < 0.752, consistency),
    # falls back to h; step 4 from h takes e (gap 15): sum cos 0.954 >= 0.8 * 0.9997
    loose = G2ISSelector(k_neighbors=3, conflict_rule=False).select(pool, target, 4, 0, feats)
    assert loose.ids == ["a", "b", "h", "e"] and loose.diagnostics["underfill"] == 0
    # no consistency rule: step 3 takes f; from f (c 7, b 48, a 88) c conflicts with a, and
    # every remaining example conflicts with a, b or f (h: 133 from f) -> [a, b, f]
    free = G2ISSelector(k_neighbors=3, consistency_rule=False).select(pool, target, 4, 0, feats)
    assert free.ids == ["a", "b", "f"] and free.diagnostics["underfill"] == 1
    # graph=none: plain top-4 by dot with kv
    top = G2ISSelector(graph="none").select(pool, target, 4, 0, feats)
    assert top.ids == ["a", "b", "h", "e"]


def test_rules_hold_at_every_step_on_a_random_store():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 16)) + 0.3  # a shared drift, so the walk can go somewhere
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    V = rng.normal(size=(40, 16)) + rng.normal(size=16)
    core = core_knowledge(V, val_variance=0.5)
    assert core.components.shape[0] >= 2
    budgets = largest_remainder(60, core.weights)
    walk = g2is_walk(X, core.components, budgets, NeighbourLists(X, 10, "on_demand"))
    assert len(set(walk.order)) == len(walk.order)  # never twice, across components
    assert sum(s["fallbacks"] for s in walk.per_component) > 0
    for j, kv in enumerate(core.components):
        rows = [r for r, c in zip(walk.order, walk.component, strict=True) if c == j]
        assert len(rows) == walk.per_component[j]["picked"] <= budgets[j]
        G = X[rows].astype(np.float64)
        assert (G @ G.T >= 0).all()  # no conflict inside a component
        total = G[0].copy()
        for g in G[1:]:  # consistency, recomputed from the selection order
            old = abs(total @ kv) / np.linalg.norm(total)
            total += g
            assert abs(total @ kv) / np.linalg.norm(total) >= 0.8 * old - 1e-9


@pytest.mark.parametrize(
    ("total", "weights", "expected"),
    [
        (10, [1 / 3, 1 / 3, 1 / 3], [4, 3, 3]),  # tied remainders: the lower index first
        (7, [0.5, 0.3, 0.2], [4, 2, 1]),  # 3.5, 2.1, 1.4: the .5 gets the spare one
        (5, [0.6, 0.4], [3, 2]),  # exact
        (1, [0.25, 0.25, 0.25, 0.25], [1, 0, 0, 0]),
        (3, [0.1, 0.1, 0.8], [0, 0, 3]),  # 0.3, 0.3, 2.4: the .4 beats the tied .3s
        (2, [1 / 3, 1 / 3, 1 / 3], [1, 1, 0]),  # three tied .667s, two spares: indices 0, 1
    ],
)
def test_largest_remainder(total, weights, expected):
    assert largest_remainder(total, np.array(weights)).tolist() == expected


def test_largest_remainder_sums_exactly_on_random_weights():
    rng = np.random.default_rng(1)
    for _ in range(200):
        w = rng.random(rng.integers(1, 12))
        total = int(rng.integers(0, 1000))
        shares = largest_remainder(total, w)
        assert shares.sum() == total
        assert np.all(np.abs(shares - total * w / w.sum()) < 1)


def brute_force(X: np.ndarray, k: int) -> np.ndarray:
    S = X.astype(np.float64) @ X.astype(np.float64).T
    out = []
    for i in range(len(X)):
        j = np.array([x for x in range(len(X)) if x != i])
        out.append(j[np.lexsort((j, -S[i, j]))][:k])
    return np.array(out)


def test_graph_matches_brute_force_exact_and_on_demand():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(57, 8)).astype(np.float32)
    X[10] = X[3]  # an exact duplicate: ties broken by the lower index
    X[20] = X[3]
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    want = brute_force(X, 10)
    idx, sims = knn_graph(X, 10, block=16)
    assert idx.dtype == np.int32 and sims.dtype == np.float32 and idx.shape == (57, 10)
    np.testing.assert_array_equal(idx, want)
    assert idx[3][:2].tolist() == [10, 20] and idx[10][:2].tolist() == [3, 20]
    assert (np.diff(sims, axis=1) <= 0).all()
    np.testing.assert_allclose(sims, np.take_along_axis(X @ X.T, want, axis=1), rtol=1e-5)
    for i in range(len(X)):
        j, s = neighbours_on_demand(X, i, 10)
        np.testing.assert_array_equal(j, want[i])
        np.testing.assert_allclose(s, sims[i], rtol=1e-6)
    assert knn_graph(X, 100)[0].shape == (57, 56)  # K capped at n - 1


def test_lists_and_selection_do_not_depend_on_the_block_size(tmp_path):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(300, 24)).astype(np.float32)
    X[[7, 100, 299]] = X[7]  # duplicates land at different places in every blocking
    X[[50, 51]] = X[50]
    Xn = unit_rows(X)
    assert Xn[7].tobytes() == Xn[100].tobytes() == Xn[299].tobytes()
    small, whole = knn_graph(Xn, 12, block=7), knn_graph(Xn, 12, block=300)
    np.testing.assert_array_equal(small[0], whole[0])
    np.testing.assert_array_equal(small[1], whole[1])
    assert whole[0][7][:2].tolist() == [100, 299] and whole[0][299][:2].tolist() == [7, 100]
    for i in (7, 50, 51, 100, 299):
        np.testing.assert_array_equal(neighbours_on_demand(Xn, i, 12)[0], whole[0][i])
    ids = [f"p{i:03d}" for i in range(300)]
    pool = [ex(i) for i in ids]
    val = [ex(f"v{j}") for j in range(4)]
    V = X[[7, 50, 7, 200]] + 0.1 * rng.normal(size=(4, 24))
    picks = []
    for block in (7, 1024):  # a store each: the exact graph is cached per store
        train = store(tmp_path / str(block) / "features" / "train", ids, X)
        vstore = store(tmp_path / str(block) / "features" / "val", [e.id for e in val], V)
        feats = FeatureSet([CheckpointFeatures("epoch_1", 1e-5, train, vstore)])
        target = Target.single("t", val, val[:1])
        for graph in ("exact", "on_demand"):
            sel = G2ISSelector(k_neighbors=12, graph=graph, graph_block=block, anchor_pool=30)
            picks.append(sel.select(pool, target, 40, 0, feats).ids)
    assert all(p == picks[0] for p in picks[1:])
    assert len(picks[0]) >= 10 and {"p007", "p100", "p299"} <= set(picks[0])
    dup = [i for i in picks[0] if i in ("p007", "p100", "p299")]
    assert dup == sorted(dup)


def test_pca_threshold_weights_and_orientation():
    rng = np.random.default_rng(3)
    basis = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    coords = rng.normal(size=(200, 6)) * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    V = coords @ basis.T + 10 * basis[:, 0]  # the mean points along +basis[0]
    core = core_knowledge(V, val_variance=0.5)
    ratio = np.linalg.svd(V - V.mean(0), compute_uv=False) ** 2
    ratio /= ratio.sum()
    c = int(np.argmax(np.cumsum(ratio) > 0.5)) + 1
    assert len(core.weights) == c and core.weights.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(core.explained, ratio[:c])
    assert core.components[0] @ V.mean(0) > 0
    assert len(core_knowledge(V, n_components=4).weights) == 4


def test_feature_request_and_checkpoint_choice(hand):
    assert G2ISSelector().request() == GradientStores("adam", None)
    assert G2ISSelector(checkpoint=2).request() == GradientStores("adam", (2,))
    pool, target, feats = hand
    with pytest.raises(ValueError, match="epoch_3"):
        G2ISSelector(checkpoint=3).select(pool, target, 2, 0, feats)
    with pytest.raises(ValueError, match="needs gradient features"):
        G2ISSelector().select(pool, target, 2, 0)


def test_config_composes_and_instantiates():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import dataselect.config  # noqa: F401  (registers base_config)

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("config", overrides=["selector=g2is", "paths.output_dir=/tmp/x"])
    sel = instantiate(cfg.selector)
    assert isinstance(sel, G2ISSelector)
    assert (sel.graph, sel.fill, sel.delta, sel.checkpoint) == ("on_demand", "strict", 0.8, None)
    assert (sel.orient, sel.normalize_validation, sel.center) == ("mean", True, True)


def test_pipeline_runs_g2is_on_the_tiny_model(tmp_path):
    """End to end (tiny random model, ~3 s): Adam features at the last warmup epoch."""
    from test_pipeline import run

    m = run(tmp_path, "selector=g2is", "features.sketch.dim=64", "stage=select")
    d = m["diagnostics"]
    assert d["checkpoint"] == "epoch_2" and d["budget"] == 8
    assert d["selected"] + d["underfill"] == 8
    assert sum(c["budget"] for c in d["components"]) == 8


def test_ivf_approximate_graph_recalls_the_exact_neighbours():
    from dataselect.selectors.graph import NeighbourLists, knn_graph

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 32))
    X = centers[rng.integers(0, 10, 2000)] + 0.3 * rng.normal(size=(2000, 32))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    exact = knn_graph(X, 10)[0]
    approx = NeighbourLists(X, 10, "ivf")
    nodes = range(0, 2000, 20)
    recall = np.mean([len(set(approx[i]) & set(exact[i])) / 10 for i in nodes])
    assert recall >= 0.95, recall
    assert all(i not in approx[i] for i in nodes) and approx.nodes_computed == len(nodes)
    # sqrt(n) = 44 lists partition the rows; a query scores only its 8 nearest lists
    lists = approx.ivf.lists
    assert len(lists) == 44 and sorted(np.concatenate(lists).tolist()) == list(range(2000))


def svd_flip_rows(Vt: np.ndarray) -> np.ndarray:
    """sklearn >= 1.5's PCA sign rule, by hand: each row of Vt times the sign of its largest
    |entry| (the first one on a tie)."""
    top = Vt[np.arange(len(Vt)), np.abs(Vt).argmax(axis=1)]
    return Vt * np.sign(top)[:, None]


@pytest.mark.parametrize("shape", [(12, 30), (100, 8)])  # wide: full SVD; tall: covariance
def test_max_abs_components_are_sklearns_pca(shape):
    decomposition = pytest.importorskip("sklearn.decomposition")
    rng = np.random.default_rng(12)
    V = rng.normal(size=shape) * np.linspace(2.0, 0.5, shape[1]) + rng.normal(size=shape[1])
    core = core_knowledge(V, val_variance=0.5, orient="max_abs")
    pca = decomposition.PCA(n_components=0.5).fit(V)
    assert len(core.weights) == pca.n_components_ >= 2
    np.testing.assert_allclose(core.components, pca.components_, atol=1e-10)
    np.testing.assert_allclose(core.explained, pca.explained_variance_ratio_, rtol=1e-10)
    c = len(core.weights)
    Vt = np.linalg.svd(V - V.mean(0), full_matrices=False)[2][:c]
    any_signs = np.where(np.arange(c) % 2, -1.0, 1.0)[:, None]  # whatever LAPACK returned
    np.testing.assert_allclose(core.components, svd_flip_rows(Vt * any_signs), atol=1e-10)
    # orient=mean is another sign rule: it disagrees on at least one of these components
    signs = np.sign(np.sum(core_knowledge(V, 0.5).components * core.components, axis=1))
    assert np.all(np.abs(signs) == 1) and (signs < 0).any()


def test_normalize_validation_is_pca_of_unit_rows():
    decomposition = pytest.importorskip("sklearn.decomposition")
    rng = np.random.default_rng(12)
    V = rng.normal(size=(10, 20)) * rng.uniform(0.1, 20.0, size=(10, 1))  # norms 0.1 to 20
    V[3] = 0.0  # a zero row stays zero
    unit_v = V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-300)
    core = core_knowledge(V, 0.5, orient="max_abs", normalize=True)
    pca = decomposition.PCA(n_components=0.5).fit(unit_v)
    assert len(core.weights) == pca.n_components_
    np.testing.assert_allclose(core.components, pca.components_, atol=1e-10)
    np.testing.assert_allclose(core.explained, pca.explained_variance_ratio_, rtol=1e-10)
    raw = core_knowledge(V, 0.5, orient="max_abs")  # the big rows dominate the raw PCA
    assert abs(raw.components[0] @ core.components[0]) < 0.9


def xy_case(tmp_path, val_rows):
    """Pool px = (1, 0), py = (0, 1); validation gradients ``val_rows`` (2-d): pool, target,
    features."""
    pool = [ex("px"), ex("py")]
    train = store(tmp_path / "train", ["px", "py"], [(1.0, 0.0), (0.0, 1.0)])
    val = [ex(f"v{i}") for i in range(len(val_rows))]
    vstore = store(tmp_path / "val", [e.id for e in val], val_rows)
    feats = FeatureSet([CheckpointFeatures("epoch_1", 1e-5, train, vstore)])
    return pool, Target.single("t", val, val[:1]), feats


def test_normalize_validation_reaches_the_selector(tmp_path):
    """Validation (4, 0), (0, 1), (0, 1), (0, -1). Raw: centered x variance 12 beats y's 2.75,
    kv ~ +x (along the mean (1, .25)). Unit rows (1, 0), (0, 1), (0, 1), (0, -1): y variance
    2.75 beats x's .75, kv ~ +y (the mean (.25, .25)). Budget 1, no graph: the top by dot."""
    rows = [(4.0, 0.0), (0.0, 1.0), (0.0, 1.0), (0.0, -1.0)]
    pool, target, feats = xy_case(tmp_path, rows)
    picks = {}
    for on in (True, False):
        sel = G2ISSelector(graph="none", normalize_validation=on).select(pool, target, 1, 0, feats)
        assert sel.diagnostics["normalize_validation"] is on
        picks[on] = (sel.ids, sel.scores[0])
    assert picks[True][0] == ["py"] and picks[False][0] == ["px"]
    assert picks[True][1] > 0.95 and picks[False][1] > 0.95


def test_uncentered_components_are_the_svd_of_the_rows():
    rng = np.random.default_rng(5)
    V = rng.normal(size=(12, 9)) + 4.0 * rng.normal(size=9)  # a shared direction + spread
    core = core_knowledge(V, n_components=3, center=False)
    _, s, Vt = np.linalg.svd(V, full_matrices=False)
    np.testing.assert_allclose(np.abs(core.components @ Vt[:3].T), np.eye(3), atol=1e-10)
    np.testing.assert_allclose(core.explained, (s**2 / (s**2).sum())[:3], rtol=1e-10)
    mean = V.mean(0) / np.linalg.norm(V.mean(0))
    assert core.components[0] @ mean > 0.99  # the shared direction leads, oriented along it
    centered = core_knowledge(V, n_components=3)
    assert abs(centered.components[0] @ mean) < 0.9  # centering removed it


def test_center_reaches_the_selector(tmp_path):
    """Validation rows (1, .2), (1, -.2), (1, .2), (1, -.2), all along x but for a +-y wobble.
    Centered (the paper) the x parts cancel and the one component is y: the walk's top by dot is
    py, an example of the wobble. Uncentered, the first component is x (96% of the energy): px,
    the examples that share what the validation rows share. Budget 1, no graph."""
    pool, target, feats = xy_case(tmp_path, [(1.0, 0.2), (1.0, -0.2), (1.0, 0.2), (1.0, -0.2)])
    picks = {}
    for center in (True, False):
        sel = G2ISSelector(graph="none", center=center).select(pool, target, 1, 0, feats)
        assert sel.diagnostics["center"] is center
        picks[center] = sel.ids
    assert picks == {True: ["py"], False: ["px"]}
