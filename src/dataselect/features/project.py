"""Full-D gradient passes for exact subspace methods, never holding more than a batch.

``full_gradients`` writes N x D validation gradients to a memory-mapped .npy (N is small: the
validation set). ``project_pool`` streams the pool once: per batch, B x D gradients, then
their coordinates ``g @ P`` (B x k) go to a resumable store, shard by shard; no full-D
gradient outlives its batch. The pass is a ``shards.ShardJob`` (``ProjectJob``), so it also
runs over DDP ranks or a submitit array (``distributed.run_sharded``), the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataselect.data.formatting import Tokenized
from dataselect.features.featurize import (
    DEFAULT_BATCHING,
    Batching,
    adam_state,
    gradient_batches,
    length_order,
    token_batches,
)
from dataselect.features.gradients import grad_dim, per_example_grads
from dataselect.features.shards import ShardCompute, ShardRows, fill_store
from dataselect.features.store import GradientStore, StoreWriter
from dataselect.training.data import collate


def full_gradients(
    model,
    examples: list[Tokenized],
    out: Path,
    pad_id: int,
    batching: Batching = DEFAULT_BATCHING,
) -> np.ndarray:
    """SGD gradients (N x D, float32) of ``examples`` in the given order, as an .npy memmap."""
    device = next(model.parameters()).device
    G = np.lib.format.open_memmap(
        out, mode="w+", dtype=np.float32, shape=(len(examples), grad_dim(model))
    )
    s = 0
    for chunk in token_batches(examples, batching.batch_size, batching.max_tokens):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        G[s : s + len(chunk)] = per_example_grads(model, batch, batching.method).cpu().numpy()
        s += len(chunk)
    G.flush()
    return G


@dataclass
class ProjectJob:
    """GIST's exact pool pass as a ``shards.ShardJob``: per shard, the gradients (or Adam
    features) of its examples batch by batch, ``f @ P`` (k floats) and ``|f|`` each. ``P``
    travels as a path (D x k float32 is large: each worker reads it once, in ``prepare``)."""

    examples: list[Tokenized] | dict[int, Tokenized]  # by store row (``length_order``)
    n_total: int
    out: Path
    subspace: Path  # P (D x k float32), an .npy
    k: int
    spec: dict
    pad_id: int
    gradient_type: str = "sgd"
    checkpoint: Path | None = None  # its saved optimizer state, for the adam type
    batching: Batching = DEFAULT_BATCHING
    trace: Path | None = None  # tests/drills: each worker appends "pid shard" lines here

    @property
    def label(self) -> str:
        return f"subspace pass ({self.gradient_type})"

    def shard_rows(self, i: int) -> range:
        size = self.batching.shard_size
        return range(i * size, min((i + 1) * size, self.n_total))

    def writer(self, tidy: bool = True) -> StoreWriter:
        spec = {**self.spec, "gradient_type": self.gradient_type}
        return StoreWriter(
            self.out, self.k, self.n_total, spec, "float32", self.batching.shard_size, tidy
        )

    def prepare(self, model) -> ShardCompute:
        adam, meta = adam_state(model, self.gradient_type, self.checkpoint)
        device = next(model.parameters()).device
        Pt = torch.from_numpy(np.ascontiguousarray(np.load(self.subspace))).to(device)
        b = self.batching

        def compute(todo: list[Tokenized], advance: Callable[[int], None]) -> ShardRows:
            batches = gradient_batches(
                model, todo, self.pad_id, b.batch_size, b.method, self.gradient_type, adam, meta,
                max_tokens=b.max_tokens, advance=advance,
            )  # fmt: skip
            coords, norms = [], []
            for _, _, f in batches:  # |f|, not |g|: the energy share is of what is projected
                coords.append((f @ Pt).cpu().numpy())
                norms += f.norm(dim=1).tolist()
            ids, n_tokens = [t.id for t in todo], [t.n_loss_tokens for t in todo]
            return ids, np.concatenate(coords), n_tokens, norms, None

        return compute


def project_job(
    examples: list[Tokenized],
    P: np.ndarray,
    out: Path,
    spec: dict,
    pad_id: int,
    *,
    gradient_type: str = "sgd",
    checkpoint: Path | None = None,
    batching: Batching = DEFAULT_BATCHING,
) -> ProjectJob:
    """The pass that fills a store at ``out``; ``P`` is saved in its directory for the
    workers (``subspace_file``), and ``finish_projection`` deletes it."""
    out = Path(out)
    path = subspace_file(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(P, dtype=np.float32))
    return ProjectJob(
        examples=length_order(examples),
        n_total=len(examples),
        out=out,
        subspace=path,
        k=int(P.shape[1]),
        spec=dict(spec),
        pad_id=pad_id,
        gradient_type=gradient_type,
        checkpoint=None if checkpoint is None else Path(checkpoint),
        batching=batching,
    )


def subspace_file(out: Path) -> Path:
    """Where a pass's P waits for its workers: in the store's directory while the pass runs
    (a killed pass leaves it in its partial work), never in the finished store."""
    return out / "subspace.tmp.npy"


def finish_projection(job: ProjectJob) -> None:
    """Delete the pass's copy of P (before the store's directory becomes an artifact)."""
    job.subspace.unlink(missing_ok=True)


def project_pool(
    model, examples: list[Tokenized], P: np.ndarray, out: Path, spec: dict, pad_id: int, **kw
) -> GradientStore:
    """One pass in this process: coordinates P^T g (k floats per example) and |g| into a
    store at ``out`` (resumed where a killed pass left it). Keywords: those of
    ``project_job`` (``checkpoint``: the epoch dir whose optimizer state the adam type needs)."""
    job = project_job(examples, P, out, spec, pad_id, **kw)
    try:
        return fill_store(model, job)
    finally:
        finish_projection(job)
