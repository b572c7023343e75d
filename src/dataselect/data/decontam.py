"""Test-set decontamination: drop pool examples that repeat or quote a held-out item.

Two checks, as in the GPT-3 / open-instruct decontamination reports:

- exact: the pool example's prompt equals a held-out prompt once normalized
  (``readers.normalized_text``: lower-cased, whitespace collapsed);
- n-gram: the pool example's full text (every turn) shares a word n-gram of length ``ngram``
  (13 by default) with a held-out prompt. Words are the lower-cased alphanumeric runs, so
  punctuation and spacing do not matter. A held-out prompt shorter than ``ngram`` words has
  no n-gram and is caught by the exact check only.

The held-out n-grams are hashed into one set of ints; each pool text is then checked with C-level
``zip`` + ``map(hash)`` + ``set.isdisjoint`` (stops at the first hit). 270k examples x 300 words
= 81M n-grams take well under a minute on one core.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator

from dataselect.data.readers import normalized_text
from dataselect.data.records import Example

_WORD = re.compile(r"[^\W_]+")  # alphanumeric runs (Unicode letters and digits)


def words(text: str) -> list[str]:
    """Lower-cased words: the text split on every non-alphanumeric character."""
    return _WORD.findall(text.lower())


def ngram_hashes(tokens: list[str], n: int) -> Iterator[int]:
    """The hash of every run of ``n`` consecutive tokens (none when there are fewer)."""
    return map(hash, zip(*(tokens[i:] for i in range(n)), strict=False))  # shifted copies


def full_text(example: Example) -> str:
    return "\n".join(m["content"] for m in example.messages)


def decontaminate(
    pool: list[Example], held_out: Iterable[Example], ngram: int = 13, exact: bool = True
) -> tuple[list[Example], dict]:
    """The pool minus examples overlapping a held-out item, and a report.

    ``ngram=0`` turns the n-gram check off; ``exact=False`` the exact one. An example caught by
    both counts as ``exact``. Report: ``{"exact": n, "ngram": n, "removed": n,
    "by_source": {source: n removed}}``.
    """
    held_out = list(held_out)
    prompts = {normalized_text(e) for e in held_out} if exact else set()
    banned: set[int] = set()
    if ngram > 0:
        for e in held_out:
            banned.update(ngram_hashes(words(e.prompt), ngram))
    kept: list[Example] = []
    counts = {"exact": 0, "ngram": 0}
    by_source: Counter[str] = Counter()
    for e in pool:
        if prompts and normalized_text(e) in prompts:
            hit = "exact"
        elif banned and not banned.isdisjoint(ngram_hashes(words(full_text(e)), ngram)):
            hit = "ngram"
        else:
            kept.append(e)
            continue
        counts[hit] += 1
        by_source[e.source] += 1
    report = {
        **counts,
        "removed": len(pool) - len(kept),
        "by_source": dict(sorted(by_source.items())),
    }
    return kept, report
