"""BM25 (a LESS baseline): the target's validation prompts as queries over the pool.

    documents = the pool examples' text (every turn), one BM25 index over the pool (bm25s)
    queries   = the validation examples' prompts (``query: all``: their whole text)
    score(z)  = max (or sum) over queries q of BM25(q, z)
    select the global top-k

Tokenization is bm25s's own (``bm25s.tokenize``: lower-cased ``\\w\\w+`` words, English
stopwords removed unless ``stopwords: null``, no stemming). The index is the pool side: it
depends on the pool and the BM25 knobs only, so its key leaves the target out and every
target reuses it. A query is tokenized to strings and mapped through the *index's*
vocabulary (``retriever.get_tokens_ids``): words the pool never uses score nothing. (Tokenizing
queries with ``return_ids=True`` would number them in a new vocabulary of their own.)

The index is built in one process, not as a job of shards like the model passes
(``features.distributed``): it is global (the vocabulary numbered in first-seen order, the
corpus' document frequencies), so shards would need a merge that must reproduce bm25s's own,
and it is cheap (about 1,100 200-word documents a second on a loaded 2-core machine: 4 min
for a 270k-example pool).

The ranking goes through ``ranking.top_k`` with no tolerance: the per-query scores are the
library's (float32, each document's sum over query tokens in query order, so equal documents
score equally), and the aggregate over queries is exact (max) or a fixed sequence of float64
adds (sum), so the order is (score desc, pool order asc) on every machine. Queries are scored
one at a time: memory is one score vector over the pool, whatever the validation set's size.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np
from omegaconf import DictConfig

from dataselect.context import Planned, RunContext, Sizes
from dataselect.data.records import Example
from dataselect.data.targets import Target
from dataselect.features.passes import example_text
from dataselect.features.request import FeatureInputs, FeatureRequest, Features
from dataselect.keys import artifact_key, pool_spec
from dataselect.progress import heartbeat
from dataselect.selectors.base import Selection, Selector, one_of
from dataselect.selectors.ranking import top_k

log = logging.getLogger(__name__)

AGGREGATES = ("max", "sum")
QUERIES = ("prompt", "all")
METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")


def tokenize(texts: list[str], stopwords: str | None) -> list[list[str]]:
    """bm25s's tokenizer, as strings (lower-cased, ``\\w\\w+``, ``stopwords`` removed)."""
    return bm25s.tokenize(texts, stopwords=stopwords, return_ids=False, show_progress=False)


def build_index(
    texts: list[str], k1: float, b: float, method: str, stopwords: str | None
) -> bm25s.BM25:
    """A BM25 index of ``texts`` (one document each, in order). The vocabulary is numbered
    in first-seen order (``return_ids=True``), so the saved index is the same in every run."""
    with heartbeat(f"bm25 index of {len(texts):,} documents"):
        return _index(texts, k1, b, method, stopwords)


def _index(texts: list[str], k1: float, b: float, method: str, stopwords: str | None):
    tokens = bm25s.tokenize(texts, stopwords=stopwords, return_ids=True, show_progress=False)
    if not tokens.vocab:
        raise ValueError(
            f"bm25: none of the {len(texts)} pool documents has a word left after tokenization"
            f" (stopwords={stopwords!r}); nothing to index"
        )
    retriever = bm25s.BM25(k1=k1, b=b, method=method)
    retriever.index(tokens, show_progress=False)
    return retriever


def _query_rows(retriever: bm25s.BM25, queries: list[str], stopwords: str | None):
    """Each query's BM25 scores of every indexed document (float64), one query at a time, as
    bm25s computes them (``get_scores_from_ids``; out-of-vocabulary words dropped)."""
    n_docs = int(retriever.scores["num_docs"])
    for words in tokenize(queries, stopwords):
        ids = retriever.get_tokens_ids(words)
        if not ids:  # no word of the query is in the pool: zero everywhere (bm25s raises)
            yield np.zeros(n_docs)
        else:
            yield np.asarray(retriever.get_scores_from_ids(ids), dtype=np.float64)


def query_scores(retriever: bm25s.BM25, queries: list[str], stopwords: str | None) -> np.ndarray:
    """(n_queries, n_docs) float64: each query's BM25 score of every indexed document."""
    n_docs = int(retriever.scores["num_docs"])
    rows = list(_query_rows(retriever, queries, stopwords))
    return np.stack(rows) if rows else np.zeros((0, n_docs))


def aggregate_scores(
    retriever: bm25s.BM25, queries: list[str], stopwords: str | None, how: str
) -> tuple[np.ndarray, int]:
    """(n_docs,) float64: the max, or the sum, over queries of their BM25 scores, streamed
    (memory: one score vector, not queries x pool); and how many queries match no document.
    The sum adds the queries in their order: a fixed sequence of float64 adds per document,
    so its bits depend on that document's scores alone."""
    one_of("bm25", "aggregate", how, AGGREGATES)
    out, unmatched = None, 0
    for row in _query_rows(retriever, queries, stopwords):
        unmatched += int(not row.any())
        if out is None:
            out = row.copy()
        elif how == "max":
            np.maximum(out, row, out=out)
        else:
            out += row
    return (np.zeros(int(retriever.scores["num_docs"])) if out is None else out), unmatched


@dataclass
class BM25Index:
    """The pool side: a bm25s index with one document per pool example, in ``ids`` order."""

    ids: list[str]
    retriever: bm25s.BM25
    stopwords: str | None

    def scores(self, queries: list[str]) -> np.ndarray:
        """(n_queries, len(ids)) float64."""
        return query_scores(self.retriever, queries, self.stopwords)

    def aggregate(self, queries: list[str], how: str) -> tuple[np.ndarray, int]:
        """(len(ids),) float64 max or sum over queries, and the queries matching nothing."""
        return aggregate_scores(self.retriever, queries, self.stopwords, how)

    @classmethod
    def load(cls, path: Path, stopwords: str | None) -> BM25Index:
        ids = json.loads((path / "ids.json").read_text())
        retriever = bm25s.BM25.load(path / "index", show_progress=False)
        return cls(ids, retriever, stopwords)


@dataclass(frozen=True)
class BM25Pass(FeatureRequest[BM25Index]):
    """The pool's BM25 index (target-agnostic: cached once per pool and knobs)."""

    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"
    stopwords: str | None = "en"

    def needs_warmup(self) -> bool:
        return False  # text only

    def key(self, cfg: DictConfig) -> str:
        return artifact_key(
            {
                "pool": pool_spec(cfg),
                "text": "all",
                "bm25": {"k1": self.k1, "b": self.b, "method": self.method},
                "tokenizer": {"bm25s": bm25s.__version__, "stopwords": self.stopwords},
            }
        )

    def estimate(self, cfg: DictConfig, sizes: Sizes) -> list[Planned]:
        what = f"pool BM25 index ({self.method}, k1={self.k1}, b={self.b})"
        return [Planned("bm25_index", what, self.key(cfg), sizes.pool, None, None)]

    def index(self, texts: list[str]) -> bm25s.BM25:
        return build_index(texts, self.k1, self.b, self.method, self.stopwords)

    def build(self, ctx: RunContext, inputs: FeatureInputs) -> Features[BM25Index]:
        pool, key = inputs.pool, self.key(ctx.cfg)

        def build(work: Path) -> None:
            log.info("bm25: indexing %d pool examples", len(pool))
            self.index([example_text(e, "all") for e in pool]).save(
                work / "index", show_progress=False
            )
            (work / "ids.json").write_text(json.dumps([e.id for e in pool]))

        art = ctx.artifact("bm25_index", key, build)
        value = BM25Index.load(art.path, self.stopwords)
        nbytes = sum(f.stat().st_size for f in art.path.rglob("*") if f.is_file())
        return Features(value, key, [art.costed("pool", nbytes, len(pool))])


class BM25Selector(Selector[BM25Index]):
    name = "bm25"

    def __init__(
        self,
        query: str = "prompt",
        aggregate: str = "max",
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        stopwords: str | None = "en",
    ):
        one_of("bm25", "query", query, QUERIES)
        one_of("bm25", "aggregate", aggregate, AGGREGATES)
        one_of("bm25", "method", method, METHODS)
        if stopwords is not None and not isinstance(stopwords, str):
            raise ValueError(
                f"bm25: stopwords must be a language code (en) or null, got {stopwords!r}"
            )
        self.query, self.aggregate = query, aggregate
        self.k1, self.b, self.method, self.stopwords = float(k1), float(b), method, stopwords

    def request(self) -> BM25Pass:
        return BM25Pass(self.k1, self.b, self.method, self.stopwords)

    def select(
        self,
        pool: list[Example],
        target: Target,
        budget: int,
        seed: int,
        features: BM25Index | None = None,
    ) -> Selection:
        if not isinstance(features, BM25Index):
            raise ValueError("bm25 needs the pipeline's BM25 index of the pool (its request)")
        at = {i: r for r, i in enumerate(features.ids)}
        missing = [e.id for e in pool if e.id not in at]
        if missing:
            raise KeyError(
                f"bm25: {len(missing)} candidates are not in the index, e.g. {missing[:3]}"
            )
        rows = np.array([at[e.id] for e in pool], dtype=np.int64)
        queries = [example_text(v, self.query) for v in target.validation]
        scores, unmatched = features.aggregate(queries, self.aggregate)
        scores = scores[rows]
        # exact scores (see the module docstring): no tolerance, ties by pool order
        top, vals = top_k(scores, budget, 0.0, lambda p: scores[p])
        return Selection.of(
            pool,
            top,
            [float(s) for s in vals],
            aggregate=self.aggregate,
            query=self.query,
            queries=len(queries),
            queries_matching_nothing=unmatched,
            score_mean_selected=float(np.mean(vals)),
            score_mean_candidates=float(np.mean(scores)),
            zero_score_selected=int((vals <= 0).sum()),
        )
