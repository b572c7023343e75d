"""Perplexity: rank the pool by each example's loss under a reference model (Marion et al.,
2023, "When Less is More: Investigating Data Pruning"; Ankner et al., 2024; the GIST paper's
"perplexity" row).

    l(z) = mean cross-entropy of z's answer tokens under the model (log perplexity)
    highest: the top-k by l          (hard / unfamiliar examples)
    lowest:  the bottom-k by l       (easy / fluent examples)
    middle:  the k around the median (rank window [(n - k) / 2, (n + k) / 2), nearest the
             median first), Marion et al.'s best-performing "middle" subset

The reference model is the base model (``model: base``, the papers' setting) or the warmup's
LoRA at a checkpoint (``model: warmup``). The losses depend on the model and the pool only:
one pass over the pool, cached and shared by every target (the target is never read); a job
of shards (``passes.shard_table``): it resumes per shard and runs under
``features.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from dataselect.context import Planned, RunContext, Sizes
from dataselect.data.records import Example
from dataselect.data.targets import Target
from dataselect.features.passes import (
    LMPassJob,
    PassModel,
    Table,
    answer_loss,
    checkpoint_name,
    lm_job,
    model_key,
    pool_runner,
    shard_table,
)
from dataselect.features.request import FeatureInputs, FeatureRequest, Features
from dataselect.keys import artifact_key, pool_spec
from dataselect.selectors.base import Selection, Selector, one_of
from dataselect.selectors.ranking import top_k

MODES = ("highest", "lowest", "middle")


@dataclass(frozen=True)
class ExampleLosses(FeatureRequest[Table]):
    """One float per pool example: its mean answer-token loss under the model."""

    model: str = "base"
    checkpoint: int | None = None  # model=warmup: the epoch (null: the last)

    def needs_warmup(self) -> bool:
        return self.model == "warmup"

    def key(self, cfg: DictConfig) -> str:
        return artifact_key(
            {"losses": model_key(cfg, self.model, self.checkpoint), "pool": pool_spec(cfg)}
        )

    def estimate(self, cfg: DictConfig, sizes: Sizes) -> list[Planned]:
        where = "base" if self.model == "base" else checkpoint_name(cfg, self.checkpoint)
        nbytes = None if sizes.pool is None else sizes.pool * 4
        return [
            Planned(
                "pool_loss",
                f"pool losses @ {where}",
                self.key(cfg),
                sizes.pool,
                nbytes,
                "featurize",
            )
        ]

    def build(self, ctx: RunContext, inputs: FeatureInputs) -> Features[Table]:
        toks, _ = ctx.tokenize(inputs.pool, "pool")
        fc, key = ctx.cfg.features, self.key(ctx.cfg)
        model = PassModel(ctx, self.model, self.checkpoint, inputs.warmup_dir)

        def job_at(out: Path) -> LMPassJob:
            spec = {"stage": "pool_loss", "key": key}
            pad = ctx.tokenizer.pad_token_id
            return lm_job(toks, out, answer_loss, 1, spec, pad, fc, "pool losses")

        run = pool_runner(ctx, model)
        ids = [t.id for t in toks]
        tab, art = shard_table(ctx, "pool_loss", key, ids, job_at, run, len(toks), scalar=True)
        return Features(tab, key, [art])


class PerplexitySelector(Selector[Table]):
    name = "perplexity"

    def __init__(self, mode: str = "middle", model: str = "base", checkpoint: int | None = None):
        one_of("perplexity", "mode", mode, MODES)
        self.mode = mode
        self.losses = ExampleLosses(model, checkpoint)

    def request(self) -> ExampleLosses:
        return self.losses

    def select(
        self,
        pool: list[Example],
        target: Target,
        budget: int,
        seed: int,
        features: Table | None = None,
    ) -> Selection:
        if features is None:
            raise ValueError("perplexity needs per-example losses (the pipeline's features stage)")
        loss = features.rows([e.id for e in pool]).astype(np.float64)
        top = pick(loss, budget, self.mode)
        return Selection.of(
            pool,
            top,
            loss[top].tolist(),
            mode=self.mode,
            model=self.losses.model,
            loss_mean_pool=float(loss.mean()),
            loss_mean_selected=float(loss[top].mean()),
            loss_median_pool=float(np.median(loss)),
        )


def pick(loss: np.ndarray, k: int, mode: str) -> np.ndarray:
    """Positions of the ``k`` examples ``mode`` keeps, best first; ties by position."""
    exact = lambda key: lambda p: key[p]  # noqa: E731  (stored float32 values: exact)
    if mode == "highest":
        return top_k(loss, k, 0.0, exact(loss))[0]
    if mode == "lowest":
        return top_k(-loss, k, 0.0, exact(-loss))[0]
    n = len(loss)
    order = top_k(-loss, n, 0.0, exact(-loss))[0]  # ascending loss, ties by position
    start = (n - k) // 2
    window = order[start : start + k]
    center = (n - 1) / 2  # nearest the median rank first
    dist = -np.abs(np.arange(start, start + k) - center)
    return window[top_k(dist, k, 0.0, exact(dist))[0]]
