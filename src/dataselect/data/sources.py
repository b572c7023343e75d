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

Errors name the config key of the source (``pool.sources[1]``, ``target.gsm8k.test[0]``)
besides the file, line and field: a missing file says which key (``...path`` or
``paths.data_dir``) to change; a source that gives no examples (an empty file, every record
skipped, ``n: 0``, ``cap: 0``) is an error, as is a duplicate id (both locations named). The
examples come back as ``Examples``, whose ``skipped`` counts the records skipped per file.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dataselect.config import pool_sources
from dataselect.data.readers import (
    ON_ERROR,
    read_hub,
    read_json_file,
    read_reasoning_gym,
)
from dataselect.data.records import Example, Examples, RecordError, check_unique_ids

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
    if Path(spec["path"]).expanduser().is_absolute():
        fix = "fix the source's path (it is absolute, so paths.data_dir does not apply)"
    else:
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


REQUIRED = {"json": ("path",), "hub": ("path",), "reasoning_gym": ("name", "n", "seed")}


def read_source(spec: dict[str, Any], data_dir: Path) -> Examples:
    kind = spec.get("kind")
    if kind not in READERS:
        # the benchmark kinds (gsm8k, bbh, ...) register when their module is imported; a
        # caller that reads a pool without a target (dataselect-export) has not imported it
        import dataselect.data.benchmarks  # noqa: F401
    if kind not in READERS:
        raise RecordError(f"source {spec}: unknown kind {kind!r}; known: {sorted(READERS)}")
    if spec.get("on_error", "raise") not in ON_ERROR:
        raise RecordError(f"source {spec}: on_error {spec['on_error']!r} not in {ON_ERROR}")
    for key in REQUIRED.get(kind, ()):
        if spec.get(key) is None:
            raise RecordError(f"source {spec}: a {kind} source needs field {key!r}")
    cap = spec.get("cap")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise RecordError(f"source {spec}: field 'cap' must be a count of at least 1, got {cap!r}")
    examples = READERS[kind](spec, Path(data_dir))
    skipped = getattr(examples, "skipped", {})
    if not examples:
        raise RecordError(f"source {spec}: no examples")
    if cap is not None and len(examples) > cap:
        examples = random.Random(int(spec.get("seed", 0))).sample(examples, int(cap))
    if prefix := spec.get("id_prefix"):
        examples = [
            Example(f"{prefix}{e.id}", e.source, e.messages, e.meta, e.where) for e in examples
        ]
    return Examples(examples, skipped)


def _fix_keys(spec: dict[str, Any], at: str) -> str:
    """The config keys that choose a source's file: its ``path`` and/or ``paths.data_dir``."""
    keys = []
    if spec.get("path") is not None:
        keys.append(f"{at}.path")
    absolute = spec.get("path") is not None and Path(str(spec["path"])).expanduser().is_absolute()
    if spec.get("kind") != "hub" and not absolute:
        keys.append("paths.data_dir")
    return " or ".join(keys)


def read_sources(specs: list[dict[str, Any]], data_dir: Path, what: str, key: str = "") -> Examples:
    """Read and concatenate sources; ``key`` (``pool.sources``) is their config key, named
    with ``what`` (``pool jsonl``) in every error, so a message says what to change."""
    out = Examples()
    for i, spec in enumerate(specs):
        at = f"{key}[{i}]" if key else f"source {i}"
        spec = dict(spec)
        try:
            examples = read_source(spec, data_dir)
        except FileNotFoundError as e:
            fix = _fix_keys(spec, at)
            raise FileNotFoundError(
                f"{what} ({at}): {e}" + (f" [config key to change: {fix}]" if fix else "")
            ) from e
        except RecordError as e:
            raise RecordError(f"{what} ({at}): {e}") from e
        out += examples
        for where, n in examples.skipped.items():
            out.skipped[where] = out.skipped.get(where, 0) + n
    check_unique_ids(out, what)
    return out


def load_pool(cfg, data_dir: Path) -> Examples:
    """Read a pool. It is target-agnostic (one warmup serves every target); selection removes
    the candidates that overlap a target (``dataselect.data.targets.candidates``).

    ``pool.skipped`` counts the malformed records skipped (``on_error: skip``) per file."""
    specs = pool_sources(cfg)
    if not specs:
        raise RecordError(
            f"pool {cfg.name}: no sources; set pool.sources, e.g. "
            "'pool.sources=[{kind: json, path: /data/my_pool.jsonl}]'"
        )
    pool = read_sources(specs, data_dir, f"pool {cfg.name}", "pool.sources")
    if pool.n_skipped:  # each source warned already; this is the pool's total
        log.info(
            "pool %s: %d examples read, %d malformed records skipped (%s)",
            cfg.name,
            len(pool),
            pool.n_skipped,
            ", ".join(f"{w}: {n}" for w, n in pool.skipped.items()),
        )
    return pool
