"""Representation similarity: the model's own hidden states as the example representation.

RDS+ (Ivison et al., 2025, "Large-Scale Data Selection for Instruction Tuning";
hamishivi/automated-instruction-selection), the baseline recent work finds hardest to beat:

    e(x) = position-weighted mean of the final layer's hidden states over x's tokens
           (token t of L weighs t / (1 + ... + L); SGPT's pooling), for the chat-formatted
           example, prompt and answer
    per target task T:  s_T(x) = max over validation examples v of T of cos(e(x), e(v))
    round-robin over the target's tasks: each in turn adds its best example not yet taken
    (one task: the global top-k by s_T)

RDS as LESS used it (Xia et al., 2024, its baseline table's "RDS"): e(x) = the final
layer's hidden state at the last token, and LESS's matching: s(x) = max over subtasks of the
mean over the subtask's validation examples of cos(e(x), e(v)).

``model: base`` (default: RDS+ embeds with the model being trained, before training) or
``warmup`` (the warmup LoRA at ``checkpoint``, like LESS's gradients). The pool's
representations depend on the model and the pool only: one forward pass, cached and shared
by every target (a job of shards: it resumes per shard and runs under
``features.distributed``); a new target costs its validation examples' forward pass.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from dataselect.context import Planned, RunContext, Sizes
from dataselect.data.records import Example
from dataselect.data.targets import Target
from dataselect.features.passes import (
    LMPassJob,
    Paired,
    PassModel,
    checkpoint_name,
    last_token_state,
    lm_job,
    lm_pass,
    model_key,
    pool_runner,
    shard_table,
    table,
    weighted_mean_state,
)
from dataselect.features.request import FeatureInputs, FeatureRequest, Features
from dataselect.features.stores import validation_tokens
from dataselect.keys import artifact_key, pool_spec, validation_spec
from dataselect.selectors.base import Selection, Selector, one_of, subtask_groups
from dataselect.selectors.similarity import round_robin, subtask_mean_max

POOLINGS = {"weighted_mean": weighted_mean_state, "last_token": last_token_state}
VARIANTS = {"rds_plus": "weighted_mean", "rds": "last_token"}


@dataclass(frozen=True)
class HiddenStates(FeatureRequest[Paired]):
    pooling: str = "weighted_mean"  # weighted_mean (RDS+) | last_token (LESS's RDS)
    model: str = "base"
    checkpoint: int | None = None

    def needs_warmup(self) -> bool:
        return self.model == "warmup"

    def keys(self, cfg: DictConfig) -> tuple[str, str]:
        common = {"hidden": model_key(cfg, self.model, self.checkpoint), "pooling": self.pooling}
        return (
            artifact_key({**common, "pool": pool_spec(cfg)}),
            artifact_key({**common, "validation": validation_spec(cfg)}),
        )

    def key(self, cfg: DictConfig) -> str:
        return artifact_key({"rds": self.keys(cfg)})

    def estimate(self, cfg: DictConfig, sizes: Sizes) -> list[Planned]:
        pool, val = self.keys(cfg)
        where = "base" if self.model == "base" else checkpoint_name(cfg, self.checkpoint)
        what = f"hidden states ({self.pooling}) @ {where}"
        return [
            Planned("hidden_pool", f"pool {what}", pool, sizes.pool, None, "featurize"),
            Planned("hidden_val", f"validation {what}", val, sizes.validation, None, "featurize"),
        ]

    def build(self, ctx: RunContext, inputs: FeatureInputs) -> Features[Paired]:
        pool_key, val_key = self.keys(ctx.cfg)
        fc, pad, reduce = ctx.cfg.features, ctx.tokenizer.pad_token_id, POOLINGS[self.pooling]
        model = PassModel(ctx, self.model, self.checkpoint, inputs.warmup_dir)  # loaded once
        ptoks, _ = ctx.tokenize(inputs.pool, "pool")
        vtoks = validation_tokens(ctx, inputs.target)

        def job_at(out: Path) -> LMPassJob:
            spec = {"stage": "hidden_pool", "key": pool_key}
            dim = model.hidden_size()
            return lm_job(ptoks, out, reduce, dim, spec, pad, fc, "pool hidden states")

        def validation() -> np.ndarray:
            what = "validation hidden states"
            return lm_pass(
                model(), vtoks, pad, reduce, int(fc.batch_size), fc.get("max_batch_tokens"), what
            ).astype(np.float32)

        ids = [t.id for t in ptoks]
        run = pool_runner(ctx, model)  # a job of shards: resumable, features.distributed
        ptab, part = shard_table(ctx, "hidden_pool", pool_key, ids, job_at, run, len(ptoks))
        vids = [t.id for t in vtoks]
        vtab, vart = table(ctx, "hidden_val", val_key, vids, validation, "target")
        return Features(Paired(ptab, vtab), self.key(ctx.cfg), [part, vart])


class RDSSelector(Selector[Paired]):
    name = "rds"

    def __init__(
        self,
        variant: str = "rds",
        pooling: str | None = None,
        model: str = "base",
        checkpoint: int | None = None,
    ):
        one_of("rds", "variant", variant, VARIANTS)
        pooling = pooling or VARIANTS[variant]
        one_of("rds", "pooling", pooling, POOLINGS)
        self.variant = variant
        self.name = variant  # rds | rds_plus: two rows of a paper table, kept apart
        self.states = HiddenStates(pooling, model, checkpoint)

    def request(self) -> HiddenStates:
        return self.states

    def select(
        self,
        pool: list[Example],
        target: Target,
        budget: int,
        seed: int,
        features: Paired | None = None,
    ) -> Selection:
        if features is None:
            raise ValueError("rds needs hidden states (the pipeline's features stage)")
        P, Q = features.matrices(pool, target.validation)
        diag = {"variant": self.variant, "pooling": self.states.pooling, "model": self.states.model}
        if self.variant == "rds_plus":
            ends = np.cumsum([0] + [len(t.validation) for t in target.tasks])
            tasks = [np.arange(a, b) for a, b in zip(ends[:-1], ends[1:], strict=True)]
            top, val, owner = round_robin(P, Q, tasks, budget)
            names = [t.name for t in target.tasks]
            diag["task_of_pick"] = dict(Counter(names[t] for t in owner).most_common())
        else:
            names, groups = subtask_groups(target.validation)
            top, val, winner = subtask_mean_max(P, Q, groups, budget)
            diag["subtask_of_max"] = dict(Counter(names[j] for j in winner).most_common())
        return Selection.of(pool, top, val.tolist(), **diag)
