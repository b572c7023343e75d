"""The stages of one run, chained through the artifact cache.

    warmup -> features -> select -> finetune -> evaluate

Each stage is a function of the run's config and its upstream artifacts; its output lives in
``${paths.cache_dir}/<stage>/<key>/`` where ``key`` hashes what determines it (see the
``dataselect.keys``), so a sweep pays once for what its jobs share. A killed stage resumes:
training from its last epoch checkpoint, featurizing from its finished shards, evaluation
from its finished benchmarks; what it ends with is byte-identical to an uninterrupted run.
``stage=X`` runs the chain up to X, reusing what is cached. Every cache hit is logged and
counted in metrics.json.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dataselect import models
from dataselect.cache import COMPLETE, content_key, materialize, write_json
from dataselect.config import Stage
from dataselect.data.formatting import tokenize_examples
from dataselect.data.records import Example
from dataselect.data.sources import load_pool
from dataselect.data.targets import Target, candidates, load_target
from dataselect.keys import evaluate_key, finetune_key, select_key, warmup_key, warmup_seed
from dataselect.selectors.base import Selection, Selector, resolve_budget
from dataselect.tracking import Tracker

log = logging.getLogger(__name__)

ORDER = [Stage.warmup, Stage.features, Stage.select, Stage.finetune, Stage.evaluate]


def hydra_choice(group: str) -> str | None:
    """The option chosen for a config group in this Hydra app run (None outside one)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:  # not running under @hydra.main
        return None


# ---- the run ---------------------------------------------------------------------------


@dataclass
class Run:
    cfg: DictConfig
    tracker: Tracker | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cache_hits: dict[str, bool] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    spectra: dict[str, Any] = field(default_factory=dict)  # checkpoint -> eigvals of G G^T
    built: set[Path] = field(default_factory=set)  # artifacts this run computed (not hits)
    cost_records: list[dict] = field(default_factory=list)  # artifacts the selection rests on
    _tokenizer: Any = None
    _token_memo: dict = field(default_factory=dict)  # (id, max_length) -> tokenized, once a run

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg.paths.cache_dir)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.paths.output_dir)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = models.load_tokenizer(self.cfg.model, self.cache_dir)
        return self._tokenizer

    def artifact(self, stage: str, key: str, build, resume: bool = False) -> Path:
        """The artifact dir for (stage, key): reused when complete, else built now."""
        path = self.cache_dir / stage / key
        t0 = time.time()
        hit = materialize(path, build, resume=resume, info={"stage": stage, "key": key})
        self.timings[stage] = self.timings.get(stage, 0.0) + time.time() - t0
        self.cache_hits[stage] = self.cache_hits.get(stage, True) and hit  # all hit
        if not hit:
            self.built.add(path)
        log.info("%s: %s %s", stage, "cache hit, reusing" if hit else "built", path)
        return path

    def record_cost(self, kind: str, path: Path, nbytes: int = 0, pool_size: int = 1) -> None:
        """Record an artifact the selection depends on: ``pool`` (a pass over the pool) or
        ``target`` (validation gradients). Its build seconds come from its COMPLETE marker,
        so a cached artifact still reports what it cost to make."""
        marker = json.loads((Path(path) / COMPLETE).read_text())
        self.cost_records.append(
            {
                "kind": kind,
                "path": str(path),
                "bytes_per_pool_example": nbytes / pool_size,
                "build_seconds": marker["seconds"],
                "computed": Path(path) in self.built,
            }
        )

    def cost(self) -> dict[str, Any]:
        """Passes over the pool, bytes stored per pool example and seconds, for every selector."""
        pool = [r for r in self.cost_records if r["kind"] == "pool"]
        target = [r for r in self.cost_records if r["kind"] == "target"]
        return {
            "pool_passes": len(pool),
            "pool_passes_computed_this_run": sum(r["computed"] for r in pool),
            "bytes_per_pool_example": sum(r["bytes_per_pool_example"] for r in pool),
            "pool_pass_seconds": sum(r["build_seconds"] for r in pool),
            "target_seconds": sum(r["build_seconds"] for r in target),
            "stage_seconds": dict(self.timings),
        }

    def tokenize(self, examples: list[Example], what: str, max_length: int | None = None):
        max_length = max_length or self.cfg.model.max_length
        toks, stats = tokenize_examples(self.tokenizer, examples, max_length, self._token_memo)
        if stats.dropped_no_answer_tokens:
            log.warning(
                "%s: dropped %d examples with no answer tokens left after truncation to %d tokens",
                what,
                stats.dropped_no_answer_tokens,
                max_length,
            )
        return toks, stats

    def train(self, examples: list[Example], train_cfg, work: Path, stage: str, seed: int) -> None:
        from dataselect.training import train_lora

        toks, stats = self.tokenize(examples, stage)
        if not toks:
            raise ValueError(
                f"{stage}: none of the {len(examples)} examples has an answer token within "
                f"{self.cfg.model.max_length} tokens (raise model.max_length)"
            )
        write_json(work / "data.json", {"ids": [t.id for t in toks], **stats.as_dict()})
        base = models.load_base_model(self.cfg.model, self.cache_dir)
        model = models.with_lora(base, self.cfg.model.lora, seed)
        loggers = self.tracker.lightning_loggers(stage) if self.tracker else None
        train_lora(model, self.tokenizer, toks, train_cfg, self.cfg.trainer, work, seed, loggers)


def run_warmup(run: Run, pool: list[Example]) -> Path:
    """LoRA on a seeded random ``warmup.fraction`` of the pool; a checkpoint per epoch."""
    cfg = run.cfg

    def build(work: Path) -> None:
        n = max(1, round(cfg.warmup.fraction * len(pool)))
        seed = warmup_seed(cfg)
        chosen = random.Random(seed).sample(pool, n)
        log.info(
            "warmup: LoRA on %d of %d pool examples, %d epochs", n, len(pool), cfg.warmup.epochs
        )
        run.train(chosen, cfg.warmup, work, "warmup", seed)

    # resume: a killed warmup goes on from its last epoch checkpoint (``train_lora``)
    return run.artifact("warmup", warmup_key(cfg), build, resume=True)


def run_select(
    run: Run,
    selector: Selector,
    pool: list[Example],
    target: Target,
    features: Any,
    features_key: str | None,
) -> Path:
    """Candidates = pool minus target overlap minus examples with no answer tokens."""
    cfg = run.cfg
    dc = cfg.decontamination
    cands, removed = candidates(pool, target, ngram=dc.ngram, exact=dc.exact)
    run.diagnostics["decontamination"] = removed
    if removed["removed"]:
        log.info(
            "select: removed %d pool examples overlapping the target: %s",
            removed["removed"],
            removed,
        )
    toks, fstats = run.tokenize(cands, "candidates")
    trainable = {t.id for t in toks}
    cands = [e for e in cands if e.id in trainable]
    budget = resolve_budget(cfg.budget, len(cands))
    run.sizes.update(
        pool=len(pool),
        candidates=len(cands),
        budget=budget,
        removed_target_overlap=removed["removed"],
        dropped_no_answer_tokens=fstats.dropped_no_answer_tokens,
    )

    def build(work: Path) -> None:
        sel = selector.select(cands, target, budget, cfg.seed, features=features)
        if len(sel.ids) != len(set(sel.ids)):
            raise RuntimeError(f"selector {selector.name} returned duplicate ids")
        sel.write_jsonl(work / "selection.jsonl")
        write_json(work / "diagnostics.json", sel.diagnostics)

    return run.artifact("select", select_key(cfg, features_key), build)


def run_finetune(run: Run, pool: list[Example], selection_dir: Path) -> Path:
    cfg = run.cfg
    by_id = {e.id: e for e in pool}
    sel = Selection.read_jsonl(selection_dir / "selection.jsonl")

    def build(work: Path) -> None:
        log.info(
            "finetune: LoRA on the %d selected examples, %d epochs",
            len(sel.ids),
            cfg.finetune.epochs,
        )
        run.train([by_id[i] for i in sel.ids], cfg.finetune, work, "finetune", cfg.seed)

    # keyed by the selected ids themselves, not only by the config that chose them
    return run.artifact("finetune", finetune_key(cfg, content_key(sel.ids)), build, resume=True)


def eval_tasks(cfg: DictConfig, target: Target) -> list:
    """The tasks to evaluate on: the target's own, or ``evaluator.benchmarks`` (target names,
    each the target's own task or read from ``conf/target/<name>.yaml``) for cross-task
    tables. Decontamination covers only the target's test items."""
    from dataselect.config import CONF_DIR

    names = cfg.evaluator.benchmarks
    if not names:
        return target.tasks
    own = {t.name: t for t in target.tasks}
    out = []
    for name in names:
        if name in own:
            out.append(own[name])
            continue
        path = CONF_DIR / "target" / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"evaluator.benchmarks: {name!r} is not a target ({path} missing)")
        out += load_target(OmegaConf.load(path), Path(cfg.paths.data_dir)).tasks
    return out


def run_evaluate(run: Run, target: Target, adapter_run: Path | None, stage: str) -> dict:
    """Score the base model plus adapter (or the base alone) on the target's test set."""
    from dataselect.evaluation import aggregate, evaluate
    from dataselect.training import list_checkpoints

    cfg = run.cfg

    def build(work: Path) -> None:
        model = models.load_base_model(cfg.model, run.cache_dir)
        if adapter_run is not None:
            last = list_checkpoints(adapter_run)[-1]
            model = models.with_adapter(model, last / "adapter").merge_and_unload()
        model.eval()
        benches = {t.name: t.benchmarks() for t in eval_tasks(cfg, target)}
        flat = [b for bs in benches.values() for b in bs]
        results = evaluate(model, run.tokenizer, flat, cfg.evaluator, work / "lm_eval")
        with open(work / "samples.jsonl", "w") as fh:
            for name, r in results.items():
                for s in r.pop("samples", []):
                    fh.write(json.dumps({"benchmark": name, **s}) + "\n")
        tasks = {
            task: aggregate({b.name.split("/", 1)[-1]: results[b.name] for b in bs})
            if len(bs) > 1
            else results[bs[0].name]
            for task, bs in benches.items()
        }
        write_json(work / "metrics.json", tasks)

    key = evaluate_key(cfg, adapter_run.name if adapter_run is not None else None)
    path = run.artifact(stage, key, build, resume=True)  # finished benchmarks are kept
    return json.loads((path / "metrics.json").read_text())


def run_pipeline(cfg: DictConfig, tracker: Tracker | None = None) -> dict[str, Any]:
    """Run the chain up to ``cfg.stage``; write and return the run's metrics."""
    t_start = time.time()
    run = Run(cfg, tracker)
    last = ORDER.index(Stage(cfg.stage)) if cfg.stage != Stage.all else len(ORDER) - 1
    upto = set(ORDER[: last + 1])
    run.out_dir.mkdir(parents=True, exist_ok=True)
    target = load_target(cfg.target, Path(cfg.paths.data_dir))
    pool = load_pool(cfg.pool, Path(cfg.paths.data_dir))
    run.sizes["skipped_malformed"] = pool.n_skipped  # on_error: skip (counted, never silent)
    if Stage.select in upto:  # an impossible budget fails now, not after hours of warmup
        _, fst = run.tokenize(pool, "pool")
        resolve_budget(cfg.budget, fst.kept)
    selector: Selector = instantiate(cfg.selector)
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

    warmup_dir = run_warmup(run, pool)
    features, features_key = None, None
    if Stage.features in upto:
        if selector.needs_features:
            from dataselect.features import stage

            if selector.needs_pool_pass():
                features, features_key = stage.run_gist_pass(
                    run, pool, target, warmup_dir, selector
                )
            else:
                features, features_key = stage.run_features(
                    run, pool, target, warmup_dir, selector.feature_overrides()
                )
        else:
            log.info("features: selector %s needs none, skipped", selector.name)
    if Stage.select in upto:
        sel_dir = run_select(run, selector, pool, target, features, features_key)
        (run.out_dir / "selection.jsonl").write_text((sel_dir / "selection.jsonl").read_text())
        source_of = {e.id: e.source for e in pool}
        picked = Selection.read_jsonl(sel_dir / "selection.jsonl").ids
        metrics["selection_sources"] = dict(
            sorted(Counter(source_of[i] for i in picked).items(), key=lambda kv: -kv[1])
        )
        metrics["diagnostics"] = json.loads((sel_dir / "diagnostics.json").read_text())
        spectra = run.spectra or (
            {"sketch": metrics["diagnostics"]["eigvals"]}
            if "eigvals" in metrics["diagnostics"]
            else {}
        )
        if spectra:
            from dataselect.report.spectrum import plot_spectra, spectrum_summary

            png = plot_spectra(
                spectra, metrics["diagnostics"].get("k"), run.out_dir / "spectrum.png"
            )
            metrics["spectrum"] = spectrum_summary(spectra)
            if tracker is not None:
                tracker.log_image("spectrum", png)
    if Stage.finetune in upto:
        ft_dir = run_finetune(run, pool, sel_dir)
    if Stage.evaluate in upto:
        metrics["finetuned"] = run_evaluate(run, target, ft_dir, "evaluate")
        if cfg.evaluator.include_base:
            metrics["base"] = run_evaluate(run, target, None, "evaluate_base")
    metrics.update(
        sizes=run.sizes,
        timings=run.timings,
        cache_hits=run.cache_hits,
        wall_seconds=time.time() - t_start,
        cost=run.cost(),
        **run.diagnostics,
    )
    write_json(run.out_dir / "metrics.json", metrics)
    return metrics
