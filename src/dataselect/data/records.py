"""The one record type every source is read into.

An ``Example`` is a chat: ``messages`` is a tuple of ``{"role", "content"}`` turns whose last
turn is the assistant's answer. ``id`` is stable and unique within a pool, ``source`` names
where it came from (``reasoning_gym/chain_sum``, ``gsm8k/train``), ``meta`` carries extra
labels such as ``subtask`` (BBH task, reasoning-gym family) and the gold ``answer`` used by
evaluation. ``where`` (``file:line``, ``reasoning_gym/gcd[3]``) says where the record was read;
it is not part of the example's identity and is not written out.

``Examples`` is what the readers return: a list of examples that also counts the malformed
records skipped on the way (``on_error: skip``), per file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """A malformed record; the message names the file, line and field where known."""


@dataclass(frozen=True)
class Example:
    id: str
    source: str
    messages: tuple[dict[str, str], ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    where: str = field(default="", compare=False, hash=False, repr=False)

    @property
    def prompt(self) -> str:
        """The last user turn: what an evaluator asks the model."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]

    @property
    def subtask(self) -> str:
        return str(self.meta.get("subtask", self.source))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "messages": list(self.messages),
            "meta": self.meta,
        }


def make_example(
    id: str,
    source: str,
    messages: Sequence[dict[str, Any]],
    meta: dict[str, Any] | None = None,
    where: str = "",
) -> Example:
    """Validate and build an ``Example``; ``where`` (``file:line``) prefixes every error."""
    at = f"{where}: " if where else ""
    if not isinstance(id, str) or not id:
        raise RecordError(f"{at}field 'id' must be a non-empty string, got {id!r}")
    if not messages:
        raise RecordError(f"{at}record {id!r}: field 'messages' is empty")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(f"{at}record {id!r}: messages[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RecordError(f"{at}record {id!r}: messages[{i}].role {m['role']!r} not in {ROLES}")
        if not isinstance(m["content"], str):
            raise RecordError(f"{at}record {id!r}: messages[{i}].content must be a string")
        turns.append({"role": m["role"], "content": m["content"]})
    if turns[-1]["role"] != "assistant":
        raise RecordError(f"{at}record {id!r}: the last turn must be the assistant's answer")
    if not turns[-1]["content"].strip():
        raise RecordError(
            f"{at}record {id!r}: field 'messages[{len(turns) - 1}].content' (the answer) is empty"
        )
    if not any(t["role"] == "user" and t["content"].strip() for t in turns):
        raise RecordError(f"{at}record {id!r}: no non-empty user turn")
    return Example(id=id, source=source, messages=tuple(turns), meta=dict(meta or {}), where=where)


class Examples(list):
    """A list of examples plus ``skipped``: {file (or hub split): malformed records skipped}."""

    def __init__(self, items: Iterable[Example] = (), skipped: dict[str, int] | None = None):
        super().__init__(items)
        self.skipped: dict[str, int] = dict(skipped or {})

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


def check_unique_ids(examples: Iterable[Example], what: str) -> None:
    """Ids must be unique; the error names both records' locations (``file:line``)."""
    seen: dict[str, Example] = {}
    for ex in examples:
        if ex.id in seen:
            first = seen[ex.id]
            both = first.where or ex.where
            where = f": {first.where or '?'} and {ex.where or '?'}" if both else ""
            raise RecordError(
                f"{what}: duplicate id {ex.id!r}{where} (fix the ids, or give one of the sources "
                "an id_prefix)"
            )
        seen[ex.id] = ex
