"""``train_lora``: the entry point that fine-tunes LoRA adapters (warmup and finetune stages).

A run killed at any point (even ``kill -9``) goes on when ``train_lora`` is called again on the same
``out_dir``: it resumes from the last complete ``epoch_{k}`` (its ``trainer.ckpt``, see
``checkpoint.py``), ignoring a half-written ``epoch_{k+1}.tmp``; if every epoch is already
complete it does not train at all. Data order (per epoch, from the seed), RNG states, optimizer,
scheduler and loop progress are restored, so the epoch dirs end up bitwise those of an
uninterrupted run on CPU.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from dataselect.data.formatting import Tokenized
from dataselect.progress import LogLines, interactive
from dataselect.training.checkpoint import (
    RESUME_FILE,
    EpochCheckpoint,
    checkpoint_problems,
    drop_resume_files,
    list_checkpoints,
    remove_partial_checkpoints,
)
from dataselect.training.data import SFTDataModule
from dataselect.training.module import LoRALM

log = logging.getLogger(__name__)


def build_trainer(cfg, trainer_cfg, out_dir: Path, callbacks: list, loggers=None) -> L.Trainer:
    """A Lightning Trainer from the stage config (epochs, grad_accum, ...) and the trainer group.

    ``cfg.max_steps`` is not passed on: ``LoRALM`` enforces it (see there why)."""
    tty = interactive()
    return L.Trainer(
        max_epochs=int(cfg.epochs),
        accumulate_grad_batches=int(cfg.get("grad_accum", 1)),
        gradient_clip_val=cfg.get("max_grad_norm"),
        log_every_n_steps=int(cfg.get("log_every_n_steps", 10)),
        accelerator=trainer_cfg.get("accelerator", "auto"),
        devices=trainer_cfg.get("devices", "auto"),
        precision=trainer_cfg.get("precision", "32-true"),
        strategy=trainer_cfg.get("strategy", "auto"),
        callbacks=callbacks + [RichProgressBar() if tty else LogProgress()],
        enable_progress_bar=tty,
        enable_checkpointing=False,
        enable_model_summary=False,
        logger=loggers or False,
        default_root_dir=str(out_dir),
    )


class LogProgress(L.Callback):
    """Without a terminal: optimizer steps done / total, rate, ETA and the last loss, logged
    at a bounded rate (``dataselect.progress``); a resumed run counts from where it was."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = int(min(trainer.estimated_stepping_batches, pl_module.max_steps or 1e18))
        self.lines = LogLines("training", total, unit="step", done=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        self.lines.note = "" if loss is None else f"loss {float(loss):.4f}"
        self.lines.advance(trainer.global_step - self.lines.done)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.lines.close()


def _max_steps(cfg) -> int | None:
    """``cfg.max_steps`` as ``LoRALM`` takes it: None (or Lightning's -1) for no cap."""
    max_steps = cfg.get("max_steps")
    return None if max_steps is None or int(max_steps) == -1 else int(max_steps)


def _training_done(epoch_dir: Path, cfg) -> bool:
    """Whether the run stops after checkpoint ``epoch_dir`` (``cfg.epochs`` epochs or ``max_steps``
    optimizer steps done), read from the checkpoint's ``optimizer.json``."""
    meta = json.loads((epoch_dir / "optimizer.json").read_text())
    max_steps = _max_steps(cfg)
    steps_done = max_steps is not None and meta["step"] >= max_steps
    return meta["epoch"] >= int(cfg.epochs) or steps_done


def _write_train_log(out_dir: Path, summary: dict) -> None:
    tmp = out_dir / "train_log.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out_dir / "train_log.json")


def _summary(n_examples: int, examples_seen: int, steps: int, seconds: float, history: list[dict],
             out_dir: Path, resumed_from: str | None) -> dict:  # fmt: skip
    return {
        "n_examples": n_examples,
        "examples_seen": examples_seen,
        "optimizer_steps": steps,
        "seconds": seconds,
        "examples_per_s": examples_seen / seconds if seconds > 0 else None,
        "epochs": history,
        "checkpoints": [p.name for p in list_checkpoints(out_dir)],
        "resumed_from": resumed_from,
    }


def _finish_without_training(out_dir: Path, last: Path, n_examples: int) -> list[Path]:
    """All epochs were complete already (killed after its last checkpoint): unless the finished run
    wrote ``train_log.json``, write it from the last ``trainer.ckpt``; drop the resume files."""
    log.info("all epochs complete in %s (last %s): not training again", out_dir, last.name)
    resume = last / RESUME_FILE
    if not (out_dir / "train_log.json").is_file():
        if not resume.is_file():
            raise FileNotFoundError(f"{last} has no {RESUME_FILE} and {out_dir} no train_log.json")
        state = torch.load(resume, map_location="cpu", weights_only=True)
        cb = state["callbacks"][EpochCheckpoint.__qualname__]
        seen = state[LoRALM.CHECKPOINT_KEY]["examples_seen"]
        summary = _summary(n_examples, seen, state["global_step"], cb["seconds"], cb["history"],
                           out_dir, cb["resumed_from"])  # fmt: skip
        _write_train_log(out_dir, summary)
    drop_resume_files(out_dir)
    return list_checkpoints(out_dir)


def train_lora(
    model,
    tokenizer,
    train: list[Tokenized],
    cfg,
    trainer_cfg,
    out_dir: Path,
    seed: int,
    loggers=None,
) -> list[Path]:
    """Fine-tune LoRA adapters on `train`; returns the epoch checkpoint dirs. `model` is already a
    PeftModel.

    Writes ``out_dir/epoch_{e}/`` per epoch (see ``checkpoint.py``) and ``out_dir/train_log.json``
    (per-epoch mean loss in nats/token, training seconds, examples/s, ``resumed_from``). Same seed
    and data give identical adapter weights on CPU, also across a kill and resume: when `out_dir`
    already holds complete checkpoints (of this same run), training goes on after the last one.
    The model is trained in train mode (LoRA dropout on) and left in eval mode."""
    if not train:
        raise ValueError(f"train_lora: no training examples (out_dir={out_dir})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_checkpoints(out_dir)
    done = list_checkpoints(out_dir)
    damaged = [p for d in done for p in checkpoint_problems(d)]
    if damaged:  # the earlier epochs' resume files are gone: only a fresh start rebuilds them
        log.warning(
            "discarding the checkpoints in %s, which changed after they were written (%s): "
            "training from the start",
            out_dir,
            "; ".join(damaged[:3]),
        )
        for d in done:
            shutil.rmtree(d)
        done = []
    last = done[-1] if done else None
    if last is not None and _training_done(last, cfg):
        model.eval()
        return _finish_without_training(out_dir, last, len(train))
    ckpt_path = None
    if last is not None:
        if (last / RESUME_FILE).is_file():
            ckpt_path = last / RESUME_FILE
            log.info("resuming from %s (%s)", last.name, out_dir)
        else:  # cannot happen with files written by train_lora: start over
            log.warning("%s has no %s: training from scratch", last, RESUME_FILE)
            last = None
    L.seed_everything(seed, workers=True, verbose=False)
    pad_id = tokenizer.pad_token_id
    pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
    data = SFTDataModule(
        train, int(cfg.batch_size), pad_id, seed, num_workers=int(cfg.get("num_workers", 0))
    )
    module = LoRALM(
        model,
        lr=float(cfg.lr),
        weight_decay=float(cfg.get("weight_decay", 0.0)),
        warmup_ratio=float(cfg.get("warmup_ratio", 0.0)),
        betas=tuple(cfg.get("betas", (0.9, 0.999))),
        eps=float(cfg.get("eps", 1e-8)),
        max_steps=_max_steps(cfg),
    )
    ckpt = EpochCheckpoint(out_dir, resumed_from=None if last is None else last.name)
    trainer = build_trainer(cfg, trainer_cfg, out_dir, [ckpt], loggers)
    log.info("training LoRA on %d examples for %s epochs -> %s", len(train), cfg.epochs, out_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    model.eval()
    if trainer.is_global_zero:
        summary = _summary(len(train), module.examples_seen, trainer.global_step, ckpt.seconds(),
                           ckpt.history, out_dir, ckpt.resumed_from)  # fmt: skip
        _write_train_log(out_dir, summary)
        drop_resume_files(out_dir)  # after the log: a kill in between finds the log and stops
    return list_checkpoints(out_dir)
