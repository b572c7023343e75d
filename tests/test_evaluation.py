"""Evaluation: scoring on hand-labelled generations, and lm-eval runs on tiny local tasks."""

from __future__ import annotations

import json
import logging
import math
import socket

import pytest
from omegaconf import OmegaConf

from dataselect.data.formatting import prompt_text, render
from dataselect.data.records import make_example
from dataselect.evaluation import Benchmark, evaluate
from dataselect.evaluation.scoring import extract, extract_number, is_correct, process_results
from dataselect.evaluation.tasks import select_items


def _cfg(**kw):
    base = {"batch_size": 2, "limit": None, "seed": 0, "max_gen_toks": 8}
    return OmegaConf.create({**base, **kw})


def _qa(id: str, q: str, a: str, system: str | None = None):
    turns = [{"role": "system", "content": system}] if system else []
    turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return make_example(id, "t", turns, {"answer": a})


@pytest.fixture()
def stub_generation(monkeypatch):
    """Replace model generation: answer with ``replies[question]`` (or "no idea")."""
    from lm_eval.models.huggingface import HFLM

    replies: dict[str, str] = {}
    seen: list[tuple[str, dict]] = []

    def generate_until(self, requests, disable_tqdm=False):
        seen.extend(r.args for r in requests)
        out = []
        for r in requests:
            last_turn = r.args[0].rsplit("What is", 1)[-1]
            out.append(next((v for k, v in replies.items() if k in last_turn), "no idea"))
        return out

    monkeypatch.setattr(HFLM, "generate_until", generate_until)
    return replies, seen


# ---------------------------------------------------------------- scoring (pure functions)


@pytest.mark.parametrize(
    ("generation", "gold", "correct"),
    [
        ("The answer is 1,234.", "1234", True),
        ("so 3.50 dollars", "3.5", True),
        ("-7", "-7", True),
        ("1,000", "1000.0", True),
        ("It costs $1,000.00 in total.", "$1000", True),
        ("First 12, then 30, so 42.", "42", True),  # the last number counts
        ("42 is wrong, it is 41", "42", False),
        ("7", "-7", False),
        ("I do not know.", "5", False),  # no number
        ("", "0", False),
    ],
)
def test_number_scoring(generation, gold, correct):
    assert is_correct(generation, gold, "number") is correct


def test_number_extraction():
    assert extract_number("The answer is 1,234.") == "1234"
    assert extract_number("so 3.50 dollars") == "3.5"
    assert extract_number("1000.00") == "1000"
    assert extract_number("pay -$5 now") == "-5"
    assert extract_number("list 1,2,3") == "3"  # not thousands groups
    assert extract_number("no digits here") is None


@pytest.mark.parametrize(
    ("generation", "gold", "correct"),
    [
        ("(B)", "(b)", True),
        ("  (B).\n", "(B)", True),
        ("True", "true", True),
        ("Yes", "No", False),
        ("The answer is (B)", "(B)", True),  # the text after "the answer is"
        ("So the answer is (C).", "(B)", False),
        ("(B) is wrong. So the answer is (C).", "(C)", True),  # the last "answer is" counts
    ],
)
def test_text_scoring(generation, gold, correct):
    assert is_correct(generation, gold, "text") is correct
    if "answer is" not in generation:  # else the text after it
        assert extract(generation, "text") == generation.strip().rstrip(".").lower()


def test_process_results_hook_and_bad_type():
    doc = {"target": "3.5", "answer_type": "number"}
    assert process_results(doc, ["so 3.50 dollars"]) == {"exact_match": 1.0}
    assert process_results(doc, ["3"]) == {"exact_match": 0.0}
    with pytest.raises(ValueError, match="answer_type"):
        extract("1", "regex")


# ---------------------------------------------------------------- item selection


def test_limit_with_seed_is_deterministic(toy_examples):
    ids = lambda xs: [x.id for x in xs]  # noqa: E731
    a, b = select_items(toy_examples, 5, seed=3), select_items(toy_examples, 5, seed=3)
    assert len(a) == 5 and ids(a) == ids(b) and len(set(ids(a))) == 5
    assert ids(select_items(toy_examples, 5, seed=4)) != ids(a)
    assert ids(select_items(toy_examples, 8, seed=3))[:5] == ids(a)  # nested subsets
    assert ids(select_items(toy_examples, None, seed=3)) == ids(toy_examples)
    assert sorted(ids(select_items(toy_examples, 100, seed=3))) == sorted(ids(toy_examples))


# ---------------------------------------------------------------- lm-eval runs


def test_lm_eval_runs_on_two_item_task(
    tiny_model, tiny_tokenizer, toy_examples, tmp_path, monkeypatch
):
    """Acceptance: lm-eval runs on a 2-item local task with the tiny model, network off."""
    attempts: list = []

    def no_network(self, address):
        attempts.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    items = toy_examples[:2]
    tiny_model.train()
    out = evaluate(tiny_model, tiny_tokenizer, [Benchmark("toy", items)], _cfg(), tmp_path)

    res = out["toy"]
    assert attempts == []
    assert res["metric"] == "exact_match" and res["n"] == 2
    assert res["value"] in {0.0, 0.5, 1.0}
    assert res["value"] == sum(s["correct"] for s in res["samples"]) / 2
    assert math.isfinite(res["stderr"])
    assert [s["id"] for s in res["samples"]] == ["toy-0", "toy-1"]
    assert [s["target"] for s in res["samples"]] == [ex.meta["answer"] for ex in items]
    for s, ex in zip(res["samples"], items, strict=True):
        assert s["prompt"] == prompt_text(tiny_tokenizer, ex)  # the training chat format
        assert isinstance(s["response"], str)
        assert s["correct"] == is_correct(s["response"], s["target"], "number")
    assert tiny_model.training  # the caller's train/eval mode is restored
    assert (tmp_path / "lm_eval_tasks" / "dataselect_toy.yaml").is_file()
    assert (tmp_path / "lm_eval_tasks" / "dataselect_toy.jsonl").read_text().count("\n") == 2


def test_metric_is_wired_to_scoring(tiny_model, tiny_tokenizer, tmp_path, stub_generation):
    replies, seen = stub_generation
    replies.update({"1 + 2": "1 + 2 = 3. The answer is 3.", "(a) or (b)": "(B)."})
    nums = [_qa("n0", "What is 1 + 2?", "3"), _qa("n1", "What is 2 + 2?", "4")]
    text = [_qa("t0", "What is it, (a) or (b)?", "(b)")]
    benches = [Benchmark("nums", nums), Benchmark("text", text, answer_type="text")]
    out = evaluate(tiny_model, tiny_tokenizer, benches, _cfg(), tmp_path)

    assert out["nums"]["value"] == 0.5 and out["nums"]["n"] == 2
    assert out["nums"]["stderr"] == pytest.approx(0.5)  # sample std 0.707 / sqrt(2)
    s0, s1 = out["nums"]["samples"]
    assert (s0["id"], s0["response"], s0["extracted"], s0["correct"]) == (
        "n0",
        "1 + 2 = 3. The answer is 3.",
        "3",
        True,
    )
    assert (s1["id"], s1["extracted"], s1["correct"]) == ("n1", None, False)
    assert out["text"]["value"] == 1.0 and math.isnan(out["text"]["stderr"])  # n == 1
    assert out["text"]["samples"][0]["extracted"] == "(b)"
    gen_kwargs = seen[0][1]
    assert gen_kwargs["do_sample"] is False and gen_kwargs["max_gen_toks"] == 8
    assert tiny_tokenizer.eos_token in gen_kwargs["until"] and "<|im_end|>" in gen_kwargs["until"]


def test_fewshot_as_chat_turns(tiny_model, tiny_tokenizer, tmp_path, stub_generation):
    shots = [_qa("f0", "What is 5 + 5?", "10"), _qa("f1", "What is 6 + 6?", "12")]
    test = [_qa("x0", "What is 1 + 2?", "3", system="Answer with a number.")]
    bench = Benchmark("fs", test, fewshot=shots)
    out = evaluate(tiny_model, tiny_tokenizer, [bench], _cfg(num_fewshot=1), tmp_path)

    want = [test[0].messages[0], *shots[0].messages, test[0].messages[1]]
    assert out["fs"]["samples"][0]["prompt"] == render(tiny_tokenizer, want, True)
    out = evaluate(tiny_model, tiny_tokenizer, [bench], _cfg(num_fewshot=None), tmp_path)
    assert (
        "What is 6 + 6?<|im_end|>\n<|im_start|>assistant\n12" in out["fs"]["samples"][0]["prompt"]
    )


def test_plain_text_prompt(tiny_model, tiny_tokenizer, tmp_path, stub_generation):
    replies, _ = stub_generation
    replies["1 + 2"] = " 3"
    bench = Benchmark("plain", [_qa("p0", "What is 1 + 2?", "3")])
    out = evaluate(tiny_model, tiny_tokenizer, [bench], _cfg(apply_chat_template=False), tmp_path)
    assert out["plain"]["samples"][0]["prompt"] == "What is 1 + 2?"
    assert out["plain"]["value"] == 1.0


def test_limit_and_seed_in_evaluate(
    tiny_model, tiny_tokenizer, toy_examples, tmp_path, stub_generation
):
    bench = Benchmark("toy", toy_examples)
    out = evaluate(tiny_model, tiny_tokenizer, [bench], _cfg(limit=3, seed=7), tmp_path)
    want = [ex.id for ex in select_items(toy_examples, 3, seed=7)]
    assert out["toy"]["n"] == 3
    assert sorted(s["id"] for s in out["toy"]["samples"]) == sorted(want)
    out = evaluate(tiny_model, tiny_tokenizer, [bench], _cfg(limit=50, seed=7), tmp_path)
    assert out["toy"]["n"] == len(toy_examples)


def test_empty_benchmark_raises(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="'empty_set'"):
        evaluate(tiny_model, tiny_tokenizer, [Benchmark("empty_set", [])], _cfg(), tmp_path)


# ---------------------------------------------------------------- resuming per benchmark


@pytest.fixture()
def runs(monkeypatch):
    """The lm-eval task lists ``simple_evaluate`` is called with (it still runs)."""
    import lm_eval

    calls: list[list[str]] = []
    real = lm_eval.simple_evaluate

    def spy(*args, **kwargs):
        calls.append(list(kwargs["tasks"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    return calls


def test_evaluate_resumes_per_benchmark(
    tiny_model, tiny_tokenizer, toy_examples, tmp_path, runs, caplog
):
    """A finished benchmark is read back, not re-run; a missing or truncated result file is
    recomputed; the results are the same dict either way (real generation, tiny model)."""
    benches = [
        Benchmark("toy/a", toy_examples[:2]),
        Benchmark("toy/b", toy_examples[2:4], fewshot=toy_examples[4:5]),
    ]
    results = tmp_path / "results"
    first = evaluate(tiny_model, tiny_tokenizer, benches, _cfg(), tmp_path)
    assert runs == [["dataselect_toy_a"], ["dataselect_toy_b"]]  # one lm-eval run each
    assert sorted(p.name for p in results.iterdir()) == ["toy_a.json", "toy_b.json"]
    stored = json.loads((results / "toy_b.json").read_text())
    assert stored["benchmark"] == "toy/b" and stored["result"] == first["toy/b"]

    runs.clear()
    with caplog.at_level(logging.INFO, logger="dataselect.evaluation.harness"):
        assert evaluate(tiny_model, tiny_tokenizer, benches, _cfg(), tmp_path) == first
    assert runs == [] and "evaluate: 2 of 2 benchmarks already done, resuming" in caplog.text

    (results / "toy_b.json").unlink()  # killed before toy/b finished
    runs.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dataselect.evaluation.harness"):
        resumed = evaluate(tiny_model, tiny_tokenizer, benches, _cfg(), tmp_path)
    assert runs == [["dataselect_toy_b"]] and resumed == first
    assert list(resumed) == ["toy/a", "toy/b"]  # in the order asked for
    assert "evaluate: 1 of 2 benchmarks already done, resuming" in caplog.text

    text = (results / "toy_a.json").read_text()
    (results / "toy_a.json").write_text(text[: len(text) // 2])  # a torn write: not trusted
    runs.clear()
    assert evaluate(tiny_model, tiny_tokenizer, benches, _cfg(), tmp_path) == first
    assert runs == [["dataselect_toy_a"]]
    assert json.loads((results / "toy_a.json").read_text())["result"] == first["toy/a"]
    assert sorted(p.name for p in results.iterdir()) == ["toy_a.json", "toy_b.json"]  # no temps


def test_stored_result_of_another_definition_is_rerun(
    tiny_model, tiny_tokenizer, tmp_path, stub_generation, runs
):
    replies, _ = stub_generation
    replies.update({"1 + 2": "3", "2 + 2": "4"})
    a = Benchmark("a", [_qa("a0", "What is 1 + 2?", "3")])
    b = Benchmark("b", [_qa("b0", "What is 2 + 2?", "4")])
    evaluate(tiny_model, tiny_tokenizer, [a, b], _cfg(), tmp_path)
    runs.clear()
    b2 = Benchmark("b", [_qa("b0", "What is 2 + 2?", "5")])  # a changed gold answer
    out = evaluate(tiny_model, tiny_tokenizer, [a, b2], _cfg(), tmp_path)
    assert runs == [["dataselect_b"]] and out["b"]["value"] == 0.0
    # num_fewshot=0 with no demonstrations defines the same task: nothing to redo
    runs.clear()
    evaluate(tiny_model, tiny_tokenizer, [a], _cfg(num_fewshot=0), tmp_path)
    assert runs == []
    for changed in ({"max_gen_toks": 4}, {"apply_chat_template": False}, {"seed": 1}):
        evaluate(tiny_model, tiny_tokenizer, [a], _cfg(), tmp_path)  # stored: the default
        runs.clear()
        evaluate(tiny_model, tiny_tokenizer, [a], _cfg(**changed), tmp_path)
        assert runs == [["dataselect_a"]], changed
