"""The selector interface, budgets and the random baseline."""

from __future__ import annotations

import json

import pytest

from dataselect.data.targets import Target
from dataselect.selectors.base import BudgetError, Selection, resolve_budget
from dataselect.selectors.random import RandomSelector


@pytest.mark.parametrize(
    ("budget", "n", "expected"),
    [(0.05, 1000, 50), (0.05, 1050, 52), (0.001, 100, 1), (1.0, 7, 7), (500, 1000, 500), (1, 3, 1)],
)
def test_budget_as_fraction_or_count(budget, n, expected):
    assert resolve_budget(budget, n) == expected


@pytest.mark.parametrize(
    ("budget", "needle"),
    [
        (0.0, "in \\(0, 1\\]"),
        (1.5, "in \\(0, 1\\]"),
        (0, "at least 1"),
        (11, "larger than the pool"),
        ("5%", "fraction"),
        (True, "fraction"),
    ],
)
def test_impossible_budgets_raise_clear_errors(budget, needle):
    with pytest.raises(BudgetError, match=needle):
        resolve_budget(budget, 10)


def test_random_is_seeded_uniform_and_ranked(toy_examples):
    target = Target.single("t", toy_examples[:1], toy_examples[:1])
    a = RandomSelector().select(toy_examples, target, 5, seed=3)
    b = RandomSelector().select(toy_examples, target, 5, seed=3)
    c = RandomSelector().select(toy_examples, target, 5, seed=4)
    assert a.ids == b.ids and a.ids != c.ids
    assert len(set(a.ids)) == 5 and a.scores == sorted(a.scores, reverse=True)
    assert sum(a.diagnostics["composition"].values()) == 5


def test_random_hits_each_example_at_the_base_rate(toy_examples):
    target = Target.single("t", toy_examples[:1], toy_examples[:1])
    counts = dict.fromkeys((e.id for e in toy_examples), 0)
    for seed in range(600):
        for i in RandomSelector().select(toy_examples, target, 3, seed).ids:
            counts[i] += 1
    # each of 12 examples is picked with probability 3/12: 150 of 600 draws, sd ~10.6
    assert all(100 < c < 200 for c in counts.values()), counts


def test_selection_jsonl_roundtrip(tmp_path):
    sel = Selection(["b", "a"], [0.9, 0.1])
    sel.write_jsonl(tmp_path / "s.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert rows == [{"id": "b", "score": 0.9, "rank": 0}, {"id": "a", "score": 0.1, "rank": 1}]
    assert Selection.read_jsonl(tmp_path / "s.jsonl").ids == ["b", "a"]
