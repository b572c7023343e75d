"""The gradient store: round trips, byte-identical resume after abandon / kill -9, refusals."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from dataselect.features import store as store_mod
from dataselect.features.store import (
    GradientStore,
    StoreMismatch,
    StoreWriter,
    store_bytes_per_example,
)

N, D, S = 2500, 16, 1000
SPEC = {"model": "tiny", "sketch": {"kind": "rademacher", "dim": D, "seed": 0}, "layout": "lora"}


def make_data(n: int = N, d: int = D):
    """Deterministic rows (row 5 all zeros), ids, token counts and gradient norms."""
    feats = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32) * 3
    feats[5] = 0
    ids = [f"ex-{i}" for i in range(n)]
    return feats, ids, [i % 50 + 1 for i in range(n)], [float(np.sqrt(i + 1)) for i in range(n)]


def write(path: Path, rows: range, writer: StoreWriter, chunk: int = 300, sleep: float = 0.0):
    """Add ``rows`` of make_data() to ``writer`` in chunks."""
    feats, ids, ntok, norms = make_data(writer.n_total)
    for a in range(rows.start, rows.stop, chunk):
        b = min(a + chunk, rows.stop)
        writer.add(ids[a:b], feats[a:b], ntok[a:b], norms[a:b], {"eps_share": [0.5] * (b - a)})
        time.sleep(sleep)


def new_writer(path: Path, dtype: str = "float16", n: int = N, **kw) -> StoreWriter:
    return StoreWriter(path, D, n, {**SPEC, **kw}, dtype=dtype, shard_size=S)


def full_store(path: Path, dtype: str = "float16", n: int = N) -> GradientStore:
    w = new_writer(path, dtype, n)
    write(path, w.pending(), w)
    return w.close()


def file_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip(tmp_path, dtype):
    feats, ids, ntok, norms = make_data()
    st = full_store(tmp_path / "s", dtype)
    assert len(st) == N and st.dim == D and st.spec == SPEC
    assert sorted(p.name for p in st.path.glob("*.npy")) == [f"shard_0000{i}.npy" for i in range(3)]
    expect = feats if dtype == "float32" else feats.astype(np.float16).astype(np.float32)
    got = st.features()
    assert got.dtype == np.float32 and np.array_equal(got, expect)
    assert st.ids == ids and st.n_tokens.tolist() == ntok and st.grad_norms.tolist() == norms
    assert [len(e["eps_share"]) for e in st.extras()] == [1000, 1000, 500]
    unit = st.features(normalize=True)
    norms_out = np.linalg.norm(unit, axis=1)
    assert np.allclose(np.delete(norms_out, 5), 1, atol=1e-6) and not unit[5].any()
    rows = np.array([2499, 3, 1500, 3, 999, 1000])
    assert np.array_equal(st.features(rows), expect[rows])
    assert np.array_equal(st.features(st.index(["ex-1500", "ex-2"])), expect[[1500, 2]])
    blocks = list(st.iter_blocks(block_rows=700))
    assert [s for s, _ in blocks] == [0, 700, 1400, 2100]
    assert np.array_equal(np.concatenate([b for _, b in blocks]), expect)
    assert np.allclose(np.concatenate([b for _, b in st.iter_blocks(700, normalize=True)]), unit)


def test_subset_reads_touch_only_their_shards(tmp_path, monkeypatch):
    st = full_store(tmp_path / "s")
    opened = []
    real_load = np.load

    def spy(file, *args, **kw):
        opened.append((Path(file).name, kw.get("mmap_mode")))
        return real_load(file, *args, **kw)

    monkeypatch.setattr(store_mod.np, "load", spy)
    st.features(np.array([1200, 1999, 1001]))
    assert set(opened) == {("shard_00001.npy", "r")}
    opened.clear()
    next(st.iter_blocks(block_rows=500))
    assert set(opened) == {("shard_00000.npy", "r")}


def test_torch_bf16_input(tmp_path):
    torch = pytest.importorskip("torch")
    w = StoreWriter(tmp_path / "s", 4, 2, SPEC, dtype="float32", shard_size=8)
    t = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, 2.0, 4.0]], dtype=torch.bfloat16)
    w.add(["a", "b"], t, [1, 2], [1.0, 2.0])
    assert np.array_equal(w.close().features(), t.float().numpy())


def test_resume_after_abandoned_writer_is_byte_identical(tmp_path):
    n = 4200  # 5 shards, the last one 200 rows
    ref = full_store(tmp_path / "ref", n=n)
    w = new_writer(tmp_path / "s", n=n)
    write(tmp_path / "s", range(0, 2500), w, chunk=250)  # 2.5 shards; 500 rows only buffered
    assert w.done_rows == 2000 and w.pending() == range(2500, n)
    del w  # abandoned without close, as a crash would
    # a crash inside a shard write leaves files without a marker: they must go
    (tmp_path / "s" / "shard_00002.npy").write_bytes(b"half")
    (tmp_path / "s" / "shard_00002.json.tmp").write_text("{")
    w = new_writer(tmp_path / "s", n=n)
    assert w.done_rows == 2000 and w.pending() == range(2000, n)
    assert not list((tmp_path / "s").glob("shard_00002*"))
    write(tmp_path / "s", w.pending(), w, chunk=333)  # a different chunking
    st = w.close()
    assert file_bytes(st.path) == file_bytes(ref.path)


def test_resume_after_kill_9_is_byte_identical(tmp_path):
    n = 4200
    ref = full_store(tmp_path / "ref", n=n)
    path = tmp_path / "s"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_store import new_writer, write
        w = new_writer({str(path)!r}, n={n})
        write({str(path)!r}, w.pending(), w, chunk=100, sleep=0.05)
        w.close()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not (path / "shard_00000.COMPLETE").exists():
            assert proc.poll() is None and time.time() < deadline, "writer never finished a shard"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    w = new_writer(path, n=n)
    assert 1000 <= w.done_rows < n and w.done_rows % S == 0
    write(path, w.pending(), w)
    assert file_bytes(w.close().path) == file_bytes(ref.path)


def test_shard_without_marker_is_never_read(tmp_path):
    ref = full_store(tmp_path / "ref")
    st = full_store(tmp_path / "s")
    (st.path / "shard_00001.COMPLETE").unlink()
    with pytest.raises(FileNotFoundError, match="shard 00001.*COMPLETE"):
        GradientStore(st.path)
    w = new_writer(st.path)  # keeps every complete shard (0 and 2), drops shard 1's files
    assert w.done_rows == 1000 and w.pending() == range(1000, N)
    assert w.complete_shards() == [0, 2] and w.pending_shards() == [1]
    assert sorted(p.name for p in st.path.glob("shard_*")) == [
        f"shard_0000{i}.{s}" for i in (0, 2) for s in ("COMPLETE", "json", "npy")
    ]
    write(st.path, w.pending(), w)  # the sequential writer rewrites shard 2: the same bytes
    assert file_bytes(w.close().path) == file_bytes(ref.path)
    (st.path / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        GradientStore(st.path)


def test_non_finite_and_fp16_overflow_raise_and_write_nothing(tmp_path):
    feats, ids, ntok, norms = make_data()
    w = new_writer(tmp_path / "s")
    w.add(ids[:999], feats[:999], ntok[:999], norms[:999])
    bad = feats[999:1001].copy()
    bad[1, 3] = np.nan
    with pytest.raises(FloatingPointError, match="ex-1000"):
        w.add(ids[999:1001], bad, ntok[999:1001], norms[999:1001])
    bad[1, 3] = np.inf
    with pytest.raises(FloatingPointError, match="ex-1000"):
        w.add(ids[999:1001], bad, ntok[999:1001], norms[999:1001])
    bad[1, 3] = 1e5  # finite in fp32, inf in fp16
    with pytest.raises(FloatingPointError, match=r"overflow float16.*ex-1000.*dtype='float32'"):
        w.add(ids[999:1001], bad, ntok[999:1001], norms[999:1001])
    assert not list((tmp_path / "s").glob("shard_*")) and w.pending() == range(999, N)
    w32 = StoreWriter(tmp_path / "s32", D, 1, SPEC, dtype="float32")
    w32.add(["big"], np.full((1, D), 1e5), [1], [1.0])
    assert w32.close().features().max() == 1e5


@pytest.mark.parametrize("fail_at", ["write_array", "fsync_npy", "fsync_json", "fsync_marker"])
def test_disk_full_leaves_no_partial_shard(tmp_path, monkeypatch, fail_at):
    feats, ids, ntok, norms = make_data()
    path = tmp_path / "s"
    w = new_writer(path)
    w.add(ids[:1000], feats[:1000], ntok[:1000], norms[:1000])  # shard 0 is fine
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if fail_at == "write_array":

        def half_write(fh, arr, **kw):
            fh.write(b"\x93NUMPY half a shard")
            raise enospc

        monkeypatch.setattr(np.lib.format, "write_array", half_write)
    else:
        calls, real = [], store_mod._fsync
        nth = ["fsync_npy", "fsync_json", "fsync_marker"].index(fail_at)

        def fsync(fh):
            calls.append(fh)
            if len(calls) > nth:
                raise enospc
            real(fh)

        monkeypatch.setattr(store_mod, "_fsync", fsync)
    with pytest.raises(OSError) as err:
        w.add(ids[1000:2000], feats[1000:2000], ntok[1000:2000], norms[1000:2000])
    assert err.value.errno == errno.ENOSPC
    assert f"shard 1 of {path}" in str(err.value) and "no partial shard" in str(err.value)
    assert sorted(p.name for p in path.iterdir()) == [
        "meta.json",
        "shard_00000.COMPLETE",
        "shard_00000.json",
        "shard_00000.npy",
    ]
    monkeypatch.undo()
    assert new_writer(path).done_rows == 1000


def test_mismatches_and_missing_ids(tmp_path):
    a = full_store(tmp_path / "a")
    with pytest.raises(StoreMismatch, match=r"spec\.sketch\.seed: 0 != 1"):
        new_writer(a.path, sketch={"kind": "rademacher", "dim": D, "seed": 1})
    with pytest.raises(StoreMismatch, match="dtype"):
        new_writer(a.path, dtype="float32")
    b = full_store(tmp_path / "b", dtype="float32")
    a.check_compatible(b, ["model", "sketch", "layout", "dim"])
    c = StoreWriter(tmp_path / "c", D, 1, {**SPEC, "sketch": {"kind": "countsketch"}})
    c.add(["x"], np.ones((1, D)), [1], [1.0])
    with pytest.raises(StoreMismatch, match="sketch") as err:
        a.check_compatible(c.close(), ["model", "sketch", "layout"])
    assert "model" not in str(err.value) and "layout" not in str(err.value)
    with pytest.raises(KeyError, match="nope"):
        a.index(["ex-1", "nope"])


def test_writer_refuses_wrong_counts(tmp_path):
    feats, ids, ntok, norms = make_data(10)
    w = StoreWriter(tmp_path / "s", D, 3, SPEC, shard_size=2)
    w.add(ids[:2], feats[:2], ntok[:2], norms[:2])
    with pytest.raises(ValueError, match="duplicate"):
        w.add(ids[:1], feats[:1], ntok[:1], norms[:1])
    with pytest.raises(ValueError, match="n_total"):
        w.add(ids[2:4], feats[2:4], ntok[2:4], norms[2:4])
    with pytest.raises(ValueError, match="2 of n_total=3"):
        w.close()
    assert w.done_rows == 2


def test_bytes_on_disk(tmp_path):
    assert store_bytes_per_example(8192, "float16") == 16384
    assert store_bytes_per_example(D, "float32") == 4 * D
    st = full_store(tmp_path / "s")
    npy = sorted(st.path.glob("*.npy"))
    payload = N * store_bytes_per_example(D, "float16")
    headers = sum(p.stat().st_size for p in npy) - payload
    assert payload == N * D * 2 and headers == 128 * len(npy)  # .npy v1.0 header: 128 B
    others = sum(p.stat().st_size for p in st.path.iterdir() if p.suffix != ".npy")
    assert st.bytes_on_disk() == payload + headers + others


def test_expect_names_a_store_from_another_model_or_sketch(tmp_path):
    st = full_store(tmp_path / "s")
    st.expect({"sketch": dict(SPEC["sketch"])})  # its own spec: fine
    with pytest.raises(
        StoreMismatch,
        match=r"not written for this run \(model: 'tiny' != 'another-model'.*delete it",
    ):
        st.expect({"model": "another-model"})
    with pytest.raises(StoreMismatch, match=r"sketch\.seed"):
        st.expect({"sketch": {**SPEC["sketch"], "seed": 7}})
