"""``LoRALM``: a LightningModule training the LoRA adapters of a PEFT causal LM, loss on answers.

Its Lightning checkpoints (``trainer.save_checkpoint``) hold only the trainable (LoRA) parameters:
the frozen base model is reloaded by the caller, so resuming loads with ``strict_loading = False``
and ``on_load_checkpoint`` checks that every trainable parameter is in the checkpoint.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from dataselect.data.formatting import IGNORE_INDEX


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token) over the positions whose label is not -100.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; padding and prompt tokens carry -100 and are
    ignored, so the mean is over the answer tokens of the whole batch."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX
    )


def linear_warmup_decay(warmup_steps: int, total_steps: int):
    """LR multiplier for optimizer step ``s`` (0-based): ``s / warmup`` while ``s < warmup``, then
    linear decay reaching 0 at ``total_steps`` (the HF ``get_linear_schedule_with_warmup``)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Number of warmup optimizer steps: ``ceil(warmup_ratio * total_steps)`` (as HF does)."""
    return math.ceil(warmup_ratio * total_steps)


class LoRALM(L.LightningModule):
    """Wraps a ``PeftModel``; only its trainable (LoRA) parameters are optimized (and checkpointed).

    ``lr`` is the peak learning rate; ``betas``/``eps``/``weight_decay`` go to AdamW unchanged.
    ``max_steps`` (None: no cap) stops training after that many optimizer steps, as Lightning's
    ``Trainer(max_steps=...)`` would (the epoch in progress is ended and checkpointed, the schedule
    spans ``min(max_steps, epochs x steps per epoch)``). It is enforced here and not by the Trainer
    because a Trainer with ``max_steps`` treats every resume as an iteration-based restart, which
    re-enters the finished epoch of an end-of-epoch checkpoint (Lightning #18060, #19815)."""

    CHECKPOINT_KEY = "lora_lm"  # this module's own entry in a Lightning checkpoint

    def __init__(
        self,
        model,
        lr: float,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        max_steps: int | None = None,
    ):
        super().__init__()
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be None or positive, got {max_steps}")
        self.model = model
        self.max_steps = max_steps
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.betas, self.eps = (float(betas[0]), float(betas[1])), eps
        self.epoch_losses: list[torch.Tensor] = []  # per-batch losses of the current epoch
        self.examples_seen = 0  # over all epochs, also those before a resume
        # Checkpoints lack the frozen base weights: missing keys are expected when loading them.
        self.strict_loading = False

    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, param) for trainable params, names as in ``PeftModel.named_parameters()``."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _trainable_state_keys(self) -> set[str]:
        """Keys of the trainable params in ``self.state_dict()`` ("model." + PEFT name)."""
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Keep the LoRA weights only: a 7B base would be ~14 GB per checkpoint.
        keep = self._trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[self.CHECKPOINT_KEY] = {"examples_seen": self.examples_seen}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # strict_loading is off (the base weights are not saved), so check the LoRA side here.
        keep, saved = self._trainable_state_keys(), set(checkpoint["state_dict"])
        if keep != saved:
            missing, extra = sorted(keep - saved)[:3], sorted(saved - keep)[:3]
            raise KeyError(f"checkpoint does not match the trainable params: missing {missing}, "
                           f"unexpected {extra}")  # fmt: skip
        self.examples_seen = int(checkpoint.get(self.CHECKPOINT_KEY, {}).get("examples_seen", 0))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss (mean over the batch's answer tokens) of a collated batch."""
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return lm_loss(out.logits, batch["labels"])

    def on_fit_start(self) -> None:
        # from_pretrained returns eval mode and Lightning keeps submodule modes: enable dropout.
        self.model.train()

    def on_train_epoch_start(self) -> None:
        self.epoch_losses = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        n = batch["input_ids"].size(0)
        self.epoch_losses.append(loss.detach())
        self.examples_seen += n
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=n)
        self.log("train/lr", lr, on_step=True, batch_size=n)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.max_steps is not None and self.trainer.global_step >= self.max_steps:
            self.trainer.should_stop = True  # ends this epoch (hooks run) and the fit

    def epoch_loss_mean(self) -> float:
        """Mean of the per-batch losses of the current epoch (nan if none)."""
        if not self.epoch_losses:
            return float("nan")
        return torch.stack(self.epoch_losses).float().mean().item()

    def configure_optimizers(self):
        params = [p for _, p in self.trainable_named_parameters()]
        if not params:
            raise ValueError("model has no trainable parameters (is it a PeftModel?)")
        opt = torch.optim.AdamW(
            params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay
        )
        total = int(self.trainer.estimated_stepping_batches)
        total = total if self.max_steps is None else min(total, self.max_steps)
        factor = linear_warmup_decay(warmup_steps_for(total, self.warmup_ratio), total)
        sched = {"scheduler": LambdaLR(opt, factor), "interval": "step", "frequency": 1}
        return {"optimizer": opt, "lr_scheduler": sched}
