"""LESS on a hand-worked example: 2 subtasks, 2 checkpoints, d = 2."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dataselect.data.records import make_example
from dataselect.data.targets import Target
from dataselect.features.store import StoreMismatch, StoreWriter
from dataselect.features.stores import CheckpointFeatures, FeatureSet
from dataselect.selectors.less import LESSSelector

SPEC = {"model": "m", "sketch": {"kind": "none"}, "layout": {"dim": 2}}


def ex(i: str, subtask: str = "t"):
    return make_example(
        i,
        "s",
        [{"role": "user", "content": i}, {"role": "assistant", "content": "a"}],
        {"subtask": subtask},
    )


def store(path, ids, rows, checkpoint, **spec):
    w = StoreWriter(path, 2, len(ids), {**SPEC, "checkpoint": checkpoint, **spec}, "float32", 8)
    w.add(ids, np.array(rows, dtype=np.float32), [1] * len(ids), [1.0] * len(ids))
    return w.close()


@pytest.fixture()
def case(tmp_path):
    """Validation: A = {(1,0)}, B = {(0,1), (1,1)}; the same at both checkpoints.
    Pool: z1 = (1,0) at c1 but (0,1) at c2; z2 = (0,1); z3 = (3,1); z4 = (-1,0).
    Checkpoint mean lrs 3e-5 and 1e-5 -> weights 0.75 and 0.25."""
    pool = [ex(f"z{i}") for i in range(1, 5)]
    val = [ex("v1", "A"), ex("v2", "B"), ex("v3", "B")]
    target = Target.single("t", val, val[:1])
    ckpts = []
    for c, (lr, z1) in enumerate([(3e-5, (1, 0)), (1e-5, (0, 1))]):
        train = store(tmp_path / f"t{c}", [e.id for e in pool], [z1, (0, 1), (3, 1), (-1, 0)], c)
        v = store(tmp_path / f"v{c}", ["v1", "v2", "v3"], [(1, 0), (0, 1), (1, 1)], c)
        ckpts.append(CheckpointFeatures(f"epoch_{c + 1}", lr, train, v))
    return pool, target, FeatureSet(ckpts)


def test_less_code_variant_matches_hand_worked_scores(case):
    pool, target, feats = case
    r2, r10 = math.sqrt(2), math.sqrt(10)
    # subtask A: cos with (1,0); subtask B: mean of cos with (0,1) and (1,1)/sqrt2
    z1 = max(0.75 * 1 + 0.25 * 0, 0.75 * (0 + 1 / r2) / 2 + 0.25 * (1 + 1 / r2) / 2)
    z2 = max(0.0, (1 + 1 / r2) / 2)
    z3 = max(3 / r10, (1 / r10 + 4 / (r10 * r2)) / 2)
    sel = LESSSelector().select(pool, target, 3, seed=0, features=feats)
    assert sel.ids == ["z3", "z2", "z1"]
    np.testing.assert_allclose(sel.scores, [z3, z2, z1], rtol=1e-6)
    assert sel.diagnostics["checkpoint_weights"] == pytest.approx([0.75, 0.25])
    assert sel.diagnostics["subtask_of_max"] == {"A": 2, "B": 1}


def test_less_paper_variant_uses_subtask_mean_gradient(case):
    pool, target, feats = case
    b = np.array([0.5, 1.0]) / np.linalg.norm([0.5, 1.0])  # mean of (0,1) and (1,1), normalized
    z2 = b[1]
    z3 = max(3 / math.sqrt(10), (np.array([3, 1]) / math.sqrt(10)) @ b)
    sel = LESSSelector(variant="paper").select(pool, target, 2, seed=0, features=feats)
    assert sel.ids == ["z3", "z2"]
    np.testing.assert_allclose(sel.scores, [z3, z2], rtol=1e-6)


def test_less_refuses_stores_from_different_sketches(tmp_path):
    a = store(tmp_path / "a", ["x"], [(1, 0)], 0)
    b = store(tmp_path / "b", ["v"], [(1, 0)], 0, sketch={"kind": "sjlt", "seed": 1})
    with pytest.raises(StoreMismatch, match="sketch"):
        CheckpointFeatures("epoch_1", 1e-5, a, b)


def test_less_without_features_is_a_clear_error(case):
    pool, target, _ = case
    with pytest.raises(ValueError, match="needs gradient features"):
        LESSSelector().select(pool, target, 1, seed=0)
