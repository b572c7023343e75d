"""The baselines' passes: one number or vector per example, cached like a gradient store.

A baseline's pool side (per-example losses, hidden states, sentence embeddings, n-gram
counts, a BM25 index) depends on the model and the pool only, so its artifact key leaves the
target out: every target, budget and seed reuses it, and a new target costs only its
validation side. ``table`` is that artifact for a per-example array (``ids.json`` +
``values.npy``); ``lm_pass`` is the forward pass of the language model that fills one, batch
by batch, longest first, with a progress bar.

A model pass over the pool is a job of shards like the gradient store (``shards.ShardJob``;
``LMPassJob`` here, ``embed.EmbedJob``): ``shard_table`` computes it as a store of shards in
the artifact's partial work (resumed per shard after a kill; over DDP ranks or a submitit
array with ``features.distributed``, the same bytes), then writes the same two files as
``table`` and drops the shards: the artifact's layout, and so its key, are those of before.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dataselect import models
from dataselect.context import Artifact, RunContext
from dataselect.data.formatting import Tokenized
from dataselect.data.records import Example
from dataselect.features.distributed import ModelAt, run_sharded
from dataselect.features.featurize import length_order, token_batches
from dataselect.features.shards import ShardCompute, ShardJob, ShardRows
from dataselect.features.store import StoreMismatch, StoreWriter
from dataselect.features.stores import CheckpointModels, pick_checkpoints
from dataselect.keys import model_spec, warmup_key
from dataselect.progress import progress
from dataselect.training.data import collate

log = logging.getLogger(__name__)

MODELS = ("base", "warmup")


def example_text(ex: Example, part: str = "all") -> str:
    """The example's plain text, turns joined by newlines: ``all`` of it, or its ``prompt``
    (every turn before the final answer). Text baselines (BM25, DSIR, sentence embeddings)
    read this, not the chat-formatted tokens."""
    if part not in ("all", "prompt"):
        raise ValueError(f"text part must be 'all' or 'prompt', got {part!r}")
    turns = ex.messages[:-1] if part == "prompt" else ex.messages
    return "\n".join(t["content"] for t in turns)


@dataclass
class Table:
    """One row per example, addressed by id."""

    ids: list[str]
    values: np.ndarray

    def rows(self, ids: list[str]) -> np.ndarray:
        at = {i: r for r, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in at]
        if missing:
            raise KeyError(f"{len(missing)} examples have no row in this pass, e.g. {missing[:3]}")
        return self.values[[at[i] for i in ids]]


@dataclass
class Paired:
    """A representation of the pool and of the target's validation examples."""

    pool: Table
    validation: Table

    def matrices(self, pool: list[Example], validation: list[Example]):
        """(pool rows, validation rows) for these examples, in their order."""
        return self.pool.rows([e.id for e in pool]), self.validation.rows(
            [e.id for e in validation]
        )


def table(
    ctx: RunContext,
    stage: str,
    key: str,
    ids: list[str],
    compute: Callable[[], np.ndarray],
    cost: str,
    pool_size: int = 1,
) -> tuple[Table, Artifact]:
    """The cached table (stage, key): ``compute()`` returns one row per id, in order.

    ``cost`` marks it in metrics.json: ``pool`` (a pass over the pool: its bytes are divided
    by ``pool_size``) or ``target`` (the validation side)."""

    def build(work: Path) -> None:
        values = np.asarray(compute())
        if len(values) != len(ids):
            raise RuntimeError(f"{stage}: {len(values)} rows for {len(ids)} examples")
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            bad = [
                ids[i] for i in np.flatnonzero(~np.isfinite(values.reshape(len(ids), -1)).all(1))
            ]
            raise FloatingPointError(f"{stage}: non-finite values for examples {bad[:5]}")
        np.save(work / "values.npy", values)
        (work / "ids.json").write_text(json.dumps(ids))

    art = ctx.artifact(stage, key, build)
    out = Table(json.loads((art.path / "ids.json").read_text()), np.load(art.path / "values.npy"))
    nbytes = out.values.nbytes if cost == "pool" else 0
    return out, art.costed(cost, nbytes, pool_size)


def shard_table(
    ctx: RunContext,
    stage: str,
    key: str,
    ids: list[str],
    job_at: Callable[[Path], ShardJob],
    run: Callable[[ShardJob], object],
    pool_size: int,
    scalar: bool = False,
) -> tuple[Table, Artifact]:
    """The cached pool table (stage, key) of a sharded pass: ``job_at(dir)`` is the pass
    with its store at ``dir``, ``run(job)`` fills that store (``run_sharded``); its rows, put
    back in the order of ``ids`` (``scalar``: one number each, as a 1-D array), become
    ``values.npy``. A killed pass resumes from its finished shards."""

    def build(work: Path) -> None:
        job = job_at(work / "shards")
        try:
            job.writer()  # the coordinator's: tidies what a killed run left
        except StoreMismatch as err:  # shards of another shape (e.g. a changed shard_size)
            log.warning("%s: not resuming %s (%s)", stage, job.out, err)
            shutil.rmtree(job.out)
        run(job)
        store = job.writer().close()
        values = store.features(store.index(ids))
        np.save(work / "values.npy", values[:, 0] if scalar else values)
        (work / "ids.json").write_text(json.dumps(ids))
        shutil.rmtree(job.out)

    art = ctx.artifact(stage, key, build, resume=True)
    out = Table(json.loads((art.path / "ids.json").read_text()), np.load(art.path / "values.npy"))
    return out, art.costed("pool", out.values.nbytes, pool_size)


def pool_runner(ctx: RunContext, model) -> Callable[[ShardJob], object]:
    """``run(job)`` for ``shard_table``: in this process or as ``features.distributed`` says.
    ``model()`` loads this process's model, ``model.recipe()`` is what a worker loads its own
    with, ``model.release()`` frees ours first (``PassModel``, ``embed.Embedder``)."""
    dist, folder = ctx.cfg.features.get("distributed"), ctx.cache_dir / "submitit"
    return lambda job: run_sharded(job, dist, model, model.recipe(), model.release, folder)


# ---- the language model's forward pass ------------------------------------------------------


def model_key(cfg: DictConfig, model: str, checkpoint: int | None) -> dict:
    """What determines the model a pass runs: the base, or the base with a warmup adapter."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    spec = {"model": model_spec(cfg)}
    if model == "warmup":
        spec.update(warmup=warmup_key(cfg), checkpoint=checkpoint_name(cfg, checkpoint))
    return spec


def checkpoint_epoch(cfg: DictConfig, checkpoint: int | None) -> int:
    """The warmup epoch a pass reads; null = the last one."""
    return int(cfg.warmup.epochs) if checkpoint is None else int(checkpoint)


def checkpoint_name(cfg: DictConfig, checkpoint: int | None) -> str:
    return f"epoch_{checkpoint_epoch(cfg, checkpoint)}"


def load_model(ctx: RunContext, model: str, checkpoint: int | None, warmup_dir: Path | None):
    """The base model, or the base with the warmup's adapter at ``checkpoint``; eval mode."""
    if model == "base":
        m = models.load_base_model(ctx.cfg.model, ctx.cache_dir)
    else:
        if warmup_dir is None:
            raise ValueError("model=warmup needs the warmup stage (its request says so)")
        (ckpt,) = pick_checkpoints(warmup_dir, [checkpoint_epoch(ctx.cfg, checkpoint)])
        m = CheckpointModels(ctx)(ckpt)
    return m.eval()


class PassModel:
    """A baseline pass's model (``load_model``), loaded once in this process (its pool and
    validation passes share it), and the recipe a worker process loads its own from."""

    def __init__(self, ctx: RunContext, model: str, checkpoint: int | None, warmup_dir):
        self.ctx, self.model, self.checkpoint, self.warmup_dir = ctx, model, checkpoint, warmup_dir
        self.loaded = None

    def __call__(self):
        if self.loaded is None:
            self.loaded = load_model(self.ctx, self.model, self.checkpoint, self.warmup_dir)
        return self.loaded

    def release(self) -> None:
        self.loaded = None

    def recipe(self) -> ModelAt:
        adapter = None
        if self.model == "warmup":
            epoch = checkpoint_epoch(self.ctx.cfg, self.checkpoint)
            (ckpt,) = pick_checkpoints(self.warmup_dir, [epoch])
            adapter = str(ckpt / "adapter")
        plain = OmegaConf.to_container(self.ctx.cfg.model, resolve=True)
        return ModelAt(plain, str(self.ctx.cache_dir), adapter)

    def hidden_size(self) -> int:
        """The width of the final layer's hidden states, from the model's config (no load)."""
        if self.loaded is not None:
            return int(self.loaded.config.hidden_size)
        from transformers import AutoConfig

        mc = self.ctx.cfg.model
        path = models.resolve_model_path(mc.name, self.ctx.cache_dir)
        return int(AutoConfig.from_pretrained(path, revision=mc.get("revision")).hidden_size)


@dataclass
class LMPassJob:
    """A forward pass over examples as a ``shards.ShardJob``: per shard (rows longest first),
    ``reduce`` of each batch (``lm_rows``), ``dim`` floats an example."""

    examples: list[Tokenized] | dict[int, Tokenized]  # by store row (``length_order``)
    n_total: int
    out: Path
    dim: int
    spec: dict
    reduce: Callable[..., torch.Tensor]  # a module-level function (pickled by name)
    pad_id: int
    batch_size: int = 8
    max_tokens: int | None = None
    shard_size: int = 1024
    what: str = "forward pass"
    trace: Path | None = None  # tests/drills: each worker appends "pid shard" lines here

    @property
    def label(self) -> str:
        return self.what

    def shard_rows(self, i: int) -> range:
        return range(i * self.shard_size, min((i + 1) * self.shard_size, self.n_total))

    def writer(self, tidy: bool = True) -> StoreWriter:
        spec = {**self.spec, "reduce": self.reduce.__name__}
        return StoreWriter(self.out, self.dim, self.n_total, spec, "float32", self.shard_size, tidy)

    def prepare(self, model) -> ShardCompute:
        model.eval()

        def compute(todo: list[Tokenized], advance: Callable[[int], None]) -> ShardRows:
            rows = lm_rows(
                model, todo, self.pad_id, self.reduce, self.batch_size, self.max_tokens, advance
            )
            zeros = [0.0] * len(todo)  # no gradient: the store's norm column is unused
            return (
                [t.id for t in todo],
                rows.reshape(len(todo), -1),
                [t.n_loss_tokens for t in todo],
                zeros,
                None,
            )

        return compute


def lm_job(
    toks: list[Tokenized], out: Path, reduce, dim: int, spec: dict, pad_id: int, fc, what: str
) -> LMPassJob:
    """The forward pass of ``toks`` with the ``features`` config's batching."""
    return LMPassJob(
        examples=length_order(toks),
        n_total=len(toks),
        out=Path(out),
        dim=dim,
        spec=spec,
        reduce=reduce,
        pad_id=pad_id,
        batch_size=int(fc.batch_size),
        max_tokens=fc.get("max_batch_tokens"),
        shard_size=int(fc.shard_size),
        what=what,
    )


@torch.no_grad()
def lm_rows(
    model,
    todo: list[Tokenized],
    pad_id: int,
    reduce: Callable[..., torch.Tensor],
    batch_size: int = 8,
    max_tokens: int | None = None,
    advance: Callable[[int], None] | None = None,
) -> np.ndarray:
    """``reduce`` of ``todo``'s examples, in that order, over consecutive batches (see
    ``lm_pass``): (len(todo), ...) float32."""
    device = next(model.parameters()).device
    decoder = model.get_decoder()  # a LoRA adapter's layers live inside it
    out = []
    for chunk in token_batches(todo, batch_size, max_tokens):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        h = decoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        out.append(reduce(h, batch, model).float().cpu().numpy())
        if advance is not None:
            advance(len(chunk))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


@torch.no_grad()
def lm_pass(
    model,
    toks: list[Tokenized],
    pad_id: int,
    reduce: Callable[..., torch.Tensor],
    batch_size: int = 8,
    max_tokens: int | None = None,
    what: str = "forward pass",
) -> np.ndarray:
    """``reduce(h, batch, model)`` -> (B, ...) per batch, where ``h`` is the final layer's
    (normed) hidden states, (B, T, H), from the model's decoder: the vocabulary projection,
    the largest product of a small model, is left to ``reduce`` (a loss needs it at the
    answer tokens only). Rows returned in the order of ``toks``; longest first, right-padded,
    batches bounded by ``max_tokens`` padded tokens."""
    order = sorted(range(len(toks)), key=lambda i: -len(toks[i].input_ids))  # length_order's
    with progress(what, len(toks)) as advance:
        rows = lm_rows(
            model, [toks[i] for i in order], pad_id, reduce, batch_size, max_tokens, advance
        )
    out = np.empty_like(rows)
    out[order] = rows
    return out


def answer_nll(h: torch.Tensor, batch: dict[str, torch.Tensor], model) -> torch.Tensor:
    """(B, 2): each example's next-token cross-entropy summed over its answer tokens, and the
    number of those tokens. The vocabulary projection runs on the answer positions only."""
    labels = batch["labels"][:, 1:]
    scored = labels != -100
    rows = torch.nonzero(scored)[:, 0]
    logits = model.get_output_embeddings()(h[:, :-1][scored]).float()
    nll = torch.nn.functional.cross_entropy(logits, labels[scored], reduction="none")
    total = torch.zeros(h.shape[0], device=h.device).index_add_(0, rows, nll)
    return torch.stack([total, scored.sum(1).to(total.dtype)], dim=1)


def answer_loss(h: torch.Tensor, batch: dict[str, torch.Tensor], model) -> torch.Tensor:
    """(B,) mean next-token cross-entropy over each example's answer tokens (the training
    loss of that example alone): log perplexity."""
    total, count = answer_nll(h, batch, model).unbind(1)
    return total / count.clamp(min=1)


def last_token_state(h: torch.Tensor, batch: dict[str, torch.Tensor], model=None) -> torch.Tensor:
    """(B, H) the final layer's hidden state at each example's last token (LESS's RDS)."""
    last = batch["attention_mask"].sum(1) - 1
    return h[torch.arange(h.shape[0], device=h.device), last]


def weighted_mean_state(
    h: torch.Tensor, batch: dict[str, torch.Tensor], model=None
) -> torch.Tensor:
    """(B, H) position-weighted mean of the final layer's hidden states (RDS+; SGPT's pooling):
    token t (1-based) of an example of length L weighs t / (1 + ... + L). Padding weighs
    nothing: the authors' code weighs the padded width too, which equals this for a batch of
    one (or of equal lengths) and is an accident of batching otherwise."""
    mask = batch["attention_mask"].float()
    w = torch.cumsum(mask, dim=1) * mask  # 1, 2, ..., L on real tokens, 0 on padding
    w = w / w.sum(1, keepdim=True)
    return (h.float() * w.unsqueeze(-1)).sum(1)
