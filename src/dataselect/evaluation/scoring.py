"""Answer extraction and exact-match scoring: small pure functions, shared by lm-eval and tests.

``number`` answers: the last number in the generation is compared numerically with the gold
answer (commas, ``$`` and trailing zeros ignored, so ``"1,000"`` == ``"1000.0"``).
``text`` answers (BBH): the text after the last "the answer is" (the whole generation when
there is none) must equal the gold answer after stripping whitespace, markdown emphasis and a
trailing period, case-insensitively (``"So the answer is (B)."`` -> ``"(b)"``); a choice
letter followed by its option text (``"(B) 12/14/1937"``) counts as the letter.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

ANSWER_TYPES = ("number", "text")

# An optional sign and "$", then digits with proper thousands groups ("1,234,567") or plain
# digits ("1234"), then an optional decimal part. A sentence-final "." is not a decimal part.
_NUMBER = re.compile(r"-?\$?-?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?")


def canonical_number(s: str) -> str | None:
    """``"$1,234.50"`` -> ``"1234.5"``; ``"-7"`` -> ``"-7"``; None if ``s`` is not a number."""
    t = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    text = format(d.normalize(), "f")  # normalize drops trailing zeros; "f" avoids 1E+3
    return "0" if text in ("-0", "0") else text


def extract_number(generation: str) -> str | None:
    """The last number in a generation, in canonical form; None if there is none."""
    found = _NUMBER.findall(generation)
    return canonical_number(found[-1]) if found else None


_ANSWER_IS = re.compile(r"answer is\s*:?", re.IGNORECASE)
_CHOICE = re.compile(r"^\(([a-z])\)(?:\s|$)")


def normalize_text(s: str) -> str:
    """Strip whitespace, ``*`` and trailing periods, lower-case: ``" **(B)**. "`` -> ``"(b)"``."""
    return s.strip().strip("*").strip().rstrip(".").strip().strip("*").strip().lower()


def extract_text(generation: str) -> str:
    """The final answer of a chain of thought: the rest of the line after the last
    "the answer is", normalized; a leading choice ``(x)`` stands for itself."""
    found = list(_ANSWER_IS.finditer(generation))
    text = generation[found[-1].end() :].strip().split("\n", 1)[0] if found else generation
    text = normalize_text(text)
    choice = _CHOICE.match(text)
    return f"({choice.group(1)})" if choice else text


def extract(generation: str, answer_type: str) -> str | None:
    """The answer a generation gives, in the form it is compared in."""
    if answer_type == "number":
        return extract_number(generation)
    if answer_type == "text":
        return extract_text(generation)
    raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")


def gold_answer(gold: str, answer_type: str) -> str | None:
    """The gold answer in comparable form; a number gold may itself be written "$1,000"."""
    if answer_type == "number":
        return canonical_number(gold) or extract_number(gold)
    if answer_type == "text":
        return normalize_text(gold)
    raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")


def is_correct(generation: str, gold: str, answer_type: str = "number") -> bool:
    """Exact match of the extracted answer against the gold answer."""
    got, want = extract(generation, answer_type), gold_answer(gold, answer_type)
    if got is None or want is None:
        return False
    if answer_type == "number":
        return Decimal(got) == Decimal(want)
    return got == want


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval ``process_results`` hook: ``doc`` is one JSONL line, ``results`` its generations."""
    return {"exact_match": float(is_correct(results[0], doc["target"], doc["answer_type"]))}
