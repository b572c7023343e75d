"""Random selection: the baseline every other selector must beat.

Each candidate gets a seeded uniform score; the top ``budget`` scores are chosen. That is a
uniform sample without replacement, and the scores make it a ranking like any other.
"""

from __future__ import annotations

import torch

from dataselect.data.records import Example
from dataselect.data.targets import Target
from dataselect.selectors.base import Selection, Selector, composition


class RandomSelector(Selector[None]):
    name = "random"

    def select(
        self, pool: list[Example], target: Target, budget: int, seed: int, features: None = None
    ) -> Selection:
        gen = torch.Generator().manual_seed(seed)
        scores = torch.rand(len(pool), generator=gen, dtype=torch.float64)
        top = torch.topk(scores, budget).indices.tolist()
        chosen = [pool[i] for i in top]
        return Selection(
            ids=[e.id for e in chosen],
            scores=[float(scores[i]) for i in top],
            diagnostics={"composition": composition(chosen)},
        )
