"""The target loss: per-item answer-token NLL, its summaries, and the report's intervals."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dataselect.data.formatting import IGNORE_INDEX, tokenize_example
from dataselect.data.records import make_example
from dataselect.evaluation.loss import aggregate, summarize, target_losses
from dataselect.evaluation.tasks import Benchmark
from dataselect.report import effect


def hand_nll(model, tokenizer, ex, max_length=512) -> tuple[float, int]:
    """Full-vocabulary log-softmax of one unpadded sequence, summed over answer labels."""
    tok, _ = tokenize_example(tokenizer, ex, max_length)
    ids = torch.tensor([tok.input_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    total, count = 0.0, 0
    for t in range(1, len(tok.labels)):
        if tok.labels[t] != IGNORE_INDEX:
            total -= float(logp[t - 1, tok.labels[t]])
            count += 1
    return total, count


def chats(n: int):
    """Items of different lengths (so a batch pads), some with a system turn and two
    assistant turns where only the final answer is scored (``loss: last``)."""
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"What is {i} + {i * 7 % 5}? " + "ok " * (i % 4)}]
        meta = {"answer": str(i + i * 7 % 5)}
        if i % 3 == 0:
            msgs = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Warm up: 1 + 1?"},
                {"role": "assistant", "content": "2, since one and one make two"},
                *msgs,
            ]
            meta["loss"] = "last"
        msgs.append({"role": "assistant", "content": f"The sum is {i + i * 7 % 5}."})
        out.append(make_example(f"q{i}", "toy/add", msgs, meta))
    return out


def test_loss_equals_hand_computed_nll_on_answer_tokens_only(tiny_model, tiny_tokenizer):
    items = chats(7)
    got = target_losses(tiny_model, tiny_tokenizer, [Benchmark("toy", items)], 512, batch_size=3)
    rows = got["toy"]
    assert [r["id"] for r in rows] == [e.id for e in items]
    for ex, r in zip(items, rows, strict=True):
        total, count = hand_nll(tiny_model, tiny_tokenizer, ex)
        assert r["tokens"] == count > 0
        assert r["nll"] == pytest.approx(total / count, rel=1e-4)
    # the in-context demonstration's answer is not scored: its tokens are not counted
    (demo,) = [r for r in rows if r["id"] == "q0"]
    answer = tiny_tokenizer("The sum is 0.", add_special_tokens=False)["input_ids"]
    assert demo["tokens"] <= len(answer) + 3  # the answer (+ the template's end-of-turn)
    s = summarize(rows)
    values = [r["nll"] for r in rows]
    mean = sum(values) / 7
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 6)
    assert s["value"] == pytest.approx(mean) and s["stderr"] == pytest.approx(sd / math.sqrt(7))
    assert s["n"] == 7 and s["tokens"] == sum(r["tokens"] for r in rows)


def test_loss_limit_and_truncation(tiny_model, tiny_tokenizer, caplog):
    items = chats(6)
    got = target_losses(tiny_model, tiny_tokenizer, [Benchmark("toy", items)], 512, limit=4)
    assert len(got["toy"]) == 4
    # an item whose answer is cut off entirely is left out, never scored as zero
    short = target_losses(tiny_model, tiny_tokenizer, [Benchmark("toy", items)], 40)["toy"]
    kept = {r["id"] for r in short}
    assert "q0" not in kept and len(kept) < 6 and "no answer token" in caplog.text
    with pytest.raises(ValueError, match="none of its 6 items"):
        target_losses(tiny_model, tiny_tokenizer, [Benchmark("toy", items)], 3)


def test_aggregate_is_a_macro_mean():
    a = {"value": 1.0, "stderr": 0.3, "n": 10, "tokens": 20}
    b = {"value": 3.0, "stderr": 0.4, "n": 30, "tokens": 90}
    agg = aggregate({"a": a, "b": b})
    assert agg["value"] == 2.0 and agg["stderr"] == pytest.approx(0.25)
    assert agg["n"] == 40 and agg["tokens"] == 110


def test_wilson_and_paired_difference():
    iv = effect.wilson(0.0, 40)
    assert iv.low == 0.0 and iv.high == pytest.approx(0.0876, abs=1e-3)
    iv = effect.wilson(0.5, 100)
    assert (iv.low, iv.high) == (pytest.approx(0.4038, abs=1e-3), pytest.approx(0.5962, abs=1e-3))
    a = {"t": {"x": 1.0, "y": 2.0, "z": 3.0, "w": 9.0}}
    b = {"t": {"x": 2.0, "y": 2.5, "z": 4.5}}  # w is not in b: not paired
    d = effect.paired_difference(a, b, "t")
    diffs = [-1.0, -0.5, -1.5]
    sd = math.sqrt(sum((x + 1.0) ** 2 for x in diffs) / 2)
    assert d.mean == pytest.approx(-1.0)
    assert d.high - d.mean == pytest.approx(effect.Z * sd / math.sqrt(3))
    # subtasks: the mean of the subtasks' mean differences
    a2 = {"bbh/p": {"x": 1.0, "y": 1.0}, "bbh/q": {"x": 5.0, "y": 5.0}}
    b2 = {"bbh/p": {"x": 2.0, "y": 2.0}, "bbh/q": {"x": 2.0, "y": 2.0}}
    assert effect.paired_difference(a2, b2, "bbh").mean == pytest.approx(1.0)
    assert effect.paired_difference(a2, b2, "gsm8k") is None


def _run(tmp_path, name, selector, losses, acc, seed=0, sources=None, base=None):
    d = tmp_path / name
    d.mkdir()
    res = {"value": acc, "stderr": 0.05, "n": 40}
    tl = summarize([{"nll": v, "tokens": 2} for v in losses])
    m = {
        "selector": selector,
        "seed": seed,
        "sizes": {"budget": 52},
        "selection_sources": sources or {},
        "finetuned": {"t": {**res, "target_loss": tl}},
    }
    lines = [{"model": "finetuned", "benchmark": "t", "id": f"i{k}", "nll": v, "tokens": 2}
             for k, v in enumerate(losses)]  # fmt: skip
    if base is not None:
        m["base"] = {"t": {**res, "value": 0.025, "target_loss": summarize(
            [{"nll": v, "tokens": 2} for v in base])}}  # fmt: skip
    (d / "metrics.json").write_text(json.dumps(m))
    (d / "target_loss.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return d


def test_effect_table_against_random(tmp_path):
    rnd = [2.0 + 0.1 * (k % 5) for k in range(50)]
    good = [v - 1.0 + 0.01 * (k % 3) for k, v in enumerate(rnd)]
    same = [v + 0.02 * ((-1) ** k) for k, v in enumerate(rnd)]
    dirs = [
        _run(tmp_path, "0", "less", good, 0.1, sources={"rg/t": 50, "rg/u": 2}, base=[4.0] * 50),
        _run(tmp_path, "1", "random", rnd, 0.0, base=[4.0] * 50),
        _run(tmp_path, "2", "bm25", same, 0.0),
    ]
    rows = effect.effect_rows(dirs)
    assert [r.selector for r in rows] == ["bm25", "less", "random", "base (no fine-tuning)"]
    less = rows[1]
    assert less.from_target == "50/52" and less.vs_random == "better (CIs apart)"
    assert less.loss_delta.mean == pytest.approx(statistics_mean(good) - statistics_mean(rnd))
    assert less.loss_delta.high < 0 and less.acc_delta.mean == pytest.approx(0.1)
    assert rows[0].vs_random == "CIs overlap" and rows[2].loss_delta is None
    assert rows[3].loss.mean == 4.0 and rows[3].budget is None
    md = effect.to_markdown(rows)
    assert "better (CIs apart)" in md and "| t | random (52, seed 0) |" in md
    assert f"{less.loss.mean:.3f} [{less.loss.low:.3f}, {less.loss.high:.3f}]" in md


def statistics_mean(xs):
    return sum(xs) / len(xs)


def test_wandb_summary_has_the_target_loss():
    from dataselect.cli import evaluation_summary

    tl = {"value": 1.5, "stderr": 0.1, "n": 200, "tokens": 600}
    m = {
        "finetuned": {"gsm8k": {"value": 0.1, "stderr": 0.02, "n": 40, "target_loss": tl}},
        "base": {"gsm8k": {"value": 0.05, "stderr": 0.01, "n": 40}},  # a run from before
    }
    assert evaluation_summary(m) == {
        "finetuned/gsm8k": 0.1,
        "finetuned/gsm8k_stderr": 0.02,
        "finetuned/gsm8k/target_loss": 1.5,
        "finetuned/gsm8k/target_loss_stderr": 0.1,
        "base/gsm8k": 0.05,
        "base/gsm8k_stderr": 0.01,
    }
