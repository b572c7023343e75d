"""Exact GIST's feature request: full-D validation gradients and a per-target pool pass.

    at every warmup checkpoint: G = validation SGD gradients (N x D), for the spectrum plot
    at the selector's checkpoint: the task subspace P (D x k) of G (gist.task_subspace)
    one streaming pass over the pool: P^T g and |g| per example (k + 1 floats, not D)

The pool pass depends on the target (its subspace): that is GIST's per-target cost, which
the keys say (the pool-pass key hashes the validation set and k). It is a job of shards like
the gradient store: it resumes per shard and runs under ``features.distributed`` (DDP ranks,
a submitit array), the same bytes in every mode. The validation side is
target-specific too, but shared by every k, variance rule and gradient type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from dataselect.cache import digest
from dataselect.context import Planned, RunContext, Sizes, product
from dataselect.features.featurize import Batching
from dataselect.features.project import finish_projection, full_gradients, project_job
from dataselect.features.request import FeatureInputs, FeatureRequest, Features
from dataselect.features.store import GradientStore
from dataselect.features.stores import (
    CheckpointModels,
    checkpoint_names,
    pick_checkpoints,
    run_job,
    validation_tokens,
)
from dataselect.keys import artifact_key, model_spec, pool_spec, validation_spec, warmup_key
from dataselect.selectors.gist_subspace import GISTCoords, gram_eig, task_subspace
from dataselect.training import list_checkpoints


@dataclass(frozen=True)
class GISTPass(FeatureRequest[GISTCoords]):
    checkpoint: int  # the warmup epoch whose gradients span the subspace
    k: int | None
    variance: float | None
    train_gradient: str  # sgd (GIST) | adam

    def keys(self, cfg: DictConfig, checkpoint: str) -> tuple[str, str]:
        """(pool-pass key, validation-gradient key) at one checkpoint."""
        val = {
            "model": model_spec(cfg),
            "warmup": warmup_key(cfg),
            "checkpoint": checkpoint,
            "validation": validation_spec(cfg),
            "method": cfg.features.method,
        }
        pool = {
            **val,
            "pool": pool_spec(cfg),
            "k": self.k,
            "variance": self.variance,
            "train_gradient": self.train_gradient,
        }
        return artifact_key(pool), artifact_key(val)

    def key(self, cfg: DictConfig) -> str:
        return self.keys(cfg, f"epoch_{int(self.checkpoint)}")[0]

    def estimate(self, cfg: DictConfig, sizes: Sizes) -> list[Planned]:
        ckpt, n_val, d = f"epoch_{int(self.checkpoint)}", sizes.validation, sizes.grad_dim

        out = []
        for c in checkpoint_names("all", int(cfg.warmup.epochs)):  # full-D grads at its
            key = self.keys(cfg, c)[1]  # checkpoint; the others' spectra only
            if c == ckpt:
                what = f"validation, full D @ {c}"
                out.append(Planned("gist_val", what, key, n_val, product(n_val, d, 4), "featurize"))
            else:
                what = f"validation spectrum @ {c}"
                out.append(
                    Planned("gist_spectrum", what, key, n_val, product(n_val, 8), "featurize")
                )
        # the subspace's rank is at most N (the variance rule's, too)
        k = n_val if self.variance is not None or n_val is None else min(self.k, n_val)
        k = self.k if k is None else k
        what = f"pool @ {ckpt}, k={k}"
        nbytes = product(sizes.pool, k, 4)
        out.append(Planned("gist_pass", what, self.key(cfg), sizes.pool, nbytes, "featurize"))
        return out

    def build(self, ctx: RunContext, inputs: FeatureInputs) -> Features[GISTCoords]:
        """Full-D validation gradients at every warmup checkpoint (for the spectrum), the task
        subspace at the selector's checkpoint, one streaming pass over the pool."""
        cfg, fc, pool, warmup_dir = ctx.cfg, ctx.cfg.features, inputs.pool, inputs.warmup_dir
        (ckpt,) = pick_checkpoints(warmup_dir, [self.checkpoint])
        val_toks = validation_tokens(ctx, inputs.target)
        model_at = CheckpointModels(ctx)
        spectra, artifacts = {}, []
        for c in list_checkpoints(warmup_dir):  # N x D each: N is the small validation set
            chosen = c.name == ckpt.name

            def build_val(work: Path, c=c, chosen=chosen) -> None:
                full_gradients(
                    model_at(c),
                    val_toks,
                    work / "G.npy",
                    ctx.tokenizer.pad_token_id,
                    Batching.of(fc),
                )
                (work / "ids.json").write_text(json.dumps([t.id for t in val_toks]))
                if not chosen:  # only the spectrum is wanted here: keep N eigenvalues, not N x D
                    G = np.load(work / "G.npy", mmap_mode="r")
                    np.save(work / "eigvals.npy", np.clip(gram_eig(G)[0], 0.0, None))
                    del G
                    (work / "G.npy").unlink()

            key = self.keys(cfg, c.name)[1]
            art = ctx.artifact("gist_val" if chosen else "gist_spectrum", key, build_val)
            if chosen:
                artifacts.append(art.costed("target"))
                G_dir = art.path
            else:
                artifacts.append(art)
                spectra[c.name] = np.load(art.path / "eigvals.npy")
        sub = task_subspace(np.load(G_dir / "G.npy", mmap_mode="r"), self.k, self.variance)
        spectra[ckpt.name] = sub.eigvals
        spectra = dict(sorted(spectra.items(), key=lambda kv: int(kv[0].split("_")[1])))
        val_ids = json.loads((G_dir / "ids.json").read_text())
        order = [val_ids.index(e.id) for e in inputs.target.validation]
        sub.val_coords = sub.val_coords[order]
        pool_toks, _ = ctx.tokenize(pool, "pool")
        pool_key = self.key(cfg)

        def build(work: Path) -> None:
            spec = {
                "model": model_spec(cfg),
                "checkpoint": f"{warmup_dir.name}/{ckpt.name}",
                "subspace": {"k": sub.k, "validation": digest(val_ids)},
            }
            job = project_job(
                pool_toks, sub.P, work, spec, ctx.tokenizer.pad_token_id,
                gradient_type=self.train_gradient, checkpoint=ckpt, batching=Batching.of(fc),
            )  # fmt: skip
            try:  # in this process, over DDP ranks or a submitit array: the same store
                run_job(ctx, job, model_at, ckpt, fc.distributed)
            finally:
                finish_projection(job)

        art = ctx.artifact("gist_pass", pool_key, build, resume=True)
        store = GradientStore(art.path)
        artifacts.append(art.costed("pool", store.bytes_on_disk(), len(pool)))
        coords = GISTCoords(sub, store.ids, store.features(), store.grad_norms)
        return Features(coords, pool_key, artifacts, spectra=spectra)
