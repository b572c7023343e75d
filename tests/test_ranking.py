"""Canonical rankings: bitwise scores for duplicates, and top_k equal to the full canonical sort."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataselect.selectors.ranking import (
    CANONICAL,
    FAST,
    canonical_dot,
    dot_tolerance,
    rank_by_dot,
    top_k,
    tree_sum,
)


def test_tree_sum_is_a_fixed_pairwise_order():
    x = np.array([1e16, 1.0, -1e16, 1.0, 3.0])  # padded to 8, halves added: x_i + x_{i+4}, ...
    assert tree_sum(x) == ((1e16 + 3.0) + (-1e16 + 0.0)) + ((1.0 + 0.0) + (1.0 + 0.0)) == 6.0
    assert tree_sum(x) != sum(x)  # 1e16 + 1 rounds: the order is part of the answer
    assert tree_sum(np.array([2.5])) == 2.5 and tree_sum(np.zeros(0)) == 0.0
    M = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(tree_sum(M, axis=0), M.sum(axis=0))


def test_canonical_dot_bits_depend_on_the_vectors_only():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(301, 77)).astype(np.float32)
    for j in (5, 64, 299):  # copies at positions that fall differently in any blocking
        A[j] = A[3]
    x = rng.normal(size=77)
    d = canonical_dot(A, x)
    assert len({d[i].tobytes() for i in (3, 5, 64, 299)}) == 1
    np.testing.assert_array_equal(canonical_dot(A[::-1], x)[::-1], d)  # position-free
    np.testing.assert_array_equal(canonical_dot(A[5:6], x), d[5:6])
    np.testing.assert_allclose(
        d, A.astype(np.float64) @ x, rtol=0, atol=dot_tolerance(77, scale=50)
    )
    np.testing.assert_allclose(canonical_dot(A, A[:4]), A @ A[:4].T.astype(np.float64), rtol=1e-12)
    n = CANONICAL.norms(A)
    np.testing.assert_allclose(n, np.linalg.norm(A.astype(np.float64), axis=1), rtol=1e-14)
    np.testing.assert_allclose(CANONICAL.normalize(A), FAST.normalize(A), rtol=1e-12, atol=0)


def canonical_sort(canon: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.lexsort((ids, -canon))


@pytest.mark.parametrize("k", [1, 7, 50, 200, None])
def test_top_k_equals_the_full_canonical_sort(k):
    rng = np.random.default_rng(1)
    canon = np.round(rng.normal(size=200), 3)  # many exact ties (rounded to 1e-3)
    canon[[10, 40, 41, 150]] = canon[5]
    tol = 1e-9
    fast = canon + rng.uniform(-tol, tol, size=200)  # any error within the bound
    called = []

    def rescore(p):
        called.append(len(p))
        return canon[p]

    pos, val = top_k(fast, k, tol, rescore)
    want = canonical_sort(canon, np.arange(200))[: 200 if k is None else k]
    np.testing.assert_array_equal(pos, want)
    assert (np.diff(val) <= 0).all()
    np.testing.assert_allclose(val, canon[want], atol=tol)
    assert sum(called) < 200  # only the overlapping groups were re-scored


def test_top_k_per_row_tolerance_and_ids():
    canon = np.array([0.5, 0.4, 0.3, 0.2, 0.1])
    fast = np.array([0.5, 0.4, 0.35, 0.2, 0.1])  # row 2 is far off, but its bound says so
    tol = np.array([0.0, 0.0, 0.2, 0.0, 0.0])
    pos, _ = top_k(fast, 3, tol, lambda p: canon[p])
    assert pos.tolist() == [0, 1, 2]
    ids = np.array([9, 8, 7, 6, 5])  # ties break by ids, not positions
    pos, _ = top_k(np.ones(5), 2, 0.0, lambda p: np.ones(len(p)), ids=ids)
    assert pos.tolist() == [4, 3]


def test_top_k_refuses_non_finite_scores():
    with pytest.raises(ValueError, match="1 of 3 scores are not finite"):
        top_k(np.array([1.0, np.nan, 0.0]), 2, 0.0, lambda p: p)


def test_rank_by_dot_orders_duplicates_by_index_whatever_the_block():
    rng = np.random.default_rng(2)
    Y = rng.normal(size=(500, 33)).astype(np.float32)
    Y /= np.linalg.norm(Y, axis=1, keepdims=True)
    x = Y[17].astype(np.float64) + 0.1 * rng.normal(size=33)
    for j in (401, 3, 250):
        Y[j] = Y[17]  # four copies of the best row
    want = canonical_sort(canonical_dot(Y, x), np.arange(500))
    assert want[:4].tolist() == [3, 17, 250, 401]
    for block in (1, 7, 64, 8192):
        np.testing.assert_array_equal(rank_by_dot(Y, x, block=block)[0], want)
    cand = np.array([401, 250, 17, 3, 0])
    assert rank_by_dot(Y, x, cand, 2)[0].tolist() == [3, 17]


# One store with exact duplicates, selected by every store-based selector; run in a fresh
# interpreter per BLAS kernel (OpenBLAS reads OPENBLAS_CORETYPE when it loads).
PROBE = r"""
import hashlib, json, sys
from pathlib import Path
import numpy as np
from dataselect.data.records import make_example
from dataselect.data.targets import Target
from dataselect.features.store import StoreWriter
from dataselect.features.stores import CheckpointFeatures, FeatureSet
from dataselect.selectors.g2is import G2ISSelector
from dataselect.selectors.gist import GISTSelector
from dataselect.selectors.less import LESSSelector

COPIES = [3, 10, 51, 56]  # exact duplicates of row 3, the target's own direction


def ex(i, subtask="t"):
    msgs = [{"role": "user", "content": i}, {"role": "assistant", "content": "a"}]
    return make_example(i, "s", msgs, {"subtask": subtask})


def store(path, ids, rows):
    spec = {"model": "m", "sketch": {"kind": "none"}, "layout": {"dim": 0}, "checkpoint": "c"}
    w = StoreWriter(path, rows.shape[1], len(ids), {**spec, "dim": rows.shape[1]}, "float32", 64)
    w.add(ids, rows, [1] * len(ids), [1.0] * len(ids))
    return w.close()


root = Path(sys.argv[1])
rng = np.random.default_rng(0)
N, D = int(sys.argv[2]), int(sys.argv[3])
X = rng.normal(size=(N, D)).astype(np.float32)
X[COPIES] = X[3]
X[[20, 21, N - 7]] = X[20]  # a second group, inside the selections but not at the top
V = (X[3] + 0.01 * rng.normal(size=(6, D))).astype(np.float32)
V[3:] = X[20] + 0.3 * rng.normal(size=(3, D))
ids = [f"p{i:03d}" for i in range(N)]
pool = [ex(i) for i in ids]
val = [ex(f"v{j}", "ab"[j // 3]) for j in range(6)]
target = Target.single("t", val, val[:1])
train = store(root / "features" / "train", ids, X)
vstore = store(root / "features" / "val", [e.id for e in val], V)
feats = FeatureSet([CheckpointFeatures("epoch_1", 1e-5, train, vstore)])
out = {"blas": hashlib.sha256((X @ X.T).tobytes()).hexdigest()}
for name, sel, budget in [
    ("less_code", LESSSelector(), 4),
    ("less_code_2", LESSSelector(block_rows=7), 2),
    ("less_paper", LESSSelector(variant="paper"), 30),
    ("gist_sketch", GISTSelector(space="sketch", k=4), 30),
    ("gist_energy", GISTSelector(space="sketch", k=4, energy_weight=True), 30),
    ("g2is", G2ISSelector(k_neighbors=10, anchor_pool=20), 30),
    ("g2is_exact", G2ISSelector(k_neighbors=10, graph="exact", graph_block=16), 30),
    ("g2is_ivf", G2ISSelector(k_neighbors=10, graph="ivf"), 30),
]:
    out[name] = sel.select(pool, target, budget, 0, feats).ids
print(json.dumps(out))
"""


def kernels() -> list[str]:
    """No override, the environment's own (CI may set one), and explicit kernels this CPU runs."""
    import platform

    chosen = ["", os.environ.get("OPENBLAS_CORETYPE", "")]
    if platform.machine() in ("x86_64", "AMD64"):
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        chosen += ["Haswell"] if " avx2" in flags else []
        chosen += ["Prescott"]
    return list(dict.fromkeys(chosen))


@pytest.mark.parametrize("shape", [(57, 64), (57, 200)])  # sizes where the kernels' bits differ
def test_duplicates_select_the_same_on_every_blas_kernel(tmp_path, shape):
    runs = {}
    for kernel in kernels():
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
        if kernel:
            env["OPENBLAS_CORETYPE"] = kernel
        work = tmp_path / (kernel or "default")
        work.mkdir()
        args = [sys.executable, "-c", PROBE, str(work), *map(str, shape)]
        proc = subprocess.run(args, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[kernel or "default"] = json.loads(proc.stdout.splitlines()[-1])
    first, *rest = runs.values()
    for name, other in zip(list(runs)[1:], rest, strict=True):
        for sel in first:
            if sel != "blas":
                assert other[sel] == first[sel], f"{sel}: kernel {name} selects otherwise"
    copies = [f"p{i:03d}" for i in (3, 10, 51, 56)]
    assert first["less_code"] == copies  # four equal scores: pool order
    assert first["less_code_2"] == copies[:2]  # the cut inside the tie keeps the lowest
    for sel in set(first) - {"blas"}:
        picked = [i for i in first[sel] if i in copies]
        assert picked == sorted(picked), sel
    print({k: v["blas"][:12] for k, v in runs.items()})  # differing digests: kernels differ
