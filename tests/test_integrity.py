"""Checksums of completed artifacts: recorded at completion, checked on reuse (once per file
per process), damaged entries refused with what to do, ``dataselect verify``; epoch
checkpoints and store shards carry their own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dataselect import integrity
from dataselect.cache import COMPLETE, materialize, verify_cache
from dataselect.features.store import StoreWriter
from dataselect.integrity import DamagedArtifact


def build(work: Path) -> None:
    (work / "sub").mkdir()
    (work / "a.bin").write_bytes(bytes(range(256)) * 64)
    (work / "sub" / "b.json").write_text('{"x": 1}')
    (work / ".lock-ish").write_text("not part of the artifact")


def flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def art(tmp_path):
    final = tmp_path / "cache" / "stage" / "key1"
    assert materialize(final, build) is False
    return final


def test_the_marker_records_size_and_checksum_of_every_file(art):
    files = json.loads((art / COMPLETE).read_text())["files"]
    assert files == {
        "a.bin": [16384, integrity.file_digest(art / "a.bin")],
        "sub/b.json": [8, integrity.file_digest(art / "sub" / "b.json")],
    }
    assert materialize(art, build) is True  # intact: reused


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda p: flip(p), "a.bin: contents changed since it was built"),
        (lambda p: p.write_bytes(p.read_bytes()[:1000]), "a.bin: 1,000 bytes, 16,384 when built"),
        (lambda p: p.unlink(), "a.bin: missing"),
    ],
)
def test_a_damaged_entry_is_refused_then_rebuilt_after_verify_remove(art, damage, says):
    before = (art / "a.bin").read_bytes()
    damage(art / "a.bin")
    with pytest.raises(DamagedArtifact) as e:
        materialize(art, build)
    msg = str(e.value)
    assert says in msg and str(art) in msg and f"rm -r '{art}'" in msg and "verify" in msg
    got = verify_cache(art.parent.parent)
    assert got["checked"] == 1 and list(got["damaged"]) == [str(art)]
    assert (art / COMPLETE).is_file()  # verify alone removes nothing
    got = verify_cache(art.parent.parent, remove=True)
    assert not art.exists() and list(got["damaged"]) == [str(art)]
    assert materialize(art, build) is False and (art / "a.bin").read_bytes() == before
    assert verify_cache(art.parent.parent)["damaged"] == {}


def test_each_file_is_hashed_once_per_process(art, monkeypatch):
    calls = []
    real = integrity.file_digest
    monkeypatch.setattr(integrity, "file_digest", lambda p, sync=False: calls.append(p) or real(p))
    integrity._good.clear()
    for _ in range(3):
        materialize(art, build)
    assert sorted(p.name for p in calls) == ["a.bin", "b.json"]
    flip(art / "a.bin")  # a changed file has a new mtime: hashed again, and caught
    with pytest.raises(DamagedArtifact):
        materialize(art, build)


def test_verify_modes(art, monkeypatch):
    flip(art / "a.bin")
    monkeypatch.setenv("DATASELECT_VERIFY", "size")  # sizes only: a flipped byte passes
    assert materialize(art, build) is True
    (art / "a.bin").write_bytes(b"short")
    with pytest.raises(DamagedArtifact, match="5 bytes, 16,384 when built"):
        materialize(art, build)
    monkeypatch.setenv("DATASELECT_VERIFY", "off")
    assert materialize(art, build) is True
    monkeypatch.setenv("DATASELECT_VERIFY", "sometimes")
    with pytest.raises(ValueError, match="DATASELECT_VERIFY must be one of"):
        materialize(art, build)


def test_markers_from_before_checksums_are_trusted_and_counted(art):
    (art / COMPLETE).write_text(json.dumps({"built_at": "2026-11-01T00:00:00", "seconds": 1.0}))
    flip(art / "a.bin")
    assert materialize(art, build) is True
    got = verify_cache(art.parent.parent)
    assert got == {"checked": 0, "unverified": [str(art)], "damaged": {}}


def test_dataselect_verify_command(art, monkeypatch, capsys):
    from dataselect import cli

    cache = art.parent.parent
    monkeypatch.setattr(sys, "argv", ["dataselect", "verify", str(cache)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0 and "1 entries checked, 0 damaged" in capsys.readouterr().out
    flip(art / "sub" / "b.json", at=2)
    assert cli.verify([str(cache)]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {art}\n  sub/b.json: contents changed" in out
    assert cli.verify([str(cache), "--remove"]) == 0 and not art.exists()
    assert "damaged and removed" in capsys.readouterr().out
    assert cli.verify([str(cache / "nope")]) == 2


def test_a_resumed_store_recomputes_a_damaged_shard(tmp_path, caplog):
    path = tmp_path / "store"
    w = StoreWriter(path, dim=4, n_total=6, spec={"s": 1}, shard_size=2)
    rows = np.arange(24, dtype=np.float32).reshape(6, 4)
    for i in range(2):  # two of three shards, then "killed"
        w.write_shard(
            i, [f"e{2 * i}", f"e{2 * i + 1}"], rows[2 * i : 2 * i + 2], [3, 3], [1.0, 1.0]
        )
    marker = json.loads((path / "shard_00001.COMPLETE").read_text())
    assert set(marker["files"]) == {"shard_00001.npy", "shard_00001.json"}
    flip(path / "shard_00001.npy", at=-3)
    again = StoreWriter(path, dim=4, n_total=6, spec={"s": 1}, shard_size=2)
    assert again.pending_shards() == [1, 2] and again.done_rows == 2
    assert "shard 1 is damaged (shard_00001.npy: contents changed" in caplog.text


def test_epoch_checkpoint_problems(tmp_path):
    from dataselect.integrity import manifest
    from dataselect.training.checkpoint import (
        MARKER,
        RESUME_FILE,
        RESUME_SUM,
        checkpoint_problems,
        drop_resume_files,
    )

    d = tmp_path / "epoch_1"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 64)
    (d / RESUME_FILE).write_bytes(b"r" * 64)
    (d / RESUME_SUM).write_text(json.dumps([64, integrity.file_digest(d / RESUME_FILE)]))
    files = manifest(d, skip=(RESUME_FILE, RESUME_SUM))
    (d / MARKER).write_text(json.dumps({"files": files}))
    assert checkpoint_problems(d) == []
    flip(d / RESUME_FILE, at=5)
    assert checkpoint_problems(d) == [
        "epoch_1/trainer.ckpt: contents changed since it was built (checksum differs)"
    ]
    drop_resume_files(tmp_path)  # superseded: both go, and the epoch stays intact
    assert not (d / RESUME_SUM).exists() and checkpoint_problems(d) == []
    flip(d / "adapter" / "adapter_model.safetensors", at=10)
    assert checkpoint_problems(d)[0].startswith("epoch_1/adapter/adapter_model.safetensors")
