"""Dry run (``dry_run=true``): what a run would do, without loading the model or training.

It walks the same stage graph as the run (``stages.STAGES``), asking each stage for its key
and estimate. For every artifact that would be used: its cache key and status (``cached`` when
``<cache_dir>/<stage>/<key>/COMPLETE`` exists, else ``to run``; finetune and evaluate are keyed
by the selected ids, so before the selection exists they ``depend on the selection``), the
examples it processes, its compute and its storage. Seconds per example come from this
model's artifacts already in the cache (each ``COMPLETE`` marker holds its build seconds),
else from ``model.cost`` (reference costs from the papers), else they are unknown.

    warmup     fraction x pool x epochs               adapter + Adam state: D x 12 B x epochs
    features   what the selector's request estimates (gradient stores: pool x sketch dim x
               bytes x checkpoints; a per-target pass: its own)
    finetune   budget x epochs                        D x 12 B x epochs
    evaluate   test items (after evaluator.limit)
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dataselect import stages as graph
from dataselect.cache import COMPLETE
from dataselect.config import pool_sources
from dataselect.context import Sizes
from dataselect.keys import model_spec
from dataselect.selectors.base import BudgetError

CACHED, TO_RUN, DEPENDS = "cached", "to run", "depends on the selection"


@dataclass
class Step:
    stage: str  # the cache folder: warmup, features, features_val, select, ...
    what: str  # e.g. "pool @ epoch_2"
    key: str | None
    status: str
    examples: int | None = None  # examples processed (x epochs for training)
    rate: float | None = None  # seconds per example
    rate_source: str = ""
    seconds: float | None = None  # measured (cached) or estimated
    bytes: int | None = None
    kind: str | None = None  # whose measured rate prices it: train | featurize | evaluate


@dataclass
class Plan:
    run: dict[str, Any]
    sizes: dict[str, Any]
    steps: list[Step]
    rates: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, Any]:
        def total(steps: list[Step], attr: str, scale: float) -> float:
            return sum(getattr(s, attr) or 0 for s in steps) / scale

        todo = [s for s in self.steps if s.status != CACHED]
        return {
            "hours": total(self.steps, "seconds", 3600),
            "gb": total(self.steps, "bytes", 1e9),
            "hours_to_run": total(todo, "seconds", 3600),
            "gb_to_run": total(todo, "bytes", 1e9),
            "unknown_seconds": [f"{s.stage} {s.what}" for s in self.steps if s.seconds is None],
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "sizes": self.sizes,
            "steps": [asdict(s) for s in self.steps],
            "rates": self.rates,
            "totals": self.totals(),
            "notes": self.notes,
        }


# ---- reading the cache -------------------------------------------------------------------


def _marker_seconds(path: Path) -> float:
    return float(json.loads((path / COMPLETE).read_text())["seconds"])


def _dirs(cache: Path, stage: str) -> list[Path]:
    root = cache / stage
    return [d for d in root.glob("[!.]*") if (d / COMPLETE).is_file()] if root.is_dir() else []


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _epochs(path: Path) -> int:
    return sum(1 for d in path.glob("epoch_*") if (d / COMPLETE).is_file())


def artifact_examples(stage: str, path: Path) -> int | None:
    """Examples an artifact processed, from its own files (training: x epochs)."""
    if stage in ("warmup", "finetune"):
        return len(_json(path / "data.json")["ids"]) * _epochs(path)
    if (path / "meta.json").is_file():  # a gradient store
        return int(_json(path / "meta.json")["n_total"])
    if (path / "ids.json").is_file():  # full-D gradients, one row per listed example
        return len(_json(path / "ids.json"))
    if (path / "samples.jsonl").is_file():  # an evaluation: one line per scored item
        return sum(1 for line in (path / "samples.jsonl").open() if line.strip())
    return None


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _adapter_base(path: Path) -> str | None:
    cfgs = sorted(path.glob("epoch_*/adapter/adapter_config.json"))
    return _json(cfgs[0]).get("base_model_name_or_path") if cfgs else None


def _model_stores(cfg: DictConfig, cache: Path):
    """(dir, meta) of the cached gradient stores (any pass) built with this run's model."""
    spec = model_spec(cfg)
    stages = [d.name for d in cache.iterdir() if d.is_dir()] if cache.is_dir() else []
    for stage in sorted(stages):
        for d in _dirs(cache, stage):
            meta = _json(d / "meta.json") if (d / "meta.json").is_file() else {}
            if meta.get("spec", {}).get("model") == spec:
                yield d, meta


def measured_grad_dim(cfg: DictConfig, cache: Path) -> int | None:
    """The LoRA gradient dimension D recorded by a cached store of this model."""
    for _, meta in _model_stores(cfg, cache):
        if "layout" in meta["spec"]:
            return int(meta["spec"]["layout"]["dim"])
    return None


def measurements(cfg: DictConfig, cache: Path, own: list[tuple[str, str, Path]]):
    """{kind: [(seconds, examples), ...]} from this model's cached artifacts.

    Gradient stores name their model in meta.json; a warmup is this model's when such a store
    was built from it, a finetune when its adapter has the same base as such a warmup. Every
    cached artifact of this run (``own``) counts too (evaluations name no model: only these)."""
    found: dict[Path, tuple[str, str]] = {}  # artifact -> (kind, its cache stage)
    warmups = set()
    for d, meta in _model_stores(cfg, cache):
        found[d] = ("featurize", d.parent.name)
        warmups.add(str(meta["spec"].get("checkpoint", "")).split("/")[0])
    for kind, stage, d in own:
        if (d / COMPLETE).is_file():
            found[d] = (kind, stage)
            warmups |= {d.name} if stage == "warmup" else set()
    bases = set()
    for d in _dirs(cache, "warmup"):
        if d.name in warmups:
            found[d] = ("train", "warmup")
            bases.add(_adapter_base(d))
    for d in _dirs(cache, "finetune"):
        if _adapter_base(d) in bases - {None}:
            found[d] = ("train", "finetune")
    out: dict[str, list[tuple[float, int]]] = {"train": [], "featurize": [], "evaluate": []}
    for d, (kind, stage) in found.items():
        n = artifact_examples(stage, d)
        if n:
            out[kind].append((_marker_seconds(d), n))
    return out


def rates(cfg: DictConfig, found: dict[str, list[tuple[float, int]]]) -> dict[str, dict]:
    cost = OmegaConf.to_container(cfg.model.cost) if cfg.model.get("cost") else {}
    ref = cost.get("seconds_per_example", {})
    out = {}
    for kind, pairs in found.items():
        if pairs:
            secs, n = (sum(x) for x in zip(*pairs, strict=True))
            src = f"measured: {len(pairs)} cached artifact(s) of this model"
            out[kind] = {"seconds_per_example": secs / n, "source": src}
        elif ref.get(kind) is not None:
            src = f"model.cost ({cost.get('device', '?')}; {cost.get('source', 'no source')})"
            out[kind] = {"seconds_per_example": float(ref[kind]), "source": src}
        else:
            out[kind] = {"seconds_per_example": None, "source": "unknown"}
    return out


# ---- reading the data --------------------------------------------------------------------


def _pool_not_local(cfg: DictConfig, data_dir: Path) -> str | None:
    """Why reading the pool would need the network (a dry run never downloads), or None."""
    for s in pool_sources(cfg.pool):
        if s.kind == "hub":
            return f"hub dataset {s.path} (not read by a dry run)"
        if s.kind == "json":
            local = Path(s.path).expanduser()
            local = local if local.is_absolute() else data_dir / local
            if local.is_file():
                continue
            hub = s.get("hub")
            if hub:
                from huggingface_hub import try_to_load_from_cache

                got = try_to_load_from_cache(hub.repo_id, hub.filename, repo_type="dataset")
                if isinstance(got, str):
                    continue
            return f"missing file {local}"
    return None


def pool_size(cfg: DictConfig, data_dir: Path) -> tuple[int | None, str]:
    from dataselect.data.sources import load_pool

    why = _pool_not_local(cfg, data_dir)
    if why is None:
        try:
            return len(load_pool(cfg.pool, data_dir)), "read"
        except Exception as e:  # any reader failure: fall back to the configured size
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
    if cfg.pool.get("size"):
        return int(cfg.pool.size), f"pool.size (pool not read: {why})"
    return None, f"unknown (pool not read: {why}; set pool.size)"


def target_sizes(cfg: DictConfig, data_dir: Path) -> tuple[int | None, int | None, str]:
    """(validation examples, test items to evaluate: ``evaluator.limit`` per benchmark, i.e.
    per subtask, given as an int or by task name)."""
    try:
        from dataselect.data.targets import load_target
        from dataselect.evaluation.harness import task_limit

        target = load_target(cfg.target, data_dir)
    except Exception as e:
        return None, None, f"target not read ({type(e).__name__}: {str(e)[:160]})"
    test = 0
    for task in target.tasks:
        limit = task_limit(cfg.evaluator.limit, task.name)
        for n in Counter(ex.subtask for ex in task.test).values():
            test += n if limit is None else min(n, limit)
    return len(target.validation), test, "read"


# ---- the plan ----------------------------------------------------------------------------


def _steps(cfg, selector, stages, sizes: Sizes) -> list[Step]:
    """The graph's estimates: each artifact's key, status and examples/bytes (no rates yet)."""
    cache = Path(cfg.paths.cache_dir)
    steps: list[Step] = []
    up: dict[str, graph.Estimate] = {}
    for spec in stages:
        inputs = {n: up[n] for n in spec.inputs}
        up[spec.name] = spec.estimate(cfg, selector, sizes, inputs, spec.key(cfg, selector, inputs))
        for a in up[spec.name].artifacts:
            status = DEPENDS if a.key is None else TO_RUN
            if a.key is not None and (cache / a.stage / a.key / COMPLETE).is_file():
                status = CACHED
            steps.append(
                Step(a.stage, a.what, a.key, status, a.examples, bytes=a.bytes, kind=a.kind)
            )
    return steps


def plan(cfg: DictConfig) -> Plan:
    """The stages ``cfg`` would run, with keys, cache status and estimated cost."""
    cache, data_dir = Path(cfg.paths.cache_dir), Path(cfg.paths.data_dir)
    selector = instantiate(cfg.selector)
    stage = graph.stage_name(cfg)
    stages = graph.upto(graph.STAGES, stage)
    notes: list[str] = []
    n_pool, pool_src = pool_size(cfg, data_dir)
    n_val, n_test, target_src = target_sizes(cfg, data_dir)
    if n_pool is None or pool_src != "read":
        notes.append(f"pool size: {pool_src}")
    if target_src != "read":
        notes.append(f"{target_src}: validation and test sizes unknown")
    if cfg.evaluator.benchmarks:
        notes.append("evaluator.benchmarks is set: the evaluation estimate counts the target's")
    budget = None
    if n_pool is not None:
        try:
            budget = selector.budget(cfg.budget, n_pool, cfg.budget_rounding)
        except BudgetError as e:
            notes.append(f"budget: {e}")
    sizes = {
        "pool": n_pool,
        "pool_source": pool_src,
        "validation": n_val,
        "test": n_test,
        "budget": budget,
    }

    cost = cfg.model.get("cost") or {}
    grad_dim = measured_grad_dim(cfg, cache) or cost.get("grad_dim")
    steps = _steps(cfg, selector, stages, Sizes(n_pool, n_val, n_test, budget, grad_dim))
    own = [(s.kind, s.stage, cache / s.stage / s.key) for s in steps if s.key and s.kind]
    rate = rates(cfg, measurements(cfg, cache, own))
    for s in steps:
        path = cache / s.stage / s.key if s.key else None
        if s.status == CACHED and path is not None:
            s.examples = artifact_examples(s.stage, path)
            s.seconds, s.bytes = _marker_seconds(path), _disk_bytes(path)
            s.rate = s.seconds / s.examples if s.examples else None
            s.rate_source = "measured: this artifact"
        elif s.kind:
            s.rate, s.rate_source = (rate[s.kind][k] for k in ("seconds_per_example", "source"))
            s.seconds = s.examples * s.rate if None not in (s.examples, s.rate) else None
        else:  # select: seconds to minutes, never the bottleneck
            s.seconds, s.rate_source = 0.0, "negligible"
    if grad_dim is None:
        notes.append(
            "LoRA dim D unknown (no cached store, no model.cost.grad_dim): "
            "checkpoint and full-gradient storage not estimated"
        )
    run = {
        "model": cfg.model.name,
        "pool": cfg.pool.name,
        "target": "+".join(cfg.target),
        "selector": selector.name,
        "budget": cfg.budget,
        "seed": cfg.seed,
        "stage": stage,
        "cache_dir": str(cache),
        "device": cfg.trainer.accelerator,
    }
    return Plan(run, sizes, steps, rate, notes)


# ---- printing ----------------------------------------------------------------------------


def _num(x, fmt: str) -> str:
    return "?" if x is None else format(x, fmt)


def print_plan(p: Plan, console=None) -> dict[str, Any]:
    """Print the plan as rich tables; returns ``p.as_dict()``."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    r, z = p.run, p.sizes
    title = (
        f"dry run: {r['selector']} on {r['pool']} ({_num(z['pool'], ',')} examples) for "
        f"{r['target']}, budget {r['budget']} = {_num(z['budget'], ',')}, {r['model']}, "
        f"seed {r['seed']}, stage={r['stage']}"
    )
    table = Table(title=title, title_justify="left")
    for col in ("stage", "what", "key", "status", "examples", "s/example", "hours", "GB"):
        right = col in ("examples", "s/example", "hours", "GB")
        table.add_column(col, justify="right" if right else "left")
    style = {CACHED: "green", TO_RUN: "yellow", DEPENDS: "cyan"}
    for s in p.steps:
        table.add_row(
            s.stage,
            s.what,
            s.key or "-",
            f"[{style[s.status]}]{s.status}[/]",
            _num(s.examples, ","),
            _num(s.rate, ".3g") if s.kind else "-",
            _num(None if s.seconds is None else s.seconds / 3600, ".3g"),
            _num(None if s.bytes is None else s.bytes / 1e9, ".3g"),
        )
    console.print(table)
    t = p.totals()
    unit = "GPU-hours" if r["device"] == "gpu" else f"{r['device']}-hours"
    unknown = t["unknown_seconds"]
    at_least = ">= " if unknown else ""
    console.print(
        f"total: {at_least}{t['hours']:.3g} {unit}, {t['gb']:.3g} GB stored; still to run: "
        f"{at_least}{t['hours_to_run']:.3g} {unit}, {t['gb_to_run']:.3g} GB"
    )
    if unknown:
        console.print(f"  time unknown (no measurement, no model.cost): {', '.join(unknown)}")
    for kind, v in p.rates.items():
        console.print(
            f"  {kind}: {_num(v['seconds_per_example'], '.3g')} s/example ({v['source']})"
        )
    for note in p.notes:
        console.print(f"  note: {note}")
    console.print(f"  cache: {r['cache_dir']}")
    return p.as_dict()
