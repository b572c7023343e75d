"""Full-D gradient passes for exact subspace methods, never holding more than a batch.

``full_gradients`` writes N x D validation gradients to a memory-mapped .npy (N is small: the
validation set). ``project_pool`` streams the pool once: per batch, B x D gradients, then
their coordinates ``g @ P`` (B x k) go to a resumable store, shard by shard; no full-D
gradient outlives its batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dataselect.data.formatting import Tokenized
from dataselect.features.featurize import (
    DEFAULT_BATCHING,
    Batching,
    gradient_batches,
    length_order,
    token_batches,
)
from dataselect.features.gradients import grad_dim, per_example_grads
from dataselect.features.store import GradientStore, StoreWriter
from dataselect.progress import progress
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


def project_pool(
    model,
    examples: list[Tokenized],
    P: np.ndarray,
    out: Path,
    spec: dict,
    pad_id: int,
    *,
    gradient_type: str = "sgd",
    adam=None,
    adam_meta: dict | None = None,
    batching: Batching = DEFAULT_BATCHING,
) -> GradientStore:
    """One pass: coordinates P^T g (k floats per example) and |g| into a store at ``out``."""
    device = next(model.parameters()).device
    Pt = torch.from_numpy(np.ascontiguousarray(P)).to(device)
    ordered = length_order(examples)
    writer = StoreWriter(
        out,
        P.shape[1],
        len(ordered),
        {**spec, "gradient_type": gradient_type},
        dtype="float32",
        shard_size=batching.shard_size,
    )
    shards = writer.pending_shards()
    rows = sum(len(writer.shard_rows(i)) for i in shards)
    with progress(f"subspace pass ({gradient_type})", rows) as advance:
        for i in shards:  # batches within a shard: its bytes do not depend on resumes
            todo = [ordered[r] for r in writer.shard_rows(i)]
            batches = gradient_batches(
                model, todo, pad_id, batching.batch_size, batching.method, gradient_type, adam,
                adam_meta, max_tokens=batching.max_tokens, advance=advance,
            )  # fmt: skip
            coords, norms = [], []
            for _, _, f in batches:  # |f|, not |g|: the energy share is of what is projected
                coords.append((f @ Pt).cpu().numpy())
                norms += f.norm(dim=1).tolist()
            ids, n_tokens = [t.id for t in todo], [t.n_loss_tokens for t in todo]
            writer.write_shard(i, ids, np.concatenate(coords), n_tokens, norms)
    return writer.close()
