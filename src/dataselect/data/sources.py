"""Pools and targets from their configs: a list of sources, each read by a registered reader.

A source spec is a mapping with a ``kind``:

- ``reasoning_gym``: ``name``, ``n``, ``seed``, optional ``answer_format`` and ``config``;
- ``json``: ``path`` (relative paths resolve against ``paths.data_dir``), optional ``source``;
- ``hub``: ``path``, ``split``, optional ``name`` (needs hub access).

``cap`` on a source keeps a seeded random subset of at most that many examples.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataselect.data.readers import (
    drop_overlapping,
    read_hub,
    read_json_file,
    read_reasoning_gym,
)
from dataselect.data.records import Example, RecordError, check_unique_ids

log = logging.getLogger(__name__)

READERS: dict[str, Callable[[dict[str, Any], Path], list[Example]]] = {
    "reasoning_gym": lambda s, _: read_reasoning_gym(
        s["name"], int(s["n"]), int(s["seed"]), s.get("answer_format", "answer"), s.get("config")
    ),
    "json": lambda s, d: read_json_file(
        _resolve(s["path"], d), s.get("source"), s.get("shape", "auto")
    ),
    "hub": lambda s, _: read_hub(
        s["path"], s.get("split", "train"), s.get("name"), s.get("source")
    ),
}


def register_reader(kind: str):
    """Decorator: ``@register_reader("gsm8k") def read(spec, data_dir) -> list[Example]``."""

    def deco(fn: Callable[[dict[str, Any], Path], list[Example]]):
        READERS[kind] = fn
        return fn

    return deco


def _resolve(path: str, data_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(data_dir) / p


def read_source(spec: dict[str, Any], data_dir: Path) -> list[Example]:
    kind = spec.get("kind")
    if kind not in READERS:
        raise RecordError(f"source {spec}: unknown kind {kind!r}; known: {sorted(READERS)}")
    examples = READERS[kind](spec, Path(data_dir))
    cap = spec.get("cap")
    if cap is not None and len(examples) > cap:
        examples = random.Random(int(spec.get("seed", 0))).sample(examples, int(cap))
    return examples


def read_sources(specs: list[dict[str, Any]], data_dir: Path, what: str) -> list[Example]:
    out: list[Example] = []
    for spec in specs:
        out += read_source(dict(spec), data_dir)
    check_unique_ids(out, what)
    return out


@dataclass
class Target:
    """A target task: validation examples (for selection) and test examples (for evaluation)."""

    name: str
    validation: list[Example]
    test: list[Example]
    answer_type: str = "number"
    stats: dict[str, int] = field(default_factory=dict)


def load_target(cfg, data_dir: Path) -> Target:
    """Read a target; test items that repeat a validation prompt are dropped (and counted)."""
    validation = read_sources(list(cfg.validation), data_dir, f"target {cfg.name} validation")
    test = read_sources(list(cfg.test), data_dir, f"target {cfg.name} test")
    test, overlap = drop_overlapping(test, validation)
    if not validation:
        raise RecordError(f"target {cfg.name}: the validation set is empty")
    if not test:
        raise RecordError(f"target {cfg.name}: no test items")
    stats = {"validation": len(validation), "test": len(test), "test_dropped_overlap": overlap}
    return Target(cfg.name, validation, test, cfg.get("answer_type", "number"), stats)


def load_pool(cfg, data_dir: Path) -> list[Example]:
    """Read a pool. It is target-agnostic (one warmup serves every target); selection removes
    the candidates that repeat a target's validation or test prompts (``candidates``)."""
    pool = read_sources(list(cfg.sources), data_dir, f"pool {cfg.name}")
    if not pool:
        raise RecordError(f"pool {cfg.name}: no examples")
    return pool


def candidates(pool: list[Example], target: Target) -> tuple[list[Example], int]:
    """The pool minus examples whose prompt repeats a validation or test prompt of the target."""
    return drop_overlapping(pool, target.validation + target.test)
