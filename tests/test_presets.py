"""Paper presets and sweeps: they compose, cite their numbers, and dry-run offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import dataselect.config  # noqa: F401
from dataselect import plan

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PAPERS = [e for e in EXPERIMENTS if e != "quickstart"]
SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))
SELECTORS = sorted(p.stem for p in (CONF / "selector").glob("*.yaml"))
PAPER_TABLES = ["less_paper_table", "g2is_paper_table", "gist_paper_table"]


def compose_cfg(tmp: Path, *overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                f"paths.cache_dir={tmp / 'cache'}",
                f"paths.output_dir={tmp / 'out'}",
                f"paths.data_dir={SHARED_DATA}",
                *overrides,
            ],
            return_hydra_config=hydra,
        )


def test_the_paper_rows_are_all_there():
    assert {"less_llama2_7b_bbh_5pct", "g2is_llama31_8b_gsm8k_1pct"} <= set(PAPERS)
    assert {"g2is_llama31_8b_bbh_1pct"} <= set(PAPERS)
    assert any(e.startswith("gist_") and e.endswith("_bbh_5pct") for e in PAPERS)
    assert {"mini", "selectors_budgets", "less_paper", "ablation_gist_k"} <= set(SWEEPS)
    assert set(PAPER_TABLES) <= set(SWEEPS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(tmp_path, name):
    cfg = compose_cfg(tmp_path, f"experiment={name}")
    assert cfg.logger.group and cfg.selector._target_.startswith("dataselect.selectors.")


@pytest.mark.parametrize("name", PAPERS)
def test_paper_preset_cites_its_numbers(tmp_path, name):
    cfg = compose_cfg(tmp_path, f"experiment={name}")
    ref = cfg.reference
    assert ref is not None and len(ref.source) > 20
    assert all(isinstance(v, int | float) for k, v in ref.items() if k not in ("source", "method"))
    assert cfg.trainer.accelerator == "gpu" and cfg.model.dtype == "bfloat16"
    assert cfg.model.lora.r == 128 and cfg.model.lora.alpha == 512
    assert cfg.warmup.lr == cfg.finetune.lr == 2e-5 and cfg.warmup.epochs == 4
    assert cfg.model.cost.seconds_per_example.featurize > 0


def selector_target(name: str) -> str:
    return yaml.safe_load((CONF / "selector" / f"{name}.yaml").read_text())["_target_"]


@pytest.mark.parametrize("name", PAPERS)
def test_paper_reference_keys_name_a_task_and_a_selector(tmp_path, name):
    """reference: "<task>" (the paper's own method, named by `method`), "<selector>/<task>" (a
    row of the paper's table: a selector of conf/selector/, or "base"), percent; and `source`.
    Passes for the LESS and G2IS presets once conf/selector/{full,embed}.yaml exist."""
    cfg = compose_cfg(tmp_path, f"experiment={name}")
    ref, tasks = dict(cfg.reference), set(cfg.target)
    assert ref["method"] in SELECTORS  # the preset's own selector
    assert selector_target(ref["method"]) == cfg.selector._target_
    for key, value in ref.items():
        if key in ("source", "method"):
            continue
        selector, _, task = key.rpartition("/")
        assert task in tasks, (key, tasks)  # a number for a task this preset evaluates
        assert selector in ("", "base", *SELECTORS), (key, SELECTORS)
        assert isinstance(value, int | float) and 0 < value <= 100, (key, value)  # percent


def sweep_params(tmp_path: Path, name: str) -> dict[str, list[str]]:
    cfg = compose_cfg(tmp_path, f"sweep={name}", hydra=True)
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


@pytest.mark.parametrize("name", SWEEPS)
def test_sweeps_name_existing_selectors(tmp_path, name):
    """Passes for the *_paper_table sweeps once conf/selector/{bm25,dsir,full,embed,length,
    perplexity,rds}.yaml exist."""
    swept = sweep_params(tmp_path, name).get("selector", [])
    assert set(swept) <= set(SELECTORS), sorted(set(swept) - set(SELECTORS))


@pytest.mark.parametrize("name", PAPER_TABLES)
def test_paper_table_jobs_instantiate_every_selector(tmp_path, name):
    """Each job of a paper sweep composes and builds its selector: a preset's `selector:` knobs
    would be merged into every selector the sweep swaps in (RandomSelector(variant=...))."""
    params = sweep_params(tmp_path, name)
    assert "seed" in params and len(params["selector"]) >= 4
    for experiment in params.get("experiment", [None]):
        for selector in params["selector"]:
            if selector not in SELECTORS:
                pytest.fail(f"{name}: conf/selector/{selector}.yaml does not exist (yet)")
            job = [f"selector={selector}"] + ([f"experiment={experiment}"] if experiment else [])
            cfg = compose_cfg(tmp_path, f"sweep={name}", *job)
            assert cfg.reference is not None and cfg.reference.method
            assert instantiate(cfg.selector).name, (experiment, selector)


def test_less_preset_is_the_papers_recipe(tmp_path):
    cfg = compose_cfg(tmp_path, "experiment=less_llama2_7b_bbh_5pct")
    assert cfg.reference.bbh == 41.5 and cfg.reference["random/bbh"] == 38.9
    assert cfg.reference.method == "less" and cfg.reference["full/bbh"] == 43.2
    assert cfg.warmup.batch_size * cfg.warmup.grad_accum == 128
    assert cfg.finetune.batch_size * cfg.finetune.grad_accum == 128
    assert (cfg.budget, cfg.warmup.fraction, cfg.model.max_length) == (0.05, 0.05, 2048)
    assert cfg.features.sketch.dim == 8192 and cfg.features.dtype == "float16"
    assert cfg.model.lora.dropout == 0.1 and list(cfg.target) == ["bbh"]


@pytest.mark.parametrize("name", PAPERS)
def test_paper_preset_dry_runs_offline(tmp_path, name):
    p = plan.plan(compose_cfg(tmp_path, f"experiment={name}", "dry_run=true")).as_dict()
    assert p["sizes"]["pool"] > 10_000 and p["sizes"]["budget"] > 0
    assert {s["status"] for s in p["steps"]} <= {"to run", "depends on the selection"}
    t = p["totals"]
    assert 1 < t["hours"] < 500 and 1 < t["gb"] < 1000, t  # GPU-hours, GB
    assert not (tmp_path / "cache").exists()


def test_less_preset_plans_the_papers_17_7_gb_store(tmp_path):
    cfg = compose_cfg(tmp_path, "experiment=less_llama2_7b_bbh_5pct")
    p = plan.plan(cfg).as_dict()
    pool = [s for s in p["steps"] if s["stage"] == "features"]
    assert len(pool) == 4  # one store per warmup epoch
    n = p["sizes"]["pool"]
    assert n == pytest.approx(270_679, rel=0.05)
    store = sum(s["bytes"] for s in pool)  # 270,679 x 8,192 x 2 B x 4 = 17.7 GB
    assert store == pytest.approx(17.7e9, rel=0.05)
    # LESS: ~48 GPU-hours of gradient features (model.cost, when nothing is measured)
    hours = sum(s["seconds"] for s in pool) / 3600
    assert hours == pytest.approx(48, rel=0.05)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_composes_as_a_multirun(tmp_path, name):
    cfg = compose_cfg(tmp_path, f"sweep={name}", hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
    assert cfg.logger.group == name  # one W&B group per sweep
    assert "seed" in cfg.hydra.sweeper.params


def test_launchers_compose(tmp_path):
    slurm = compose_cfg(tmp_path, "sweep=mini", "hydra/launcher=slurm", hydra=True)
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    assert slurm.hydra.launcher.gpus_per_node == 1 and slurm.hydra.launcher.partition
    local = compose_cfg(tmp_path, "sweep=mini", "hydra/launcher=local", hydra=True)
    assert local.hydra.launcher._target_.endswith("JoblibLauncher")
    assert local.hydra.launcher.n_jobs == 2


def test_mini_sweep_dry_runs_as_a_real_multirun(tmp_path):
    """`dataselect sweep=mini dry_run=true`, one seed: 4 selectors x 2 targets, no training."""
    cmd = [
        sys.executable,
        "-m",
        "dataselect",
        "sweep=mini",
        "dry_run=true",
        "hydra.sweeper.params.seed=0",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.data_dir={SHARED_DATA}",
        f"hydra.sweep.dir={tmp_path / 'multi'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("dry run: ") == 8
    for sel in ("random", "less", "gist", "g2is"):
        assert f"dry run: {sel} on rg15x70 (1,050 examples)" in proc.stdout
    jobs = sorted((tmp_path / "multi").glob("[0-9]*"))
    overrides = [(j / ".hydra" / "overrides.yaml").read_text() for j in jobs]
    assert len(jobs) == 8 and sum("target=bbh" in o for o in overrides) == 4
    assert not (tmp_path / "cache").exists()
