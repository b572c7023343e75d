"""GIST: the task subspace against an SVD, hand-worked picks, the streaming pass's memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dataselect.data.records import make_example
from dataselect.data.targets import Target
from dataselect.selectors.gist import GISTSelector
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
