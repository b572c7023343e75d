"""Real pools from their configs: LESS layout, hub fallback, caps, mixing, on_error, ShareGPT."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import dataselect.config  # noqa: F401  (registers base_config)
from dataselect.data import readers
from dataselect.data.readers import read_json_file, record_to_example
from dataselect.data.records import RecordError
from dataselect.data.sources import load_pool, read_sources

CONF = Path(__file__).resolve().parents[1] / "conf"
LESS_SIZES = {"flan_v2": 6, "cot": 5, "dolly": 3, "oasst1": 4}


def compose_pool(pool: str, data_dir: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config", [f"pool={pool}", f"paths.data_dir={data_dir}", "paths.output_dir=/tmp/x"]
        )
    return cfg.pool


def chat(user: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def less_layout(data_dir: Path) -> None:
    """Tiny files where LESS keeps them; flan_v2 gets an empty answer and a broken line."""
    for name, n in LESS_SIZES.items():
        rows: list = [
            {"dataset": name, "id": f"{name}_{i}", "messages": chat(f"{name} q{i}", f"a{i}")}
            for i in range(n)
        ]
        if name == "flan_v2":
            rows += [
                {"dataset": name, "id": "flan_v2_90", "messages": chat("q", "")},
                '{"dataset": "flan_v2", "id": "flan_v2_91", "messages": [',
            ]
        write_jsonl(data_dir / f"less_data/train/processed/{name}/{name}_data.jsonl", rows)


def test_less_preset_reads_the_less_layout(tmp_path, caplog):
    cfg = compose_pool("less", tmp_path)
    assert cfg.name == "less" and cfg.size == 270679 and len(cfg.sources) == 4
    less_layout(tmp_path)
    with caplog.at_level(logging.WARNING):
        pool = load_pool(cfg, tmp_path)
    assert len(pool) == sum(LESS_SIZES.values())
    assert Counter(e.source for e in pool) == LESS_SIZES
    assert {e.id for e in pool if e.source == "dolly"} == {"dolly_0", "dolly_1", "dolly_2"}
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "source flan_v2: skipped 2 malformed records" in warning
    assert "flan_v2_data.jsonl:7: record 'flan_v2_90'" in warning
    assert "flan_v2_data.jsonl:8: invalid JSON" in warning


def test_missing_file_falls_back_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    cfg = compose_pool("less", tmp_path)
    downloaded = write_jsonl(tmp_path / "hub" / "x.jsonl", [{"prompt": "p", "completion": "c"}])
    calls = []

    def fake_download(repo_id, filename, repo_type=None, revision=None):
        calls.append((repo_id, filename, repo_type))
        return str(downloaded)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    (ex,) = read_sources([cfg.sources[1]], tmp_path, "pool less")
    assert (ex.source, ex.prompt) == ("cot", "p")
    assert calls == [("princeton-nlp/less_data", "train/processed/cot/cot_data.jsonl", "dataset")]


def test_missing_file_and_no_hub_access_says_how_to_fix(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    cfg = compose_pool("less", tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        load_pool(cfg, tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "less_data/train/processed/flan_v2/flan_v2_data.jsonl") in msg
    assert "princeton-nlp/less_data" in msg and "train/processed/flan_v2" in msg
    assert "paths.data_dir" in msg and "DATASELECT_DATA_DIR" in msg and "hub access" in msg
    with pytest.raises(FileNotFoundError, match="DATASELECT_DATA_DIR"):  # no hub fallback
        read_sources([{"kind": "json", "path": "nope.jsonl"}], tmp_path, "pool p")


def test_caps_mix_sources_into_a_deterministic_subset(tmp_path):
    for name in ("math", "chat"):
        rows = [
            {"id": f"{name}-{i}", "prompt": f"{name} {i}", "completion": "c"} for i in range(40)
        ]
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
    specs = [
        {"kind": "json", "path": "math.jsonl", "cap": 7, "seed": 1},
        {"kind": "json", "path": "chat.jsonl", "cap": 5},
        {"kind": "json", "path": "chat.jsonl", "cap": 3, "seed": 9, "id_prefix": "again/"},
    ]
    pool = read_sources(specs, tmp_path, "pool mix")
    assert Counter(e.source for e in pool) == {"math": 7, "chat": 8}
    assert [e.id for e in pool] == [e.id for e in read_sources(specs, tmp_path, "pool mix")]
    assert all(e.id.startswith("again/chat-") for e in pool[12:])
    reseeded = read_sources([{**specs[0], "seed": 2}], tmp_path, "pool mix")
    assert {e.id for e in reseeded} != {e.id for e in pool[:7]}
    with pytest.raises(RecordError, match="duplicate id"):  # same file twice, no id_prefix
        read_sources([specs[1], {**specs[1], "seed": 5}], tmp_path, "pool mix")


def test_on_error_raise_names_file_line_and_skip_counts(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "ok", "completion": "fine"},
            "{not json",
            {"foo": 1},
            {"messages": chat("q", "  ")},
            {"conversations": [{"from": "gpt", "value": "no user turn"}]},
            {"prompt": "ok too", "completion": "fine"},
        ],
    )
    with pytest.raises(RecordError, match=r"p\.jsonl:2: invalid JSON"):
        read_sources([{"kind": "json", "path": str(path)}], tmp_path, "pool p")
    with caplog.at_level(logging.WARNING):
        kept = read_json_file(path, on_error="skip")
    assert [e.prompt for e in kept] == ["ok", "ok too"]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "source p: skipped 4 malformed records" in warning
    assert "p.jsonl:3: unknown record shape" in warning and "p.jsonl:5" not in warning  # first 3
    with pytest.raises(RecordError, match="on_error 'ignore'"):
        read_sources([{"kind": "json", "path": str(path), "on_error": "ignore"}], tmp_path, "p")


def test_sharegpt_records_parse_multi_turn():
    record = {
        "id": 17,
        "conversations": [
            {"from": "system", "value": "Be terse."},
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"},
            {"from": "human", "value": "times 3?"},
            {"from": "gpt", "value": "12"},
        ],
        "source": "Subjective",
    }
    ex = record_to_example(record, "infinity", "infinity-0", "ii[0]")
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert (ex.id, ex.source, ex.prompt, ex.answer) == ("17", "Subjective", "times 3?", "12")
    bad = {"conversations": [{"from": "bot", "value": "hi"}]}
    with pytest.raises(RecordError, match=r"ii\[3\]: conversations\[0\]\.from 'bot'"):
        record_to_example(bad, "infinity", "infinity-3", "ii[3]")


def test_hub_source_samples_cap_rows_before_converting(monkeypatch):
    import datasets

    rows = [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
        for i in range(500)
    ]
    loads, converted = [], []
    real = readers.record_to_example

    def fake_load(path, name=None, split=None):
        loads.append((path, name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(
        readers, "record_to_example", lambda *a, **k: converted.append(1) or real(*a, **k)
    )
    spec = {"kind": "hub", "path": "BAAI/Infinity-Instruct", "name": "7M_core", "cap": 20}
    pool = read_sources([spec], Path("."), "pool ii")
    assert len(pool) == 20 and len(converted) == 20
    assert loads == [("BAAI/Infinity-Instruct", "7M_core", "train")]
    assert all(e.id == f"BAAI/Infinity-Instruct/train-{e.prompt[1:]}" for e in pool)
    again = read_sources([spec], Path("."), "pool ii")
    assert [e.id for e in again] == [e.id for e in pool]
    other = read_sources([{**spec, "seed": 1}], Path("."), "pool ii")
    assert {e.id for e in other} != {e.id for e in pool}


def test_infinity_instruct_and_jsonl_presets_compose(tmp_path):
    ii = compose_pool("infinity_instruct", tmp_path)
    (spec,) = ii.sources
    assert (spec.kind, spec.path, spec.name) == ("hub", "BAAI/Infinity-Instruct", "7M_core")
    assert spec.cap == ii.size and spec.on_error == "skip"
    jsonl = compose_pool("jsonl", tmp_path)
    assert jsonl.name == "jsonl" and list(jsonl.sources) == []


def test_a_pool_extends_another_with_extra_sources(tmp_path):
    """cpu_table = the planted pool's 55 families (its defaults list) at per_family 10, the
    first 10 of each planted family, + GSM8K train; the extra sources are read after the
    others and are part of the pool's cache key."""
    from omegaconf import OmegaConf

    from dataselect.keys import pool_spec

    table, planted = compose_pool("cpu_table", tmp_path), compose_pool("planted", tmp_path)
    spec = pool_spec(OmegaConf.create({"pool": table}))
    planted_spec = pool_spec(OmegaConf.create({"pool": planted}))["sources"]
    assert len(planted_spec) >= 50 and {s["n"] for s in planted_spec} == {30}
    assert spec["sources"][:-1] == [{**s, "n": 10} for s in planted_spec]
    assert spec["sources"][-1]["kind"] == "gsm8k" and len(spec["sources"]) == 56
    assert table.size == 10 * len(planted_spec) + spec["sources"][-1]["n"]
    first = {**planted_spec[0], "n": 10}
    assert [e.prompt for e in read_sources([first], tmp_path, "pool t")] == [
        e.prompt for e in read_sources([planted_spec[0]], tmp_path, "pool p")
    ][:10]
    small = OmegaConf.create(
        {
            "name": "small",
            "sources": [{"kind": "reasoning_gym", "name": "chain_sum", "n": 3, "seed": 1}],
            "extra_sources": [{"kind": "reasoning_gym", "name": "gcd", "n": 2, "seed": 2}],
        }
    )
    pool = load_pool(small, tmp_path)
    assert [e.source for e in pool] == ["reasoning_gym/chain_sum"] * 3 + ["reasoning_gym/gcd"] * 2
    assert pool_spec(OmegaConf.create({"pool": small})) != pool_spec(
        OmegaConf.create({"pool": {**OmegaConf.to_container(small), "extra_sources": []}})
    )
