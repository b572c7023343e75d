"""The stage graph of a run, declared once: the pipeline runs it, the dry run prices it,
the drills enumerate it.

    warmup -> features -> select -> finetune -> evaluate

A stage is a ``StageSpec``: its name, its upstream stages, its cache key (a function of the
config and the upstream results: the same in a run and in a dry run), its estimate (the
artifacts it would use, with examples and bytes) and its build (a function of the run
context, the run's inputs and the upstream results that *returns* a typed result). Each
artifact lives in ``${paths.cache_dir}/<stage>/<key>/`` (``dataselect.keys``), so a sweep
pays once for what its jobs share. A killed stage resumes: training from its last epoch
checkpoint, featurizing from its finished shards, evaluation from its finished benchmarks.
``stage=X`` runs the graph up to X, reusing what is cached.

The features stage builds whatever the selector's ``request()`` asks for (shared gradient
stores, a per-target pass, ...): the request, not this module, knows its keys, artifacts
and costs.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dataselect import models
from dataselect.cache import COMPLETE, digest, write_json
from dataselect.context import Artifact, Planned, RunContext, Sizes, product
from dataselect.data.records import Example
from dataselect.data.targets import Target, candidates, load_target
from dataselect.export import SELECTED, SELECTION, selected_rows, write_jsonl
from dataselect.features.request import FeatureInputs, Features
from dataselect.keys import evaluate_key, finetune_key, select_key, warmup_key, warmup_seed
from dataselect.selectors.base import Selection, Selector

log = logging.getLogger("dataselect.pipeline")

TRAIN_STATE_BYTES = 12  # per LoRA parameter and epoch: fp32 adapter + Adam's 2 fp32 moments


@dataclass(frozen=True)
class RunInputs:
    """What every stage may read: the run's data and its selector."""

    pool: list[Example]
    target: Target
    selector: Selector


@dataclass
class StageResult:
    """What a stage returns: its key, the artifacts it used, and what goes into metrics.json."""

    key: str | None
    artifacts: list[Artifact] = field(default_factory=list)
    value: Any = None  # what downstream stages read (a directory, features, a selection)
    ids: list[str] | None = None  # select: the selected ids, best first
    sizes: dict[str, int] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)  # top level of metrics.json
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. finetuned, base, spectrum


@dataclass
class Estimate:
    """What a stage would do, for the dry run: the same key, its artifacts, and (select) the
    ids of a cached selection, which finetune and evaluate are keyed by."""

    key: str | None
    artifacts: list[Planned] = field(default_factory=list)
    ids: list[str] | None = None


Upstream = dict[str, Any]  # stage name -> its StageResult (run) or Estimate (dry run)


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[str, ...]
    key: Callable[[DictConfig, Selector, Upstream], str | None]
    estimate: Callable[[DictConfig, Selector, Sizes, Upstream, str | None], Estimate]
    build: Callable[[RunContext, RunInputs, Upstream], StageResult]


def stage_name(cfg: DictConfig) -> str:
    """The last stage this run goes to (``stage=X``; all: every stage)."""
    return str(getattr(cfg.stage, "value", cfg.stage))


def upto(stages: list[StageSpec], stage: str) -> list[StageSpec]:
    """The stages ``stage=X`` runs: the graph's prefix ending at X (all: every stage)."""
    names = [s.name for s in stages]
    if stage == "all":
        return list(stages)
    if stage not in names:
        raise ValueError(f"stage must be all or one of {names}, got {stage!r}")
    return stages[: names.index(stage) + 1]


def train_on(
    ctx: RunContext, examples: list[Example], train_cfg, work: Path, stage: str, seed: int
) -> None:
    """LoRA training of the base model on ``examples`` into ``work`` (warmup, finetune)."""
    from dataselect.training import train_lora

    cfg = ctx.cfg
    toks, stats = ctx.tokenize(examples, stage)
    if not toks:
        raise ValueError(
            f"{stage}: none of the {len(examples)} examples has an answer token within "
            f"{cfg.model.max_length} tokens (raise model.max_length)"
        )
    write_json(work / "data.json", {"ids": [t.id for t in toks], **stats.as_dict()})
    base = models.load_base_model(cfg.model, ctx.cache_dir)
    model = models.with_lora(base, cfg.model.lora, seed)
    loggers = ctx.tracker.lightning_loggers(stage) if ctx.tracker else None
    train_lora(model, ctx.tokenizer, toks, train_cfg, cfg.trainer, work, seed, loggers)


# ---- warmup: LoRA on a random fraction of the pool, a checkpoint per epoch ----------------


def needs_warmup(cfg: DictConfig, selector: Selector) -> bool:
    """A run trains a warmup when the selector's features are read at its checkpoints, or
    when it is asked for (``stage=warmup``); random and the text / base-model baselines
    otherwise skip it."""
    request = selector.request()
    wanted = request is not None and request.needs_warmup()
    return wanted or stage_name(cfg) == "warmup"


def warmup_key_of(cfg, selector: Selector, up: Upstream) -> str | None:
    return warmup_key(cfg) if needs_warmup(cfg, selector) else None


def warmup_estimate(cfg, selector, sizes: Sizes, up: Upstream, key) -> Estimate:
    if key is None:
        return Estimate(None)
    epochs = int(cfg.warmup.epochs)
    n = max(1, round(cfg.warmup.fraction * sizes.pool)) if sizes.pool else None
    state = product(sizes.grad_dim, TRAIN_STATE_BYTES, epochs)
    what = f"{n} x {epochs} epochs"
    return Estimate(key, [Planned("warmup", what, key, product(n, epochs), state, "train")])


def warmup_build(ctx: RunContext, inputs: RunInputs, up: Upstream) -> StageResult:
    cfg, pool = ctx.cfg, inputs.pool
    if not needs_warmup(cfg, inputs.selector):
        log.info("warmup: selector %s reads no warmup checkpoint, skipped", inputs.selector.name)
        return StageResult(None)

    def build(work: Path) -> None:
        n = max(1, round(cfg.warmup.fraction * len(pool)))
        seed = warmup_seed(cfg)
        chosen = random.Random(seed).sample(pool, n)
        log.info(
            "warmup: LoRA on %d of %d pool examples, %d epochs", n, len(pool), cfg.warmup.epochs
        )
        train_on(ctx, chosen, cfg.warmup, work, "warmup", seed)

    # resume: a killed warmup goes on from its last epoch checkpoint (``train_lora``)
    art = ctx.artifact("warmup", warmup_key(cfg), build, resume=True)
    return StageResult(art.path.name, [art], value=art.path)


# ---- features: whatever the selector requests ---------------------------------------------


def features_key(cfg, selector: Selector, up: Upstream) -> str | None:
    request = selector.request()
    return None if request is None else request.key(cfg)


def features_estimate(cfg, selector: Selector, sizes: Sizes, up: Upstream, key) -> Estimate:
    request = selector.request()
    return Estimate(key, [] if request is None else request.estimate(cfg, sizes))


def features_build(ctx: RunContext, inputs: RunInputs, up: Upstream) -> StageResult:
    request = inputs.selector.request()
    if request is None:
        log.info("features: selector %s needs none, skipped", inputs.selector.name)
        return StageResult(None)
    got: Features = request.build(
        ctx, FeatureInputs(inputs.pool, inputs.target, up["warmup"].value)
    )
    return StageResult(got.key, got.artifacts, value=got, diagnostics=got.diagnostics)


# ---- select: the selector on the candidates (pool minus target overlap) -------------------


def select_key_of(cfg, selector: Selector, up: Upstream) -> str:
    return select_key(cfg, up["features"].key)


def select_estimate(cfg, selector: Selector, sizes: Sizes, up: Upstream, key) -> Estimate:
    path = Path(cfg.paths.cache_dir) / "select" / key
    ids = None
    if (path / COMPLETE).is_file():  # finetune and evaluate are keyed by the selected ids
        ids = Selection.read_jsonl(path / SELECTION).ids
    what = f"{selector.name}, budget {sizes.budget}"
    return Estimate(key, [Planned("select", what, key, 0, 0)], ids)


def select_build(ctx: RunContext, inputs: RunInputs, up: Upstream) -> StageResult:
    """Candidates = pool minus target overlap minus examples with no answer tokens."""
    cfg, pool, target, selector = ctx.cfg, inputs.pool, inputs.target, inputs.selector
    feats: Features | None = up["features"].value
    dc = cfg.decontamination
    cands, removed = candidates(pool, target, ngram=dc.ngram, exact=dc.exact)
    if removed["removed"]:
        log.info(
            "select: removed %d pool examples overlapping the target: %s",
            removed["removed"],
            removed,
        )
    toks, fstats = ctx.tokenize(cands, "candidates")
    trainable = {t.id for t in toks}
    cands = [e for e in cands if e.id in trainable]
    budget = selector.budget(cfg.budget, len(cands), cfg.budget_rounding)
    sizes = dict(
        pool=len(pool),
        candidates=len(cands),
        budget=budget,
        removed_target_overlap=removed["removed"],
        dropped_no_answer_tokens=fstats.dropped_no_answer_tokens,
    )

    def build(work: Path) -> None:
        value = None if feats is None else feats.value
        sel = selector.select(cands, target, budget, cfg.seed, features=value)
        if len(sel.ids) != len(set(sel.ids)):
            raise RuntimeError(f"selector {selector.name} returned duplicate ids")
        sel.write_jsonl(work / SELECTION)
        write_json(work / "diagnostics.json", sel.diagnostics)

    art = ctx.artifact("select", select_key_of(cfg, selector, up), build)
    text = (art.path / SELECTION).read_text()
    (ctx.out_dir / SELECTION).write_text(text)
    by_id = {e.id: e for e in pool}
    chosen = selected_rows([json.loads(x) for x in text.splitlines() if x], by_id)
    write_jsonl(ctx.out_dir / SELECTED, chosen)  # the examples themselves (dataselect.export)
    if ctx.tracker is not None:
        ctx.tracker.log_selection(chosen)
    ids = [r["id"] for r in chosen]
    source_of = {e.id: e.source for e in pool}
    metrics: dict[str, Any] = {
        "selection_sources": dict(
            sorted(Counter(source_of[i] for i in ids).items(), key=lambda kv: -kv[1])
        ),
        # what the selector chose from (after decontamination): each source's base rate
        "candidate_sources": dict(
            sorted(Counter(e.source for e in cands).items(), key=lambda kv: -kv[1])
        ),
        "diagnostics": json.loads((art.path / "diagnostics.json").read_text()),
    }
    eigvals = metrics["diagnostics"].get("eigvals")
    spectra = (feats.spectra if feats is not None else {}) or (
        {"sketch": eigvals} if eigvals is not None else {}
    )
    if spectra:
        from dataselect.report.spectrum import plot_spectra, spectrum_summary

        png = plot_spectra(spectra, metrics["diagnostics"].get("k"), ctx.out_dir / "spectrum.png")
        metrics["spectrum"] = spectrum_summary(spectra)
        if ctx.tracker is not None:
            ctx.tracker.log_image("spectrum", png)
    return StageResult(
        art.path.name,
        [art],
        value=art.path,
        ids=ids,
        sizes=sizes,
        diagnostics={"decontamination": removed},
        metrics=metrics,
    )


# ---- finetune: LoRA on the selection --------------------------------------------------------


def finetune_key_of(cfg, selector: Selector, up: Upstream) -> str | None:
    """Keyed by the selected ids themselves, not only by the config that chose them."""
    ids = up["select"].ids
    return None if ids is None else finetune_key(cfg, digest(ids))


def finetune_estimate(cfg, selector: Selector, sizes: Sizes, up: Upstream, key) -> Estimate:
    ids, epochs = up["select"].ids, int(cfg.finetune.epochs)
    n = len(ids) if ids is not None else sizes.budget
    state = product(sizes.grad_dim, TRAIN_STATE_BYTES, epochs)
    what = f"{n} x {epochs} epochs"
    return Estimate(key, [Planned("finetune", what, key, product(n, epochs), state, "train")])


def finetune_build(ctx: RunContext, inputs: RunInputs, up: Upstream) -> StageResult:
    cfg = ctx.cfg
    by_id = {e.id: e for e in inputs.pool}
    ids = up["select"].ids

    def build(work: Path) -> None:
        log.info(
            "finetune: LoRA on the %d selected examples, %d epochs", len(ids), cfg.finetune.epochs
        )
        train_on(ctx, [by_id[i] for i in ids], cfg.finetune, work, "finetune", cfg.seed)

    art = ctx.artifact("finetune", finetune_key_of(cfg, inputs.selector, up), build, resume=True)
    return StageResult(art.path.name, [art], value=art.path)


# ---- evaluate: lm-eval on the target's test set (and the base model) ------------------------


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


def evaluate_key_of(cfg, selector: Selector, up: Upstream) -> str | None:
    adapter = up["finetune"].key
    return None if adapter is None else evaluate_key(cfg, adapter)


def evaluate_estimate(cfg, selector: Selector, sizes: Sizes, up: Upstream, key) -> Estimate:
    out = [Planned("evaluate", "fine-tuned model", key, sizes.test, 0, "evaluate")]
    if cfg.evaluator.include_base:
        base = evaluate_key(cfg, None)
        out.append(Planned("evaluate_base", "base model", base, sizes.test, 0, "evaluate"))
    return Estimate(key, out)


def evaluate_one(ctx: RunContext, target: Target, adapter_run: Path | None, stage: str):
    """Score the base model plus adapter (or the base alone) on the target's test set:
    accuracy with lm-eval, and the target loss of the reference answers."""
    from dataselect.evaluation import aggregate, evaluate, loss
    from dataselect.evaluation.tasks import task_benchmarks
    from dataselect.training import list_checkpoints

    cfg = ctx.cfg

    def build(work: Path) -> None:
        model = models.load_base_model(cfg.model, ctx.cache_dir)
        if adapter_run is not None:
            last = list_checkpoints(adapter_run)[-1]
            model = models.with_adapter(model, last / "adapter").merge_and_unload()
        model.eval()
        tasks_ = eval_tasks(cfg, target)
        benches = {t.name: task_benchmarks(t) for t in tasks_}
        flat = [b for bs in benches.values() for b in bs]
        results = evaluate(model, ctx.tokenizer, flat, cfg.evaluator, work / "lm_eval")
        with open(work / "samples.jsonl", "w") as fh:
            for name, r in results.items():
                for s in r.pop("samples", []):
                    fh.write(json.dumps({"benchmark": name, **s}) + "\n")
        losses: dict[str, list[dict]] = {}
        for t in tasks_:
            losses.update(
                loss.target_losses(
                    model,
                    ctx.tokenizer,
                    benches[t.name],
                    t.max_length or cfg.model.max_length,
                    cfg.evaluator.loss_limit,
                    int(cfg.evaluator.seed),
                    int(cfg.evaluator.batch_size),
                )
            )
        with open(work / "target_loss.jsonl", "w") as fh:
            for name, items in losses.items():
                for it in items:
                    fh.write(json.dumps({"benchmark": name, **it}) + "\n")
        out = {}
        for task, bs in benches.items():
            per = {b.name: loss.summarize(losses[b.name]) for b in bs}
            if len(bs) > 1:
                out[task] = aggregate({b.name.split("/", 1)[-1]: results[b.name] for b in bs})
                out[task]["target_loss"] = loss.aggregate(per)
            else:
                out[task] = {**results[bs[0].name], "target_loss": per[bs[0].name]}
        write_json(work / "metrics.json", out)

    key = evaluate_key(cfg, adapter_run.name if adapter_run is not None else None)
    art = ctx.artifact(stage, key, build, resume=True)  # finished benchmarks are kept
    return art, json.loads((art.path / "metrics.json").read_text())


def evaluate_build(ctx: RunContext, inputs: RunInputs, up: Upstream) -> StageResult:
    """The fine-tuned (and base) model's scores; each one's per-item target losses are
    copied into the run dir as ``target_loss.jsonl`` (``model``: finetuned | base), so a
    report can pair two runs item by item."""
    art, tuned = evaluate_one(ctx, inputs.target, up["finetune"].value, "evaluate")
    out = StageResult(art.path.name, [art], metrics={"finetuned": tuned})
    arts = [("finetuned", art)]
    if ctx.cfg.evaluator.include_base:
        base_art, base = evaluate_one(ctx, inputs.target, None, "evaluate_base")
        out.artifacts.append(base_art)
        out.metrics["base"] = base
        arts.append(("base", base_art))
    with open(ctx.out_dir / "target_loss.jsonl", "w") as fh:
        for which, a in arts:
            for line in (a.path / "target_loss.jsonl").read_text().splitlines():
                fh.write(json.dumps({"model": which, **json.loads(line)}) + "\n")
    return out


STAGES: list[StageSpec] = [
    StageSpec("warmup", (), warmup_key_of, warmup_estimate, warmup_build),
    StageSpec("features", ("warmup",), features_key, features_estimate, features_build),
    StageSpec("select", ("features",), select_key_of, select_estimate, select_build),
    StageSpec("finetune", ("select",), finetune_key_of, finetune_estimate, finetune_build),
    StageSpec("evaluate", ("finetune",), evaluate_key_of, evaluate_estimate, evaluate_build),
]
