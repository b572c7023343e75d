"""A pool pass as a job of independent shards: what every pool pass (gradient featurizing,
GIST's exact pass, the baselines' model passes) shares, so that one loop resumes it and
``distributed.py`` spreads it over processes.

A job fixes the rows of its output (its examples in a fixed order, longest first for a model
pass) and cuts them into shards of ``shard_size`` rows (``shard_rows``). ``prepare(model)``
does a worker's one-time setup (an Adam state, a sketch, a subspace on the model's device)
and returns ``compute(todo, advance) -> (ids, rows, n_tokens, norms, extra)`` for one shard's
examples, which ``StoreWriter.write_shard`` takes as they are. A shard's bytes depend on its
examples only (its batches never cross it), so which process computed it, and where a killed
run stopped, does not show in the result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from dataselect.features.store import GradientStore, StoreWriter
from dataselect.locking import try_lock
from dataselect.progress import progress

log = logging.getLogger(__name__)

# (ids, rows (n x dim), n_tokens, norms, extra columns or None): one shard, as write_shard takes
ShardRows = tuple[list[str], Any, Sequence[int], Sequence[float], dict | None]
ShardCompute = Callable[[list, Callable[[int], None]], ShardRows]


class ShardJob(Protocol):
    """What a worker needs to compute shards of one store, minus the model (a worker loads its
    own). Implementations are picklable dataclasses with an ``examples`` field (a list, or a
    dict by row for a worker that got only its shards: ``subset``)."""

    examples: Any  # row -> example
    n_total: int
    out: Path
    trace: Path | None  # tests/drills: each computed shard appends "pid shard" here

    @property
    def label(self) -> str:
        """What the progress line calls the pass."""

    def shard_rows(self, i: int) -> range: ...

    def writer(self, tidy: bool = True) -> StoreWriter: ...

    def prepare(self, model) -> ShardCompute: ...


def subset(job: ShardJob, shards: list[int]) -> ShardJob:
    """The job restricted to ``shards``' examples (what a worker needs to be sent)."""
    rows = {r: job.examples[r] for i in shards for r in job.shard_rows(i)}
    return dataclasses.replace(job, examples=rows)


def compute_shards(
    model, job: ShardJob, shards: list[int], writer: StoreWriter, bar: bool = True
) -> int:
    """Compute and write ``shards`` of the job's store; returns how many this call wrote.

    A shard another process is computing right now (its lock is held) or has finished is
    skipped."""
    compute = job.prepare(model)
    rows = sum(len(writer.shard_rows(i)) for i in shards)
    wrote = 0
    with progress(job.label, rows, enabled=bar) as advance:
        for i in shards:
            with try_lock(writer.shard_lock(i)) as mine:
                if not mine or writer.is_complete(i):
                    advance(len(writer.shard_rows(i)))
                    continue
                todo = [job.examples[r] for r in writer.shard_rows(i)]
                writer.write_shard(i, *compute(todo, advance))
                wrote += 1
                if job.trace is not None:
                    with open(job.trace, "a") as fh:
                        fh.write(f"{os.getpid()} {i}\n")
    return wrote


def fill_store(model, job: ShardJob) -> GradientStore:
    """Compute every shard of ``job``'s store that is not finished, in this process; returns
    the closed store. A store left unfinished (a killed run) is resumed."""
    writer = job.writer()
    todo = writer.pending_shards()
    if len(todo) < writer.n_shards:
        log.info(  # "featurize: resuming" is what the drills look for
            "featurize: resuming %s (%s), %d of %d shards done",
            job.out, job.label, writer.n_shards - len(todo), writer.n_shards,
        )  # fmt: skip
    compute_shards(model, job, todo, writer)
    return writer.close()
