"""What a selector asks the framework to compute before it selects: a feature request.

A request is a frozen dataclass whose fields say what is needed (a gradient type and
checkpoints; a subspace rank; an embedding model...). The framework treats every request
the same way: ``key`` names what it builds (the selection's cache key includes it),
``estimate`` prices it for the dry run from the same keys, and ``build`` computes it through
the run context's artifacts (so it is cached, locked and resumed like every artifact) and
returns ``Features``: the typed value the selector's ``select`` receives, plus the artifacts
it used (with their costs), diagnostics and, optionally, gradient spectra for the run's plot.
A request that only depends on the model and the pool is shared across targets, budgets and
selectors through its artifacts' keys.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from omegaconf import DictConfig

from dataselect.context import Artifact, Planned, RunContext, Sizes
from dataselect.data.records import Example
from dataselect.data.targets import Target

T = TypeVar("T")


@dataclass(frozen=True)
class FeatureInputs:
    """What a request is computed from."""

    pool: list[Example]
    target: Target
    warmup_dir: Path | None  # the warmup artifact (one LoRA checkpoint per epoch); None when
    # the request does not need one (``needs_warmup``)


@dataclass
class Features(Generic[T]):
    value: T  # what ``Selector.select`` receives
    key: str  # names ``value``: part of the selection's cache key
    artifacts: list[Artifact] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    spectra: dict[str, Any] = field(default_factory=dict)  # checkpoint -> eigvals of G G^T


class FeatureRequest(ABC, Generic[T]):
    """Subclasses are frozen dataclasses; see the module docstring."""

    def needs_warmup(self) -> bool:
        """Whether ``build`` reads the warmup's checkpoints (gradient features do; a request
        on the base model or on text does not, and then the run trains no warmup)."""
        return True

    @abstractmethod
    def key(self, cfg: DictConfig) -> str:
        """The key of what ``build`` returns, from the config alone."""

    @abstractmethod
    def estimate(self, cfg: DictConfig, sizes: Sizes) -> list[Planned]:
        """The artifacts ``build`` would use, with their keys, examples and bytes."""

    @abstractmethod
    def build(self, ctx: RunContext, inputs: FeatureInputs) -> Features[T]:
        """Compute (or reuse) the artifacts and return the selector's typed value."""
