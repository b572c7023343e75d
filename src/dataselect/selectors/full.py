"""Full data: the whole candidate pool, the papers' "full data" row (G2IS's main table).

The budget is ignored: every candidate (the pool minus target overlap minus examples with no
answer tokens) is selected, in pool order, and ``metrics.json`` reports the count as the
budget. What a selection method is measured against from above: a selector that beats full
data at 1-5% of it has earned its cost.
"""

from __future__ import annotations

from dataselect.data.records import Example
from dataselect.data.targets import Target
from dataselect.selectors.base import Selection, Selector, composition


class FullSelector(Selector[None]):
    name = "full"

    def budget(self, requested: float | int, candidates: int, rounding: str = "nearest") -> int:
        if candidates < 1:
            raise ValueError("full: the pool has no candidates left; nothing to train on")
        return candidates

    def select(
        self, pool: list[Example], target: Target, budget: int, seed: int, features: None = None
    ) -> Selection:
        return Selection(
            ids=[e.id for e in pool],
            scores=[1.0] * len(pool),
            diagnostics={"composition": composition(pool), "full": True},
        )
