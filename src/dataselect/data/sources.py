"""Pools and targets from their configs: a list of sources, each read by a registered reader.

A source spec is a mapping with a ``kind``:

- ``reasoning_gym``: ``name``, ``n``, ``seed``, optional ``answer_format`` and ``config``;
- ``json``: ``path`` (relative paths resolve against ``paths.data_dir``), optional ``source``,
  ``shape`` and ``hub: {repo_id, filename, revision}``: a hub dataset file downloaded when the
  local file is missing;
- ``hub``: ``path``, ``split``, optional ``name`` (the dataset config; needs hub access).

Every source also takes ``cap`` (keep a random subset of at most that many examples, drawn
with the source's ``seed``, default 0: mixing = several sources, each with its cap),
``on_error`` (``raise``, the default, or ``skip``: skip malformed records, count them, warn once)
and ``id_prefix`` (prepended to every id, for sources whose ids collide).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dataselect.data.readers import (
    ON_ERROR,
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
        _local_or_hub(s, d), s.get("source"), s.get("shape", "auto"), s.get("on_error", "raise")
    ),
    "hub": lambda s, _: read_hub(
        s["path"],
        s.get("split", "train"),
        s.get("name"),
        s.get("source"),
        s.get("cap"),
        int(s.get("seed", 0)),
        s.get("on_error", "raise"),
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


def _local_or_hub(spec: dict[str, Any], data_dir: Path) -> Path:
    """A json source's file: ``path`` if it exists, else its ``hub`` file, downloaded."""
    local = _resolve(spec["path"], data_dir)
    if local.is_file():
        return local
    fix = "set paths.data_dir (or DATASELECT_DATA_DIR) to the folder that holds it"
    hub = spec.get("hub")
    if not hub:
        raise FileNotFoundError(f"data file not found: {local}; {fix}")
    import huggingface_hub

    where = f"hub dataset {hub['repo_id']} file {hub['filename']}"
    try:
        return Path(
            huggingface_hub.hf_hub_download(
                hub["repo_id"], hub["filename"], repo_type="dataset", revision=hub.get("revision")
            )
        )
    except Exception as e:
        reason = (str(e).splitlines() or [""])[0]
        raise FileNotFoundError(
            f"data file not found: {local}, and downloading the {where} failed "
            f"({type(e).__name__}: {reason}); {fix}, or get hub access (network, HF_TOKEN or "
            "`huggingface-cli login`, HF_HUB_OFFLINE unset)"
        ) from e


def read_source(spec: dict[str, Any], data_dir: Path) -> list[Example]:
    kind = spec.get("kind")
    if kind not in READERS:
        raise RecordError(f"source {spec}: unknown kind {kind!r}; known: {sorted(READERS)}")
    if spec.get("on_error", "raise") not in ON_ERROR:
        raise RecordError(f"source {spec}: on_error {spec['on_error']!r} not in {ON_ERROR}")
    examples = READERS[kind](spec, Path(data_dir))
    cap = spec.get("cap")
    if cap is not None and len(examples) > cap:
        examples = random.Random(int(spec.get("seed", 0))).sample(examples, int(cap))
    if prefix := spec.get("id_prefix"):
        examples = [Example(f"{prefix}{e.id}", e.source, e.messages, e.meta) for e in examples]
    return examples


def read_sources(specs: list[dict[str, Any]], data_dir: Path, what: str) -> list[Example]:
    out: list[Example] = []
    for spec in specs:
        out += read_source(dict(spec), data_dir)
    check_unique_ids(out, what)
    return out


def load_pool(cfg, data_dir: Path) -> list[Example]:
    """Read a pool. It is target-agnostic (one warmup serves every target); selection removes
    the candidates that overlap a target (``dataselect.data.targets.candidates``)."""
    pool = read_sources(list(cfg.sources), data_dir, f"pool {cfg.name}")
    if not pool:
        raise RecordError(f"pool {cfg.name}: no examples")
    return pool
