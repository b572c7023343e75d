"""The selector interface, the budget rule and the ``Selection`` result."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from dataselect.data.records import Example
from dataselect.data.targets import Target
from dataselect.features.request import FeatureRequest


class BudgetError(ValueError):
    pass


ROUNDINGS = ("nearest", "floor")


def resolve_budget(budget: float | int, pool_size: int, rounding: str = "nearest") -> int:
    """A fraction in (0, 1] (a float: 0.05 = 5% of the pool) or a count (an int: 500).

    A fraction becomes a count by ``rounding``: ``nearest`` (this project's default) or
    ``floor``, the authors' ``int(p * N)`` (LESS, GIST and G2IS all truncate; the paper
    presets set it), and never below one example. Every error states
    the budget and the pool size (the candidates left after decontamination and truncation),
    and says how to fix it; an empty candidate pool is an error, never an empty selection.
    """
    pool = f"the pool has {pool_size} candidates"
    if rounding not in ROUNDINGS:
        raise BudgetError(f"budget_rounding must be one of {ROUNDINGS}, got {rounding!r}")
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
        count = int(budget * pool_size) if rounding == "floor" else round(budget * pool_size)
        return max(1, count)
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

    @classmethod
    def of(cls, pool: list[Example], positions, scores, **diagnostics: Any) -> Selection:
        """The pool examples at ``positions`` (best first) with their ``scores``; the
        diagnostics lead with the selection's composition by source."""
        chosen = [pool[int(i)] for i in positions]
        return cls(
            [e.id for e in chosen],
            [float(x) for x in scores],
            {"composition": composition(chosen), **diagnostics},
        )

    def write_jsonl(self, path: Path) -> None:
        with open(path, "w") as fh:
            for rank, (i, s) in enumerate(zip(self.ids, self.scores, strict=True)):
                fh.write(json.dumps({"id": i, "score": s, "rank": rank}) + "\n")

    @classmethod
    def read_jsonl(cls, path: Path, diagnostics: dict[str, Any] | None = None) -> Selection:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
        rows.sort(key=lambda r: r["rank"])
        return cls([r["id"] for r in rows], [r["score"] for r in rows], diagnostics or {})


def subtask_groups(validation: list[Example]) -> tuple[list[str], list[np.ndarray]]:
    """Subtask names (first-seen order) and the validation positions of each."""
    names: list[str] = []
    for ex in validation:
        if ex.subtask not in names:
            names.append(ex.subtask)
    labels = np.array([names.index(ex.subtask) for ex in validation])
    return names, [np.flatnonzero(labels == k) for k in range(len(names))]


def one_of(selector: str, knob: str, value: Any, options) -> None:
    """A knob's value checked against its options, with the error every selector gives."""
    if value not in options:
        raise ValueError(f"{selector}: {knob} must be one of {tuple(options)}, got {value!r}")


def composition(chosen: list[Example]) -> dict[str, int]:
    """How many chosen examples come from each source: the first thing to look at."""
    return dict(Counter(e.source for e in chosen).most_common())


F = TypeVar("F")


class Selector(ABC, Generic[F]):
    """Subclasses read like their paper's algorithm box; knobs arrive as constructor kwargs.

    ``request`` declares the features the selector needs (a ``FeatureRequest`` whose build
    returns an ``F``, or None); the framework builds, caches, resumes and prices it, and
    ``select`` receives what it built."""

    name: ClassVar[str]

    def request(self) -> FeatureRequest[F] | None:
        """The features to compute before selecting (None: none)."""
        return None

    def budget(self, requested: float | int, candidates: int, rounding: str = "nearest") -> int:
        """How many to select of ``candidates`` (``full`` overrides: all of them)."""
        return resolve_budget(requested, candidates, rounding)

    @abstractmethod
    def select(
        self, pool: list[Example], target: Target, budget: int, seed: int, features: F | None = None
    ) -> Selection:
        """Choose ``budget`` examples of ``pool`` for ``target``."""
