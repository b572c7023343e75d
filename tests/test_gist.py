"""GIST: the task subspace against an SVD, hand-worked picks, the authors' grouping against
their formula, the streaming pass's memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dataselect.data.records import make_example
from dataselect.data.targets import Target
from dataselect.selectors.gist import AUTHORS_SUBTASKS, GISTSelector, authors_groups
from dataselect.selectors.gist_subspace import (
    GISTCoords,
    choose_rank,
    effective_rank,
    task_subspace,
)


def test_subspace_is_the_top_k_right_singular_subspace():
    rng = np.random.default_rng(0)
    G = rng.normal(size=(10, 500)) * np.linspace(3, 0.1, 10)[:, None]
    sub = task_subspace(G, k=4, chunk=37)  # chunks that do not divide D
    assert sub.P.shape == (500, 4)
    np.testing.assert_allclose(sub.P.T @ sub.P, np.eye(4), atol=1e-5)  # orthonormal columns
    _, S, Vt = torch.linalg.svd(torch.from_numpy(G), full_matrices=False)
    Vk = Vt[:4].T.numpy()
    np.testing.assert_allclose(sub.P @ sub.P.T, Vk @ Vk.T, atol=1e-5)  # same subspace
    np.testing.assert_allclose(np.sqrt(sub.eigvals[:4]), S[:4].numpy(), rtol=1e-8)
    np.testing.assert_allclose(sub.val_coords, G @ sub.P, atol=1e-5)  # U_k S_k = G P


def test_rank_rules():
    lam = np.array([4.0, 3.0, 2.0, 1.0, 0.0])
    assert choose_rank(lam, k=150, variance=None) == 4  # capped at the numerical rank
    assert choose_rank(lam, k=2, variance=None) == 2
    assert choose_rank(lam, k=None, variance=0.7) == 2  # cumulative shares .4 .7 .9 1
    assert choose_rank(lam, k=None, variance=0.71) == 3
    with pytest.raises(ValueError, match="all zero"):
        choose_rank(np.zeros(3), k=2, variance=None)
    assert effective_rank(np.array([1.0, 1.0, 0.0])) == pytest.approx(2.0)


def ex(i, subtask="t"):
    msgs = [{"role": "user", "content": i}, {"role": "assistant", "content": "a"}]
    return make_example(i, "s", msgs, {"subtask": subtask})


@pytest.fixture()
def case():
    """Validation: A = {(2,0,0)}, B = {(0,1,0), (0,3,0)}; rank 2, subspace = span(e1, e2).
    Pool: z1 = (1,0,5) (mostly outside), z2 = (1,1,0), z3 = (0,2,0), z4 = (-1,0,0)."""
    val = [ex("vA", "A"), ex("vB1", "B"), ex("vB2", "B")]
    G = np.array([[2.0, 0, 0], [0, 1, 0], [0, 3, 0]])
    sub = task_subspace(G, k=150)
    g = np.array([[1.0, 0, 5], [1, 1, 0], [0, 2, 0], [-1, 0, 0]])
    pool = [ex(f"z{i}") for i in range(1, 5)]
    coords = GISTCoords(sub, [e.id for e in pool], g @ sub.P, np.linalg.norm(g, axis=1))
    return pool, Target.single("t", val, val[:1]), coords


def test_gist_pick_equals_hand_worked_answer(case):
    pool, target, coords = case
    sel = GISTSelector(k=150).select(pool, target, 3, seed=0, features=coords)
    # cos with A's center e1 / B's center e2: z1 (1, 0), z2 (.707, .707), z3 (0, 1), z4 (-1, 0)
    assert sel.ids == ["z1", "z3", "z2"]  # z1 and z3 tie at 1: pool order
    np.testing.assert_allclose(sel.scores, [1.0, 1.0, 1 / np.sqrt(2)], atol=1e-6)
    assert sel.diagnostics["k"] == 2 and sel.diagnostics["explained_variance"] == 1.0


def test_energy_weighting_penalizes_gradients_outside_the_subspace(case):
    pool, target, coords = case
    sel = GISTSelector(k=150, energy_weight=True).select(pool, target, 3, seed=0, features=coords)
    # |P^T g| / |g|: z1 1/sqrt(26), z2 1, z3 1
    assert sel.ids == ["z3", "z2", "z1"]
    np.testing.assert_allclose(sel.scores, [1.0, 1 / np.sqrt(2), 1 / np.sqrt(26)], atol=1e-6)


def test_the_gist_identity_at_full_rank():
    """With k = rank(G) and one subtask, plain GIST scores cos(g, v_mean) x |g| / |P^T g|
    (it rewards gradients whose energy lies outside the validation span), and the
    energy-weighted variant scores exactly cos(g, v_mean): the diagnosis in ALGORITHMS.md,
    checked on this implementation."""
    rng = np.random.default_rng(3)
    G = rng.normal(size=(6, 40))
    g = rng.normal(size=(30, 40)) + 0.5 * G.mean(0)
    sub = task_subspace(G, k=150)
    assert sub.P.shape[1] == 6
    val = [ex(f"v{i}") for i in range(6)]
    pool = [ex(f"z{i}") for i in range(30)]
    coords = GISTCoords(sub, [e.id for e in pool], g @ sub.P, np.linalg.norm(g, axis=1))
    target = Target.single("t", val, val[:1])
    v = G.mean(0)
    cos = g @ v / (np.linalg.norm(g, axis=1) * np.linalg.norm(v))
    inside = np.linalg.norm(g @ sub.P, axis=1)
    plain = GISTSelector(k=150).select(pool, target, 30, seed=0, features=coords)
    by_id = dict(zip(plain.ids, plain.scores, strict=True))
    want = cos * np.linalg.norm(g, axis=1) / inside
    np.testing.assert_allclose([by_id[e.id] for e in pool], want, rtol=1e-5)
    energy = GISTSelector(k=150, energy_weight=True).select(pool, target, 30, 0, features=coords)
    by_id = dict(zip(energy.ids, energy.scores, strict=True))
    np.testing.assert_allclose([by_id[e.id] for e in pool], cos, rtol=1e-5)
    # and so the two rank the pool differently
    assert plain.ids[:10] != energy.ids[:10]


def test_streaming_pass_never_holds_the_pool_gradients(tmp_path):
    """D ~ 2.1M and N = 1,000: N x D float32 would be 8.4 GB; peak RSS must stay far below."""
    script = textwrap.dedent(
        f"""
        import json, resource, numpy as np, torch
        from omegaconf import OmegaConf
        from transformers import AutoModelForCausalLM
        from dataselect.data.formatting import Tokenized
        from dataselect.features.gradients import grad_dim
        from dataselect.features.project import project_pool
        from dataselect.models import build_tiny_random, with_lora
        d = build_tiny_random({str(tmp_path / "m")!r}, hidden=256, layers=2)
        lora = OmegaConf.create({{"r": 256, "alpha": 256, "dropout": 0.0, "target_modules":
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}})
        model = with_lora(AutoModelForCausalLM.from_pretrained(d), lora, seed=0)
        D = grad_dim(model)
        rng = np.random.default_rng(0)
        ids = [rng.integers(3, 200, 24).tolist() for _ in range(1000)]
        toks = [Tokenized(f"x{{i}}", x, [-100] * 12 + x[12:]) for i, x in enumerate(ids)]
        P = np.linalg.qr(rng.normal(size=(D, 8)).astype(np.float32))[0]
        store = project_pool(model, toks, P, {str(tmp_path / "s")!r}, {{}}, 0)
        print(json.dumps({{"D": D, "n": len(store), "k": store.dim,
              "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    full_gb = out["n"] * out["D"] * 4 / 1e9
    assert out["D"] > 2_000_000 and out["n"] == 1000 and out["k"] == 8 and full_gb > 8
    assert out["peak_mb"] < 2500, f"peak {out['peak_mb']:.0f} MB vs {full_gb:.1f} GB for N x D"


def matching_gist(val_coords, train_coords, n_subtasks):
    """The authors' matching_gist.py, in numpy: the N validation rows reshaped into
    (n_subtasks, N / n_subtasks) and averaged, or kept per example when that does not divide;
    rows normalized; cosine with the normalized training coordinates; max over groups."""
    n, k = val_coords.shape
    per_task = val_coords.reshape(n_subtasks, -1, k).mean(1) if n % n_subtasks == 0 else val_coords
    v = per_task / np.linalg.norm(per_task, axis=1, keepdims=True)
    t = train_coords / np.linalg.norm(train_coords, axis=1, keepdims=True)
    return (t @ v.T).max(1)


def random_case(name, labels, n_pool=40, d=120, seed=0):
    """Validation examples labelled ``labels`` (target ``name``), random full-rank G and pool."""
    rng = np.random.default_rng(seed)
    val = [ex(f"v{i}", s) for i, s in enumerate(labels)]
    G = rng.normal(size=(len(val), d)) + rng.normal(size=d)  # a shared drift, as real ones
    sub = task_subspace(G, k=150)
    g = rng.normal(size=(n_pool, d)) + 0.5 * rng.normal(size=d)
    pool = [ex(f"z{i:02d}") for i in range(n_pool)]
    coords = GISTCoords(sub, [e.id for e in pool], g @ sub.P.astype(np.float64), np.ones(n_pool))
    return pool, Target.single(name, val, val[:1]), coords


@pytest.mark.parametrize(
    ("name", "labels", "knob", "n_groups"),
    [
        # BBH as LESS ships it: 27 subtasks x 3 = 81 rows; their 23 does not divide 81
        ("bbh", [f"s{i // 3}" for i in range(81)], None, 81),
        # 69 = 23 x 3 rows, labels round-robin: runs of 3 consecutive rows mix labels
        ("bbh", [f"s{i % 23}" for i in range(69)], None, 23),
        ("gsm8k", [f"s{i % 4}" for i in range(12)], None, 1),  # their table's default: 1
        ("gsm8k", [f"s{i % 4}" for i in range(12)], 3, 3),  # n_subtasks set: 3 runs of 4
    ],
)
def test_authors_grouping_reproduces_their_matching_formula(name, labels, knob, n_groups):
    pool, target, coords = random_case(name, labels)
    n_sub = knob or {"bbh": 23}.get(name, 1)
    want = matching_gist(coords.subspace.val_coords, coords.coords, n_sub)
    sel = GISTSelector(grouping="authors", n_subtasks=knob).select(
        pool, target, 10, seed=0, features=coords
    )
    order = np.lexsort((np.arange(len(pool)), -want))[:10]
    assert sel.ids == [pool[i].id for i in order]
    np.testing.assert_allclose(sel.scores, want[order], rtol=1e-10, atol=1e-12)
    assert sel.diagnostics["n_groups"] == n_groups and sel.diagnostics["grouping"] == "authors"
    # the default groups by label: other groups here, so other scores
    ours = GISTSelector().select(pool, target, 10, seed=0, features=coords)
    assert ours.diagnostics["n_groups"] == len(set(labels))
    assert not np.allclose(ours.scores, sel.scores, atol=1e-3)


def test_authors_groups_are_consecutive_runs_or_single_examples():
    val = [ex(f"v{i}", f"s{i // 3}") for i in range(9)]
    names, groups = authors_groups(val, 3)  # 9 = 3 x 3: runs of 3, one label each
    assert names == ["s0", "s1", "s2"]
    assert [g.tolist() for g in groups] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    names, groups = authors_groups(val, 2)  # 9 % 2 != 0: per example
    assert names == [e.subtask for e in val]
    assert [g.tolist() for g in groups] == [[i] for i in range(9)]
    names, _ = authors_groups(val, 1)  # one run of all 9: mixed labels
    assert names == ["rows 0-8"]
    assert AUTHORS_SUBTASKS == {"bbh": 23, "mmlu": 57, "tydiqa": 9}
    with pytest.raises(ValueError, match="grouping"):
        GISTSelector(grouping="labels")
    with pytest.raises(ValueError, match="n_subtasks"):
        GISTSelector(grouping="authors", n_subtasks=0)


def test_config_defaults_and_the_bbh_preset():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import dataselect.config  # noqa: F401  (registers base_config)

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("config", overrides=["selector=gist", "paths.output_dir=/tmp/x"])
        preset = compose("config", overrides=["experiment=gist_llama32_3b_bbh_5pct"])
    sel = instantiate(cfg.selector)
    assert (sel.k, sel.grouping, sel.n_subtasks, sel.space) == (150, "subtask", None, "exact")
    assert preset.selector.k == 150 and preset.selector.grouping == "subtask"
