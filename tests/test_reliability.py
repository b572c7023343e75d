"""The fault drills (``experiments/reliability/drills.py``) on the tiny model, each a real
``python -m dataselect`` process: kill -9 inside every stage, a concurrent pair, determinism
across runs and 1 vs 2 DDP processes, a full disk, NaN weights, foreign stores, damaged cache
files (``corruption.py``), and the whole bad-input corpus through ``run_pipeline``. Every
drill must pass."""

from __future__ import annotations

import random

import corruption
import drills
import pytest


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = drills.Workspace.create(tmp_path_factory.mktemp("drills"))
    ws.reference()
    return ws


def test_the_drills_enumerate_the_stage_graph():
    """Every stage of the graph is drilled, or finishes too fast to interrupt (select); the
    digests cover every cache folder the dry run lists for the drills' config."""
    from dataselect.stages import STAGES

    assert drills.kill_stages() == ("warmup", "features", "finetune", "evaluate")
    assert {s.name for s in STAGES} - set(drills.kill_stages()) == {"select"}
    assert drills.cache_stages() == (
        "warmup",
        "features",
        "features_val",
        "select",
        "finetune",
        "evaluate",
    )


@pytest.mark.parametrize("stage", drills.kill_stages())
def test_kill_9_inside_a_stage_resumes_to_identical_artifacts(ws, stage):
    d = drills.kill_drill(ws, stage, random.Random(stage), f"kill-{stage}")
    assert d.ok and d.identical, d.outcome
    assert "killed" in d.outcome and f"into {stage}" in d.outcome


@pytest.mark.parametrize("stage", drills.kill_stages())
def test_kill_9_after_a_unit_of_work_resumes_from_it(ws, stage):
    """Killed right after an epoch checkpoint / a shard / a benchmark: the re-run resumes from
    it (its log says so) and ends with the reference artifacts."""
    d = drills.kill_after_progress_drill(ws, stage)
    assert d.ok and d.identical, d.outcome


def test_digest_sees_a_changed_artifact(ws, tmp_path):
    """The drills' notion of identical is not vacuous: one flipped byte is a difference."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(ws.reference(), cache)
    ref = drills.digest(ws.reference())
    assert drills.differences(ref, drills.digest(cache)) == []
    assert any(k.endswith(".npy") for k in ref) and any("adapter_model" in k for k in ref)
    shard = next((cache / "features").glob("*/shard_00000.npy"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert drills.differences(ref, drills.digest(cache)) == [
        f"features/{shard.parent.name}/shard_00000.npy"
    ]


def test_concurrent_pair_builds_each_artifact_once(ws):
    d = drills.concurrent_drill(ws)
    assert d.ok and d.identical, d.outcome


def test_same_selection_across_runs_and_1_vs_2_processes(ws):
    d = drills.determinism_drill(ws)
    assert d.ok, d.outcome


def test_full_disk_leaves_no_partial_shard_and_resumes(ws):
    d = drills.full_disk_drill(ws)
    assert d.ok and d.identical, d.outcome


def test_nan_weights_stop_the_run_and_leave_nothing_trusted(ws):
    d = drills.nan_drill(ws)
    assert d.ok, d.outcome


@pytest.mark.parametrize("what", ["model", "sketch"])
def test_a_store_from_another_model_or_sketch_is_refused(ws, what):
    d = drills.foreign_store_drill(ws, what)
    assert d.ok, d.outcome
    assert ("model.name" if what == "model" else "sketch.seed") in d.outcome


def test_bad_input_corpus_through_the_pipeline(ws):
    rows = drills.bad_input_drills(ws)
    failed = [f"{r.name}: {r.outcome}" for r in rows if not r.ok]
    assert len(rows) >= 30 and not failed, failed


def test_a_run_without_a_terminal_logs_training_and_featurizing_progress(ws):
    """The reference run's stdout is a file, as under nohup or Slurm (the drills set
    DATASELECT_PROGRESS_EVERY=0): training and the gradient pass log progress lines."""
    log = (ws.root / "reference" / "out0" / "run.log").read_text()
    lines = [x for x in log.splitlines() if "[dataselect.progress]" in x]
    steps = [x for x in lines if "] - training: " in x]
    grads = [x for x in lines if "] - gradients (" in x]
    assert len(steps) >= 4 and "step/s" in steps[0] and "ETA" in steps[0] and "loss " in steps[0]
    assert len(grads) >= 4 and "ex/s" in grads[0] and "elapsed" in grads[0]
    assert any("(100%)" in x for x in grads) and "\r" not in log


def test_damaged_complete_entries_are_refused_reported_removed_and_rebuilt(ws):
    """A store shard flipped, another truncated, an adapter flipped: each refused on reuse,
    reported by ``dataselect verify``, removed by ``--remove``, rebuilt as the reference."""
    d = corruption.complete_entry_drill(ws)
    n = len(corruption.DAMAGES)
    assert d.ok and d.identical, d.outcome
    assert f"refused on reuse: {n}/{n}" in d.outcome and f"{n}/{n} reported" in d.outcome


@pytest.mark.parametrize(
    "stage, marker, damaged",
    [
        ("warmup", "epoch_1/COMPLETE", "epoch_1/trainer.ckpt"),  # the resume file
        ("features", "shard_00002.COMPLETE", "shard_00001.npy"),  # a finished shard
    ],
)
def test_damaged_partial_work_is_recomputed_not_resumed(ws, stage, marker, damaged):
    d = corruption.partial_work_drill(ws, f"damaged {stage} {damaged}", stage, marker, damaged)
    assert d.ok and d.identical, d.outcome
