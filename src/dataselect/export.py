"""The selected data itself, in the shapes training tools read.

Every run writes ``selected.jsonl`` beside ``selection.jsonl``: one row per selected example,
best first, ``{"messages": [...], "id", "source", "score", "rank"}``. That is the chat
(conversational) format ``datasets.load_dataset("json", data_files=...)``, trl's
``SFTTrainer`` and open-instruct read as they are. ``dataselect-export`` writes the other
common shapes from it:

- ``alpaca``: LLaMA-Factory's alpaca columns, ``instruction`` (last user turn), ``input``
  (empty), ``output`` (the answer), ``system`` and ``history`` (earlier ``[user,
  assistant]`` pairs);
- ``sharegpt``: LLaMA-Factory's sharegpt columns, ``conversations`` of ``{"from": "human" |
  "gpt", "value"}`` turns and ``system``;
- ``parquet``: the chat rows as a parquet file.

Each shape keeps ``id``, ``source``, ``score`` and ``rank`` (the tools ignore extra
columns). A run dir made before ``selected.jsonl`` existed is exported by re-reading its pool
from its saved config (``.hydra/config.yaml``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dataselect.data.records import Example

SELECTION = "selection.jsonl"  # id, score, rank
SELECTED = "selected.jsonl"  # the examples themselves, in chat format
KEEP = ("id", "source", "score", "rank")


class ExportError(ValueError):
    """A run dir that cannot be exported; the message says which and why."""


def selected_rows(selection: Iterable[dict[str, Any]], by_id: dict[str, Example]) -> list[dict]:
    """The chat rows of ``selection`` (``selection.jsonl``'s rows), in rank order."""
    rows = []
    for r in sorted(selection, key=lambda r: r["rank"]):
        if r["id"] not in by_id:
            raise ExportError(f"selected id {r['id']!r} is not in the pool")
        ex = by_id[r["id"]]
        rows.append(
            {
                "messages": [dict(m) for m in ex.messages],
                "id": ex.id,
                "source": ex.source,
                "score": r["score"],
                "rank": r["rank"],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write through a temporary name, so a kill never leaves a half file under ``path``."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)
    return path


def _split(messages: list[dict]) -> tuple[str, list[tuple[str, str]]]:
    """The system prompt and the (user, assistant) turns, in order."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    pairs, user = [], ""
    for m in turns:
        if m["role"] == "user":
            user = f"{user}\n\n{m['content']}" if user else m["content"]
        else:
            pairs.append((user, m["content"]))
            user = ""
    return system, pairs


def to_alpaca(row: dict) -> dict:
    system, pairs = _split(row["messages"])
    (instruction, output), history = pairs[-1], pairs[:-1]
    return {
        "instruction": instruction,
        "input": "",
        "output": output,
        "system": system,
        "history": [list(p) for p in history],
        **{k: row[k] for k in KEEP},
    }


def to_sharegpt(row: dict) -> dict:
    system, pairs = _split(row["messages"])
    turns = []
    for user, answer in pairs:
        turns += [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
    return {"conversations": turns, "system": system, **{k: row[k] for k in KEEP}}


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.partial")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)
    return path


def write_alpaca(path: Path, rows: list[dict]) -> Path:
    return write_jsonl(path, [to_alpaca(r) for r in rows])


def write_sharegpt(path: Path, rows: list[dict]) -> Path:
    return write_jsonl(path, [to_sharegpt(r) for r in rows])


# shape -> (file name, writer of the chat rows)
FORMATS: dict[str, tuple[str, Callable[[Path, list[dict]], Path]]] = {
    "chat": (SELECTED, write_jsonl),
    "alpaca": ("selected.alpaca.jsonl", write_alpaca),
    "sharegpt": ("selected.sharegpt.jsonl", write_sharegpt),
    "parquet": ("selected.parquet", write_parquet),
}


def read_rows(run_dir: Path) -> list[dict]:
    """A run's chat rows: its ``selected.jsonl``, else rebuilt from its selection and pool."""
    if (run_dir / SELECTED).is_file():
        return [json.loads(x) for x in (run_dir / SELECTED).read_text().splitlines() if x]
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise ExportError(f"{run_dir}: no {SELECTED}, and no .hydra/config.yaml to rebuild it")
    from omegaconf import OmegaConf

    from dataselect.data.sources import load_pool

    cfg = OmegaConf.load(config)
    pool = load_pool(cfg.pool, Path(cfg.paths.data_dir))
    selection = [json.loads(x) for x in (run_dir / SELECTION).read_text().splitlines() if x]
    return selected_rows(selection, {e.id: e for e in pool})


def run_dirs(root: Path) -> list[Path]:
    """``root`` if it is a run dir (it holds a selection), else every run dir under it."""
    if (root / SELECTION).is_file():
        return [root]
    found = sorted(p.parent for p in root.rglob(SELECTION) if ".cache" not in p.parts)
    if not found:
        raise ExportError(f"{root}: no run dir (no {SELECTION}) in or under it")
    return found


def export(root: Path, fmt: str, out: Path | None = None) -> list[Path]:
    """Write ``fmt`` for each run dir in or under ``root``: next to the run's files, or
    under ``out`` at the run's path relative to ``root`` (one file per run)."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {tuple(FORMATS)}, got {fmt!r}")
    name, write = FORMATS[fmt]
    written = []
    for run in run_dirs(root):
        dest = run if out is None else out / run.relative_to(root)
        dest.mkdir(parents=True, exist_ok=True)
        written.append(write(dest / name, read_rows(run)))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dataselect-export",
        description="Write the selected examples of a run (or of every run under a dir) "
        "for training tools: chat (trl, open-instruct), alpaca and sharegpt "
        "(LLaMA-Factory), parquet.",
    )
    parser.add_argument("dir", type=Path, help="a run dir, or a multirun dir holding run dirs")
    parser.add_argument("--format", default="alpaca", choices=tuple(FORMATS))
    parser.add_argument("--out", type=Path, help="output dir (default: each run's own dir)")
    args = parser.parse_args(argv)
    try:
        paths = export(args.dir, args.format, args.out)
    except (ValueError, OSError) as e:  # ExportError, RecordError, a missing file
        print(f"dataselect-export: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
