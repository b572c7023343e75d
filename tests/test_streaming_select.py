"""Selection streamed from the memory-mapped store equals selection on the loaded matrix.

Every store-based selector reads the fp16 store a block at a time (issue #15: 270,679 x 8,192
must fit in 4 GB). On small multi-shard stores, each selection is checked against a direct
numpy computation on the loaded matrix (float64, no near-ties in these data) and against the
same code run on the in-memory array; no read ever asks for the whole store.
"""

from __future__ import annotations

import numpy as np
import pytest

from dataselect.data.records import make_example
from dataselect.data.targets import Target
from dataselect.features.store import GradientStore, StoreWriter
from dataselect.features.stores import CheckpointFeatures, FeatureSet
from dataselect.selectors.base import subtask_groups
from dataselect.selectors.g2is import (
    G2ISSelector,
    core_knowledge,
    g2is_walk,
    largest_remainder,
)
from dataselect.selectors.gist import GISTSelector
from dataselect.selectors.gist_subspace import task_subspace
from dataselect.selectors.graph import (
    IVFIndex,
    NeighbourLists,
    knn_graph,
    neighbours_many,
    unit_rows,
)
from dataselect.selectors.less import LESSSelector
from dataselect.selectors.ranking import dot_tolerance, rank_by_dot, rank_many
from dataselect.selectors.rowsource import UnitRows, dot_orders, screen

SPEC = {"model": "m", "sketch": {"kind": "none"}, "layout": {}}
SUBTASKS = "abcd"


def ex(i: str, subtask: str = "t"):
    msgs = [{"role": "user", "content": i}, {"role": "assistant", "content": "a"}]
    return make_example(i, "s", msgs, {"subtask": subtask})


def write(path, ids, rows, checkpoint="c", dtype="float16", shard_size=97):
    spec = {**SPEC, "checkpoint": checkpoint}
    w = StoreWriter(path, rows.shape[1], len(ids), spec, dtype, shard_size)
    w.add(ids, rows, [1] * len(ids), [1.0] * len(ids))
    return w.close()


class Reads:
    """Records the rows of every read from a store (to show none reads it whole)."""

    def __init__(self, monkeypatch):
        self.sizes: list[int] = []
        features, take = GradientStore.features, GradientStore.take  # ``rows`` calls take

        def spy_features(store, idx=None, *a, **k):
            self.sizes.append(len(store) if idx is None else int(np.size(idx)))
            return features(store, idx, *a, **k)

        def spy_take(store, idx, *a, **k):
            self.sizes.append(int(np.size(idx)))
            return take(store, idx, *a, **k)

        monkeypatch.setattr(GradientStore, "features", spy_features)
        monkeypatch.setattr(GradientStore, "take", spy_take)


def clustered(rng, n, d, clusters=8, noise=0.6):
    centers = rng.normal(size=(clusters, d))
    return (centers[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, d))).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 2,000 x 24 fp16 pool (21 shards) at two checkpoints, 12 validation rows over 4
    subtasks; the pool is the store less its last 40 rows."""
    root = tmp_path_factory.mktemp("streaming") / "features"
    rng = np.random.default_rng(0)
    n, d = 2000, 24
    ids = [f"p{i:04d}" for i in range(n)]
    val = [ex(f"v{j}", SUBTASKS[j // 3]) for j in range(12)]
    X = clustered(rng, n, d)
    V = (X[rng.choice(n, 12)] + 0.3 * rng.normal(size=(12, d))).astype(np.float32)
    ckpts = []
    for c in range(2):
        Xc = X if c == 0 else (X + 0.5 * rng.normal(size=X.shape)).astype(np.float32)
        train = write(root / f"train{c}", ids, Xc, f"c{c}")
        vstore = write(root / f"val{c}", [e.id for e in val], V + c, f"c{c}", "float32", 5)
        ckpts.append(CheckpointFeatures(f"epoch_{c + 1}", [3e-5, 1e-5][c], train, vstore))
    pool = [ex(i) for i in ids[:-40]]
    return pool, Target.single("t", val, val[:1]), FeatureSet(ckpts)


def top(score: np.ndarray, k: int) -> list[int]:
    """The reference order: score descending, position ascending."""
    return np.lexsort((np.arange(len(score)), -score))[:k].tolist()


def unit64(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_take_reads_rows_as_features_does(world):
    _, _, feats = world
    store = feats.checkpoints[0].train
    idx = np.array([1999, 3, 3, 4, 5, 96, 97, 98, 1000, 0, 1999])  # runs, repeats, any order
    want = store.features()
    np.testing.assert_array_equal(store.take(idx), want[idx])
    np.testing.assert_array_equal(store.take(idx, np.float64), want[idx].astype(np.float64))
    np.testing.assert_array_equal(store.rows(90, 300), want[90:300])
    assert store.take(np.zeros(0, dtype=np.int64)).shape == (0, 24)
    with pytest.raises(IndexError, match="out of range"):
        store.take([2000])
    with pytest.raises(IndexError, match="out of range"):
        store.rows(5, 2001)


def test_the_row_cache_holds_at_most_cache_rows_rows_of_memory(world):
    """The rows kept from small reads are their own arrays: a view would keep the whole
    block it came from alive (at 270k x 8192 this grew a G2IS walk by 4 GB). The kept rows
    still equal the loaded matrix's."""
    _, _, feats = world
    store = feats.checkpoints[0].train
    want = unit_rows(store.features())
    X = UnitRows(store, block=300, cache_rows=16)
    rng = np.random.default_rng(1)
    for _ in range(40):  # small reads (kept) and exact units of raw rows (kept too)
        rows = rng.choice(len(X), 60, replace=False)
        assert X[rows].tobytes() == want[rows].tobytes()
        R, _ = X.raw(rows)
        assert X.unit(rows, R).tobytes() == want[rows].tobytes()
    kept = list(X._cache.values())
    assert len(kept) == 16
    pinned = {id(r if r.base is None else r.base): (r if r.base is None else r.base).nbytes
              for r in kept}  # fmt: skip
    assert sum(pinned.values()) <= 16 * 24 * 4
    for i, r in X._cache.items():
        assert r.tobytes() == want[i].tobytes()


def test_unit_rows_read_the_store_normalized_as_the_loaded_matrix(world, monkeypatch):
    _, _, feats = world
    store = feats.checkpoints[0].train
    want = unit_rows(store.features())  # the in-memory path
    X = UnitRows(store, block=300)
    reads = Reads(monkeypatch)
    idx = np.array([1999, 3, 3, 500, 0, 96, 97])
    assert X[idx].tobytes() == want[idx].tobytes()  # bitwise, any order, repeats
    assert X[250:1337].tobytes() == want[250:1337].tobytes()  # across shards
    assert X[-1].tobytes() == want[-1].tobytes() and X[5].shape == (24,)
    blocks = list(X.blocks())
    assert [s for s, _ in blocks] == list(range(0, 2000, 300))
    assert np.concatenate([b for _, b in blocks]).tobytes() == want.tobytes()
    # X[-1] (row 1999) is not read again: the rows of small reads are kept
    assert max(reads.sizes) <= 1087 and X.rows_read == 7 + 1087 + 1 + 2000
    Q = want[[7, 900]]
    S = screen(X, Q, block=300)  # computed from the raw fp16 rows
    bound = dot_tolerance(24, np.float32, scale=1.0 + 1e-6)
    exact = Q.astype(np.float64) @ want.astype(np.float64).T
    assert S.dtype == np.float32 and np.abs(S - exact).max() <= bound
    with pytest.raises(IndexError, match="out of range"):
        X[2000]


def test_rank_many_is_one_rank_by_dot_per_direction(world):
    _, _, feats = world
    X = UnitRows(feats.checkpoints[0].train, block=128)
    Xm = unit_rows(feats.checkpoints[0].train.features())
    dirs = np.random.default_rng(1).normal(size=(3, 24))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    many = rank_many(X, dirs, block=128)
    cand = np.arange(0, 2000, 3)[::-1]
    for x, (idx, val) in zip(dirs, many, strict=True):
        want = top(Xm.astype(np.float64) @ x, 2000)
        assert idx.tolist() == want == rank_by_dot(Xm, x)[0].tolist()
        np.testing.assert_allclose(val, (Xm.astype(np.float64) @ x)[want], atol=1e-12)
        assert (
            rank_by_dot(X, x, cand, 50, block=64)[0].tolist()
            == [w for w in want if w % 3 == 0][:50]
        )


def test_dot_orders_rank_lazily_as_rank_by_dot(world, tmp_path):
    _, _, feats = world
    raw = feats.checkpoints[0].train.features()
    raw[[10, 700, 1500]] = raw[10]  # exact duplicates: ties break by index
    store = write(tmp_path / "dups", [f"p{i}" for i in range(2000)], raw)
    Xm = unit_rows(store.features())
    X = UnitRows(store, block=256)
    dirs = np.stack([Xm[10].astype(np.float64), np.random.default_rng(2).normal(size=24)])
    dirs[1] /= np.linalg.norm(dirs[1])
    taken = np.zeros(2000, dtype=bool)
    taken[::7] = True
    for Y in (Xm, X):
        for order, x in zip(dot_orders(Y, dirs, block=300), dirs, strict=True):
            full = rank_by_dot(Xm, x)[0]
            assert order.prefix(5).tolist() == full[:5].tolist()
            assert order.prefix(1500).tolist() == full[:1500].tolist()
            np.testing.assert_array_equal(order.prefix(5000), full)
            free = np.concatenate(list(order.free(taken, first=16)))
            np.testing.assert_array_equal(free, full[~taken[full]])
            assert order.first_free(taken, 3).tolist() == full[~taken[full]][:3].tolist()
        assert dot_orders(Y, dirs)[0].prefix(3).tolist() == [10, 700, 1500]


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_less_streaming_equals_numpy(world, monkeypatch, variant):
    pool, target, feats = world
    names, groups = subtask_groups(target.validation)
    w = feats.lr_weights()
    score = np.zeros((len(pool), len(groups)))
    for c, wc in zip(feats.checkpoints, w, strict=True):
        T = unit64(c.train.features()[: len(pool)])
        V = c.val.features().astype(np.float64)
        if variant == "paper":
            score += wc * (T @ unit64(np.stack([V[g].mean(0) for g in groups])).T)
        else:
            cos = T @ unit64(V).T
            score += wc * np.stack([cos[:, g].mean(1) for g in groups], axis=1)
    want = [pool[i].id for i in top(score.max(1), 150)]
    reads = Reads(monkeypatch)
    small = LESSSelector(variant, block_rows=333).select(pool, target, 150, 0, feats)
    assert max(reads.sizes) <= 333
    whole = LESSSelector(variant, block_rows=10**6).select(pool, target, 150, 0, feats)
    assert small.ids == whole.ids == want
    np.testing.assert_allclose(small.scores, score.max(1)[top(score.max(1), 150)], atol=1e-6)


@pytest.mark.parametrize("energy", [False, True])
def test_gist_sketch_streaming_equals_numpy(world, monkeypatch, energy):
    pool, target, feats = world
    one = FeatureSet(feats.checkpoints[:1])
    c = one.checkpoints[0]
    sub = task_subspace(c.val.features().astype(np.float64), k=5)
    g = c.train.features()[: len(pool)].astype(np.float64)
    coords = g @ sub.P.astype(np.float64)
    _, groups = subtask_groups(target.validation)
    centers = unit64(np.stack([sub.val_coords[gr].mean(0) for gr in groups]))
    score = (unit64(coords) @ centers.T).max(1)
    if energy:
        score = score * np.linalg.norm(coords, axis=1) / np.linalg.norm(g, axis=1)
    want = [pool[i].id for i in top(score, 150)]
    reads = Reads(monkeypatch)
    small = GISTSelector("sketch", k=5, energy_weight=energy, block_rows=257)
    got = small.select(pool, target, 150, 0, one)
    assert max(reads.sizes) <= 257
    whole = GISTSelector("sketch", k=5, energy_weight=energy, block_rows=10**6)
    assert got.ids == whole.select(pool, target, 150, 0, one).ids == want


def brute_lists(X64: np.ndarray, k: int) -> np.ndarray:
    S = X64 @ X64.T
    np.fill_diagonal(S, -np.inf)
    return np.array([top(row, k) for row in S])


def reference_walk(X64, components, budgets, lists, anchor_pool, delta, excluded):
    """G2IS's walk on the loaded float64 unit rows, written plainly (``lists=None``: the
    no-graph top-b)."""
    n = len(X64)
    taken, order = excluded.copy(), []

    def valid(members: list[int], z: int, kv: np.ndarray) -> bool:
        G = X64[members]
        if (G @ X64[z] < 0).any():
            return False
        total = G.sum(0)
        old = abs(total @ kv) / np.linalg.norm(total)
        return abs((total + X64[z]) @ kv) / np.linalg.norm(total + X64[z]) >= delta * old

    for kv, b in zip(components, budgets, strict=True):
        by_kv = np.lexsort((np.arange(n), -(X64 @ kv)))
        if b <= 0:
            continue
        if lists is None:
            picks = by_kv[~taken[by_kv]][:b]
            taken[picks] = True
            order += picks.tolist()
            continue
        head = by_kv[:anchor_pool][~taken[by_kv[:anchor_pool]]]
        head = head if head.size else by_kv[~taken[by_kv]]
        members = [int(head[0])]
        while len(members) < b:
            taken[members[-1]] = True
            z = next(
                (z for z in lists[members[-1]] if not taken[z] and valid(members, z, kv)), None
            )
            if z is None:
                z = next((z for z in by_kv if not taken[z] and valid(members, z, kv)), None)
            if z is None:
                break
            members.append(int(z))
        taken[members] = True
        order += members
    return order


@pytest.mark.parametrize("graph", ["on_demand", "exact", "none"])
def test_g2is_streaming_equals_numpy_and_in_memory(world, monkeypatch, tmp_path, graph):
    pool, target, feats = world
    ckpt = feats.checkpoints[-1]
    store = ckpt.train
    # a copy of the store in its own cache layout (the exact graph is cached beside it)
    store = write(tmp_path / "features" / "train", store.ids, store.features(), "c1")
    one = FeatureSet([CheckpointFeatures("epoch_2", 1e-5, store, ckpt.val)])
    Xm = unit_rows(store.features())
    excluded = np.ones(len(Xm), dtype=bool)
    excluded[: len(pool)] = False
    V = ckpt.val.features()
    core = core_knowledge(V, 0.7, None, "mean", True, True)
    assert len(core.weights) >= 2
    budgets = largest_remainder(60, core.weights)
    lists = None if graph == "none" else brute_lists(Xm.astype(np.float64), 10)
    want = reference_walk(Xm.astype(np.float64), core.components, budgets, lists, 30, 0.8, excluded)
    nbrs = None if graph == "none" else NeighbourLists(Xm, 10, graph, 256)
    memory = g2is_walk(Xm, core.components, budgets, nbrs, 30, 0.8, excluded=excluded)
    picks = []
    for batch in (1, 8):
        reads = Reads(monkeypatch)
        sel = G2ISSelector(
            val_variance=0.7, k_neighbors=10, graph=graph, graph_block=256, anchor_pool=30,
            graph_batch=batch,
        ).select(pool, target, 60, 0, one)  # fmt: skip
        assert max(reads.sizes) <= 1024 < len(store)  # never the whole store
        picks.append(sel.ids)
        if graph == "on_demand" and batch == 8:
            d = sel.diagnostics
            assert d["graph_passes"] < d["graph_nodes_computed"]  # several lists a pass
    assert len(want) == 60 and [pool[i].id for i in memory.order] == [pool[i].id for i in want]
    assert picks == [[pool[i].id for i in want]] * 2


def test_exact_lists_stream_as_brute_force(world):
    _, _, feats = world
    store = feats.checkpoints[0].train
    Xm = unit_rows(store.features())
    X = UnitRows(store, block=333)
    want = brute_lists(Xm.astype(np.float64), 12)
    nodes = np.array([0, 1999, 640, 641, 7])
    np.testing.assert_array_equal(neighbours_many(X, nodes, 12)[0], want[nodes])
    np.testing.assert_array_equal(knn_graph(X, 12, block=700)[0], want)


def canonical_best(Y64: np.ndarray, C64: np.ndarray) -> np.ndarray:
    """Each row's nearest centroid, ties to the lower index."""
    S = Y64 @ C64.T
    return np.lexsort((np.arange(len(C64))[:, None].repeat(len(Y64), 1), -S.T), axis=0)[0]


@pytest.mark.parametrize("train_rows", [32768, 600])  # every row / a sample of the rows
def test_ivf_streaming_equals_in_memory_and_its_own_definition(world, train_rows):
    _, _, feats = world
    store = feats.checkpoints[0].train
    Xm = unit_rows(store.features())
    X = UnitRows(store, block=333)
    opts = {"n_lists": 30, "n_probe": 4, "train_rows": train_rows, "block": 500}  # one level
    streamed, memory = IVFIndex(X, **opts, cache_bytes=20_000), IVFIndex(Xm, **opts)
    assert streamed.C.tobytes() == memory.C.tobytes()
    for a, b in zip(streamed.lists, memory.lists, strict=True):
        np.testing.assert_array_equal(a, b)
    # the definition: the top 10 by cosine among the rows of the 4 lists nearest the query
    X64, C64 = Xm.astype(np.float64), memory.C.astype(np.float64)
    owner = canonical_best(X64, C64)
    for a in range(30):
        np.testing.assert_array_equal(memory.lists[a], np.flatnonzero(owner == a))
    for i in (0, 5, 777, 1500, 1999):
        probes = top(C64 @ X64[i], 4)
        cand = np.sort(np.concatenate([memory.lists[p] for p in probes]))
        cand = cand[cand != i]
        want = cand[top(X64[cand] @ X64[i], 10)]
        np.testing.assert_array_equal(streamed.neighbours(i, 10), want)
        np.testing.assert_array_equal(memory.neighbours(i, 10), want)
    assert len(streamed._rows) < 30 and streamed.list_reads > 4  # the cache is bounded


def test_two_level_ivf_streaming_equals_in_memory_and_its_definition(world):
    _, _, feats = world
    store = feats.checkpoints[0].train
    Xm = unit_rows(store.features())
    X = UnitRows(store, block=333)
    opts = {"n_lists": 30, "n_probe": 4, "train_rows": 600, "block": 500, "coarse": 5}
    streamed, memory = IVFIndex(X, **opts), IVFIndex(Xm, **opts)
    assert streamed.coarse == memory.coarse == 5 and 25 <= len(memory.lists) <= 35
    assert streamed.C.tobytes() == memory.C.tobytes()
    for a, b in zip(streamed.lists, memory.lists, strict=True):
        np.testing.assert_array_equal(a, b)
    # the definition: the nearest fine centroid of the row's nearest coarse cell
    X64 = Xm.astype(np.float64)
    cell = canonical_best(X64, memory.top.astype(np.float64))
    owner = np.empty(2000, dtype=np.int64)
    for c, rows in enumerate(memory.lists):
        owner[rows] = c
    np.testing.assert_array_equal(memory.cell[owner], cell)
    for g in range(5):
        fine = np.flatnonzero(memory.cell == g)
        best = fine[canonical_best(X64[cell == g], memory.C64[fine])]
        np.testing.assert_array_equal(owner[cell == g], best)
    for i in (0, 777, 1999):  # a query probes the nearest lists among all of them
        probes = top(memory.C64 @ X64[i], 4)
        cand = np.sort(np.concatenate([memory.lists[p] for p in probes]))
        cand = cand[cand != i]
        want = cand[top(X64[cand] @ X64[i], 10)]
        np.testing.assert_array_equal(streamed.neighbours(i, 10), want)


def test_g2is_ivf_streaming_equals_in_memory(world, monkeypatch):
    pool, target, feats = world
    ckpt = feats.checkpoints[-1]
    ivf = {"n_lists": 20, "n_probe": 3, "train_rows": 500, "block": 512}
    reads = Reads(monkeypatch)
    sel = G2ISSelector(val_variance=0.7, k_neighbors=10, graph="ivf", anchor_pool=30, ivf=ivf)
    got = sel.select(pool, target, 60, 0, feats)
    assert max(reads.sizes) <= 1024 and got.diagnostics["graph"] == "ivf"
    Xm = unit_rows(ckpt.train.features())
    excluded = np.ones(len(Xm), dtype=bool)
    excluded[: len(pool)] = False
    core = core_knowledge(ckpt.val.features(), 0.7, None, "mean", True, True)
    budgets = largest_remainder(60, core.weights)
    nbrs = NeighbourLists(Xm, 10, "ivf", ivf=ivf)
    memory = g2is_walk(Xm, core.components, budgets, nbrs, 30, 0.8, excluded=excluded)
    assert got.ids == [pool[i].id for i in memory.order] and len(got.ids) == 60
