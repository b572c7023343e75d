"""Every pool pass is a job of shards like the gradient store: GIST's exact pass and the
baselines' model passes give the single-process bytes over 2 DDP ranks (gloo, CPU), and a
killed or damaged pass recomputes only the shards it lacks.

The 2-rank tests run every process on one thread: on CPU the bits of a matmul or a reduction
depend on the thread count (a DDP rank gets cores / ranks threads, this process all cores),
and the claim is about the sharding, not about the kernels."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_distributed import recipe, writers
from test_featurize import setup, snapshot  # noqa: F401  (setup is a fixture)

from dataselect.context import RunContext
from dataselect.data.formatting import tokenize_examples
from dataselect.features import featurize as fz
from dataselect.features.distributed import ModelAt, featurize_ddp
from dataselect.features.gradients import grad_dim
from dataselect.features.passes import LMPassJob, answer_loss, lm_job, lm_pass, shard_table
from dataselect.features.project import finish_projection, project_job, project_pool
from dataselect.features.shards import fill_store
from dataselect.features.store import StoreWriter

BATCHING = fz.Batching(batch_size=2, shard_size=4)
MODEL_CFG = {"dtype": "float32", "revision": None}


@pytest.fixture()
def one_thread(monkeypatch):
    """This process and the ranks it spawns (Lightning keeps a set OMP_NUM_THREADS) on one
    thread."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def subspace(model, k: int = 3) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.linalg.qr(rng.normal(size=(grad_dim(model), k)))[0].astype(np.float32)


def gist(model, toks, P, ckpt, pad, out):
    """GIST's pass in this process (Adam features: the workers load the optimizer state)."""
    kw = {"gradient_type": "adam", "checkpoint": ckpt, "batching": BATCHING}
    return project_pool(model, toks, P, out, {"model": "tiny"}, pad, **kw)


def test_gist_pass_over_two_ddp_ranks_is_the_single_process_store(
    setup,  # noqa: F811
    tmp_path,
    tiny_model_dir,
    one_thread,
):
    model, toks, ckpt, pad = setup
    P = subspace(model)
    one = gist(model, toks, P, ckpt, pad, tmp_path / "one")
    assert len(one) == 12 and one.dim == 3 and one.spec["gradient_type"] == "adam"
    assert sorted(p.name for p in one.path.iterdir() if "shard" not in p.name) == ["meta.json"]

    job = project_job(
        toks, P, tmp_path / "ddp", {"model": "tiny"}, pad,
        gradient_type="adam", checkpoint=ckpt, batching=BATCHING,
    )  # fmt: skip
    job.trace = tmp_path / "trace"
    two = featurize_ddp(job, recipe(tiny_model_dir, ckpt, tmp_path), devices=2)
    finish_projection(job)
    by_pid = writers(job.trace)
    assert len(by_pid) == 2 and os.getpid() not in by_pid, "two rank processes wrote shards"
    assert sorted(map(sorted, by_pid.values())) == [[0, 2], [1]]  # shard i -> rank i mod 2
    assert snapshot(two.path) == snapshot(one.path)
    assert np.array_equal(two.features(), one.features())


def test_a_damaged_gist_pass_recomputes_only_that_shard(setup, tmp_path):  # noqa: F811
    model, toks, ckpt, pad = setup
    P = subspace(model)
    whole = snapshot(gist(model, toks, P, ckpt, pad, tmp_path / "s").path)
    (tmp_path / "s" / "shard_00001.COMPLETE").unlink()  # as a killed writer leaves it
    job = project_job(
        toks, P, tmp_path / "s", {"model": "tiny"}, pad,
        gradient_type="adam", checkpoint=ckpt, batching=BATCHING,
    )  # fmt: skip
    job.trace = tmp_path / "trace"
    fill_store(model, job)
    finish_projection(job)
    assert writers(job.trace) == {os.getpid(): [1]}
    assert snapshot(tmp_path / "s") == whole


@pytest.fixture()
def lm(tiny_model_dir, tiny_tokenizer, toy_examples, tmp_path):
    """The base model as a worker loads it, the toy examples, and a loss pass's job."""
    toks, _ = tokenize_examples(tiny_tokenizer, toy_examples, 256)
    load = ModelAt({"name": str(tiny_model_dir), **MODEL_CFG}, str(tmp_path / "models"), None)
    pad, fc = tiny_tokenizer.pad_token_id, OmegaConf.create({"batch_size": 2, "shard_size": 4})

    def job(out, trace=None) -> LMPassJob:
        j = lm_job(toks, out, answer_loss, 1, {"stage": "pool_loss"}, pad, fc, "pool losses")
        j.trace = trace
        return j

    return load, toks, pad, job


def test_loss_pass_over_two_ddp_ranks_is_the_single_process_store(lm, tmp_path, one_thread):
    load, toks, pad, job = lm
    one = fill_store(load(), job(tmp_path / "one"))
    trace = tmp_path / "trace"
    two = featurize_ddp(job(tmp_path / "ddp", trace), load, devices=2)
    by_pid = writers(trace)
    assert len(by_pid) == 2 and os.getpid() not in by_pid, "two rank processes wrote shards"
    assert snapshot(two.path) == snapshot(one.path)
    # the rows are the unsharded pass's losses (batches of 2 never cross a shard of 4)
    want = lm_pass(load().eval(), toks, pad, answer_loss, batch_size=2)
    assert np.array_equal(two.features(two.index([t.id for t in toks]))[:, 0], want)


def test_a_killed_pool_table_resumes_from_its_shards(lm, tmp_path, monkeypatch):
    """``shard_table`` (perplexity's, RDS's, the embeddings' pool side): killed after one
    shard, the next run computes the other two only; the artifact is the one an unsharded
    pass wrote (ids.json + values.npy in pool order), no shards left in it."""
    load, toks, pad, job = lm
    model, ids, trace = load().eval(), [t.id for t in toks], tmp_path / "trace"
    ctx = RunContext(OmegaConf.create({"paths": {"cache_dir": str(tmp_path / "cache")}}))
    run = lambda j: fill_store(model, j)  # noqa: E731

    real, calls = StoreWriter.write_shard, []

    def dying(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **k)

    monkeypatch.setattr(StoreWriter, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        shard_table(ctx, "pool_loss", "k1", ids, lambda out: job(out, trace), run, 12, True)
    monkeypatch.setattr(StoreWriter, "write_shard", real)
    assert writers(trace) == {os.getpid(): [0]}
    trace.unlink()
    tab, art = shard_table(ctx, "pool_loss", "k1", ids, lambda out: job(out, trace), run, 12, True)
    assert writers(trace) == {os.getpid(): [1, 2]}
    assert sorted(p.name for p in art.path.iterdir()) == ["COMPLETE", "ids.json", "values.npy"]
    assert json.loads((art.path / "ids.json").read_text()) == ids == tab.ids
    want = lm_pass(model, toks, pad, answer_loss, batch_size=2).astype(np.float32)
    assert tab.values.dtype == np.float32 and tab.values.shape == (12,)
    assert np.array_equal(tab.values, want)
    assert art.cost == "pool" and art.bytes_per_pool_example == 4


@pytest.mark.parametrize(
    ("selector", "stage"), [("perplexity", "pool_loss"), ("embed", "embed_pool")]
)
def test_pipeline_runs_a_baseline_pass_as_an_array_into_the_same_table(
    tmp_path, monkeypatch, selector, stage
):
    """``features.distributed`` reaches the baselines' pool passes (submitit's in-process
    ``debug`` cluster here: the wiring, each task loading its model from the recipe); the
    table and the selection are those of one process, and the mode is not in the key."""
    from test_pipeline import run as run_pipeline

    from dataselect.features import distributed

    tasks, real = [], distributed.run_array_task

    def spy(job, load_model, shards):
        tasks.append((list(shards), real(job, load_model, shards)))
        return tasks[-1][1]

    monkeypatch.setattr(distributed, "run_array_task", spy)

    common = [f"selector={selector}", "stage=select", "features.shard_size=8"]
    run_pipeline(tmp_path / "one", *common)
    arr = [
        "features.distributed.mode=submitit",
        "features.distributed.tasks=2",
        "features.distributed.submitit.cluster=debug",
    ]
    run_pipeline(tmp_path / "arr", *common, *arr)
    got = []
    for p in (tmp_path / "one", tmp_path / "arr"):
        (entry,) = (p / "cache" / stage).glob("[!.]*")
        got.append((entry.name, *((entry / f).read_bytes() for f in ("ids.json", "values.npy"))))
        got[-1] += ((p / "run0" / "selection.jsonl").read_text(),)
    assert sorted(tasks) == [([0, 2, 4], 3), ([1, 3], 2)]  # 40 examples, 5 shards of 8
    assert got[0] == got[1]
    assert not (tmp_path / "one" / "cache" / stage / got[0][0] / "shards").exists()


def test_a_loss_pass_caps_its_batches_at_max_batch_tokens(lm, tmp_path, monkeypatch):
    """``features.max_batch_tokens`` bounds the baselines' pool passes as it bounds
    featurizing (padded tokens per batch), and the capped pass gives the same losses."""
    from dataselect.features import passes

    load, toks, pad, _ = lm
    longest = max(len(t.input_ids) for t in toks)
    fc = OmegaConf.create({"batch_size": 4, "shard_size": 4, "max_batch_tokens": longest + 1})
    sizes = []
    real = passes.token_batches

    def spy(todo, batch_size, max_tokens):
        out = list(real(todo, batch_size, max_tokens))
        sizes.extend((len(c), max(len(t.input_ids) for t in c), max_tokens) for c in out)
        return out

    monkeypatch.setattr(passes, "token_batches", spy)
    j = lm_job(toks, tmp_path / "capped", answer_loss, 1, {"stage": "pool_loss"}, pad, fc, "x")
    store = fill_store(load(), j)
    assert sizes and {m for *_, m in sizes} == {longest + 1}
    assert all(n * width <= longest + 1 or n == 1 for n, width, _ in sizes)
    assert any(n == 1 for n, _, _ in sizes)  # the cap split batches the size alone would not
    want = lm_pass(load().eval(), toks, pad, answer_loss, batch_size=4)
    got = store.features(store.index([t.id for t in toks]))[:, 0]
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)
