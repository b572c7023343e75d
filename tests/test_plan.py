"""The dry run: stage keys and cache status match what the pipeline builds; measured costs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import dataselect.config  # noqa: F401
from dataselect import plan
from dataselect.cli import main_cfg

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = [
    "model=tiny_random",
    "logger=csv",
    "selector=less",
    "features.sketch.dim=64",
    "pool.sources=[{kind: reasoning_gym, name: chain_sum, n: 30, seed: 1},"
    "{kind: reasoning_gym, name: gsm_symbolic, n: 10, seed: 2}]",
    "target.gsm_symbolic.validation=[{kind: reasoning_gym, name: gsm_symbolic, n: 4, seed: 3}]",
    "target.gsm_symbolic.test=[{kind: reasoning_gym, name: gsm_symbolic, n: 6, seed: 4}]",
    "budget=8",
    "warmup.epochs=2",
    "warmup.fraction=0.2",
    "finetune.epochs=1",
    "evaluator.limit=3",
]


def config(tmp: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                *TINY,
                f"paths.cache_dir={tmp / 'cache'}",
                f"paths.output_dir={tmp / 'out'}",
                *overrides,
            ],
        )


def statuses(p: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in p["steps"]:
        out.setdefault(s["stage"], set()).add(s["status"])
    return out


def test_empty_cache_every_stage_to_run(tmp_path, capsys):
    p = main_cfg(config(tmp_path, "dry_run=true"))  # the CLI hook: plan, print, no run
    assert "dry run: less" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
    assert statuses(p) == {
        "warmup": {"to run"},
        "features": {"to run"},
        "features_val": {"to run"},
        "select": {"to run"},
        "finetune": {"depends on the selection"},
        "evaluate": {"depends on the selection"},
        "evaluate_base": {"to run"},
    }
    feats = [s for s in p["steps"] if s["stage"] == "features"]
    assert [s["what"] for s in feats] == ["pool adam @ epoch_1", "pool adam @ epoch_2"]
    assert p["sizes"] == {
        "pool": 40,
        "pool_source": "read",
        "validation": 4,
        "test": 3,  # limit 3 of the 6 test items
        "budget": 8,
    }
    by = {s["stage"]: s for s in p["steps"]}
    assert by["warmup"]["examples"] == 8 * 2  # 20% of 40, 2 epochs
    assert by["features"]["bytes"] == 40 * 64 * 2  # pool x dim x fp16
    assert by["finetune"]["examples"] == 8 and by["finetune"]["key"] is None
    # no measurement and tiny_random has no model.cost: compute unknown, not guessed
    assert by["warmup"]["seconds"] is None and p["rates"]["train"]["source"] == "unknown"


def test_stage_limits_the_plan(tmp_path):
    p = plan.plan(config(tmp_path, "stage=features", "selector=less"))
    stages = [s["stage"] for s in plan.print_plan(p)["steps"]]
    assert stages[0] == "warmup" and set(stages[1:]) == {"features", "features_val"}
    # random reads no features and no warmup checkpoint: nothing to run up to features
    p = plan.plan(config(tmp_path, "stage=features", "selector=random"))
    assert plan.print_plan(p)["steps"] == []


def test_gist_exact_plans_a_pool_pass_per_target(tmp_path):
    p = plan.plan(config(tmp_path, "selector=gist", "selector.k=3")).as_dict()
    stages = [s["stage"] for s in p["steps"]]
    assert stages[:4] == ["warmup", "gist_val", "gist_spectrum", "gist_pass"]
    (pass_,) = [s for s in p["steps"] if s["stage"] == "gist_pass"]
    assert pass_["bytes"] == 40 * 3 * 4 and pass_["what"] == "pool @ epoch_1, k=3"


def test_unreadable_pool_falls_back_to_pool_size(tmp_path):
    missing = "pool.sources=[{kind: json, path: nowhere/pool.jsonl}]"
    p = plan.plan(config(tmp_path, missing, "+pool.size=1000")).as_dict()
    assert p["sizes"]["pool"] == 1000 and p["sizes"]["budget"] == 8
    assert p["sizes"]["pool_source"].startswith("pool.size (pool not read: missing file")
    assert any("pool size" in n for n in p["notes"])


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    """A real stage=select run (warmup, LESS features, selection) on the tiny model."""
    tmp = tmp_path_factory.mktemp("plan")
    metrics = main_cfg(config(tmp, "stage=select"))
    assert metrics["cache_hits"] == {
        "warmup": False,
        "features": False,
        "features_val": False,
        "select": False,
    }
    return tmp


def test_after_select_upstream_is_cached_and_finetune_to_run(selected):
    p = plan.plan(config(selected)).as_dict()
    st = statuses(p)
    for stage in ("warmup", "features", "features_val", "select"):
        assert st[stage] == {"cached"}, (stage, st)
    assert st["finetune"] == {"to run"} and st["evaluate"] == {"to run"}
    by = {s["stage"]: s for s in p["steps"]}
    # the plan's keys are the pipeline's: each cached step names an existing artifact
    for s in p["steps"]:
        if s["status"] == "cached":
            assert (selected / "cache" / s["stage"] / s["key"] / "COMPLETE").is_file()
    assert by["finetune"]["key"] and by["finetune"]["examples"] == 8  # 8 selected x 1 epoch
    # cached steps report what they cost; the finetune estimate uses the measured warmup rate
    warm = by["warmup"]
    assert warm["seconds"] > 0 and warm["rate_source"] == "measured: this artifact"
    assert warm["examples"] == 16 and warm["bytes"] > 0
    assert p["rates"]["train"]["source"].startswith("measured")
    assert p["rates"]["train"]["seconds_per_example"] == pytest.approx(warm["seconds"] / 16)
    assert by["finetune"]["seconds"] == pytest.approx(8 * warm["seconds"] / 16)
    assert p["totals"]["hours_to_run"] < p["totals"]["hours"]


def test_measurements_carry_over_to_a_new_selector_of_the_same_model(selected):
    p = plan.plan(config(selected, "selector=gist", "selector.k=3")).as_dict()
    by = {s["stage"]: s for s in p["steps"]}
    assert by["warmup"]["status"] == "cached" and by["gist_pass"]["status"] == "to run"
    assert p["rates"]["featurize"]["source"].startswith("measured")  # from the LESS stores
    assert by["gist_pass"]["seconds"] > 0
    # another model: nothing of the tiny model's counts
    other = plan.plan(config(selected, "model.max_length=512")).as_dict()
    assert other["rates"]["featurize"]["source"] == "unknown"
    assert {s["status"] for s in other["steps"]} <= {"to run", "depends on the selection"}
