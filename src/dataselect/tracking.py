"""Run tracking: W&B (offline by default, so it works with no network) and CSV, always."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class Tracker:
    """One W&B run per pipeline run (group = sweep), plus Lightning loggers for training."""

    def __init__(self, cfg: DictConfig, out_dir: Path, name: str):
        self.out_dir = Path(out_dir)
        self.wandb_run = None
        lcfg = cfg.logger
        if lcfg.wandb and lcfg.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=lcfg.project,
                group=lcfg.group or sweep_group(),
                name=name,
                tags=list(lcfg.tags),
                mode=lcfg.mode,
                dir=str(self.out_dir),
                config=OmegaConf.to_container(cfg, resolve=True),
                reinit="finish_previous",
            )

    def lightning_loggers(self, stage: str) -> list:
        from lightning.pytorch.loggers import CSVLogger, WandbLogger

        loggers: list = [CSVLogger(save_dir=str(self.out_dir / "csv"), name=stage, version="")]
        if self.wandb_run is not None:
            loggers.append(WandbLogger(experiment=self.wandb_run, prefix=stage))
        return loggers

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(metrics)

    def log_image(self, key: str, path: Path) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Image(str(path))})

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def sweep_group() -> str | None:
    """In a Hydra multirun with no ``logger.group``: the sweep's directory name, so the
    W&B UI groups the sweep's runs; None outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    return "/".join(Path(hc.sweep.dir).parts[-2:])
