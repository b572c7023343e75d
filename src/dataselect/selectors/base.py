"""The selector interface, the budget rule and the ``Selection`` result."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dataselect.data.records import Example
from dataselect.data.targets import Target


class BudgetError(ValueError):
    pass


def resolve_budget(budget: float | int, pool_size: int) -> int:
    """A fraction in (0, 1] (a float: 0.05 = 5% of the pool) or a count (an int: 500).

    A fraction rounds to the nearest count and never below one example. Every error states
    the budget and the pool size (the candidates left after decontamination and truncation),
    and says how to fix it; an empty candidate pool is an error, never an empty selection.
    """
    pool = f"the pool has {pool_size} candidates"
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise BudgetError(
            f"budget must be a fraction (0.05) or a count (500), got {budget!r} ({pool})"
        )
    if pool_size < 1:
        raise BudgetError(
            f"budget {budget}: the pool has no candidates left (after removing target overlap "
            "and examples with no answer tokens); nothing to select from"
        )
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            count = budget > 1 and budget.is_integer()
            hint = f"; for a count write an integer (budget={int(budget)})" if count else ""
            raise BudgetError(f"budget fraction {budget} must be in (0, 1] ({pool}){hint}")
        return max(1, round(budget * pool_size))
    if budget < 1:
        raise BudgetError(f"budget count {budget} must be at least 1 ({pool})")
    if budget > pool_size:
        raise BudgetError(
            f"budget {budget} is larger than the pool ({pool_size} candidates); "
            f"set budget to at most {pool_size} or a fraction"
        )
    return budget


@dataclass
class Selection:
    """The chosen ids, best first, with their scores and the selector's diagnostics."""

    ids: list[str]
    scores: list[float]
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def write_jsonl(self, path: Path) -> None:
        with open(path, "w") as fh:
            for rank, (i, s) in enumerate(zip(self.ids, self.scores, strict=True)):
                fh.write(json.dumps({"id": i, "score": s, "rank": rank}) + "\n")

    @classmethod
    def read_jsonl(cls, path: Path, diagnostics: dict[str, Any] | None = None) -> Selection:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
        rows.sort(key=lambda r: r["rank"])
        return cls([r["id"] for r in rows], [r["score"] for r in rows], diagnostics or {})


def composition(chosen: list[Example]) -> dict[str, int]:
    """How many chosen examples come from each source: the first thing to look at."""
    return dict(Counter(e.source for e in chosen).most_common())


class Selector(ABC):
    """Subclasses read like their paper's algorithm box; knobs arrive as constructor kwargs."""

    name: ClassVar[str]
    needs_features: ClassVar[bool] = False  # True: the pipeline runs the features stage first

    def feature_overrides(self) -> dict[str, Any]:
        """Changes to the ``features`` config this selector needs (e.g. SGD, one checkpoint)."""
        return {}

    def needs_pool_pass(self) -> bool:
        """True: a per-target pass over the pool (exact GIST) instead of the shared store."""
        return False

    @abstractmethod
    def select(
        self, pool: list[Example], target: Target, budget: int, seed: int, features: Any = None
    ) -> Selection:
        """Choose ``budget`` examples of ``pool`` for ``target``."""
