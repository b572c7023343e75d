"""Length: the longest examples (Zhao et al., 2024, "Long Is More for Alignment"; the GIST
paper's "length" row).

    n(z) = the number of answer tokens of z (``by=answer``), or of all its tokens (``by=total``),
           in the model's chat format, cut at ``model.max_length`` as training sees it
    select the global top-k by n(z); equal lengths go to pool order

No model pass and no target: a cheap, strong baseline for instruction tuning, since longer
responses carry more supervision per example.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from dataselect.cache import digest
from dataselect.context import Planned, RunContext, Sizes
from dataselect.data.records import Example
from dataselect.data.targets import Target
from dataselect.features.request import FeatureInputs, FeatureRequest, Features
from dataselect.keys import model_spec, pool_spec
from dataselect.selectors.base import Selection, Selector, one_of
from dataselect.selectors.ranking import top_k

BY = ("answer", "total")


@dataclass(frozen=True)
class TokenCounts(FeatureRequest[dict[str, tuple[int, int]]]):
    """Example id -> (answer tokens, total tokens) after truncation; from the run's
    tokenization (memoized), so nothing is cached on disk."""

    def needs_warmup(self) -> bool:
        return False

    def key(self, cfg: DictConfig) -> str:
        return digest({"token_counts": model_spec(cfg), "pool": pool_spec(cfg)})

    def estimate(self, cfg: DictConfig, sizes: Sizes) -> list[Planned]:
        return []

    def build(self, ctx: RunContext, inputs: FeatureInputs) -> Features:
        toks, _ = ctx.tokenize(inputs.pool, "pool")
        counts = {t.id: (t.n_loss_tokens, len(t.input_ids)) for t in toks}
        return Features(counts, self.key(ctx.cfg))


class LengthSelector(Selector[dict[str, tuple[int, int]]]):
    name = "length"

    def __init__(self, by: str = "answer"):
        one_of("length", "by", by, BY)
        self.by = by

    def request(self) -> TokenCounts:
        return TokenCounts()

    def select(
        self,
        pool: list[Example],
        target: Target,
        budget: int,
        seed: int,
        features: dict[str, tuple[int, int]] | None = None,
    ) -> Selection:
        if features is None:
            raise ValueError("length needs token counts (the pipeline's features stage)")
        col = BY.index(self.by)
        score = np.array([features[e.id][col] for e in pool], dtype=np.float64)
        top, val = top_k(score, budget, 0.0, lambda p: score[p])  # integers: exact
        return Selection.of(
            pool,
            top,
            val.tolist(),
            by=self.by,
            tokens_mean_pool=float(score.mean()),
            tokens_mean_selected=float(val.mean()),
        )
