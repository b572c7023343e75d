"""Targets: one or more tasks, each with validation examples (for selection), test items and
few-shot demonstrations (for evaluation).

``cfg.target`` maps task names to task configs, so ``target=gsm8k`` is a one-task target and
``target=[gsm8k,bbh]`` a multi-task one. A multi-task target's validation set is the union of
its tasks' (each example keeps its subtask label: LESS and GIST take the max over subtasks,
G2IS finds its components in it) and it is evaluated on every task.

Errors name the task and its config key (``target.gsm8k.validation[0]``): a missing file, an
empty validation set, no test items, a duplicate validation id across tasks.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

import dataselect.data.benchmarks  # noqa: F401  (registers the gsm8k / bbh source kinds)
from dataselect.config import task_config
from dataselect.data.readers import drop_overlapping
from dataselect.data.records import Example, RecordError, check_unique_ids
from dataselect.data.sources import read_sources

log = logging.getLogger(__name__)


@dataclass
class Task:
    name: str
    validation: list[Example]
    test: list[Example]
    fewshot: list[Example] = field(default_factory=list)
    answer_type: str = "number"
    max_length: int | None = None  # token limit of validation examples (None: the model's)
    dropped_test: int = 0  # test items equal to a validation example or a demonstration


@dataclass
class Target:
    tasks: list[Task]
    stats: dict[str, int] = field(default_factory=dict)

    @classmethod
    def single(
        cls, name: str, validation: list[Example], test: list[Example], answer_type: str = "number"
    ) -> Target:
        """A one-task target built in code (tests, benchmarks)."""
        return cls([Task(name, validation, test, answer_type=answer_type)])

    @property
    def name(self) -> str:
        return "+".join(t.name for t in self.tasks)

    @property
    def validation(self) -> list[Example]:
        return [ex for t in self.tasks for ex in t.validation]

    @property
    def test(self) -> list[Example]:
        return [ex for t in self.tasks for ex in t.test]

    @property
    def answer_type(self) -> str:
        return self.tasks[0].answer_type


def _origins(examples: list[Example]) -> str:
    """The files (or generators) examples were read from: ``where`` less the line/index."""
    seen = dict.fromkeys(re.sub(r"(:\d+|\[\d+\])$", "", e.where) or e.source for e in examples)
    names = list(seen)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def load_task(name: str, cfg: DictConfig, data_dir: Path) -> Task:
    """Read a task; test items that repeat a validation prompt or a few-shot demonstration
    are dropped (and counted), so no test item is ever a demonstration or a target example.

    An empty validation set or no test items (none listed, an empty file, or every item
    dropped as a repeat) is an error naming the task, its config key and the files."""
    key = f"target.{name}"
    for part in ("validation", "test"):
        if not cfg.get(part):
            raise RecordError(
                f"target {name}: no {part} sources; set {key}.{part} "
                "(e.g. [{kind: json, path: my_" + part + ".jsonl}])"
            )
    validation = read_sources(
        list(cfg.validation), data_dir, f"target {name} validation", f"{key}.validation"
    )
    test = read_sources(list(cfg.test), data_dir, f"target {name} test", f"{key}.test")
    fewshot = read_sources(
        list(cfg.get("fewshot") or []), data_dir, f"target {name} fewshot", f"{key}.fewshot"
    )
    if not validation:  # read_sources refuses empty sources; kept as a guard
        raise RecordError(f"target {name}: the validation set is empty ({key}.validation)")
    n_test = len(test)
    kept, overlap = drop_overlapping(test, validation + fewshot)
    if not kept:
        raise RecordError(
            f"target {name}: no test items: all {n_test} test items of {_origins(test)} repeat "
            f"a validation or few-shot prompt and were dropped (change {key}.test or "
            f"{key}.validation)"
        )
    test = kept
    if overlap:
        log.info(
            "target %s: dropped %d test items equal to a validation/few-shot one", name, overlap
        )
    return Task(
        name,
        validation,
        test,
        fewshot,
        cfg.get("answer_type", "number"),
        cfg.get("max_length"),
        overlap,
    )


def load_target(cfg: DictConfig, data_dir: Path) -> Target:
    if not cfg:
        raise RecordError("no target: choose one, e.g. target=gsm8k or target=[gsm8k,bbh]")
    tasks = [load_task(name, task_config(name, t), data_dir) for name, t in cfg.items()]
    target = Target(tasks)
    check_unique_ids(target.validation, f"target {target.name} validation")
    target.stats = {
        "validation": len(target.validation),
        "test": len(target.test),
        "test_dropped_overlap": sum(t.dropped_test for t in tasks),
    }
    return target


def candidates(
    pool: list[Example], target: Target, ngram: int = 13, exact: bool = True
) -> tuple[list[Example], dict]:
    """The pool minus examples that repeat a validation prompt, or overlap a test item
    (same prompt, or a shared word ``ngram``-gram; see ``dataselect.data.decontam``)."""
    from dataselect.data.decontam import decontaminate

    kept, val_overlap = drop_overlapping(pool, target.validation)
    kept, report = decontaminate(kept, target.test, ngram=ngram, exact=exact)
    report = {"validation_overlap": val_overlap, **report}
    report["removed"] = len(pool) - len(kept)
    return kept, report
