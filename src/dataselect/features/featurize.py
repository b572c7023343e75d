"""Featurize: examples -> per-example gradient features at one checkpoint -> a gradient store.

One pass, shard by shard: the examples sorted longest first (less padding), each shard's rows
in token-bounded batches that never cross the shard, one forward + backward per batch
(``gradients.per_example_grads``), the gradient-type transform (sgd | sign | adam from the
checkpoint's saved AdamW state), the sketch, then ``StoreWriter.write_shard``. A shard's bytes
depend only on its examples, so a killed pass resumes from its finished shards, and DDP ranks
or array tasks (``distributed.py``) each writing their own shards give the same store.
``FeaturizeJob`` is this pass as a ``shards.ShardJob`` (``shards.py`` runs its shards).
A factorized sketch (``factorized.py``, sgd only) is projected in the backward hooks instead
of after them: no (B, D) gradient is formed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataselect.cache import digest
from dataselect.data.formatting import Tokenized
from dataselect.features.factorized import check_gradient_type, make_sketch, per_example_sketch
from dataselect.features.gradients import (
    eps_dominance,
    flat_adam_state,
    lora_parameters,
    per_example_grads,
    to_features,
)
from dataselect.features.shards import (  # compute_shards: re-exported (tests, drills)
    ShardCompute,
    ShardRows,
    compute_shards,  # noqa: F401
    fill_store,
)
from dataselect.features.sketch import SketchSpec
from dataselect.features.store import GradientStore, StoreWriter
from dataselect.training.checkpoint import load_optimizer_state
from dataselect.training.data import collate


def length_order(examples: list[Tokenized]) -> list[Tokenized]:
    """Longest first (a too-long batch fails at the start, not the end), ties by input order."""
    return [
        examples[i] for i in sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    ]


def token_batches(
    todo: list[Tokenized], batch_size: int, max_tokens: int | None
) -> Iterator[list[Tokenized]]:
    """Consecutive batches of at most ``batch_size`` examples and ``max_tokens`` padded tokens
    (batch x longest), so long examples (BBH validation: 2k tokens) get small batches and the
    activations of a backward pass stay bounded; an example longer than ``max_tokens`` goes
    alone. Order is kept: the store's rows follow the input."""
    chunk: list[Tokenized] = []
    longest = 0
    for t in todo:
        n = len(t.input_ids)
        if chunk and (
            len(chunk) == batch_size
            or (max_tokens is not None and (len(chunk) + 1) * max(longest, n) > max_tokens)
        ):
            yield chunk
            chunk, longest = [], 0
        chunk.append(t)
        longest = max(longest, n)
    if chunk:
        yield chunk


def gradient_batches(
    model,
    todo: list[Tokenized],
    pad_id: int,
    batch_size: int,
    method: str,
    gradient_type: str,
    adam=None,
    meta: dict | None = None,
    adam_form: str = "less",
    max_tokens: int | None = None,
    advance: Callable[[int], None] | None = None,
) -> Iterator[tuple[list[Tokenized], torch.Tensor, torch.Tensor]]:
    """(examples, raw gradients g (B, D), features (B, D)) batch by batch; ``advance(n)`` is
    called after each batch (a progress bar's). A non-finite gradient raises naming the batch's
    example ids.

    ``meta`` is the checkpoint's optimizer.json (betas, eps, step) for the adam type."""
    meta = meta or {}
    grads = per_batch(
        model, todo, pad_id, batch_size, max_tokens, advance,
        lambda batch: per_example_grads(model, batch, method=method),
    )  # fmt: skip
    for chunk, g in grads:
        feats = to_features(
            g,
            gradient_type,
            adam,
            betas=meta.get("betas", (0.9, 0.999)),
            eps=meta.get("eps", 1e-8),
            step=meta.get("step"),
            adam_form=adam_form,
        )
        yield chunk, g, feats


def per_batch(model, todo, pad_id, batch_size, max_tokens, advance, fn) -> Iterator[tuple]:
    """(examples, ``fn(batch)``) per token batch (``token_batches``, collated on the model's
    device); ``advance(n)`` after each. A non-finite gradient raises naming the examples."""
    device = next(model.parameters()).device
    for chunk in token_batches(todo, batch_size, max_tokens):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        try:
            out = fn(batch)
        except FloatingPointError as err:  # name the examples, not batch rows
            raise FloatingPointError(
                f"{err} of batch {[t.id for t in chunk]}; check these examples or the "
                "checkpoint (a NaN loss in warmup poisons every gradient)"
            ) from err
        yield chunk, out
        if advance is not None:
            advance(len(chunk))


@dataclass(frozen=True)
class Batching:
    """How a gradient pass walks its examples: at most ``batch_size`` examples and
    ``max_tokens`` padded tokens (batch x longest) a backward pass, ``method`` batched (one
    backward per batch) | loop (one per example), ``shard_size`` examples a store shard (the
    unit of resumption). Read once from the ``features`` config (``of``)."""

    batch_size: int = 8
    method: str = "batched"
    max_tokens: int | None = None
    shard_size: int = 1024

    @classmethod
    def of(cls, fc) -> Batching:
        return cls(int(fc.batch_size), str(fc.method), fc.max_batch_tokens, int(fc.shard_size))


DEFAULT_BATCHING = Batching()


@dataclass
class FeaturizeJob:
    """Everything a worker needs to compute shards of one store, minus the model (a worker
    loads its own: see ``distributed.py``). Picklable, so DDP ranks and Slurm array tasks
    receive it whole."""

    examples: list[Tokenized] | dict[int, Tokenized]  # by store row (``length_order``)
    n_total: int
    out: Path
    dim: int  # the store's row width (the sketch's output)
    meta_spec: dict  # the store's spec (``featurize`` fills it)
    sketch: SketchSpec
    gradient_type: str
    checkpoint: Path | None
    pad_id: int
    batching: Batching = DEFAULT_BATCHING
    adam_form: str = "less"
    dtype: str = "float16"
    trace: Path | None = None  # tests/drills: each worker appends "pid shard" lines here

    def shard_rows(self, i: int) -> range:
        """The store rows of shard ``i`` (as ``StoreWriter.shard_rows``)."""
        size = self.batching.shard_size
        return range(i * size, min((i + 1) * size, self.n_total))

    def writer(self, tidy: bool = True) -> StoreWriter:
        return StoreWriter(
            self.out,
            self.dim,
            self.n_total,
            self.meta_spec,
            dtype=self.dtype,
            shard_size=self.batching.shard_size,
            tidy=tidy,
        )

    @property
    def label(self) -> str:
        return f"gradients ({self.gradient_type})"

    def prepare(self, model) -> ShardCompute:
        """Once per worker: the Adam state and the sketch on the model's device; then each
        shard's ``shard_features``."""
        adam, meta = adam_state(model, self.gradient_type, self.checkpoint)
        projector = make_sketch(self.sketch, device=next(model.parameters()).device)

        def compute(todo: list[Tokenized], advance: Callable[[int], None]) -> ShardRows:
            return shard_features(model, todo, self, projector, adam, meta, advance)

        return compute


def adam_state(model, gradient_type: str, checkpoint: Path | None):
    """(flat Adam state, optimizer meta) at ``checkpoint`` for the adam type, else (None, {})."""
    if gradient_type != "adam":
        return None, {}
    if checkpoint is None:
        raise ValueError("gradient_type=adam needs a checkpoint with saved optimizer state")
    state, meta = load_optimizer_state(checkpoint)
    return flat_adam_state(state, [n for n, _ in lora_parameters(model)]), meta


def shard_features(model, todo, job: FeaturizeJob, projector, adam, meta, advance=None):
    """(ids, features, n_tokens, grad_norms, extra) of one shard's examples, batch by batch."""
    if job.sketch.kind == "factorized":
        return factorized_features(model, todo, job, projector, advance)
    feats, norms, extra = [], [], {"eps_share": []} if adam is not None else None
    batches = gradient_batches(
        model, todo, job.pad_id, job.batching.batch_size, job.batching.method, job.gradient_type,
        adam, meta, job.adam_form, job.batching.max_tokens, advance,
    )  # fmt: skip
    for _, g, f in batches:
        feats.append(projector.project(f).cpu().numpy())
        norms += g.norm(dim=1).tolist()
        if extra is not None:
            extra["eps_share"] += eps_dominance(g, adam[1], meta["betas"], meta["eps"]).tolist()
    ids, n_tokens = [t.id for t in todo], [t.n_loss_tokens for t in todo]
    return ids, np.concatenate(feats), n_tokens, norms, extra


def factorized_features(model, todo, job: FeaturizeJob, projector, advance=None):
    """``shard_features`` for a factorized sketch: each batch's features and exact |g| come
    straight from the backward hooks (``per_example_sketch``); sgd only."""
    check_gradient_type(job.sketch, job.gradient_type)
    b = job.batching
    batches = per_batch(
        model, todo, job.pad_id, b.batch_size, b.max_tokens, advance,
        lambda batch: per_example_sketch(model, batch, projector, b.method),
    )  # fmt: skip
    feats, norms = [], []
    for _, (f, n) in batches:
        feats.append(f.cpu().numpy())
        norms += n.tolist()
    ids, n_tokens = [t.id for t in todo], [t.n_loss_tokens for t in todo]
    return ids, np.concatenate(feats), n_tokens, norms, None


def featurize_job(
    model,
    examples: list[Tokenized],
    out: Path,
    *,
    gradient_type: str,
    sketch: SketchSpec,
    spec: dict[str, Any],
    checkpoint: Path | None,
    pad_id: int,
    batching: Batching = DEFAULT_BATCHING,
    adam_form: str = "less",
    dtype: str = "float16",
) -> FeaturizeJob:
    """The job that fills a store at ``out`` with the features of ``examples``."""
    check_gradient_type(sketch, gradient_type)
    names = [n for n, _ in lora_parameters(model)]
    layout = {"dim": sketch.dim_in, "params": digest(names)}  # which gradient coordinates
    meta_spec = {
        **spec,
        "sketch": sketch.to_dict(),
        "layout": layout,
        "gradient_type": gradient_type,
        "adam_form": adam_form if gradient_type == "adam" else None,
    }
    return FeaturizeJob(
        examples=length_order(examples),
        n_total=len(examples),
        out=Path(out),
        dim=sketch.dim_out,
        meta_spec=meta_spec,
        sketch=sketch,
        gradient_type=gradient_type,
        checkpoint=checkpoint,
        pad_id=pad_id,
        batching=batching,
        adam_form=adam_form,
        dtype=dtype,
    )


def featurize(model, examples: list[Tokenized], out: Path, **kw) -> GradientStore:
    """Write the features of ``examples`` into a store at ``out``; returns its reader.

    ``model`` is the PeftModel with the checkpoint's adapter loaded; ``checkpoint`` is the
    epoch dir whose optimizer state the adam type needs. ``spec`` goes into the store's
    metadata (with the sketch's) so that only compatible stores are ever compared.
    Keywords: those of ``featurize_job``.
    """
    return fill_store(model, featurize_job(model, examples, out, **kw))


def eps_share(store: GradientStore) -> float | None:
    """Mean share of coordinates where eps > v' (LESS's collapsed preconditioner), or None."""
    shares = [s for shard in store.extras() for s in (shard or {}).get("eps_share", [])]
    return float(np.mean(shares)) if shares else None
