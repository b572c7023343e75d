"""Featurize: examples -> per-example gradient features at one checkpoint -> a gradient store.

One pass: batches of length-sorted examples (less padding), one forward + backward per batch
(``gradients.per_example_grads``), the gradient-type transform (sgd | sign | adam from the
checkpoint's saved AdamW state), the sketch, then ``StoreWriter.add``. The writer keeps
finished shards, so a killed pass resumes where it stopped, and yields the same bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dataselect.cache import content_key
from dataselect.data.formatting import Tokenized
from dataselect.features.gradients import (
    eps_dominance,
    flat_adam_state,
    lora_parameters,
    per_example_grads,
    to_features,
)
from dataselect.features.sketch import Sketch, SketchSpec
from dataselect.features.store import GradientStore, StoreWriter
from dataselect.training.checkpoint import load_optimizer_state
from dataselect.training.data import collate

log = logging.getLogger(__name__)


def length_order(examples: list[Tokenized]) -> list[Tokenized]:
    """Longest first (a too-long batch fails at the start, not the end), ties by input order."""
    return [
        examples[i] for i in sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    ]


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar with examples/s; yields ``advance(n)``."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} ex/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total, rate=0.0)

        def advance(n: int) -> None:
            t = bar.tasks[0]
            bar.update(task, advance=n, rate=(t.completed + n) / max(t.elapsed or 1e-9, 1e-9))

        yield advance


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
    description: str = "gradients",
    max_tokens: int | None = None,
) -> Iterator[tuple[list[Tokenized], torch.Tensor, torch.Tensor]]:
    """(examples, raw gradients g (B, D), features (B, D)) batch by batch, with a progress bar.

    ``meta`` is the checkpoint's optimizer.json (betas, eps, step) for the adam type."""
    meta = meta or {}
    device = next(model.parameters()).device
    with progress(description, len(todo)) as advance:
        for chunk in token_batches(todo, batch_size, max_tokens):
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            g = per_example_grads(model, batch, method=method)
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
            advance(len(chunk))


def featurize(
    model,
    examples: list[Tokenized],
    out: Path,
    *,
    gradient_type: str,
    sketch: SketchSpec,
    spec: dict[str, Any],
    checkpoint: Path | None,
    pad_id: int,
    batch_size: int = 8,
    method: str = "batched",
    adam_form: str = "less",
    dtype: str = "float16",
    shard_size: int = 1024,
    max_tokens: int | None = None,
) -> GradientStore:
    """Write the features of ``examples`` into a store at ``out``; returns its reader.

    ``model`` is the PeftModel with the checkpoint's adapter loaded; ``checkpoint`` is the
    epoch dir whose optimizer state the adam type needs. ``spec`` goes into the store's
    metadata (with the sketch's) so that only compatible stores are ever compared.
    """
    names = [n for n, _ in lora_parameters(model)]
    adam, meta = None, {}
    if gradient_type == "adam":
        if checkpoint is None:
            raise ValueError("gradient_type=adam needs a checkpoint with saved optimizer state")
        state, meta = load_optimizer_state(checkpoint)
        adam = flat_adam_state(state, names, [p.shape for _, p in lora_parameters(model)])
    device = next(model.parameters()).device
    projector = Sketch(sketch, device=device)
    ordered = length_order(examples)
    layout = {"dim": sketch.dim_in, "params": content_key(names)}  # which gradient coordinates
    writer = StoreWriter(
        out,
        sketch.dim_out,
        len(ordered),
        {
            **spec,
            "sketch": sketch.to_dict(),
            "layout": layout,
            "gradient_type": gradient_type,
            "adam_form": adam_form if adam else None,
        },
        dtype=dtype,
        shard_size=shard_size,
    )
    todo = ordered[writer.done_rows :]
    if writer.done_rows:
        log.info("featurize: resuming %s after %d finished rows", out.name, writer.done_rows)
    batches = gradient_batches(
        model,
        todo,
        pad_id,
        batch_size,
        method,
        gradient_type,
        adam,
        meta,
        adam_form,
        f"gradients ({gradient_type})",
        max_tokens,
    )
    for chunk, g, feats in batches:
        extra = None
        if adam is not None:
            extra = {"eps_share": eps_dominance(g, adam[1], meta["betas"], meta["eps"]).tolist()}
        writer.add(
            [t.id for t in chunk],
            projector.project(feats).cpu().numpy(),
            [t.n_loss_tokens for t in chunk],
            g.norm(dim=1).tolist(),
            extra,
        )
    return writer.close()


def eps_share(store: GradientStore) -> float | None:
    """Mean share of coordinates where eps > v' (LESS's collapsed preconditioner), or None."""
    shares = [s for shard in store.extras() for s in (shard or {}).get("eps_share", [])]
    return float(np.mean(shares)) if shares else None
