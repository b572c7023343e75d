"""The run context every stage receives: the config, the artifact cache, the tokenizer.

It sits at the bottom: stages take it with their upstream results and return typed results;
nothing is written back into it for a later stage to read. ``artifact`` returns an
``Artifact`` record (path, cache hit, seconds, what it costs the selection), which the
stage passes back up in its result; the pipeline sums timings, cache hits and costs from
those records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dataselect import models
from dataselect.cache import COMPLETE, materialize
from dataselect.data.formatting import tokenize_examples
from dataselect.data.records import Example

log = logging.getLogger("dataselect.pipeline")


@dataclass(frozen=True)
class Artifact:
    """One cache entry a stage used: built now or reused."""

    stage: str  # its cache folder: warmup, features, features_val, select, ...
    path: Path
    hit: bool  # reused from the cache
    seconds: float  # this run's wall time to get it (build, or wait and reuse)
    build_seconds: float  # what building it cost, from its COMPLETE marker (cached too)
    cost: str | None = None  # "pool" (a pass over the pool) | "target" (validation side)
    bytes_per_pool_example: float = 0.0

    def costed(self, kind: str, nbytes: int = 0, pool_size: int = 1) -> Artifact:
        """This artifact marked as one the selection rests on (``cost`` in metrics.json)."""
        return dataclasses.replace(self, cost=kind, bytes_per_pool_example=nbytes / pool_size)


@dataclass
class RunContext:
    cfg: DictConfig
    tracker: Any = None  # dataselect.tracking.Tracker, or None
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

    def artifact(
        self, stage: str, key: str, build: Callable[[Path], None], resume: bool = False
    ) -> Artifact:
        """The artifact for (stage, key): reused when complete, else built now."""
        path = self.cache_dir / stage / key
        t0 = time.time()
        hit = materialize(path, build, resume=resume, info={"stage": stage, "key": key})
        log.info("%s: %s %s", stage, "cache hit, reusing" if hit else "built", path)
        marker = json.loads((path / COMPLETE).read_text())
        return Artifact(stage, path, hit, time.time() - t0, float(marker["seconds"]))

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


def product(*xs) -> int | None:
    """The product of the sizes ``xs`` (examples, dims, bytes), or None if any is unknown."""
    out = 1
    for x in xs:
        if x is None:
            return None
        out *= int(x)
    return out


@dataclass(frozen=True)
class Sizes:
    """What the dry run knows before anything runs (None: unknown)."""

    pool: int | None
    validation: int | None
    test: int | None  # test items to evaluate (after ``evaluator.limit``)
    budget: int | None
    grad_dim: int | None  # the LoRA gradient dimension D


@dataclass
class Planned:
    """One artifact a stage would use, as the dry run prices it."""

    stage: str  # the cache folder
    what: str  # e.g. "pool sgd @ epoch_2"
    key: str | None  # None: depends on an upstream result not computed yet
    examples: int | None = None  # examples processed (x epochs for training)
    bytes: int | None = None
    kind: str | None = None  # whose measured rate prices it: train | featurize | evaluate
