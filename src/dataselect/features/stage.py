"""The features stage: pool and validation gradient stores at each warmup checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig, OmegaConf

from dataselect import models
from dataselect.cache import content_key
from dataselect.data.records import Example
from dataselect.data.targets import Target
from dataselect.features.distributed import ModelAt, featurize_array, featurize_ddp, make_executor
from dataselect.features.featurize import eps_share, featurize_job, fill_store
from dataselect.features.gradients import flat_adam_state, grad_dim, lora_parameters
from dataselect.features.project import full_gradients, project_pool
from dataselect.features.sketch import SketchSpec
from dataselect.features.store import GradientStore
from dataselect.keys import features_keys, gist_keys, model_spec
from dataselect.selectors.features import CheckpointFeatures, FeatureSet
from dataselect.selectors.gist import GISTCoords, gram_eig, task_subspace
from dataselect.training import list_checkpoints, load_optimizer_state

if TYPE_CHECKING:
    from dataselect.pipeline import Run

log = logging.getLogger(__name__)


def sketch_spec(sc: DictConfig, dim_in: int) -> SketchSpec:
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

    def __init__(self, run: Run):
        self.run, self.name, self.model = run, None, None

    def release(self) -> None:
        """Free the loaded model (before worker processes load their own)."""
        self.name, self.model = None, None

    def recipe(self, ckpt: Path) -> ModelAt:
        """What a worker process needs to load the same model itself."""
        plain = OmegaConf.to_container(self.run.cfg.model, resolve=True)
        return ModelAt(plain, str(self.run.cache_dir), str(ckpt / "adapter"))

    def __call__(self, ckpt: Path):
        if self.name != ckpt.name:
            self.model = None  # free the previous one first
            base = models.load_base_model(self.run.cfg.model, self.run.cache_dir)
            self.model = models.with_adapter(base, ckpt / "adapter", trainable=True)
            self.name = ckpt.name
        return self.model


def run_job(run: Run, job, model_at: CheckpointModels, ckpt: Path, dist) -> None:
    """Compute a store in this process, over DDP ranks, or as a submitit array (the same
    bytes in every mode: see ``distributed.py``)."""
    mode = "none" if dist is None else dist.mode
    if mode == "none":
        fill_store(model_at(ckpt), job)
    elif mode == "ddp":
        model_at.release()
        featurize_ddp(job, model_at.recipe(ckpt), int(dist.devices), dist.accelerator)
    elif mode == "submitit":
        executor = make_executor(
            OmegaConf.to_container(dist.submitit, resolve=True), run.cache_dir / "submitit"
        )
        model_at.release()
        featurize_array(job, model_at.recipe(ckpt), int(dist.tasks), executor)
    else:
        raise ValueError(f"features.distributed.mode must be none | ddp | submitit, got {mode!r}")


def validation_tokens(run: Run, target: Target):
    """Each task's validation examples, cut at its own token limit (BBH's, with two in-context
    demonstrations, are longer than training examples)."""
    out = []
    for task in target.tasks:
        limit = task.max_length or run.cfg.model.max_length
        toks, stats = run.tokenize(task.validation, f"{task.name} validation", limit)
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


def run_features(
    run: Run, pool: list[Example], target: Target, warmup_dir: Path, overrides: dict | None = None
) -> tuple[FeatureSet, str]:
    """Pool (configured type) and validation (SGD) gradient stores at each warmup checkpoint.

    ``overrides`` are the selector's changes to the features config (GIST: SGD, one epoch).
    """
    cfg = run.cfg
    fc = OmegaConf.merge(cfg.features, overrides or {})
    ckpts = pick_checkpoints(warmup_dir, fc.checkpoints)
    pool_toks, _ = run.tokenize(pool, "pool")
    val_toks = validation_tokens(run, target)
    model_at = CheckpointModels(run)
    out, keys, diag = [], [], {}
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
                    sketch=sketch_spec(fc.sketch, grad_dim(model)),
                    spec=spec,
                    checkpoint=ckpt,
                    pad_id=run.tokenizer.pad_token_id,
                    batch_size=fc.batch_size,
                    method=fc.method,
                    adam_form=fc.adam_form,
                    dtype=fc.dtype,
                    shard_size=fc.shard_size,
                    max_tokens=fc.max_batch_tokens,
                )
                dist = fc.distributed if stage == "features" else None  # validation: small
                run_job(run, job, model_at, ckpt, dist)

            stores[stage] = GradientStore(run.artifact(stage, key, build, resume=True))
            stores[stage].expect(
                {
                    **spec,
                    "gradient_type": gtype,
                    "sketch": {k: fc.sketch[k] for k in ("kind", "seed")}
                    | ({"dim_out": fc.sketch.dim} if fc.sketch.kind != "none" else {}),
                }
            )
            if stage == "features":
                run.record_cost(
                    "pool", stores[stage].path, stores[stage].bytes_on_disk(), len(pool)
                )
            else:
                run.record_cost("target", stores[stage].path)
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
    run.diagnostics["features"] = diag
    return FeatureSet(out), content_key(keys)


def run_gist_pass(
    run: Run, pool: list[Example], target: Target, warmup_dir: Path, selector
) -> tuple[GISTCoords, str]:
    """Exact GIST: full-D validation gradients at every warmup checkpoint (for the spectrum),
    the task subspace at the selector's checkpoint, one streaming pass over the pool."""
    cfg, fc = run.cfg, run.cfg.features
    (ckpt,) = pick_checkpoints(warmup_dir, [selector.checkpoint])
    val_toks = validation_tokens(run, target)
    model_at = CheckpointModels(run)
    spectra = {}
    for c in list_checkpoints(warmup_dir):  # N x D each: N is the small validation set
        chosen = c.name == ckpt.name

        def build_val(work: Path, c=c, chosen=chosen) -> None:
            full_gradients(
                model_at(c),
                val_toks,
                work / "G.npy",
                run.tokenizer.pad_token_id,
                fc.batch_size,
                fc.method,
                fc.max_batch_tokens,
            )
            (work / "ids.json").write_text(json.dumps([t.id for t in val_toks]))
            if not chosen:  # only the spectrum is wanted here: keep N eigenvalues, not N x D
                G = np.load(work / "G.npy", mmap_mode="r")
                np.save(work / "eigvals.npy", np.clip(gram_eig(G)[0], 0.0, None))
                del G
                (work / "G.npy").unlink()

        key = gist_keys(cfg, c.name, selector)[1]
        vdir = run.artifact("gist_val" if chosen else "gist_spectrum", key, build_val)
        if chosen:
            run.record_cost("target", vdir)
            G_dir = vdir
        else:
            spectra[c.name] = np.load(vdir / "eigvals.npy")
    sub = task_subspace(np.load(G_dir / "G.npy", mmap_mode="r"), selector.k, selector.variance)
    spectra[ckpt.name] = sub.eigvals
    spectra = dict(sorted(spectra.items(), key=lambda kv: int(kv[0].split("_")[1])))
    val_ids = json.loads((G_dir / "ids.json").read_text())
    order = [val_ids.index(e.id) for e in target.validation]
    sub.val_coords = sub.val_coords[order]
    pool_toks, _ = run.tokenize(pool, "pool")
    pool_key, _ = gist_keys(cfg, ckpt.name, selector)

    def build(work: Path) -> None:
        model = model_at(ckpt)
        adam, meta = None, {}
        if selector.train_gradient == "adam":
            state, meta = load_optimizer_state(ckpt)
            adam = flat_adam_state(state, [n for n, _ in lora_parameters(model)])
        spec = {
            "model": model_spec(cfg),
            "checkpoint": f"{warmup_dir.name}/{ckpt.name}",
            "subspace": {"k": sub.k, "validation": content_key(val_ids)},
        }
        project_pool(
            model,
            pool_toks,
            sub.P,
            work,
            spec,
            run.tokenizer.pad_token_id,
            gradient_type=selector.train_gradient,
            adam=adam,
            adam_meta=meta,
            batch_size=fc.batch_size,
            method=fc.method,
            shard_size=fc.shard_size,
            max_tokens=fc.max_batch_tokens,
        )

    store = GradientStore(run.artifact("gist_pass", pool_key, build, resume=True))
    run.record_cost("pool", store.path, store.bytes_on_disk(), len(pool))
    run.spectra = spectra
    coords = GISTCoords(sub, store.ids, store.features(), store.grad_norms)
    return coords, pool_key
