"""Random projections: determinism (golden values), linearity, JL accuracy, spec checks."""

from __future__ import annotations

import math

import pytest
import torch

from dataselect.features.sketch import (
    HASH_VERSION,
    KINDS,
    Sketch,
    SketchMismatch,
    SketchSpec,
    check_same_sketch,
    hash64,
    mix64_py,
)

RANDOM_KINDS = ("rademacher", "gaussian", "sjlt", "countsketch")
SKETCH_KINDS = tuple(k for k in KINDS if k != "factorized")  # test_factorized.py has that one
M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def _signed(x: int) -> int:
    return x - (1 << 64) if x >> 63 else x


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _one_thread():
    """Dense generation is many small ops: 2 OpenMP threads on a shared 2-core box can be 100x
    slower than 1 when another process holds a core (measured), so these tests use one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- golden values (hash changes)


def test_hash_matches_python_splitmix64_and_golden():
    key = SketchSpec("rademacher", 3, 70).key
    assert key == 6238072747940578789
    c = torch.arange(0, 5000, 7, dtype=torch.int64)
    ref = [_signed(mix64_py(key + (i + 1) * GAMMA)) for i in c.tolist()]
    assert hash64(key, c).tolist() == ref  # int64 multiply wraps mod 2^64 as required
    golden = [-4616330145664149646, 6869446166584666695, 8084911050856847527, -846397198931878612]
    assert hash64(key, torch.arange(4)).tolist() == golden


def test_golden_rademacher_entries():
    e = Sketch(SketchSpec("rademacher", 3, 70, seed=0)).entries()
    assert torch.equal(e.abs(), torch.full((3, 70), 1 / math.sqrt(70)))
    golden = [
        "+-++---+---+-+--+-++++---+---+--++++--+++++++++-----+---------+----+++",
        "---++-+-+++--+----++----+-+--+----++++-------+-+--++--++++++---+++--+-",
        "--+---+-+++-+--+-+++++-----++----++-+-++----+-+++-+---+---++--+++--++-",
    ]
    got = ["".join("+" if v > 0 else "-" for v in row) for row in e.tolist()]
    assert got == golden


def test_golden_gaussian_entries_bit_exact():
    e = Sketch(SketchSpec("gaussian", 2, 5, seed=1)).entries() * math.sqrt(5)
    golden = [
        [1.3281166553497314, 0.3286164104938507, 1.7984074354171753, 1.3048902750015259,
         0.17400462925434113],
        [0.8685804605484009, 0.6444795727729797, 0.27585798501968384, 0.1444583237171173,
         0.42081549763679504],
    ]  # fmt: skip
    assert torch.allclose(e, torch.tensor(golden), rtol=0, atol=1e-6)
    unscaled = Sketch(SketchSpec("gaussian", 2, 5, seed=1))._generate(0, 2, torch.device("cpu"))
    assert unscaled.tolist() == golden  # float32 values, exactly


def test_golden_sparse_buckets():
    sj = Sketch(SketchSpec("sjlt", 6, 8, seed=2))
    assert sj.indices.tolist() == [
        [0, 2, 4, 6], [1, 3, 5, 6], [1, 3, 5, 7], [1, 3, 5, 6], [1, 3, 5, 7], [0, 3, 4, 6]
    ]  # fmt: skip
    assert sj.signs.tolist() == [
        [-1, -1, 1, -1], [-1, -1, -1, 1], [-1, -1, -1, -1], [1, 1, 1, 1], [-1, 1, 1, -1],
        [-1, 1, -1, 1],
    ]  # fmt: skip
    cs = Sketch(SketchSpec("countsketch", 6, 5, seed=2))
    assert cs.indices.flatten().tolist() == [1, 2, 0, 0, 3, 2]
    assert cs.signs.flatten().tolist() == [-1, -1, 1, -1, -1, -1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_cpu_and_cuda_agree(kind):
    spec = SketchSpec(kind, 3000, 3000 if kind == "none" else 512, seed=5, block_rows=1000)
    cpu, gpu = Sketch(spec), Sketch(spec, device="cuda")
    assert torch.equal(cpu.entries(0, 300), gpu.entries(0, 300).cpu())  # the matrix: bit-exact
    if spec.nnz:
        assert torch.equal(cpu.indices, gpu.indices.cpu())
        assert torch.equal(cpu.signs, gpu.signs.cpu())
    x = torch.randn(4, 3000, generator=_gen())
    y_cpu, y_gpu = cpu.project(x), gpu.project(x.cuda())
    assert y_gpu.device.type == "cuda"
    assert torch.allclose(y_cpu, y_gpu.cpu(), rtol=1e-4, atol=1e-4)  # summation order only


# ---------------------------------------------------------------- determinism and linearity


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_same_spec_same_projection_and_seed_matters(kind):
    spec = SketchSpec(kind, 1500, 256, seed=3, block_rows=400)
    x = torch.randn(3, 1500, generator=_gen())
    a, b = Sketch(spec), Sketch(spec)
    ya = a.project(x)
    assert ya.shape == (3, 256) and ya.dtype == torch.float32
    assert torch.equal(ya, b.project(x))
    assert torch.equal(ya, a.project(x))
    assert torch.equal(a.entries(), b.entries())
    other = Sketch(SketchSpec(kind, 1500, 256, seed=4)).project(x)
    assert not torch.allclose(ya, other, atol=1e-3)
    # block size changes only the summation order, never the matrix
    assert torch.allclose(ya, Sketch(SketchSpec(kind, 1500, 256, seed=3)).project(x), atol=1e-5)
    assert torch.allclose(a.project(x[1]), ya[1], atol=1e-5)  # 1-D input


@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_linearity_and_matches_explicit_matrix(kind):
    D = 700
    spec = SketchSpec(kind, D, D if kind == "none" else 128, seed=9, block_rows=256)
    sk = Sketch(spec)
    x, y = torch.randn(2, 5, D, generator=_gen(1))
    a = -2.5
    assert torch.allclose(sk.project(a * x + y), a * sk.project(x) + sk.project(y), atol=1e-4)
    assert torch.allclose(sk.project(x), x @ sk.entries(), atol=1e-4)


@pytest.mark.parametrize("backend", ["csr", "index_add"])
@pytest.mark.parametrize("kind", ["sjlt", "countsketch"])
def test_sparse_small_explicit_example(kind, backend):
    sk = Sketch(SketchSpec(kind, 5, 3, seed=11, nnz=2), backend=backend)
    nnz = 2 if kind == "sjlt" else 1
    assert sk.indices.shape == (5, nnz) and sk.indices.dtype == torch.int32
    M = torch.zeros(5, 3)
    for i in range(5):
        for k in range(nnz):
            M[i, sk.indices[i, k]] += float(sk.signs[i, k]) / math.sqrt(nnz)
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5, 4.0], [0.0, 1.0, 0.0, 0.0, -1.0]])
    assert torch.allclose(sk.project(x), x @ M, atol=1e-6)
    assert torch.allclose(sk.entries(), M)


@pytest.mark.parametrize("nnz", [1, 3, 4])
def test_sparse_buckets_each_coordinate_in_nnz_distinct_slots(nnz):
    D, d = 10_000, 1000
    sk = Sketch(SketchSpec("sjlt", D, d, seed=1, nnz=nnz))
    assert int(torch.bincount(sk.indices.flatten().long(), minlength=d).sum()) == D * nnz
    assert set(sk.signs.unique().tolist()) == {-1, 1}
    bounds = [k * d // nnz for k in range(nnz + 1)]
    for k in range(nnz):  # slot k lands in block k, so the nnz buckets are distinct
        assert bool(((sk.indices[:, k] >= bounds[k]) & (sk.indices[:, k] < bounds[k + 1])).all())
    assert torch.allclose(sk.entries().pow(2).sum(1), torch.ones(D))  # unit rows
    x = torch.randn(2, D, generator=_gen())
    backends = [Sketch(sk.spec, backend=b).project(x) for b in ("csr", "index_add")]
    assert torch.allclose(*backends, atol=1e-4)


def test_none_is_identity_and_input_dtype():
    x = torch.randn(3, 50, generator=_gen())
    assert torch.equal(Sketch(SketchSpec("none", 50, 50)).project(x), x)
    half = Sketch(SketchSpec("none", 50, 50, input_dtype="float16")).project(x)
    assert half.dtype == torch.float32 and torch.equal(half, x.half().float())
    r = Sketch(SketchSpec("rademacher", 50, 16, input_dtype="float16"))
    assert torch.allclose(r.project(x), x.half().float() @ r.entries(), atol=1e-5)


def test_dense_block_cache_gives_same_result():
    spec = SketchSpec("rademacher", 1000, 64, block_rows=300)
    x = torch.randn(2, 1000, generator=_gen())
    cached = Sketch(spec, cache_blocks=True)
    y1, y2 = cached.project(x), cached.project(x)
    assert len(cached._cache) == 4 and torch.equal(y1, y2)
    assert torch.equal(y1, Sketch(spec).project(x))
    tiny = Sketch(spec, cache_blocks=True, cache_bytes=300 * 64 * 2)
    tiny.project(x)
    assert len(tiny._cache) == 1


# ---------------------------------------------------------------- Johnson-Lindenstrauss


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_jl_cosines_and_norms_preserved(kind):
    D, d, n = 20_000, 4096, 12
    g = _gen(7)
    base = torch.randn(n, D, generator=g)
    x = base + 0.7 * base.roll(1, 0) + 0.2 * torch.randn(n, D, generator=g)  # varied cosines
    x = x * (1 + torch.rand(n, 1, generator=g) * 10)
    sx = Sketch(SketchSpec(kind, D, d, seed=2, block_rows=5000)).project(x)

    def cos(v):
        v = v / v.norm(dim=1, keepdim=True)
        return v @ v.T

    iu = torch.triu_indices(n, n, 1)
    c_true, c_sk = cos(x)[iu[0], iu[1]], cos(sx)[iu[0], iu[1]]
    assert c_true.abs().max() > 0.3  # the pairs are not all orthogonal
    assert (c_sk - c_true).abs().mean() < 0.02
    ratio = sx.norm(dim=1) / x.norm(dim=1)
    assert (ratio - 1).abs().mean() < 0.03


# ---------------------------------------------------------------- spec, dicts, mismatch


def test_spec_validation_and_normalization():
    with pytest.raises(ValueError, match="unknown sketch kind"):
        SketchSpec("fourier", 10, 5)
    with pytest.raises(ValueError):
        SketchSpec("sjlt", 10, 0)
    with pytest.raises(ValueError, match="nnz"):
        SketchSpec("sjlt", 10, 3, nnz=4)
    with pytest.raises(ValueError, match="identity"):
        SketchSpec("none", 10, 5)
    with pytest.raises(ValueError, match="input_dtype"):
        SketchSpec("gaussian", 10, 5, input_dtype="int8")
    assert SketchSpec("countsketch", 10, 5).nnz == 1
    assert SketchSpec("rademacher", 10, 5, nnz=7).nnz == 0
    assert SketchSpec("none", 10, 10, seed=3).seed == 0
    assert SketchSpec("gaussian", 10, 20).dim_out == 20  # d > D is allowed (wasteful, valid)
    assert "sjlt 10->5" in SketchSpec("sjlt", 10, 5, nnz=2).describe()
    with pytest.raises(ValueError, match="expected"):
        Sketch(SketchSpec("sjlt", 10, 5)).project(torch.zeros(2, 11))


def test_to_dict_round_trip():
    spec = SketchSpec("sjlt", 921_600, 8192, seed=4, nnz=3, input_dtype="float16")
    d = spec.to_dict()
    assert d["hash"] == HASH_VERSION and d["kind"] == "sjlt"
    assert SketchSpec.from_dict(d) == spec
    with pytest.raises(ValueError, match="hash"):
        SketchSpec.from_dict({**d, "hash": "other"})


def test_check_same_sketch():
    a = SketchSpec("rademacher", 1000, 8192, seed=0).to_dict()
    check_same_sketch(a, dict(a))
    check_same_sketch(a, {**a, "block_rows": 17})  # speed knob, not part of the matrix
    check_same_sketch(a, {**a, "nnz": 9})  # unused by dense kinds, normalized away
    for field, value in [("kind", "gaussian"), ("seed", 1), ("dim_out", 4096), ("dim_in", 999),
                         ("input_dtype", "float16")]:  # fmt: skip
        with pytest.raises(SketchMismatch, match=field) as err:
            check_same_sketch(a, {**a, field: value})
        assert isinstance(err.value, ValueError)
    with pytest.raises(SketchMismatch, match=r"dim_out: 8192 != 10.*seed: 0 != 1") as err:
        check_same_sketch(a, {**a, "seed": 1, "dim_out": 10})
    assert "kind" not in str(err.value)
    with pytest.raises(SketchMismatch, match="nnz: 4 != 2"):
        sj = SketchSpec("sjlt", 100, 64).to_dict()
        check_same_sketch(sj, {**sj, "nnz": 2})


def test_csr_failure_falls_back_to_index_add(monkeypatch):
    sk = Sketch(SketchSpec("sjlt", 100, 16, seed=1))
    assert sk.backend == "csr" and Sketch(SketchSpec("countsketch", 100, 16)).backend == "index_add"
    x = torch.randn(2, 100, generator=_gen())
    ref = sk.project(x)

    def no_csr(device):
        raise RuntimeError("sparse CSR matmul unsupported")

    monkeypatch.setattr(sk, "_csr_on", no_csr)
    assert torch.allclose(sk.project(x), ref, atol=1e-5) and sk.backend == "index_add"
    assert Sketch(SketchSpec("gaussian", 100, 16)).indices.shape == (100, 0)
