"""Factorized LoRA sketch: hooks vs explicit matrix, the documented definition, determinism,
the sgd-only rule, and a store featurized end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_gradients import examples, lora_model

from dataselect.data.formatting import tokenize_examples
from dataselect.features import featurize as fz
from dataselect.features.factorized import (
    FactorizedSketch,
    auto_factor,
    block_sq_norms,
    check_gradient_type,
    factorized_spec,
    make_sketch,
    per_example_sketch,
)
from dataselect.features.gradients import per_example_grads
from dataselect.features.sketch import (
    Sketch,
    SketchMismatch,
    SketchSpec,
    check_same_sketch,
    factor_dims,
    mix64_py,
)
from dataselect.training import collate

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]  # blocks (4|32|64, 4) and (4, 64|128)
GAMMA = 0x9E3779B97F4A7C15


@pytest.fixture(autouse=True)
def _one_thread():
    """Many tiny ops: on a shared 2-core box one thread is faster (as in test_sketch.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture()
def model(tiny_model_dir):
    return lora_model(tiny_model_dir, TARGETS)  # random lora_B: every block's gradient is non-zero


@pytest.fixture()
def batch():
    return collate(examples(), pad_id=0)  # 5 rows, lengths 7..30: right-padded


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------- the hooks give g @ S


@pytest.mark.parametrize("factor", [3, 6, 200])  # both sides projected | r side whole | identity
def test_hooks_equal_explicit_matrix_on_padded_batch(model, batch, factor):
    spec = factorized_spec(model, factor, seed=1)
    assert spec.dim_out == sum(min(factor, o) * min(factor, i) for o, i in spec.blocks)
    assert len(spec.blocks) == 2 * 2 * len(TARGETS)  # 2 layers, lora_A + lora_B each
    g = per_example_grads(model, batch)  # (5, D), the materialized reference
    S = FactorizedSketch(spec).entries()
    assert S.shape == (spec.dim_in, spec.dim_out)
    if factor == 200:  # every side kept whole: S is the identity
        assert torch.equal(S, torch.eye(spec.dim_in))
    ref = g @ S
    for route in ("auto", "factors", "full"):
        sketch = FactorizedSketch(spec, route=route)
        feats, norms = per_example_sketch(model, batch, sketch)
        assert feats.shape == (5, spec.dim_out) and feats.dtype == torch.float32
        assert rel(feats, ref) < 1e-5, route
        assert torch.allclose(norms, g.norm(dim=1), rtol=1e-5), route
    assert rel(sketch.project(g), ref) < 1e-5
    assert rel(sketch.project(g[2]), ref[2]) < 1e-5  # 1-D input
    if factor == 3:
        loop, loop_norms = per_example_sketch(model, batch, sketch, method="loop")  # materializes
        assert rel(loop, ref) < 1e-4 and torch.allclose(loop_norms, norms, rtol=1e-4)


def test_both_norm_routes_are_exact():
    g = _gen(3)
    for T, o, i in [(2, 40, 50), (60, 8, 30)]:  # auto picks Gram, then full
        go, x = torch.randn(3, T, o, generator=g), torch.randn(3, T, i, generator=g)
        ref = torch.stack([(go[b].T @ x[b]).square().sum() for b in range(3)])
        for route in ("auto", "factors", "full"):
            assert torch.allclose(block_sq_norms(go, x, route), ref, rtol=1e-5)


def test_entries_are_the_documented_matrix():
    """S = blockdiag_b(P_out,b kron P_in,b); P = the Rademacher sketch with seed h(2b + s), or
    the identity for a side no wider than the factor."""
    blocks = ((4, 7), (5, 3), (2, 2))
    spec = SketchSpec("factorized", 28 + 15 + 4, 9 + 9 + 4, seed=5, factor=3, blocks=blocks)
    sk = FactorizedSketch(spec)
    key = SketchSpec("factorized", 28 + 15 + 4, 22, seed=5, factor=3, blocks=blocks).key
    assert key == mix64_py(5 * GAMMA + 4)

    def factor(b, s):
        n, k = blocks[b][s], min(3, blocks[b][s])
        if k == n:
            return torch.eye(n)
        seed = mix64_py(key + (2 * b + s + 1) * GAMMA)
        return Sketch(SketchSpec("rademacher", n, k, seed=seed)).entries()

    want = torch.block_diag(*[torch.kron(factor(b, 0), factor(b, 1)) for b in range(3)])
    assert torch.equal(sk.entries(), want)
    assert torch.equal(sk.entries(10, 31), want[10:31])
    nz = want[:28, :9]  # both sides projected: +-1/sqrt(3 * 3) everywhere
    assert torch.allclose(nz.abs(), torch.full_like(nz, 1 / 3))


def test_golden_entries():
    spec = SketchSpec("factorized", 12, 4, seed=1, factor=2, blocks=((3, 4),))
    e = FactorizedSketch(spec).entries()
    assert torch.allclose(e.abs(), torch.full((12, 4), 0.5))  # (1 / sqrt(2))^2
    got = ["".join("+" if v > 0 else "-" for v in row) for row in e.tolist()]
    assert got == [
        "--++", "++--", "-++-", "-++-", "--++", "++--", "-++-", "-++-", "----", "++++", "-+-+",
        "-+-+",
    ]  # fmt: skip


def test_inner_products_preserved():
    """E[S S^T] = I: norms and cosines of correlated vectors survive (blocks of equal energy)."""
    blocks = ((32, 48),) * 64
    spec = SketchSpec("factorized", 64 * 32 * 48, 64 * 64, seed=2, factor=8, blocks=blocks)
    g = _gen(7)
    base = torch.randn(12, spec.dim_in, generator=g)
    x = base + 0.7 * base.roll(1, 0) + 0.2 * torch.randn(12, spec.dim_in, generator=g)
    sx = FactorizedSketch(spec).project(x)
    cos = [torch.nn.functional.normalize(v, dim=1) @ torch.nn.functional.normalize(v, dim=1).T
           for v in (x, sx)]  # fmt: skip
    iu = torch.triu_indices(12, 12, 1)
    assert cos[0][iu[0], iu[1]].abs().max() > 0.3
    assert (cos[1] - cos[0])[iu[0], iu[1]].abs().mean() < 0.03
    assert ((sx.norm(dim=1) / x.norm(dim=1)) - 1).abs().mean() < 0.03


# ---------------------------------------------------------------- determinism


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cpu_and_cuda_agree(model, batch):
    spec = factorized_spec(model, 3, seed=1)
    cpu, gpu = FactorizedSketch(spec), FactorizedSketch(spec, device="cuda")
    assert torch.equal(cpu.entries(), gpu.entries().cpu())  # the matrix: bit-exact
    f_cpu, n_cpu = per_example_sketch(model, batch, cpu)
    f_gpu, n_gpu = per_example_sketch(model.cuda(), batch, gpu)
    assert f_gpu.device.type == "cuda"
    assert rel(f_gpu.cpu(), f_cpu) < 1e-4 and torch.allclose(n_gpu.cpu(), n_cpu, rtol=1e-4)


def test_same_spec_same_bytes_and_seed_matters(model, batch):
    spec = factorized_spec(model, 3, seed=1)
    a, b = FactorizedSketch(spec), FactorizedSketch(factorized_spec(model, 3, seed=1))
    assert torch.equal(a.entries(), b.entries())
    fa, _ = per_example_sketch(model, batch, a)
    fb, _ = per_example_sketch(model, batch, b)
    assert fa.numpy().tobytes() == fb.numpy().tobytes()
    other = FactorizedSketch(factorized_spec(model, 3, seed=2))
    assert not torch.equal(a.entries(), other.entries())
    assert not torch.allclose(per_example_sketch(model, batch, other)[0], fa, atol=1e-3)


# ---------------------------------------------------------------- spec and errors


def test_spec_validation_dict_and_mismatch(model):
    spec = factorized_spec(model, 6, seed=3)
    d = spec.to_dict()
    assert d["kind"] == "factorized" and d["factor"] == 6 and d["blocks"][0] == [4, 64]
    assert SketchSpec.from_dict(json.loads(json.dumps(d))) == spec
    assert "factor" not in SketchSpec("sjlt", 10, 5).to_dict()  # older stores stay comparable
    assert "factor=6" in spec.describe()
    with pytest.raises(SketchMismatch, match="factor: 6 != 3"):
        check_same_sketch(d, factorized_spec(model, 3, seed=3).to_dict())
    with pytest.raises(ValueError, match="factorized_spec"):
        SketchSpec("factorized", 12, 4)  # no blocks
    with pytest.raises(ValueError, match="12 -> 4 dims, spec says 12 -> 5"):
        SketchSpec("factorized", 12, 5, factor=2, blocks=((3, 4),))
    with pytest.raises(ValueError, match="input_dtype"):
        SketchSpec("factorized", 12, 4, factor=2, blocks=((3, 4),), input_dtype="float16")
    with pytest.raises(ValueError, match="factor >= 1"):
        factorized_spec(model, 0)
    with pytest.raises(ValueError, match="FactorizedSketch"):
        Sketch(spec)
    assert isinstance(make_sketch(spec), FactorizedSketch)
    assert isinstance(make_sketch(SketchSpec("sjlt", 10, 5)), Sketch)


def test_sketch_of_another_model_is_refused(model, batch, tiny_model_dir):
    other = lora_model(tiny_model_dir, ["q_proj"])
    with pytest.raises(ValueError, match="rebuild it with factorized_spec"):
        per_example_sketch(model, batch, FactorizedSketch(factorized_spec(other, 3)))


class TwiceLinear(torch.nn.Module):
    """A toy LM whose one trainable Linear runs twice per forward (a shared module)."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.head = (
            torch.nn.Embedding(20, 6), torch.nn.Linear(6, 6, bias=False), torch.nn.Linear(6, 20)
        )  # fmt: skip
        for p in [*self.emb.parameters(), *self.head.parameters()]:
            p.requires_grad_(False)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.head(self.lin(self.lin(self.emb(input_ids))))})


def test_a_weight_that_runs_twice_is_refused():
    toy, ids = TwiceLinear(), torch.randint(0, 20, (2, 5), generator=_gen())
    batch = {"input_ids": ids, "labels": ids}
    sketch = FactorizedSketch(factorized_spec(toy, 3))
    with pytest.raises(ValueError, match="ran twice"):
        per_example_sketch(toy, batch, sketch)
    g = per_example_grads(toy, batch)  # the materializing path adds both calls up
    loop, _ = per_example_sketch(toy, batch, sketch, method="loop")
    assert rel(loop, g @ sketch.entries()) < 1e-5


@pytest.mark.parametrize("gtype", ["adam", "sign"])
def test_adam_and_sign_features_are_refused(model, gtype, tmp_path):
    spec = factorized_spec(model, 3)
    with pytest.raises(ValueError, match=rf"cannot sketch '{gtype}'.*elementwise.*sjlt/rademacher"):
        check_gradient_type(spec, gtype)
    check_gradient_type(spec, "sgd")
    check_gradient_type(SketchSpec("sjlt", 10, 5), gtype)  # other kinds take any type
    with pytest.raises(ValueError, match="sjlt/rademacher"):
        fz.featurize_job(
            model, [], tmp_path / "s", gradient_type=gtype, sketch=spec, spec={},
            checkpoint=None, pad_id=0,
        )  # fmt: skip
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- a store, end to end


def test_featurize_store_end_to_end(tiny_model_dir, tiny_tokenizer, toy_examples, tmp_path):
    toks, _ = tokenize_examples(tiny_tokenizer, toy_examples, 256)
    model = lora_model(tiny_model_dir, TARGETS)
    spec = factorized_spec(model, 3, seed=4)
    pad = tiny_tokenizer.pad_token_id

    def run(out, method):
        return fz.featurize(
            model, toks, out, gradient_type="sgd", sketch=spec, spec={"model": "tiny"},
            checkpoint=None, pad_id=pad, dtype="float32",
            batching=fz.Batching(batch_size=3, shard_size=5, method=method),
        )  # fmt: skip

    store = run(tmp_path / "batched", "batched")
    assert len(store) == 12 and store.meta["spec"]["sketch"] == spec.to_dict()
    S = FactorizedSketch(spec).entries()
    by_id = {t.id: t for t in toks}
    g = torch.cat([per_example_grads(model, collate([by_id[i]], pad)) for i in store.ids])
    feats = torch.from_numpy(store.features())
    assert feats.shape == (12, spec.dim_out)
    assert rel(feats, g @ S) < 1e-5
    assert np.allclose(store.grad_norms, g.norm(dim=1).numpy(), rtol=1e-5)
    loop = run(tmp_path / "loop", "loop")
    assert loop.ids == store.ids
    assert np.allclose(loop.features(), store.features(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- in the config


def test_auto_factor_is_the_smallest_reaching_dim():
    blocks = [(8, 576), (576, 8), (8, 576), (192, 8)]

    def d(k):
        return sum(a * b for a, b in factor_dims(blocks, k))

    for dim in (1, 100, 383, 384, 385, 4000, d(576)):
        k = auto_factor(blocks, dim)
        assert d(k) >= dim and (k == 1 or d(k - 1) < dim), dim
    assert auto_factor(blocks, d(576) + 1) == 576  # unreachable: every side whole (d = D)
    with pytest.raises(ValueError, match="dim >= 1"):
        auto_factor(blocks, 0)


def test_pipeline_runs_a_factorized_sketch_and_refuses_adam_before_warmup(tmp_path):
    """`features.sketch.kind=factorized` through the pipeline: the pool and validation stores
    are the factorized sketch with the factor chosen from `dim`, LESS selects from them; with
    Adam features the run stops before any warmup is trained."""
    from test_pipeline import run as run_pipeline

    from dataselect.features.store import GradientStore

    fact = ["selector=less", "stage=select", "features.sketch.kind=factorized"]
    with pytest.raises(ValueError, match="cannot sketch 'adam' features"):
        run_pipeline(tmp_path, *fact)
    assert not (tmp_path / "cache" / "warmup").exists() or not any(
        (tmp_path / "cache" / "warmup").iterdir()
    )
    out = run_pipeline(tmp_path, *fact, "features.gradient_type=sgd", "features.sketch.dim=300")
    stores = [GradientStore(p) for p in sorted((tmp_path / "cache" / "features").glob("[!.]*"))]
    stores += [GradientStore(p) for p in (tmp_path / "cache" / "features_val").glob("[!.]*")]
    assert len(stores) == 4  # pool and validation at 2 checkpoints
    for s in stores:
        sk = s.meta["spec"]["sketch"]
        blocks = [tuple(b) for b in sk["blocks"]]
        assert sk["kind"] == "factorized" and sk["factor"] == auto_factor(blocks, 300)
        assert s.dim == sum(a * b for a, b in factor_dims(blocks, sk["factor"])) >= 300
    assert out["sizes"]["budget"] == 8
    assert len((tmp_path / "run1" / "selection.jsonl").read_text().splitlines()) == 8


def test_factor_is_in_the_store_key_only_for_the_factorized_kind():
    from hydra import compose, initialize_config_dir
    from test_pipeline import CONF

    from dataselect.keys import features_keys

    def keys(*over):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=["model=tiny_random", *over])
        return features_keys(cfg, cfg.features, "epoch_1")

    assert keys() == keys("features.sketch.factor=5")  # sjlt: factor decides nothing
    fact = "features.sketch.kind=factorized"
    assert len({keys(fact), keys(fact, "features.sketch.factor=5"), keys()}) == 3
