"""One run: walk the stage graph (``stages.STAGES``) up to ``cfg.stage`` and write metrics.

    warmup -> features -> select -> finetune -> evaluate

Each stage is built from the run context, the run's inputs and its upstream results, and
returns its result; the metrics (sizes, timings, cache hits, costs, diagnostics) are summed
from those results here. What a stage is and what it costs is declared in ``stages.py``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dataselect import stages as graph
from dataselect.cache import write_json
from dataselect.context import Artifact, RunContext
from dataselect.data.sources import load_pool
from dataselect.data.targets import load_target
from dataselect.selectors.base import Selector

log = logging.getLogger(__name__)


def hydra_choice(group: str) -> str | None:
    """The option chosen for a config group in this Hydra app run (None outside one)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:  # not running under @hydra.main
        return None


def ledger(artifacts: list[Artifact]) -> dict[str, Any]:
    """Timings and cache hits per cache stage, and what the selection cost: passes over the
    pool, bytes stored per pool example, build seconds (cached artifacts report theirs)."""
    timings: dict[str, float] = {}
    hits: dict[str, bool] = {}
    for a in artifacts:
        timings[a.stage] = timings.get(a.stage, 0.0) + a.seconds
        hits[a.stage] = hits.get(a.stage, True) and a.hit  # all hit
    pool = [a for a in artifacts if a.cost == "pool"]
    target = [a for a in artifacts if a.cost == "target"]
    cost = {
        "pool_passes": len(pool),
        "pool_passes_computed_this_run": sum(not a.hit for a in pool),
        "bytes_per_pool_example": sum(a.bytes_per_pool_example for a in pool),
        "pool_pass_seconds": sum(a.build_seconds for a in pool),
        "target_seconds": sum(a.build_seconds for a in target),
        "stage_seconds": dict(timings),
        # what each artifact cost to build, cached or not: the cost of this selection from
        # scratch (a warmup and pool passes are shared by every target that reuses them)
        "build_seconds": {
            stage: sum(a.build_seconds for a in artifacts if a.stage == stage) for stage in timings
        },
    }
    return {"timings": timings, "cache_hits": hits, "cost": cost}


def run_pipeline(cfg: DictConfig, tracker=None) -> dict[str, Any]:
    """Run the graph up to ``cfg.stage``; write and return the run's metrics."""
    t_start = time.time()
    ctx = RunContext(cfg, tracker)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    stages = graph.upto(graph.STAGES, graph.stage_name(cfg))
    target = load_target(cfg.target, Path(cfg.paths.data_dir))
    pool = load_pool(cfg.pool, Path(cfg.paths.data_dir))
    selector: Selector = instantiate(cfg.selector)
    if any(s.name == "select" for s in stages):  # an impossible budget fails now, not later
        _, fst = ctx.tokenize(pool, "pool")
        selector.budget(cfg.budget, fst.kept, cfg.budget_rounding)
        request = selector.request()
        if request is not None:  # features it cannot build (a sketch / type clash) fail now too
            request.key(cfg)
    metrics: dict[str, Any] = {
        "selector": selector.name,
        "target": target.name,
        "model_name": cfg.model.name,
        "pool_name": cfg.pool.name,
        "experiment": hydra_choice("experiment"),
        "reference": OmegaConf.to_container(cfg.reference) if cfg.reference else None,
        "budget_cfg": cfg.budget,
        "seed": cfg.seed,
        "target_sizes": target.stats,
        "pool_skipped": pool.skipped,
    }
    inputs = graph.RunInputs(pool, target, selector)
    results: dict[str, graph.StageResult] = {}
    for spec in stages:
        results[spec.name] = spec.build(ctx, inputs, {n: results[n] for n in spec.inputs})

    sizes = {"skipped_malformed": pool.n_skipped}  # on_error: skip (counted, never silent)
    diagnostics: dict[str, Any] = {}
    for r in results.values():
        metrics.update(r.metrics)
        sizes.update(r.sizes)
        diagnostics.update(r.diagnostics)
    books = ledger([a for r in results.values() for a in r.artifacts])
    metrics.update(
        sizes=sizes,
        timings=books["timings"],
        cache_hits=books["cache_hits"],
        wall_seconds=time.time() - t_start,
        cost=books["cost"],
        **diagnostics,
    )
    write_json(ctx.out_dir / "metrics.json", metrics)
    return metrics
