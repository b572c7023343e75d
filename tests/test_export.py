"""The selected data leaves the framework: selected.jsonl in every run, the export shapes
(golden files), multi-run export, runs from before selected.jsonl, the W&B selection table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dataselect import export
from dataselect.data.records import make_example

GOLDEN = Path(__file__).parent / "golden" / "export"


def pool():
    return [
        make_example(
            "a",
            "src/one",
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6"},
            ],
        ),
        make_example(
            "b",
            "src/two",
            [{"role": "user", "content": "Spell cat"}, {"role": "assistant", "content": "c-a-t"}],
        ),
        make_example(
            "c",
            "src/two",
            [{"role": "user", "content": "unused"}, {"role": "assistant", "content": "x"}],
        ),
    ]


SELECTION = [  # selection.jsonl's rows, deliberately not in rank order
    {"id": "a", "score": 0.25, "rank": 1},
    {"id": "b", "score": 0.5, "rank": 0},
]


def run_dir(root: Path, name: str = "run") -> Path:
    d = root / name
    d.mkdir(parents=True)
    rows = export.selected_rows(SELECTION, {e.id: e for e in pool()})
    export.write_jsonl(d / export.SELECTED, rows)
    export.write_jsonl(d / export.SELECTION, SELECTION)
    return d


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x]


def test_chat_rows_round_trip_through_datasets_in_rank_order(tmp_path):
    import datasets

    d = run_dir(tmp_path)
    ds = datasets.load_dataset("json", data_files=str(d / export.SELECTED), split="train")
    assert ds["id"] == ["b", "a"] and ds["rank"] == [0, 1] and ds["score"] == [0.5, 0.25]
    by_id = {e.id: e for e in pool()}
    assert [tuple(m) for m in ds["messages"]] == [by_id[i].messages for i in ("b", "a")]


@pytest.mark.parametrize("fmt", ["chat", "alpaca", "sharegpt"])
def test_each_shape_matches_its_golden_file(tmp_path, fmt):
    d = run_dir(tmp_path)
    (path,) = export.export(d, fmt)
    assert path.parent == d and lines(path) == lines(GOLDEN / export.FORMATS[fmt][0])


def test_alpaca_keeps_the_system_prompt_and_earlier_turns_as_history():
    row = export.selected_rows(SELECTION, {e.id: e for e in pool()})[1]
    got = export.to_alpaca(row)
    assert (got["system"], got["instruction"], got["output"]) == ("Be brief.", "and 3+3?", "6")
    assert got["history"] == [["2+2?", "4"]] and got["id"] == "a" and got["rank"] == 1
    turns = export.to_sharegpt(row)["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]


def test_parquet_holds_the_chat_rows(tmp_path):
    import pyarrow.parquet as pq

    d = run_dir(tmp_path)
    (path,) = export.export(d, "parquet", tmp_path / "out")
    assert path == tmp_path / "out" / "selected.parquet"  # a single run dir: no subfolder
    assert pq.read_table(path).to_pylist() == lines(GOLDEN / export.SELECTED)


def test_a_multirun_dir_exports_one_file_per_run(tmp_path, capsys):
    for job in ("0", "1"):
        run_dir(tmp_path / "multi", job)
    (tmp_path / "multi" / "report").mkdir()  # not a run: skipped
    assert (
        export.main([str(tmp_path / "multi"), "--format", "sharegpt", "--out", str(tmp_path / "x")])
        == 0
    )
    want = [tmp_path / "x" / job / "selected.sharegpt.jsonl" for job in ("0", "1")]
    assert capsys.readouterr().out.split() == [w for p in want for w in ("wrote", str(p))]
    assert all(lines(p) == lines(GOLDEN / "selected.sharegpt.jsonl") for p in want)


def test_a_run_from_before_selected_jsonl_is_rebuilt_from_its_pool(tmp_path):
    data = tmp_path / "pool.jsonl"
    data.write_text("".join(json.dumps(e.to_json()) + "\n" for e in pool()))
    d = tmp_path / "old"
    (d / ".hydra").mkdir(parents=True)
    export.write_jsonl(d / export.SELECTION, SELECTION)
    cfg = {
        "pool": {"name": "p", "sources": [{"kind": "json", "path": str(data)}]},
        "paths": {"data_dir": str(tmp_path)},
    }
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path,) = export.export(d, "alpaca")
    assert lines(path) == lines(GOLDEN / "selected.alpaca.jsonl")


def test_what_cannot_be_exported_says_why(tmp_path, capsys):
    with pytest.raises(export.ExportError, match="'zz' is not in the pool"):
        export.selected_rows([{"id": "zz", "score": 1.0, "rank": 0}], {})
    assert export.main([str(tmp_path)]) == 1
    assert "no run dir (no selection.jsonl)" in capsys.readouterr().err
    (tmp_path / export.SELECTION).write_text("")
    with pytest.raises(export.ExportError, match="no .hydra/config.yaml"):
        export.export(tmp_path, "chat")
    with pytest.raises(export.ExportError, match="format must be one of"):
        export.export(tmp_path, "csv")
