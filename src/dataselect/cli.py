"""The ``dataselect`` command: a Hydra app that wires the config to the pipeline.

The configs live in the repository's top-level ``conf/`` (install the package editable, as
``make`` does, or pass ``--config-dir``).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

import dataselect.config  # noqa: F401  (registers the typed schema "base_config")
from dataselect.pipeline import run_pipeline
from dataselect.report.table import print_results, write_csv
from dataselect.tracking import Tracker

log = logging.getLogger("dataselect")


def quiet_libraries() -> None:
    """Lightning logs every line twice under Hydra (its own handler + the root's) and adds
    tips; transformers warns about generation flags. Keep warnings, drop the chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        lg = logging.getLogger(name)
        lg.propagate = False
        lg.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def scalars(tree: Any, prefix: str = "") -> dict[str, float]:
    """Flatten the numbers of nested dicts to "a/b/c" keys (for the W&B summary)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(scalars(v, f"{prefix}{k}/"))
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        out[prefix.rstrip("/")] = tree
    return out


def evaluation_summary(metrics: dict) -> dict[str, float]:
    """W&B summary keys of the evaluation: ``finetuned/<task>`` (accuracy, with ``_stderr``)
    and ``finetuned/<task>/target_loss`` (with ``_stderr``); the same for ``base``."""
    out: dict[str, float] = {}
    for k in ("finetuned", "base"):
        for task, m in (metrics.get(k) or {}).items():
            out[f"{k}/{task}"] = m["value"]
            out[f"{k}/{task}_stderr"] = m["stderr"]
            if "target_loss" in m:
                out[f"{k}/{task}/target_loss"] = m["target_loss"]["value"]
                out[f"{k}/{task}/target_loss_stderr"] = m["target_loss"]["stderr"]
    return out


def main_cfg(cfg: DictConfig) -> dict:
    if cfg.dry_run:  # the stages, cache status and estimated cost; nothing is trained
        from dataselect import plan

        return plan.print_plan(plan.plan(cfg))
    quiet_libraries()
    selector = cfg.selector._target_.rsplit(".", 1)[-1]
    name = f"{selector}-{'+'.join(cfg.target)}-{cfg.budget}-s{cfg.seed}"
    tracker = Tracker(cfg, cfg.paths.output_dir, name)
    try:
        metrics = run_pipeline(cfg, tracker)
        if "finetuned" in metrics:
            out = Path(cfg.paths.output_dir)
            (out / "results.md").write_text(print_results(metrics) + "\n")
            write_csv(metrics, out / "results.csv")
            tracker.summary(evaluation_summary(metrics))
        tracker.summary(scalars({k: metrics.get(k) for k in ("diagnostics", "cost", "sizes")}))
        hits = [s for s, hit in metrics["cache_hits"].items() if hit]
        log.info(
            "cache hits: %s; wall time %.1f s; run dir %s",
            ", ".join(hits) or "none",
            metrics["wall_seconds"],
            cfg.paths.output_dir,
        )
        return metrics
    finally:
        tracker.finish()


@hydra.main(version_base="1.3", config_path=str(dataselect.config.CONF_DIR), config_name="config")
def run(cfg: DictConfig) -> None:
    main_cfg(cfg)


def verify(argv: list[str]) -> int:
    """``dataselect verify [cache dir] [--remove]``: check every cache entry's files against
    the checksums recorded when it was completed; exit 1 if any is damaged and kept."""
    import argparse

    from dataselect.cache import verify_cache

    parser = argparse.ArgumentParser(prog="dataselect verify", description=verify.__doc__)
    default = os.environ.get("DATASELECT_CACHE_DIR", ".cache/dataselect")  # as conf/paths
    parser.add_argument("cache_dir", nargs="?", type=Path, default=Path(default))
    parser.add_argument("--remove", action="store_true", help="delete damaged entries")
    args = parser.parse_args(argv)
    if not args.cache_dir.is_dir():
        print(f"dataselect verify: no cache dir {args.cache_dir}", file=sys.stderr)
        return 2
    got = verify_cache(args.cache_dir, remove=args.remove)
    for path, problems in got["damaged"].items():
        print(f"DAMAGED {path}{' (removed)' if args.remove else ''}")
        for p in problems:
            print(f"  {p}")
    print(
        f"{args.cache_dir}: {got['checked']} entries checked, {len(got['damaged'])} damaged"
        f"{' and removed (the next run rebuilds them)' if args.remove and got['damaged'] else ''}"
        f", {len(got['unverified'])} without checksums (completed before they were recorded)"
    )
    return 1 if got["damaged"] and not args.remove else 0


def main() -> None:
    """``dataselect verify ...`` checks a cache; anything else is a Hydra run."""
    if len(sys.argv) > 1 and sys.argv[1] == "verify":
        raise SystemExit(verify(sys.argv[2:]))
    run()
