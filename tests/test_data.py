"""Records, readers and chat formatting."""

from __future__ import annotations

import json

import pytest

from dataselect.data.formatting import IGNORE_INDEX, tokenize_example, tokenize_examples
from dataselect.data.readers import read_json_file, read_reasoning_gym
from dataselect.data.records import RecordError, make_example
from dataselect.data.sources import read_sources
from dataselect.data.targets import candidates, load_target


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_every_json_shape_reads_to_user_then_assistant(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}]},
        {"prompt": "q1", "completion": "a1"},
        {"instruction": "q2", "input": "ctx", "output": "a2"},
        {"question": "q3", "answer": "a3 #### 3"},
        {"input": "q4", "target": "a4", "id": "custom"},
    ]
    exs = read_json_file(write_jsonl(tmp_path / "p.jsonl", rows), source="mine")
    assert [e.answer for e in exs] == ["a0", "a1", "a2", "a3 #### 3", "a4"]
    assert [e.prompt for e in exs] == ["q0", "q1", "q2\n\nctx", "q3", "q4"]
    assert [e.id for e in exs] == ["mine-1", "mine-2", "mine-3", "mine-4", "custom"]
    assert all(e.source == "mine" for e in exs)


def test_bbh_layout_json_file(tmp_path):
    path = tmp_path / "boolean_expressions.json"
    path.write_text(json.dumps({"examples": [{"input": "not True is", "target": "False"}]}))
    (ex,) = read_json_file(path)
    assert (ex.prompt, ex.answer, ex.source) == ("not True is", "False", "boolean_expressions")


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"prompt": "q"', "p.jsonl:2: invalid JSON"),
        ('{"foo": 1}', "p.jsonl:2: unknown record shape"),
        ('{"prompt": "q", "completion": "  "}', "p.jsonl:2: record 'p-2'"),
        ('{"prompt": "q", "completion": ["a"]}', "p.jsonl:2: field 'completion'"),
    ],
)
def test_malformed_records_name_file_line_and_field(tmp_path, line, needle):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok", "completion": "fine"}, line])
    with pytest.raises(RecordError, match=needle.replace("[", r"\[")):
        read_json_file(path)


def test_missing_file_and_duplicate_ids(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_json_file(tmp_path / "nope.jsonl")
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "prompt": "a", "completion": "b"}] * 2)
    with pytest.raises(RecordError, match="duplicate id 'x'"):
        read_sources([{"kind": "json", "path": str(path)}], tmp_path, "pool p")


def test_reasoning_gym_reader_is_seeded_and_labelled():
    a = read_reasoning_gym("chain_sum", 5, seed=3)
    b = read_reasoning_gym("chain_sum", 5, seed=3)
    assert [e.to_json() for e in a] == [e.to_json() for e in b]
    assert a[0].id == "rg/chain_sum/3/0" and a[0].source == "reasoning_gym/chain_sum"
    assert a[0].meta["answer"] == a[0].answer and a[0].subtask == "chain_sum"


def test_cot_answer_format_keeps_final_answer():
    (ex,) = read_reasoning_gym("gsm_symbolic", 1, seed=1, answer_format="cot")
    assert ex.answer.endswith(f"The answer is {ex.meta['answer']}.") and len(ex.answer) > 20


def test_target_is_disjoint_and_pool_candidates_drop_target_prompts(tmp_path):
    from omegaconf import OmegaConf

    same = {"kind": "reasoning_gym", "name": "gsm_symbolic", "n": 6, "seed": 7}
    cfg = OmegaConf.create(
        {"t": {"validation": [same], "test": [{**same, "n": 10}], "answer_type": "number"}}
    )
    target = load_target(cfg, tmp_path)
    # the first 6 test items are the validation items (same seed) and must be gone
    assert target.stats["test_dropped_overlap"] == 6 and len(target.test) == 4
    pool = read_reasoning_gym("gsm_symbolic", 12, seed=7) + read_reasoning_gym("gcd", 3, 1)
    kept, removed = candidates(pool, target)
    assert removed["removed"] == 10 and len(kept) == 5
    assert removed["validation_overlap"] == 6 and removed["exact"] == 4


def test_label_masking_puts_loss_on_assistant_tokens_only(tiny_tokenizer):
    ex = make_example(
        "m",
        "s",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "times 3?"},
            {"role": "assistant", "content": "12"},
        ],
    )
    tok, truncated = tokenize_example(tiny_tokenizer, ex, 1000)
    assert not truncated and len(tok.input_ids) == len(tok.labels)
    full = tiny_tokenizer.apply_chat_template(list(ex.messages), tokenize=False)
    assert tiny_tokenizer.decode(tok.input_ids) == full
    pairs = list(zip(tok.input_ids, tok.labels, strict=True))
    answer_ids = [i for i, lab in pairs if lab != IGNORE_INDEX]
    assert tiny_tokenizer.decode(answer_ids) == "4<|im_end|>\n12<|im_end|>\n"
    assert all(lab in (IGNORE_INDEX, i) for i, lab in pairs)


def test_truncation_drops_examples_without_answer_tokens(tiny_tokenizer):
    long_q = make_example(
        "long", "s", [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]
    )
    short = make_example(
        "ok", "s", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    )
    toks, stats = tokenize_examples(tiny_tokenizer, [long_q, short], max_length=64)
    assert [t.id for t in toks] == ["ok"]
    assert stats.as_dict() == {"kept": 1, "truncated": 1, "dropped_no_answer_tokens": 1}
    assert stats.dropped_ids == ["long"]


def test_tokenize_memo_reuses_results(tiny_tokenizer, toy_examples, monkeypatch):
    import dataselect.data.formatting as fmt

    memo: dict = {}
    first, _ = tokenize_examples(tiny_tokenizer, toy_examples, 64, memo)
    calls = []
    real = fmt.tokenize_example
    monkeypatch.setattr(fmt, "tokenize_example", lambda *a: calls.append(1) or real(*a))
    again, stats = tokenize_examples(tiny_tokenizer, toy_examples[:5], 64, memo)
    assert calls == [] and again == first[:5] and stats.kept == 5


def test_tokenize_memo_is_per_token_limit(tiny_tokenizer, toy_examples):
    """The same example at two limits (pool vs a validation task's own) is cut twice."""
    memo: dict = {}
    long, _ = tokenize_examples(tiny_tokenizer, toy_examples[:1], 1000, memo)
    limit = len(long[0].input_ids) - 1  # cuts the end-of-turn token, keeps the answer
    short, stats = tokenize_examples(tiny_tokenizer, toy_examples[:1], limit, memo)
    assert len(short[0].input_ids) == limit and stats.truncated == 1
