"""Test-set decontamination against the real GSM8K test set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataselect.data.decontam import decontaminate, words
from dataselect.data.records import Example, make_example

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
pytestmark = pytest.mark.skipif(not GSM8K_TEST.is_file(), reason="needs shared/data/gsm8k")


def ex(id: str, user: str, answer: str = "ok", source: str = "pool") -> Example:
    return make_example(
        id, source, [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    )


@pytest.fixture(scope="module")
def gsm8k_test() -> list[Example]:
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines() if line.strip()]
    return [ex(f"test-{i}", r["question"], r["answer"], "gsm8k") for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def pool(gsm8k_test) -> list[Example]:
    """3 verbatim test questions, 3 quoting one (13-gram), 4 near misses / unrelated."""
    q = [e.prompt for e in gsm8k_test if len(words(e.prompt)) >= 30][:6]
    first12 = " ".join(q[5].split()[:12])
    assert len(words(first12)) == 12
    return [
        ex("verbatim-0", q[0], source="a"),
        ex("verbatim-1", "  " + q[1].upper() + "\n", source="a"),  # case and spacing
        ex("verbatim-2", q[2], source="b"),
        ex("quoted-0", f"Solve step by step. {q[3]} Give the final number.", source="a"),
        ex("quoted-1", "Rewrite it: " + q[4].replace(",", " ;").replace(".", " !"), source="b"),
        ex("quoted-in-answer", "Give me a word problem.", f"Sure: {q[0][:-1]} Enjoy.", "b"),
        ex("first-12-words", f"{first12} zebra crossing", source="a"),
        ex("unrelated-0", "Name three primary colours.", "Red, yellow and blue.", "a"),
        ex("unrelated-1", "What is the capital of France?", "Paris.", "b"),
        ex("unrelated-2", "Translate 'good morning' into Spanish.", "Buenos dias.", "b"),
    ]


def ids(examples: list[Example]) -> list[str]:
    return [e.id for e in examples]


def test_removes_verbatim_and_quoted_test_items(pool, gsm8k_test):
    kept, report = decontaminate(pool, gsm8k_test)
    assert ids(kept) == ["first-12-words", "unrelated-0", "unrelated-1", "unrelated-2"]
    assert report == {"exact": 3, "ngram": 3, "removed": 6, "by_source": {"a": 3, "b": 3}}


def test_ngram_zero_keeps_only_the_exact_check(pool, gsm8k_test):
    kept, report = decontaminate(pool, gsm8k_test, ngram=0)
    assert report == {"exact": 3, "ngram": 0, "removed": 3, "by_source": {"a": 2, "b": 1}}
    assert ids(kept)[:3] == ["quoted-0", "quoted-1", "quoted-in-answer"]


def test_ngram_alone_also_catches_verbatim_items(pool, gsm8k_test):
    _, report = decontaminate(pool, gsm8k_test, exact=False)
    assert report == {"exact": 0, "ngram": 6, "removed": 6, "by_source": {"a": 3, "b": 3}}
    _, off = decontaminate(pool, gsm8k_test, ngram=0, exact=False)
    assert off == {"exact": 0, "ngram": 0, "removed": 0, "by_source": {}}


def test_short_held_out_items_are_matched_exactly_only():
    held_out = [ex("t", "What is two plus two?")]  # 5 words < 13: no n-grams
    pool = [
        ex("same", "what is  two plus TWO?"),
        ex("inside", "Quick one. What is two plus two? Answer in words please, thanks a lot."),
    ]
    kept, report = decontaminate(pool, held_out)
    assert ids(kept) == ["inside"] and report["exact"] == 1 and report["ngram"] == 0
    kept, report = decontaminate(pool, held_out, ngram=4)
    assert kept == [] and report == {"exact": 1, "ngram": 1, "removed": 2, "by_source": {"pool": 2}}


def test_words_split_on_non_alphanumerics():
    assert words("Janet's ducks: 16-3 eggs_day!") == [
        "janet",
        "s",
        "ducks",
        "16",
        "3",
        "eggs",
        "day",
    ]
