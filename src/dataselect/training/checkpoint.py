"""Per-epoch checkpoints: LoRA adapter + AdamW moments keyed by parameter name, written atomically.

Layout of ``out_dir/epoch_{e}/`` (e is 1-based)::

    adapter/                  PEFT ``save_pretrained`` output
    optimizer.safetensors     "{name}.exp_avg", "{name}.exp_avg_sq" for every trainable param
    optimizer.json            betas, eps, weight_decay, step, lr_mean, lr_last, param_names, ...
    trainer.ckpt              Lightning checkpoint to resume from (only while training runs)
    trainer.ckpt.sum          its size and checksum (deleted with it)
    COMPLETE                  written last: size and checksum of the other files

Everything is written into ``epoch_{e}.tmp`` and renamed, so an ``epoch_{e}`` dir always has its
``COMPLETE`` marker; ``list_checkpoints`` also ignores any dir that lacks it.

``trainer.ckpt`` (``trainer.save_checkpoint``) holds what a run killed later needs to go on from
the end of epoch ``e``: the LoRA weights (not the frozen base, see ``LoRALM.on_save_checkpoint``),
optimizer and lr-scheduler state, loop progress, and this callback's state (per-epoch history,
training seconds, RNG states). It is a training-time file: once ``epoch_{e+1}`` is complete the one
in ``epoch_{e}`` is deleted, and ``train_lora`` deletes the last one when training is done, so a
finished run's epoch dirs hold only ``adapter/``, ``optimizer.*`` and ``COMPLETE``. Those never
depend on whether a run was resumed: they are bitwise those of an uninterrupted run (on CPU).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dataselect.cache import fsync_dir, write_atomic
from dataselect.integrity import check, file_digest, manifest, recorded

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
RESUME_FILE = "trainer.ckpt"
RESUME_SUM = "trainer.ckpt.sum"  # [size, xxh3] of the resume file, deleted with it
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")
_EPOCH_TMP = re.compile(r"^epoch_(\d+)\.tmp$")


def rng_state() -> dict:
    """The global RNG states (torch CPU, every CUDA device, python ``random``, numpy) as tensors and
    plain python values, so that a ``weights_only`` ``torch.load`` restores them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }


def set_rng_state(state: dict) -> None:
    """Inverse of ``rng_state``. CUDA states are restored when the device count matches."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        log.warning("not restoring %d saved CUDA RNG states on this machine", len(cuda))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def optimizer_state_by_name(
    optimizer: torch.optim.Optimizer, named_params: list[tuple[str, torch.nn.Parameter]]
) -> dict[str, torch.Tensor]:
    """Flatten Adam state to ``{"{name}.exp_avg": t, "{name}.exp_avg_sq": t}`` (CPU, contiguous).

    The torch state is keyed by the parameter object, so it is looked up with the param itself,
    never by name. A param that has no state yet (never stepped) gets zeros, Adam's initial state.
    """
    out: dict[str, torch.Tensor] = {}
    for name, p in named_params:
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            t = state.get(key)
            t = torch.zeros_like(p) if t is None else t
            out[f"{name}.{key}"] = t.detach().to("cpu").contiguous()
    return out


def stable_adapter_config(adapter_dir: Path) -> None:
    """PEFT writes ``target_modules`` from a set, in an order that changes from process to
    process (string hashing is salted): sort it, so the same training gives the same bytes."""
    path = Path(adapter_dir) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


class EpochCheckpoint(L.Callback):
    """Saves ``out_dir/epoch_{e}/`` at the end of every training epoch (files on rank 0 only).

    Also records, per epoch, the learning rate of every optimizer step (the lr that step used)
    and the mean training loss; ``history`` holds one summary dict per saved epoch, including those
    saved before a resume: the callback's ``state_dict`` (history, seconds trained, RNG states) is
    part of every ``trainer.ckpt``. The RNG states are those at the end of the epoch; on resume they
    are set again when the next epoch starts, so dropout continues as without the interruption.
    ``resumed_from`` (the epoch dir this process resumed from, if any) is saved, not loaded."""

    def __init__(self, out_dir: Path, resumed_from: str | None = None):
        self.out_dir = Path(out_dir)
        self.resumed_from = resumed_from
        self.epoch_lrs: list[float] = []
        self.history: list[dict] = []
        self.saved: list[Path] = []  # epoch dirs written by this process
        self.seconds_before = 0.0  # training seconds of the runs before a resume
        self._started: float | None = None
        self._rng_to_restore: dict | None = None

    def seconds(self) -> float:
        """Wall-clock seconds of training so far, the runs before a resume included (their time
        after the last checkpoint, lost to the kill, is not counted)."""
        now = 0.0 if self._started is None else time.perf_counter() - self._started
        return self.seconds_before + now

    def state_dict(self) -> dict:
        return {
            "history": self.history,
            "seconds": self.seconds(),
            "rng": rng_state(),
            "resumed_from": self.resumed_from,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])
        self.seconds_before = float(state_dict["seconds"])
        self._rng_to_restore = state_dict["rng"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_lrs = []
        if self._rng_to_restore is not None:  # first epoch after a resume
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.epoch_lrs.append(float(optimizer.param_groups[0]["lr"]))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        optimizer = trainer.optimizers[0]
        group = optimizer.param_groups[0]
        named = pl_module.trainable_named_parameters()
        lrs = self.epoch_lrs
        meta = {
            "epoch": epoch,
            "step": trainer.global_step,
            "steps_this_epoch": len(lrs),
            "betas": list(group["betas"]),
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "lr_mean": sum(lrs) / len(lrs) if lrs else 0.0,
            "lr_last": lrs[-1] if lrs else 0.0,
            "train_loss_mean": pl_module.epoch_loss_mean(),
            "param_names": [n for n, _ in named],
        }
        bad = [n for n, p in named if not torch.isfinite(p.detach()).all()]
        if bad:  # never checkpoint a diverged model: every gradient taken at it would be NaN
            raise FloatingPointError(
                f"training diverged: non-finite LoRA weights after epoch {epoch} in {bad[:3]}"
                f"{' ...' if len(bad) > 3 else ''} (mean loss {meta['train_loss_mean']}); lower "
                "the learning rate or check the data; no checkpoint was written"
            )
        self.history.append({k: v for k, v in meta.items() if k != "param_names"})
        final = self.out_dir / f"epoch_{epoch}"
        tmp = self.out_dir / f"epoch_{epoch}.tmp"
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            pl_module.model.save_pretrained(str(tmp / "adapter"))
            stable_adapter_config(tmp / "adapter")
            save_file(optimizer_state_by_name(optimizer, named), str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(meta, indent=1))
        # Every rank takes part (it ends in a barrier); rank 0 writes. It holds self.history.
        trainer.save_checkpoint(tmp / RESUME_FILE, weights_only=False)
        if not trainer.is_global_zero:
            return
        # The marker records the epoch's files (fsynced first); the resume file, deleted once
        # superseded, has its checksum beside it, so the marker stays the same across resumes.
        resume = tmp / RESUME_FILE
        write_atomic(
            tmp / RESUME_SUM, json.dumps([resume.stat().st_size, file_digest(resume, True)])
        )
        files = manifest(tmp, skip=(MARKER, RESUME_FILE, RESUME_SUM))
        write_atomic(tmp / MARKER, json.dumps({"files": files}, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(self.out_dir)
        self.saved.append(final)
        drop_resume_files(self.out_dir, keep=final)  # the older ones are superseded
        log.info(
            "epoch %d: loss %.4f, lr_mean %.3g, step %d -> %s",
            epoch, meta["train_loss_mean"], meta["lr_mean"], meta["step"], final,
        )  # fmt: skip


def load_optimizer_state(
    epoch_dir: Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """``({name: {"exp_avg": t, "exp_avg_sq": t}}, meta)`` from a checkpoint dir, in the order of
    ``meta["param_names"]``."""
    epoch_dir = Path(epoch_dir)
    meta = json.loads((epoch_dir / "optimizer.json").read_text())
    flat = load_file(str(epoch_dir / "optimizer.safetensors"), device=str(device))
    state = {
        n: {"exp_avg": flat[f"{n}.exp_avg"], "exp_avg_sq": flat[f"{n}.exp_avg_sq"]}
        for n in meta["param_names"]
    }
    return state, meta


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete ``epoch_{e}`` dirs under ``run_dir`` (with the ``COMPLETE`` marker), by epoch."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for d in run_dir.iterdir():
        m = _EPOCH_DIR.match(d.name)
        if m and d.is_dir() and (d / MARKER).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def drop_resume_files(run_dir: Path, keep: Path | None = None) -> None:
    """Delete ``trainer.ckpt`` from every complete epoch dir under ``run_dir`` except ``keep``."""
    for d in list_checkpoints(run_dir):
        if d != keep:
            (d / RESUME_FILE).unlink(missing_ok=True)
            (d / RESUME_SUM).unlink(missing_ok=True)


def checkpoint_problems(epoch_dir: Path) -> list[str]:
    """What in a complete epoch dir differs from what its marker (and, while it exists, the
    resume file's checksum) recorded; empty when intact or written before checksums."""
    problems = []
    files = recorded(epoch_dir / MARKER)
    if files is not None:
        problems += check(epoch_dir, files)
    resume, total = epoch_dir / RESUME_FILE, epoch_dir / RESUME_SUM
    if resume.is_file() and total.is_file():
        problems += check(epoch_dir, {RESUME_FILE: json.loads(total.read_text())})
    return [f"{epoch_dir.name}/{p}" for p in problems]


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Remove ``epoch_{e}.tmp`` dirs (a checkpoint whose writing was interrupted)."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for d in run_dir.iterdir():
            if _EPOCH_TMP.match(d.name):
                log.info("removing the partly written checkpoint %s", d)
                shutil.rmtree(d)
