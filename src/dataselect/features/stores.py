"""Gradient stores: pool and validation gradient features at warmup checkpoints.

``GradientStores`` is the feature request of the store-based selectors (LESS, G2IS, GIST in
sketch space): the pool's features of a gradient type (target-agnostic: one store serves
every target, budget and selector) and the target's validation SGD features, both sketched,
at each chosen warmup checkpoint. The helpers here (checkpoints, models, validation tokens,
where a store is computed) serve every gradient pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from dataselect import models
from dataselect.cache import digest
from dataselect.context import Planned, RunContext, Sizes, product
from dataselect.data.targets import Target
from dataselect.features.distributed import ModelAt, run_sharded
from dataselect.features.factorized import check_gradient_type, factorized_spec
from dataselect.features.featurize import Batching, eps_share, featurize_job
from dataselect.features.gradients import grad_dim
from dataselect.features.request import FeatureInputs, FeatureRequest, Features
from dataselect.features.sketch import SketchSpec
from dataselect.features.store import GradientStore
from dataselect.keys import features_keys, model_spec
from dataselect.training import list_checkpoints, load_optimizer_state

log = logging.getLogger(__name__)

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


# Sketch kinds whose output dimension is ``features.sketch.dim`` exactly (``none``: D; a
# factorized sketch: that of its factor, at least ``dim``; see ``sketch_spec``).
EXACT_DIM_KINDS = ("sjlt", "countsketch", "rademacher", "gaussian")

# The spec keys two stores must share to be compared (the sketch includes its seed and dims).
COMPARABLE = ("model", "checkpoint", "sketch", "layout")


@dataclass
class CheckpointFeatures:
    name: str  # e.g. "epoch_2"
    lr_mean: float  # the epoch's mean learning rate (LESS's checkpoint weight)
    train: GradientStore  # pool features (the configured gradient type)
    val: GradientStore  # target validation features (always SGD)

    def __post_init__(self) -> None:
        self.train.check_compatible(self.val, COMPARABLE)


@dataclass
class FeatureSet:
    checkpoints: list[CheckpointFeatures]

    def lr_weights(self) -> np.ndarray:
        """w_c = mean lr of epoch c / sum over epochs (LESS); uniform if every lr is 0."""
        lrs = np.array([c.lr_mean for c in self.checkpoints], dtype=np.float64)
        if lrs.sum() <= 0:
            return np.full(len(lrs), 1.0 / len(lrs))
        return lrs / lrs.sum()


def sketch_spec(sc: DictConfig, model) -> SketchSpec:
    """The ``features.sketch`` config's matrix for ``model``'s LoRA gradients (a factorized
    sketch takes its blocks from the model and, with ``factor: null``, its factor from
    ``dim``: ``factorized.factorized_spec``)."""
    if sc.kind == "factorized":
        factor = sc.get("factor")
        return factorized_spec(model, None if factor is None else int(factor), sc.seed, sc.dim)
    dim_in = grad_dim(model)
    return SketchSpec(
        kind=sc.kind,
        dim_in=dim_in,
        dim_out=dim_in if sc.kind == "none" else sc.dim,
        seed=sc.seed,
        nnz=sc.nnz,
        block_rows=sc.block_rows,
        input_dtype=sc.input_dtype,
    )


def pick_checkpoints(warmup_dir: Path, wanted) -> list[Path]:
    ckpts = list_checkpoints(warmup_dir)
    if wanted == "all":
        return ckpts
    names = {f"epoch_{int(e)}" for e in wanted}
    missing = names - {c.name for c in ckpts}
    if missing:
        raise ValueError(f"features.checkpoints: the warmup has no {sorted(missing)}")
    return [c for c in ckpts if c.name in names]


class CheckpointModels:
    """The base model with one checkpoint's adapter, loaded lazily and one at a time."""

    def __init__(self, ctx: RunContext):
        self.ctx, self.name, self.model = ctx, None, None

    def release(self) -> None:
        """Free the loaded model (before worker processes load their own)."""
        self.name, self.model = None, None

    def recipe(self, ckpt: Path) -> ModelAt:
        """What a worker process needs to load the same model itself."""
        plain = OmegaConf.to_container(self.ctx.cfg.model, resolve=True)
        return ModelAt(plain, str(self.ctx.cache_dir), str(ckpt / "adapter"))

    def __call__(self, ckpt: Path):
        if self.name != ckpt.name:
            self.model = None  # free the previous one first
            base = models.load_base_model(self.ctx.cfg.model, self.ctx.cache_dir)
            self.model = models.with_adapter(base, ckpt / "adapter", trainable=True)
            self.name = ckpt.name
        return self.model


def run_job(ctx: RunContext, job, model_at: CheckpointModels, ckpt: Path, dist) -> None:
    """Compute a store in this process, over DDP ranks, or as a submitit array (the same
    bytes in every mode: see ``distributed.py``)."""
    run_sharded(
        job,
        dist,
        lambda: model_at(ckpt),
        model_at.recipe(ckpt),
        model_at.release,
        ctx.cache_dir / "submitit",
    )


def validation_tokens(ctx: RunContext, target: Target):
    """Each task's validation examples, cut at its own token limit (BBH's, with two in-context
    demonstrations, are longer than training examples)."""
    out = []
    for task in target.tasks:
        limit = task.max_length or ctx.cfg.model.max_length
        toks, stats = ctx.tokenize(task.validation, f"{task.name} validation", limit)
        if stats.dropped_no_answer_tokens:
            dropped = set(stats.dropped_ids)
            named = [f"{e.id} ({e.where})" for e in task.validation if e.id in dropped]
            raise ValueError(
                f"target {task.name}: {stats.dropped_no_answer_tokens} validation examples have "
                f"no answer tokens within {limit} tokens (raise target.{task.name}.max_length): "
                + ", ".join(named[:3])
                + (" ..." if len(named) > 3 else "")
            )
        if stats.truncated:
            log.warning(
                "%s validation: %d examples cut at %d tokens", task.name, stats.truncated, limit
            )
        out += toks
    return out


def checkpoint_names(wanted, epochs: int) -> list[str]:
    """The warmup checkpoints ``wanted`` ("all" or epoch numbers) names, from the config."""
    chosen = range(1, epochs + 1) if wanted == "all" else sorted(int(e) for e in wanted)
    return [f"epoch_{e}" for e in chosen]


@dataclass(frozen=True)
class GradientStores(FeatureRequest[FeatureSet]):
    """Pool features (``gradient_type``) and validation SGD features at ``checkpoints``.

    None takes the run's ``features`` config: a selector sets only what its method fixes
    (G2IS: Adam features; GIST in sketch space: SGD at one epoch)."""

    gradient_type: str | None = None
    checkpoints: tuple[int, ...] | None = None

    def config(self, cfg: DictConfig) -> DictConfig:
        """The ``features`` config with this request's fields applied."""
        over: dict = {}
        if self.gradient_type is not None:
            over["gradient_type"] = self.gradient_type
        if self.checkpoints is not None:
            over["checkpoints"] = list(self.checkpoints)
        fc = OmegaConf.merge(cfg.features, over)
        check_gradient_type(fc.sketch.kind, fc.gradient_type)  # before any warmup is paid for
        return fc

    def _keys(self, cfg: DictConfig) -> list[tuple[str, str, str]]:
        fc = self.config(cfg)
        names = checkpoint_names(fc.checkpoints, int(cfg.warmup.epochs))
        return [(c, *features_keys(cfg, fc, c)) for c in names]

    def key(self, cfg: DictConfig) -> str:
        return digest([k for _, pool_key, val_key in self._keys(cfg) for k in (pool_key, val_key)])

    def estimate(self, cfg: DictConfig, sizes: Sizes) -> list[Planned]:
        fc = self.config(cfg)
        # factorized: about dim (its factor's dimension is known once the model is loaded)
        dim = sizes.grad_dim if fc.sketch.kind == "none" else int(fc.sketch.dim)
        per = DTYPE_BYTES.get(fc.dtype, 4)

        def nbytes(n):
            return product(n, dim, per)

        out = []
        for c, pool_key, val_key in self._keys(cfg):
            what = f"pool {fc.gradient_type} @ {c}"
            out.append(
                Planned("features", what, pool_key, sizes.pool, nbytes(sizes.pool), "featurize")
            )
            what = f"validation sgd @ {c}"
            out.append(
                Planned(
                    "features_val",
                    what,
                    val_key,
                    sizes.validation,
                    nbytes(sizes.validation),
                    "featurize",
                )
            )
        return out

    def build(self, ctx: RunContext, inputs: FeatureInputs) -> Features[FeatureSet]:
        cfg, pool, warmup_dir = ctx.cfg, inputs.pool, inputs.warmup_dir
        fc = self.config(cfg)
        ckpts = pick_checkpoints(warmup_dir, fc.checkpoints)
        pool_toks, _ = ctx.tokenize(pool, "pool")
        val_toks = validation_tokens(ctx, inputs.target)
        model_at = CheckpointModels(ctx)
        out, keys, diag, artifacts = [], [], {}, []
        for ckpt in ckpts:
            pool_key, val_key = features_keys(cfg, fc, ckpt.name)
            keys += [pool_key, val_key]
            spec = {"model": model_spec(cfg), "checkpoint": f"{warmup_dir.name}/{ckpt.name}"}
            stores = {}
            for stage, key, toks, gtype in (
                ("features", pool_key, pool_toks, fc.gradient_type),
                ("features_val", val_key, val_toks, "sgd"),
            ):

                def build(work: Path, toks=toks, gtype=gtype, ckpt=ckpt, spec=spec, stage=stage):
                    model = model_at(ckpt)
                    job = featurize_job(
                        model,
                        toks,
                        work,
                        gradient_type=gtype,
                        sketch=sketch_spec(fc.sketch, model),
                        spec=spec,
                        checkpoint=ckpt,
                        pad_id=ctx.tokenizer.pad_token_id,
                        batching=Batching.of(fc),
                        adam_form=fc.adam_form,
                        dtype=fc.dtype,
                    )
                    dist = fc.distributed if stage == "features" else None  # validation: small
                    run_job(ctx, job, model_at, ckpt, dist)

                art = ctx.artifact(stage, key, build, resume=True)
                stores[stage] = GradientStore(art.path)
                stores[stage].expect(
                    {
                        **spec,
                        "gradient_type": gtype,
                        "sketch": {k: fc.sketch[k] for k in ("kind", "seed")}
                        | ({"dim_out": fc.sketch.dim} if fc.sketch.kind in EXACT_DIM_KINDS else {}),
                    }
                )
                if stage == "features":
                    art = art.costed("pool", stores[stage].bytes_on_disk(), len(pool))
                else:
                    art = art.costed("target")
                artifacts.append(art)
            lr_mean = load_optimizer_state(ckpt)[1]["lr_mean"]
            out.append(
                CheckpointFeatures(ckpt.name, lr_mean, stores["features"], stores["features_val"])
            )
            diag[ckpt.name] = {
                "lr_mean": lr_mean,
                "gradient_type": fc.gradient_type,
                "adam_eps_share": eps_share(stores["features"]),
                "bytes_per_example": stores["features"].bytes_on_disk() / len(stores["features"]),
            }
            log.info(
                "features %s: lr_mean %.3g, eps > v' on %s of Adam coordinates, %d B/example",
                ckpt.name,
                lr_mean,
                diag[ckpt.name]["adam_eps_share"],
                diag[ckpt.name]["bytes_per_example"],
            )
        return Features(FeatureSet(out), digest(keys), artifacts, {"features": diag})
