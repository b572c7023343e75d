"""LoRA training killed with SIGKILL resumes from the last epoch checkpoint, bitwise identical.

Every run goes in a subprocess (this file run as a script, see ``main``): 3 epochs x 3 steps on
12 tiny examples, LoRA dropout 0.1 so that the RNG restore matters. ``kill`` makes the child
SIGKILL itself at a given point: ``batch:E:B`` before batch B (0-based) of epoch E (1-based),
``after:E`` right after ``epoch_E`` was committed, ``saving:E`` while ``epoch_E.tmp`` is written.
A second call on the same ``out_dir`` resumes and must produce the files of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

EPOCHS = 3
STAGE = {
    "epochs": EPOCHS, "lr": 1e-2, "weight_decay": 0.0, "warmup_ratio": 0.5, "batch_size": 4,
    "grad_accum": 1, "betas": [0.9, 0.999], "eps": 1e-8, "max_steps": None,
    "log_every_n_steps": 1,
}  # fmt: skip
LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "strategy": "auto"}
SEED = 3


# ----------------------------------------------------------------------------- the child process


def _killer(spec: str):
    """A callback that SIGKILLs this process at the point ``spec`` names (see module docstring)."""
    import lightning as L

    kind, *where = spec.split(":")
    where = [int(x) for x in where]

    def die() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    class Killer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if kind == "batch" and [trainer.current_epoch + 1, batch_idx] == where:
                die()

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            # Inside EpochCheckpoint.on_train_epoch_end: adapter and optimizer files are in the
            # .tmp dir, trainer.ckpt and COMPLETE are not.
            if kind == "saving" and trainer.current_epoch + 1 == where[0]:
                die()

        def on_train_epoch_end(self, trainer, pl_module):
            # Runs after EpochCheckpoint's hook (callbacks run in order): epoch_E is committed.
            if kind == "after" and trainer.current_epoch + 1 == where[0]:
                die()

    return Killer()


def main(args: dict) -> None:
    """Train (or resume) in ``args["out"]`` with ``args["stage"]`` overrides, or in each of
    ``args["runs"]`` (``{"out", "stage"}``) in turn; ``args["kill"]`` may kill the process."""
    import logging

    from conftest import toy_add_examples
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dataselect.training.checkpoint as checkpoint
    import dataselect.training.train as train_mod
    from dataselect.data.formatting import tokenize_examples
    from dataselect.models import with_lora

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.get("kill"):
        build = train_mod.build_trainer
        killer = _killer(args["kill"])
        train_mod.build_trainer = lambda c, t, o, cbs, lg=None: build(c, t, o, [*cbs, killer], lg)
    if args.get("no_rng_restore"):  # negative control: the resume must then differ
        checkpoint.set_rng_state = lambda state: None
    tok = AutoTokenizer.from_pretrained(args["model"])
    examples = toy_add_examples()
    train, _ = tokenize_examples(tok, examples, max_length=64)
    for run in args.get("runs") or [args]:
        model = AutoModelForCausalLM.from_pretrained(args["model"])
        model.config.use_cache = False
        model = with_lora(model, OmegaConf.create(LORA), seed=SEED)
        cfg = OmegaConf.create({**STAGE, **run.get("stage", {})})
        dirs = train_mod.train_lora(
            model, tok, train, cfg, OmegaConf.create(TRAINER), Path(run["out"]), seed=SEED
        )
        print("CHECKPOINTS", json.dumps([d.name for d in dirs]))


# ----------------------------------------------------------------------------- the tests


def run_child(model_dir: Path, out: Path | None, **args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false"}
    spec = json.dumps({"model": str(model_dir), "out": str(out), **args})
    return subprocess.run(
        [sys.executable, __file__, spec], capture_output=True, text=True, env=env, timeout=300
    )


def train_ok(model_dir: Path, out: Path | None, **args) -> subprocess.CompletedProcess:
    proc = run_child(model_dir, out, **args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def killed(model_dir: Path, out: Path, kill: str, **args) -> subprocess.CompletedProcess:
    proc = run_child(model_dir, out, kill=kill, **args)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    return proc


def artifact_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file that a finished run leaves in its epoch dirs."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.glob("epoch_*/**/*"))
        if p.is_file()
    }


def stats(out: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_ino)
        for p in sorted(out.glob("epoch_*/**/*"))
        if p.is_file()
    }


ACCUM = {"batch_size": 2, "grad_accum": 2, "max_steps": 7}  # 3 steps/epoch, stop mid epoch 3


@pytest.fixture(scope="module")
def references(tiny_model_dir, tmp_path_factory):
    """Uninterrupted runs (one child process, to pay the imports once): file hashes, train_log."""
    outs = {"default": tmp_path_factory.mktemp("uninterrupted"),
            "accum": tmp_path_factory.mktemp("uninterrupted_accum")}  # fmt: skip
    runs = [{"out": str(outs["default"])}, {"out": str(outs["accum"]), "stage": ACCUM}]
    train_ok(tiny_model_dir, None, runs=runs)
    return {
        k: {"hashes": artifact_hashes(o), "log": json.loads((o / "train_log.json").read_text())}
        for k, o in outs.items()
    }


@pytest.fixture()
def reference(references):
    return references["default"]


def test_uninterrupted_layout(reference):
    hashes = reference["hashes"]
    for e in range(1, EPOCHS + 1):
        for name in ["adapter/adapter_model.safetensors", "optimizer.safetensors",
                     "optimizer.json", "COMPLETE"]:  # fmt: skip
            assert f"epoch_{e}/{name}" in hashes
    # The Lightning resume file is a training-time file: gone once training is done.
    assert not any(k.endswith("trainer.ckpt") for k in hashes)
    log = reference["log"]
    assert [e["epoch"] for e in log["epochs"]] == [1, 2, 3]
    assert log["resumed_from"] is None and log["optimizer_steps"] == 9
    assert log["checkpoints"] == ["epoch_1", "epoch_2", "epoch_3"]


def _epoch_names(k: int) -> set[str]:
    return {f"epoch_{e}" for e in range(1, k + 1)}


def resume_and_compare(model_dir: Path, out: Path, reference: dict, resumed_from: str) -> None:
    """Resume in ``out``; checkpoints before ``resumed_from`` stay untouched and the result equals
    the uninterrupted run byte for byte."""
    k = int(resumed_from.split("_")[1])
    kept = {p: s for p, s in stats(out).items() if p.split("/")[0] in _epoch_names(k)}
    assert any(p.endswith("trainer.ckpt") for p in kept)  # the file to resume from
    proc = train_ok(model_dir, out)
    assert f"resuming from {resumed_from}" in proc.stderr
    after = stats(out)
    for p, s in kept.items():  # not retrained (trainer.ckpt[.sum] is deleted at the end)
        assert p.endswith(("trainer.ckpt", "trainer.ckpt.sum")) or after[p] == s, p
    assert artifact_hashes(out) == reference["hashes"]
    assert not list(out.glob("epoch_*.tmp"))
    log = json.loads((out / "train_log.json").read_text())
    assert log["resumed_from"] == resumed_from
    assert log["epochs"] == reference["log"]["epochs"]  # history of all epochs, also pre-kill
    for key in ["optimizer_steps", "examples_seen", "checkpoints"]:
        assert log[key] == reference["log"][key], key


def test_kill_mid_epoch_resumes_bitwise(tiny_model_dir, tmp_path, reference):
    killed(tiny_model_dir, tmp_path, kill="batch:2:1")  # one optimizer step into epoch 2
    assert [p.name for p in sorted(tmp_path.glob("epoch_*"))] == ["epoch_1"]
    resume_and_compare(tiny_model_dir, tmp_path, reference, "epoch_1")


def test_kill_after_checkpoint_resumes_bitwise(tiny_model_dir, tmp_path, reference):
    killed(tiny_model_dir, tmp_path, kill="after:1")
    assert [p.name for p in sorted(tmp_path.glob("epoch_*"))] == ["epoch_1"]
    resume_and_compare(tiny_model_dir, tmp_path, reference, "epoch_1")


def test_kill_while_saving_checkpoint_ignores_tmp(tiny_model_dir, tmp_path, reference):
    killed(tiny_model_dir, tmp_path, kill="saving:2")
    names = sorted(p.name for p in tmp_path.glob("epoch_*"))
    assert names == ["epoch_1", "epoch_2.tmp"]
    assert (tmp_path / "epoch_2.tmp" / "optimizer.safetensors").is_file()
    assert not (tmp_path / "epoch_2.tmp" / "COMPLETE").exists()
    resume_and_compare(tiny_model_dir, tmp_path, reference, "epoch_1")


def test_resume_without_rng_restore_differs(tiny_model_dir, tmp_path, reference):
    """Negative control: dropout draws matter, so the equality above tests the RNG restore."""
    killed(tiny_model_dir, tmp_path, kill="after:1")
    train_ok(tiny_model_dir, tmp_path, no_rng_restore=True)
    hashes = artifact_hashes(tmp_path)
    assert (
        hashes["epoch_1/optimizer.safetensors"]
        == reference["hashes"]["epoch_1/optimizer.safetensors"]
    )
    for e in (2, 3):
        for name in ["adapter/adapter_model.safetensors", "optimizer.safetensors"]:
            key = f"epoch_{e}/{name}"
            assert hashes[key] != reference["hashes"][key], key


def test_all_epochs_complete_does_not_train(tiny_model_dir, tmp_path, reference):
    # Killed after the last checkpoint, before train_lora returned: trainer.ckpt is still there.
    killed(tiny_model_dir, tmp_path, kill="after:3")
    assert (tmp_path / "epoch_3" / "trainer.ckpt").is_file()
    assert not (tmp_path / "train_log.json").exists()
    resume = ("trainer.ckpt", "trainer.ckpt.sum")  # deleted at the end
    before = {p: s for p, s in stats(tmp_path).items() if not p.endswith(resume)}
    proc = train_ok(tiny_model_dir, tmp_path)
    assert "not training again" in proc.stderr and "resuming" not in proc.stderr
    assert 'CHECKPOINTS ["epoch_1", "epoch_2", "epoch_3"]' in proc.stdout
    assert {p: s for p, s in stats(tmp_path).items()} == before  # nothing rewritten
    assert artifact_hashes(tmp_path) == reference["hashes"]
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["epochs"] == reference["log"]["epochs"] and log["optimizer_steps"] == 9
    # Called once more on the finished dir: still nothing to do, the log is kept as it is.
    log_stat = (tmp_path / "train_log.json").stat().st_mtime_ns
    proc = train_ok(tiny_model_dir, tmp_path)
    assert "not training again" in proc.stderr
    assert (tmp_path / "train_log.json").stat().st_mtime_ns == log_stat
    assert stats(tmp_path) == before


def test_kill_and_resume_with_max_steps_and_grad_accum(tiny_model_dir, tmp_path, references):
    """batch 2 x accumulate 2 = 3 optimizer steps per epoch, capped at 7 steps (mid epoch 3)."""
    reference = references["accum"]
    killed(tiny_model_dir, tmp_path, kill="batch:2:3", stage=ACCUM)  # mid accumulation, step 5
    proc = train_ok(tiny_model_dir, tmp_path, stage=ACCUM)
    assert "resuming from epoch_1" in proc.stderr
    assert artifact_hashes(tmp_path) == reference["hashes"]
    metas = [
        json.loads((tmp_path / f"epoch_{e}" / "optimizer.json").read_text()) for e in (1, 2, 3)
    ]
    assert [m["step"] for m in metas] == [3, 6, 7]
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["epochs"] == reference["log"]["epochs"] and log["optimizer_steps"] == 7


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))


def test_diverged_training_writes_no_checkpoint(
    tiny_model_dir, tiny_tokenizer, toy_examples, tmp_path
):
    """NaN weights after an epoch: a clear error, and no epoch dir a later stage would trust."""
    from transformers import AutoModelForCausalLM

    from dataselect.data.formatting import tokenize_examples
    from dataselect.models import with_lora
    from dataselect.training import list_checkpoints, train_lora
    from dataselect.training.checkpoint import EpochCheckpoint

    toks, _ = tokenize_examples(tiny_tokenizer, toy_examples, 256)
    model = with_lora(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), LORA_NAN, seed=0)
    real = EpochCheckpoint.on_train_epoch_end

    def poisoned(self, trainer, pl_module):
        for n, p in pl_module.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.data.fill_(float("nan"))
        return real(self, trainer, pl_module)

    EpochCheckpoint.on_train_epoch_end = poisoned
    try:
        with pytest.raises(FloatingPointError, match=r"diverged.*epoch 1.*lora_B.*no checkpoint"):
            train_lora(model, tiny_tokenizer, toks, TRAIN_NAN, CPU_NAN, tmp_path / "w", seed=0)
    finally:
        EpochCheckpoint.on_train_epoch_end = real
    assert list_checkpoints(tmp_path / "w") == []


LORA_NAN = OmegaConf.create(
    {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
)
TRAIN_NAN = OmegaConf.create({"epochs": 1, "lr": 1e-2, "batch_size": 4, "warmup_ratio": 0.0})
CPU_NAN = OmegaConf.create({"accelerator": "cpu", "devices": 1})
