"""Featurizing over processes: 2 DDP ranks (gloo, CPU) and a submitit array write the same
store, byte for byte, as one process; a killed worker's shards are finished by the coordinator."""

from __future__ import annotations

import os

import pytest
from test_featurize import run, setup, snapshot  # noqa: F401  (setup is a fixture)

from dataselect.features import featurize as fz
from dataselect.features.distributed import (
    ModelAt,
    featurize_array,
    featurize_ddp,
    make_executor,
    shard_groups,
)
from dataselect.features.gradients import grad_dim
from dataselect.features.sketch import SketchSpec
from dataselect.features.store import GradientStore


def job_for(model, toks, ckpt, pad, out, trace=None):
    job = fz.featurize_job(
        model,
        toks,
        out,
        gradient_type="adam",
        sketch=SketchSpec("sjlt", grad_dim(model), 32, seed=1),
        spec={"model": "tiny"},
        checkpoint=ckpt,
        pad_id=pad,
        batching=fz.Batching(batch_size=2, shard_size=4),
        dtype="float32",
    )
    job.trace = trace
    return job


def recipe(tiny_model_dir, ckpt, tmp_path) -> ModelAt:
    cfg = {"name": str(tiny_model_dir), "dtype": "float32", "revision": None}
    return ModelAt(cfg, str(tmp_path / "models"), str(ckpt / "adapter"))


def writers(trace) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for line in trace.read_text().split("\n"):
        if line:
            pid, shard = map(int, line.split())
            out.setdefault(pid, []).append(shard)
    return out


def test_shard_groups_round_robin():
    assert shard_groups([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert shard_groups([5], 3) == [[5]]


def test_ddp_two_cpu_ranks_write_the_single_process_store(setup, tmp_path, tiny_model_dir):  # noqa: F811
    model, toks, ckpt, pad = setup
    one = run(model, toks, ckpt, pad, tmp_path / "one", "adam")
    trace = tmp_path / "trace"
    job = job_for(model, toks, ckpt, pad, tmp_path / "ddp", trace)
    two = featurize_ddp(job, recipe(tiny_model_dir, ckpt, tmp_path), devices=2)
    by_pid = writers(trace)
    assert len(by_pid) == 2 and os.getpid() not in by_pid, "two rank processes wrote shards"
    assert sorted(s for ss in by_pid.values() for s in ss) == [0, 1, 2]
    assert sorted(map(sorted, by_pid.values())) == [[0, 2], [1]]  # shard i -> rank i mod 2
    assert snapshot(two.path) == snapshot(one.path)
    assert two.ids == one.ids


def test_ddp_resumes_a_store_another_run_left(setup, tmp_path, tiny_model_dir):  # noqa: F811
    model, toks, ckpt, pad = setup
    one = run(model, toks, ckpt, pad, tmp_path / "one", "adam")
    job = job_for(model, toks, ckpt, pad, tmp_path / "ddp", tmp_path / "trace")
    w = job.writer()
    fz.compute_shards(model, job, [1], w)  # a killed run finished shard 1 only
    (tmp_path / "trace").unlink()
    (job.out / "shard_00002.npy.tmp999999").write_bytes(b"half")  # and died inside shard 2
    two = featurize_ddp(job, recipe(tiny_model_dir, ckpt, tmp_path), devices=2)
    assert sorted(s for ss in writers(tmp_path / "trace").values() for s in ss) == [0, 2]
    assert snapshot(two.path) == snapshot(one.path)


def test_submitit_array_over_the_same_cache(setup, tmp_path, tiny_model_dir):  # noqa: F811
    pytest.importorskip("submitit")
    model, toks, ckpt, pad = setup
    one = run(model, toks, ckpt, pad, tmp_path / "one", "adam")
    trace = tmp_path / "trace"
    job = job_for(model, toks, ckpt, pad, tmp_path / "arr", trace)
    ex = make_executor({"cluster": "local", "timeout_min": 5}, tmp_path / "submitit")
    store = featurize_array(job, recipe(tiny_model_dir, ckpt, tmp_path), 2, ex, model)
    by_pid = writers(trace)
    assert len(by_pid) == 2 and os.getpid() not in by_pid, "two array tasks wrote shards"
    assert snapshot(store.path) == snapshot(one.path)
    assert isinstance(GradientStore(store.path), GradientStore)


def test_a_failed_array_task_is_finished_by_the_coordinator(setup, tmp_path, tiny_model_dir):  # noqa: F811
    pytest.importorskip("submitit")
    model, toks, ckpt, pad = setup
    one = run(model, toks, ckpt, pad, tmp_path / "one", "adam")
    trace = tmp_path / "trace"
    job = job_for(model, toks, ckpt, pad, tmp_path / "arr", trace)
    broken = ModelAt({"name": str(tmp_path / "no-such-model"), "dtype": "float32"}, "", "")
    ex = make_executor({"cluster": "debug"}, tmp_path / "submitit")
    store = featurize_array(job, broken, 2, ex, fallback_model=model)  # every task fails
    assert writers(trace) == {os.getpid(): [0, 1, 2]}
    assert snapshot(store.path) == snapshot(one.path)


def test_pipeline_featurizes_as_a_submitit_array_into_the_same_store(tmp_path):
    """`features.distributed.mode=submitit` through the pipeline (local executor, 2 tasks):
    the same pool stores and selection as one process; the mode is not in the key."""
    from drills import digest
    from test_pipeline import run as run_pipeline

    common = ["selector=less", "stage=select", "features.shard_size=8"]
    one = run_pipeline(tmp_path / "one", *common)
    arr = run_pipeline(
        tmp_path / "arr",
        *common,
        "features.distributed.mode=submitit",
        "features.distributed.tasks=2",
        "features.distributed.submitit.cluster=local",
    )
    stores = [
        {k: v for k, v in digest(p / "cache").items() if k.startswith("features/")}
        for p in (tmp_path / "one", tmp_path / "arr")
    ]
    assert stores[0] and stores[0] == stores[1]
    assert len(list((tmp_path / "arr" / "cache" / "submitit").rglob("*_result.pkl"))) >= 2
    sel = [
        (p / "run0" / "selection.jsonl").read_text() for p in (tmp_path / "one", tmp_path / "arr")
    ]
    assert sel[0] == sel[1] and one["sizes"] == arr["sizes"]
