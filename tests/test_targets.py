"""GSM8K and BBH targets from the upstream files in ../shared/data: validation sets, test
items, few-shot demos, answer extraction on hand-labelled generations, multi-task targets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import dataselect.config  # noqa: F401
from dataselect.data.benchmarks import BBH_TASKS, gsm8k_solution, parse_cot_prompt
from dataselect.data.decontam import words
from dataselect.data.formatting import IGNORE_INDEX, tokenize_example
from dataselect.data.readers import normalized_text
from dataselect.data.records import RecordError, make_example
from dataselect.data.sources import read_sources
from dataselect.data.targets import candidates, load_target
from dataselect.evaluation import aggregate
from dataselect.evaluation.harness import task_limit
from dataselect.evaluation.scoring import extract, is_correct
from dataselect.evaluation.tasks import task_benchmarks

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(
    not (SHARED_DATA / "bbh").is_dir(), reason="needs ../shared/data (GSM8K and BBH)"
)


def target_cfg(*names: str, overrides: tuple[str, ...] = ()):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"target=[{','.join(names)}]", *overrides]).target


@pytest.fixture(scope="module")
def both():
    return load_target(target_cfg("gsm8k", "bbh"), SHARED_DATA)


def test_bbh_validation_is_81_exemplars_with_two_demos_each(both):
    bbh = next(t for t in both.tasks if t.name == "bbh")
    assert len(bbh.validation) == 81
    subtasks = [ex.subtask for ex in bbh.validation]
    assert sorted(set(subtasks)) == sorted(BBH_TASKS) and len(BBH_TASKS) == 27
    assert all(subtasks.count(s) == 3 for s in BBH_TASKS)
    prompts = {
        t: parse_cot_prompt(t, (SHARED_DATA / f"bbh/cot-prompts/{t}.txt").read_text(), t)
        for t in BBH_TASKS
    }
    for ex in bbh.validation:
        roles = [m["role"] for m in ex.messages]
        assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
        shots = prompts[ex.subtask].shots
        i = int(ex.id.rsplit("/", 1)[1])
        # the demos are the other two exemplars of the same subtask, in order
        demo_questions = [ex.messages[1]["content"], ex.messages[3]["content"]]
        assert demo_questions == [q for j, (q, _) in enumerate(shots) if j != i]
        assert ex.prompt == shots[i][0] and ex.answer == shots[i][1]
        assert ex.answer.startswith("Let's think step by step.")
        assert ex.meta["answer"] and ex.answer.rstrip(".").endswith(ex.meta["answer"])
    # the description of the task is the system turn
    assert bbh.validation[0].messages[0]["content"] == prompts[BBH_TASKS[0]].description


def test_bbh_validation_loss_covers_its_own_answer_only(both, tiny_tokenizer):
    ex = both.tasks[1].validation[0]
    tok, _ = tokenize_example(tiny_tokenizer, ex, 100_000)
    scored = [t for t, lab in zip(tok.input_ids, tok.labels, strict=True) if lab != IGNORE_INDEX]
    answer = tiny_tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
    # scored = the final answer (plus the template's end-of-turn), not the two demo answers
    assert len(answer) <= len(scored) <= len(answer) + 3
    plain = make_example("p", "s", ex.messages, {})  # without meta.loss every answer counts
    tok2, _ = tokenize_example(tiny_tokenizer, plain, 100_000)
    assert tok2.n_loss_tokens > 2 * len(scored)


def test_test_items_never_appear_in_validation_or_demos(both):
    for task in both.tasks:
        held = {normalized_text(e) for e in task.validation + task.fewshot}
        assert task.test and not any(normalized_text(e) in held for e in task.test)
    gsm8k, bbh = both.tasks
    assert len(gsm8k.test) == 1319 and len(gsm8k.validation) == 32 and len(gsm8k.fewshot) == 8
    assert len(bbh.test) == 6511 and len(bbh.fewshot) == 81


def test_test_items_equal_to_a_demo_are_dropped(tmp_path):
    """The exclusion is real: put an exemplar into a test file and it is dropped."""
    (tmp_path / "bbh" / "cot-prompts").mkdir(parents=True)
    task = "sports_understanding"
    text = (SHARED_DATA / f"bbh/cot-prompts/{task}.txt").read_text()
    (tmp_path / f"bbh/cot-prompts/{task}.txt").write_text(text)
    q = parse_cot_prompt(task, text, task).shots[0][0]
    items = [
        {"input": q, "target": "yes"},
        {"input": "Is this sentence plausible?", "target": "no"},
    ]
    (tmp_path / f"bbh/{task}.json").write_text(json.dumps({"examples": items}))
    cfg = target_cfg(
        "bbh",
        overrides=(
            f"target.bbh.validation=[{{kind: bbh_cot, demos: 2, tasks: [{task}]}}]",
            f"target.bbh.test=[{{kind: bbh, tasks: [{task}]}}]",
            f"target.bbh.fewshot=[{{kind: bbh_cot, demos: 0, tasks: [{task}]}}]",
        ),
    )
    t = load_target(cfg, tmp_path)
    assert [e.prompt for e in t.test] == ["Is this sentence plausible?"]
    assert t.stats["test_dropped_overlap"] == 1


def test_decontaminated_pool_holds_no_test_item_and_no_gsm8k_validation(both):
    gsm8k, bbh = both.tasks
    train = read_sources([{"kind": "gsm8k", "split": "train"}], SHARED_DATA, "pool")[:2000]
    leaked = [
        make_example(
            f"leak{i}",
            "leak",
            [
                {"role": "user", "content": f"Solve this. {ex.prompt}"},
                {"role": "assistant", "content": "ok"},
            ],
        )
        # embedded in a longer prompt: caught by the 13-gram rule (items of >= 13 words)
        for i, ex in enumerate(
            gsm8k.test[:5] + [e for e in bbh.test[::500] if len(words(e.prompt)) >= 13]
        )
    ]
    verbatim = [
        make_example(f"copy{i}", "copy", [*ex.messages[:-1], {"role": "assistant", "content": "x"}])
        for i, ex in enumerate(bbh.test[5:8])
    ]
    pool = train + leaked + verbatim
    in_val = {e.id for e in gsm8k.validation} & {e.id for e in train}
    kept, report = candidates(pool, both, ngram=13)
    kept_text = {normalized_text(e) for e in kept}
    assert not any(normalized_text(e) in kept_text for e in both.test)
    assert not any(normalized_text(e) in kept_text for e in both.validation)
    bad = {e.id for e in kept} & ({e.id for e in leaked + verbatim} | in_val)
    assert not bad, sorted(bad)
    assert report["validation_overlap"] == len(in_val) > 0
    assert report["exact"] == 3 and report["ngram"] >= len(leaked)
    assert report["removed"] == len(pool) - len(kept)


def test_gsm8k_solution_format_and_errors(tmp_path):
    text, final = gsm8k_solution("She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072", "f:1")
    assert text == "She sold 48/2 = 24 clips.\nThe answer is 1072." and final == "1072"
    with pytest.raises(RecordError, match="f:3.*####"):
        gsm8k_solution("no final line", "f:3")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(
        json.dumps({"question": "q?", "answer": "#### 3"}) + "\n" + json.dumps({"question": "q"})
    )
    with pytest.raises(RecordError, match=r"test.jsonl:2: field 'answer'"):
        read_sources([{"kind": "gsm8k", "split": "test"}], tmp_path, "t")
    with pytest.raises(FileNotFoundError, match="openai/gsm8k"):
        read_sources([{"kind": "gsm8k", "split": "train"}], tmp_path / "none", "t")


def test_gsm8k_validation_is_seeded_and_configurable():
    a = read_sources([{"kind": "gsm8k", "split": "train", "n": 5, "seed": 1}], SHARED_DATA, "v")
    b = read_sources([{"kind": "gsm8k", "split": "train", "n": 5, "seed": 1}], SHARED_DATA, "v")
    c = read_sources([{"kind": "gsm8k", "split": "train", "n": 5, "seed": 2}], SHARED_DATA, "v")
    assert [e.id for e in a] == [e.id for e in b] != [e.id for e in c]
    cot = read_sources([{"kind": "gsm8k_cot"}], SHARED_DATA, "v")
    assert len(cot) == 8 and cot[0].meta["answer"] == "6"
    assert all(e.answer.endswith(f"The answer is {e.meta['answer']}.") for e in cot)


# Hand-labelled generations: (generation, gold, what a grader would say).
GSM8K_LABELLED = [
    ("Natalia sold 48/2 = 24 clips in May. 48 + 24 = 72. The answer is 72.", "72", True),
    ("He pays $1,200 a month, so 12 * 1,200 = 14,400. The answer is $14,400.", "14400", True),
    ("The answer is 18.\n\nQ: next question 5", "18", False),  # ran on: the last number is 5
    ("So she has 3.50 dollars left.", "3.5", True),
    ("There are 15 trees, 21 after. 21 - 15 = 6 trees planted", "6", True),
    ("I am not sure.", "4", False),
    ("5 + 4 = 9. The answer is 10.", "9", False),
    ("The total is -3 degrees. The answer is -3.", "-3", True),
]
BBH_LABELLED = [
    ("Let's think step by step.\nnot ( True ) = False. So the answer is False.", "False", True),
    ("Let's think step by step.\n... So the answer is (D).", "(D)", True),
    (
        "Let's think step by step.\nThe date is 12/14/1937. So the answer is (D) 12/14/1937.",
        "(D)",
        True,
    ),
    ("Let's think step by step.\n(A) looks right but no. So the answer is (C).", "(A)", False),
    ("Let's think step by step.\nSo the answer is ] ) ].", "] ) ]", True),
    ("Let's think step by step.\nSo the answer is ] ].", "] ) ]", False),
    ("Let's think step by step.\n3 + 4 = 7, 7 * 2 = 14. So the answer is 14.", "14", True),
    ("So the answer is valid.", "invalid", False),
    ("the answer is: **Yes**.", "Yes", True),
    ("So the answer is apple banana cherry.", "apple banana cherry", True),
    ("Let's think step by step.\nnot True is not True is not True", "False", False),
]


@pytest.mark.parametrize(("generation", "gold", "correct"), GSM8K_LABELLED)
def test_gsm8k_answer_extraction_matches_hand_labels(generation, gold, correct):
    assert is_correct(generation, gold, "number") is correct


@pytest.mark.parametrize(("generation", "gold", "correct"), BBH_LABELLED)
def test_bbh_answer_extraction_matches_hand_labels(generation, gold, correct):
    assert is_correct(generation, gold, "text") is correct


def test_bbh_extraction_returns_the_final_answer_text():
    assert extract("blah. So the answer is (B) 11/11/2018.", "text") == "(b)"
    assert extract("So the answer is No.\nExtra line", "text") == "no"


def test_multi_task_target_is_the_union_with_task_labels(both):
    assert both.name == "gsm8k+bbh"
    assert len(both.validation) == 32 + 81
    assert {e.subtask for e in both.validation} == {"gsm8k", *BBH_TASKS}
    benches = [b for t in both.tasks for b in task_benchmarks(t)]
    assert len(benches) == 1 + 27
    g = benches[0]
    assert g.name == "gsm8k" and len(g.fewshot) == 8 and g.answer_type == "number"
    date = next(b for b in benches if b.name == "bbh/date_understanding")
    assert len(date.fewshot) == 3 and {f.subtask for f in date.fewshot} == {"date_understanding"}
    assert all(e.subtask == "date_understanding" for e in date.examples)
    assert date.answer_type == "text" and date.examples[0].messages[0]["role"] == "system"


def test_macro_and_micro_averages():
    subs = {
        "a": {"value": 1.0, "stderr": 0.0, "n": 2},
        "b": {"value": 0.25, "stderr": 0.25, "n": 4},
        "c": {"value": 0.5, "stderr": float("nan"), "n": 2},
    }
    out = aggregate(subs)
    assert out["value"] == pytest.approx((1.0 + 0.25 + 0.5) / 3)
    assert out["micro"] == pytest.approx((2 + 1 + 1) / 8)
    assert out["n"] == 8 and set(out["subtasks"]) == {"a", "b", "c"}
    # the NaN stderr falls back to p(1-p)/(n-1)
    assert out["stderr"] == pytest.approx(math.sqrt(0 + 0.0625 + 0.25) / 3)
    assert out["micro_stderr"] == pytest.approx(math.sqrt(0.5 * 0.5 / 7))


def test_evaluator_limit_per_task():
    assert task_limit(None, "bbh/x") is None and task_limit(5, "bbh/x") == 5
    limits = {"gsm8k": 30, "bbh": 2}
    assert task_limit(limits, "bbh/date_understanding") == 2
    assert task_limit(limits, "gsm8k") == 30 and task_limit(limits, "other") is None


def test_a_task_with_a_typo_is_refused_on_load():
    from omegaconf import OmegaConf

    from dataselect.config import task_config

    with pytest.raises(ValueError, match="target.t: .*validaton"):
        task_config("t", OmegaConf.create({"validaton": []}))
    with pytest.raises(ValueError, match="target.t"):
        load_target(
            OmegaConf.create({"t": {"answer_type": "number", "max_length": "x"}}), SHARED_DATA
        )
