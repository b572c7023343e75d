"""The stage graph is declared once: a stage added to it runs in the pipeline and is priced
by the dry run, with the same key; ``stage=`` names only the graph's stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_plan import config

from dataselect import plan, stages
from dataselect.cache import digest
from dataselect.config import Stage
from dataselect.context import Planned
from dataselect.pipeline import run_pipeline


def test_stage_option_names_the_graph():
    assert [s.name for s in stages.STAGES] == [s.value for s in Stage if s != Stage.all]
    assert [s.name for s in stages.upto(stages.STAGES, "select")] == [
        "warmup",
        "features",
        "select",
    ]
    with pytest.raises(ValueError, match="stage must be all or one of"):
        stages.upto(stages.STAGES, "train")


def audit_key(cfg, selector, up) -> str:
    return digest({"audit of": up["warmup"].key})


def audit_estimate(cfg, selector, sizes, up, key) -> stages.Estimate:
    return stages.Estimate(key, [Planned("audit", "warmup examples", key, sizes.pool, 8)])


def audit_build(ctx, inputs, up) -> stages.StageResult:
    def build(work: Path) -> None:
        data = json.loads((up["warmup"].value / "data.json").read_text())
        (work / "audit.json").write_text(json.dumps({"warmup_examples": len(data["ids"])}))

    art = ctx.artifact("audit", audit_key(ctx.cfg, inputs.selector, up), build)
    return stages.StageResult(art.path.name, [art], value=art.path, sizes={"audited": 1})


@pytest.fixture()
def with_audit(monkeypatch):
    """A stage between warmup and features, declared only here."""
    audit = stages.StageSpec("audit", ("warmup",), audit_key, audit_estimate, audit_build)
    monkeypatch.setattr(stages, "STAGES", [stages.STAGES[0], audit, *stages.STAGES[1:]])


def test_a_declared_stage_runs_and_is_priced_with_one_key(tmp_path, with_audit):
    # a selector whose features read the warmup (random's need none, and it trains no warmup)
    cfg = config(tmp_path, "selector=perplexity", "selector.model=warmup", "stage=select")
    before = plan.plan(cfg).as_dict()["steps"]
    assert [s["stage"] for s in before] == ["warmup", "audit", "pool_loss", "select"]
    assert before[1]["status"] == "to run" and before[1]["examples"] == 40

    m = run_pipeline(cfg)
    assert m["cache_hits"] == {"warmup": False, "audit": False, "pool_loss": False, "select": False}
    assert m["sizes"]["audited"] == 1
    (built,) = (tmp_path / "cache" / "audit").glob("[!.]*")
    assert json.loads((built / "audit.json").read_text()) == {"warmup_examples": 8}

    after = plan.plan(cfg).as_dict()["steps"]
    assert after[1]["key"] == before[1]["key"] == built.name
    assert after[1]["status"] == "cached"
    assert run_pipeline(cfg)["cache_hits"]["audit"] is True
