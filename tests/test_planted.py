"""The planted benchmark's arithmetic (experiments/planted/run_planted.py) on synthetic rows:
precision from a run's metrics, the ceiling, the spread over seeds, the report. No model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "run_planted", ROOT / "experiments" / "planted" / "run_planted.py"
)
planted = importlib.util.module_from_spec(spec)
spec.loader.exec_module(planted)

# 1,650 candidates, 30 from each of the two target families a and b
CANDIDATES = {"reasoning_gym/a": 30, "reasoning_gym/b": 30, "reasoning_gym/other": 1590}


def row(family: str, selector: str, seed: int, budget_cfg: float, n: int, hits: int) -> dict:
    other = "b" if family == "a" else "a"
    metrics = {
        "sizes": {"budget": n},
        "selection_sources": {f"reasoning_gym/{family}": hits, f"reasoning_gym/{other}": n - hits},
        "candidate_sources": CANDIDATES,
    }
    r = {"family": family, "selector": selector, "seed": seed, "budget_cfg": budget_cfg}
    return {**r, **planted.precision(metrics, family)}


def test_precision_ceiling_and_normalized():
    small = row("a", "less", 0, 0.01, 16, 8)  # the family can fill all 16
    assert small["precision"] == 0.5 and small["ceiling"] == 1.0 and small["normalized"] == 0.5
    big = row("a", "less", 0, 0.05, 82, 15)  # at most 30 of 82 can come from the family
    assert big["ceiling"] == pytest.approx(30 / 82)
    assert big["precision"] == pytest.approx(15 / 82) and big["normalized"] == pytest.approx(0.5)
    assert big["base_rate"] == pytest.approx(30 / 1650) and big["candidates"] == 1650
    assert (big["hits"], big["picked"], big["family_candidates"]) == (15, 82, 30)
    gone = planted.precision(
        {"sizes": {"budget": 16}, "selection_sources": {"x": 16}, "candidate_sources": {"x": 9}},
        "a",
    )
    assert gone["ceiling"] == 0 and gone["normalized"] == 0.0  # every example decontaminated


def rows() -> list[dict]:
    # "good": normalized a / b per seed = (1, .5), (.5, .5), (1, 1): per-seed means .75 .5 1
    good = {0: (16, 8), 1: (8, 8), 2: (16, 16)}
    out = []
    for seed, (a, b) in good.items():
        out += [row("a", "good", seed, 0.01, 16, a), row("b", "good", seed, 0.01, 16, b)]
        out += [row(f, "good", seed, 0.05, 82, 30) for f in "ab"]  # perfect at 5%
        out += [
            row(f, "random", seed, b_, n, 1) for f in "ab" for b_, n in ((0.01, 16), (0.05, 82))
        ]
    return out


def test_summary_mean_spread_and_range():
    by = {(s["selector"], s["budget_cfg"]): s for s in planted.summarize(rows())}
    good = by["good", 0.01]
    assert good["normalized"] == pytest.approx(0.75) and good["spread"] == pytest.approx(0.25)
    assert (good["families"], good["seeds"]) == (2, 3)
    assert good["min"] == pytest.approx(2 / 3) and good["worst"] == "b"
    assert good["max"] == pytest.approx(5 / 6)
    perfect = by["good", 0.05]
    assert perfect["normalized"] == pytest.approx(1.0) and perfect["spread"] == 0.0
    assert perfect["precision"] == pytest.approx(30 / 82)
    assert perfect["chance"] == pytest.approx((30 / 1650) / (30 / 82))  # base rate / ceiling
    assert by["random", 0.01]["normalized"] == pytest.approx(1 / 16)


def test_per_family_and_report(tmp_path: Path):
    fams, sels, cells = planted.per_family(rows(), 0.01)
    assert fams == ["a", "b"] and sels == ["good", "random"]
    assert cells["b", "good"] == pytest.approx(2 / 3)
    (tmp_path / "planted.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows()))
    md = planted.write_report(tmp_path)
    assert "budget 0.01: random selector 0.062" in md
    assert "per family at budget 0.05" in md and "| a | 1.00 | 0.03 |" in md  # 1 / 30
    assert (tmp_path / "planted.md").read_text().strip() == md
    assert (tmp_path / "planted.png").stat().st_size > 0
