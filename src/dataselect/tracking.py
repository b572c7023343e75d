"""Run tracking: W&B (offline by default, so it works with no network) and CSV, always."""

from __future__ import annotations

import logging
import os
from collections import Counter
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

    def log_selection(self, rows: list[dict], max_chars: int = 500) -> None:
        """What was selected: a table of the chosen examples (rank, id, source, score, prompt
        and answer, each cut at ``max_chars``) and a bar chart of their sources. In a sweep
        group W&B shows the runs' tables side by side under the same key."""
        if self.wandb_run is None:
            return
        import wandb

        def cut(s: str) -> str:
            return s if len(s) <= max_chars else s[: max_chars - 1] + "\u2026"

        columns = ["rank", "id", "source", "score", "prompt", "answer"]
        table = wandb.Table(columns=columns)
        for r in rows:
            user = [m["content"] for m in r["messages"] if m["role"] == "user"]
            prompt, answer = (user[-1] if user else ""), r["messages"][-1]["content"]
            table.add_data(r["rank"], r["id"], r["source"], r["score"], cut(prompt), cut(answer))
        counts = Counter(r["source"] for r in rows).most_common()
        bars = wandb.Table(columns=["source", "selected"], data=[list(c) for c in counts])
        self.wandb_run.log(
            {
                "selection/examples": table,
                "selection/composition": wandb.plot.bar(
                    bars, "source", "selected", title="selected examples by source"
                ),
            }
        )

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
