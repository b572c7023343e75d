"""Readers: every source becomes a list of ``Example``.

Local JSON / JSONL in the common shapes (detected per record, in this order):

| shape | fields |
|---|---|
| chat | ``messages`` (list of role/content turns, last = assistant) |
| ShareGPT | ``conversations`` (list of from/value turns: human, gpt, system) |
| prompt/completion | ``prompt``, ``completion`` |
| alpaca | ``instruction``, optional ``input``, ``output`` |
| QA | ``question``, ``answer`` (GSM8K) |
| BBH | ``input``, ``target`` |

Plus reasoning-gym generators and hub datasets (``datasets.load_dataset``, same shapes).
Every error names the file, the line and the field: invalid JSON (or UTF-8), a record of no
known shape or missing a shape's field (``instruction`` without ``output``), a field of the
wrong type, an empty or whitespace-only answer. With ``on_error="skip"`` such records are
skipped instead, counted (``Examples.skipped``: {file: count}) and reported in one warning per
source. A file with no records, or whose every record was skipped, is an error either way.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from dataselect.data.records import Example, Examples, RecordError, make_example

log = logging.getLogger(__name__)

SHAPES = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "qa": ("question", "answer"),
    "input_target": ("input", "target"),
}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
ON_ERROR = ("raise", "skip")


class Skipped:
    """The malformed records a source read with ``on_error="skip"`` passed over."""

    def __init__(self, source: str, location: str = "") -> None:
        self.source = source
        self.location = location or source  # the file (or hub split) the records came from
        self.count = 0
        self.reasons: list[str] = []

    def add(self, error: RecordError) -> None:
        self.count += 1
        if len(self.reasons) < 3:
            self.reasons.append(str(error))

    def warn(self) -> None:
        if self.count:
            log.warning(
                "source %s: skipped %d malformed records; first reasons: %s",
                self.source,
                self.count,
                " | ".join(self.reasons),
            )


def _skipped(on_error: str, source: str, location: str = "") -> Skipped | None:
    if on_error not in ON_ERROR:
        raise RecordError(f"source {source}: on_error {on_error!r} not in {ON_ERROR}")
    return Skipped(source, location) if on_error == "skip" else None


def detect_shape(record: dict[str, Any]) -> str:
    for shape, fields in SHAPES.items():
        if all(f in record for f in fields):
            return shape
    return ""


def _missing_fields(record: dict[str, Any]) -> str:
    """'field 'output' is missing (...)' for each shape the record has part of, else ''."""
    hints = []
    for fields in SHAPES.values():
        have = [f for f in fields if f in record]
        if have and len(have) < len(fields):
            missing = next(f for f in fields if f not in record)
            hints.append(f"field {missing!r} is missing ({'+'.join(fields)} records need both)")
    return "; or ".join(hints)


def _text(record: dict[str, Any], field: str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise RecordError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return str(value)


def record_to_example(
    record: dict[str, Any], source: str, default_id: str, where: str, shape: str = "auto"
) -> Example:
    """Convert one raw record of any supported shape into an ``Example``."""
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
    shape = detect_shape(record) if shape == "auto" else shape
    expected = "expected one of " + "; ".join("+".join(f) for f in SHAPES.values())
    if not shape:
        if hint := _missing_fields(record):
            raise RecordError(f"{where}: {hint}; the record has fields {sorted(record)}")
        raise RecordError(f"{where}: unknown record shape with fields {sorted(record)}; {expected}")
    if shape not in SHAPES:
        raise RecordError(f"{where}: shape {shape!r} not in {sorted(SHAPES)}")
    if missing := [f for f in SHAPES[shape] if f not in record]:
        raise RecordError(f"{where}: field {missing[0]!r} is missing (shape {shape})")
    rid = record.get("id")
    rid = default_id if rid is None or rid == "" else rid
    meta = record.get("meta") or {}
    if not isinstance(meta, dict):
        raise RecordError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
    meta = dict(meta)
    if shape in ("messages", "sharegpt"):
        field, text = ("messages", "content") if shape == "messages" else ("conversations", "value")
        turns = record[field]
        if not isinstance(turns, list):
            raise RecordError(f"{where}: field {field!r} must be a list")
        messages = turns if shape == "messages" else _sharegpt_messages(turns, where)
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        content = last.get("content")
        if last.get("role") == "assistant" and isinstance(content, str) and not content.strip():
            raise RecordError(
                f"{where}: record {str(rid)!r}: field '{field}[{len(turns) - 1}].{text}' "
                "(the answer) is empty"
            )
    else:
        if shape == "prompt_completion":
            user, answer = _text(record, "prompt", where), _text(record, "completion", where)
        elif shape == "alpaca":
            user = _text(record, "instruction", where)
            if record.get("input"):
                user += "\n\n" + _text(record, "input", where)
            answer = _text(record, "output", where)
        elif shape == "qa":
            user, answer = _text(record, "question", where), _text(record, "answer", where)
        else:
            user, answer = _text(record, "input", where), _text(record, "target", where)
        if not answer.strip():
            field = SHAPES[shape][-1]
            raise RecordError(
                f"{where}: record {str(rid)!r}: field {field!r} (the answer) is empty"
            )
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        meta.setdefault("answer", answer)
    source = str(record.get("source") or source)
    return make_example(str(rid), source, messages, meta, where=where)


def _sharegpt_messages(turns: Any, where: str) -> list[dict[str, Any]]:
    """ShareGPT ``conversations`` (``{"from": "human"|"gpt"|"system", "value"}``) as chat turns."""
    if not isinstance(turns, list):
        raise RecordError(f"{where}: field 'conversations' must be a list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RecordError(f"{where}: conversations[{i}] needs 'from' and 'value'")
        if turn["from"] not in SHAREGPT_ROLES:
            raise RecordError(
                f"{where}: conversations[{i}].from {turn['from']!r} not in {tuple(SHAREGPT_ROLES)}"
            )
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def _convert(
    rows: Iterable[tuple[int, Any]],
    source: str,
    where: Callable[[int], str],
    shape: str,
    skipped: Skipped | None,
    location: str,
) -> Examples:
    """Records to examples; a malformed one raises, or is counted in ``skipped`` when given.

    No examples at all is an error: an empty file, or every record skipped."""
    out = []
    for i, record in rows:
        try:
            out.append(record_to_example(record, source, f"{source}-{i}", where(i), shape))
        except RecordError as e:
            if skipped is None:
                raise
            skipped.add(e)
    n_skipped = skipped.count if skipped is not None else 0
    if not out and n_skipped:
        raise RecordError(
            f"{location}: all {n_skipped} records were skipped as malformed (on_error: skip); "
            f"first reasons: {' | '.join(skipped.reasons)}"
        )
    if not out:
        raise RecordError(f"{location}: no records")
    if skipped is not None:
        skipped.warn()
    return Examples(out, {location: n_skipped} if n_skipped else None)


def iter_json_records(path: Path, skipped: Skipped | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, record) for a JSONL file, or (index + 1, record) for a JSON array file.

    An invalid JSONL line (bad JSON or not UTF-8) raises, or is counted in ``skipped`` when
    given. A file with no records at all raises."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise RecordError(f"{path}:{line}: not UTF-8 text ({e.reason})") from e
        if not text.strip():
            raise RecordError(f"{path}: no records (the file is empty)")
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            hint = " (one record per line? name the file .jsonl)" if e.msg == "Extra data" else ""
            raise RecordError(f"{path}:{e.lineno}: invalid JSON: {e.msg}{hint}") from e
        if isinstance(records, dict) and "examples" in records:  # BBH layout
            records = records["examples"]
        if not isinstance(records, list):
            raise RecordError(f"{path}: expected a list of records (or {{'examples': [...]}})")
        if not records:
            raise RecordError(f"{path}: no records (an empty list)")
        yield from enumerate(records, start=1)
        return
    nonblank = 0
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        nonblank += 1
        try:
            record = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if isinstance(e, json.JSONDecodeError):
                why = f"invalid JSON: {e.msg} (column {e.colno})"
            else:
                why = f"not UTF-8 text (byte {e.start + 1} of the line)"
            error = RecordError(f"{path}:{lineno}: {why}")
            if skipped is None:
                raise error from e
            skipped.add(error)
            continue
        yield lineno, record
    if not nonblank:
        raise RecordError(f"{path}: no records (the file is empty)")


def read_json_file(
    path: str | Path, source: str | None = None, shape: str = "auto", on_error: str = "raise"
) -> Examples:
    path = Path(path)
    source = source or path.stem
    skipped = _skipped(on_error, source, str(path))
    rows = iter_json_records(path, skipped)
    return _convert(rows, source, lambda i: f"{path}:{i}", shape, skipped, str(path))


def read_reasoning_gym(
    name: str, size: int, seed: int, answer_format: str = "answer", config: dict | None = None
) -> Examples:
    """``size`` items of a reasoning-gym family; ids ``rg/<name>/<seed>/<i>``.

    Many generators draw item ``i`` from ``Random(seed + i)``, so seeds s and s + 1 share
    all but one item: space the seeds of sets meant to be disjoint by more than their sizes
    (the targets' overlap check drops repeats and counts them, but the set shrinks).

    ``answer_format``: ``answer`` (the bare final answer) or ``cot`` (the worked solution the
    generator provides, where it does, followed by the answer).
    """
    import reasoning_gym

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise RecordError(f"reasoning_gym/{name}: field 'n' must be at least 1, got {size!r}")
    ds = reasoning_gym.create_dataset(name, size=size, seed=seed, **(config or {}))
    out = []
    for i, item in enumerate(ds):
        answer = str(item["answer"])
        cot = (item.get("metadata") or {}).get("answer_cot")
        text = f"{cot}\nThe answer is {answer}." if answer_format == "cot" and cot else answer
        out.append(
            make_example(
                f"rg/{name}/{seed}/{i}",
                f"reasoning_gym/{name}",
                [
                    {"role": "user", "content": item["question"]},
                    {"role": "assistant", "content": text},
                ],
                {"answer": answer, "subtask": name},
                where=f"reasoning_gym/{name}[{i}]",
            )
        )
    return out


def read_hub(
    path: str,
    split: str,
    name: str | None = None,
    source: str | None = None,
    cap: int | None = None,
    seed: int = 0,
    on_error: str = "raise",
) -> Examples:
    """A hub dataset (needs hub access) in any of the supported shapes.

    ``cap`` draws a seeded random subset of rows *before* converting them (Infinity-Instruct
    has millions of rows); ids default to ``<source>-<row index in the full split>``."""
    import datasets

    ds = datasets.load_dataset(path, name, split=split)
    source = source or f"{path}/{split}"
    skipped = _skipped(on_error, source, f"{path}/{split}")
    rows: Iterable[int] = range(len(ds))
    if cap is not None and len(ds) > cap:
        rows = sorted(random.Random(seed).sample(range(len(ds)), int(cap)))
        ds = ds.select(rows)
    records = zip(rows, (dict(r) for r in ds), strict=True)
    return _convert(records, source, lambda i: f"{source}[{i}]", "auto", skipped, f"{path}/{split}")


def normalized_text(example: Example) -> str:
    """The prompt, lower-cased with whitespace collapsed: the key for overlap checks."""
    return " ".join(example.prompt.lower().split())


def drop_overlapping(pool: list[Example], held_out: Iterable[Example]) -> tuple[list[Example], int]:
    """Remove pool examples whose prompt equals a held-out prompt; returns (kept, n_removed)."""
    banned = {normalized_text(e) for e in held_out}
    kept = [e for e in pool if normalized_text(e) not in banned]
    return kept, len(pool) - len(kept)
