"""A Hydra callback: when a multirun ends, write its report and print the tables.

Registered in ``conf/config.yaml`` (``hydra.callbacks.report``), so every sweep, ``sweep=``
presets and ``-m`` grids alike, ends with the files ``dataselect-report <sweep dir>`` writes,
and prints the effect table (each run against random and the base model, 95% intervals)
where the runs report a target loss, else the results table over seeds. A sweep with no
finished run says so and exits as it would have; a dry run writes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("dataselect.report")


class SweepReport(Callback):
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)  # resolved once, as the sweeper does

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from dataselect.report.multirun import ReportError, write_report

        if not self.enabled or self.sweep_dir is None or config.get("dry_run"):
            return
        try:
            paths = write_report(self.sweep_dir, command=None)
        except ReportError as e:
            log.warning("no sweep report: %s", e)
            return
        # the effect table where the runs report a target loss, else the results table
        text = paths.get("effect", paths["md"]).read_text()
        print(f"\n{text}\nreport (tables, plots, CSV): {paths['md'].parent}", flush=True)
