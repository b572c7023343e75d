"""LoRA fine-tuning of causal LMs (Lightning), saving adapter + AdamW state every epoch; a killed
run resumes from its last epoch checkpoint (see ``train.py``)."""

from dataselect.training.checkpoint import (
    RESUME_FILE,
    EpochCheckpoint,
    list_checkpoints,
    load_optimizer_state,
    optimizer_state_by_name,
)
from dataselect.training.data import EpochShuffleSampler, SFTDataModule, TokenizedDataset, collate
from dataselect.training.module import LoRALM, linear_warmup_decay, lm_loss, warmup_steps_for
from dataselect.training.train import build_trainer, train_lora

__all__ = [
    "RESUME_FILE",
    "EpochCheckpoint",
    "EpochShuffleSampler",
    "LoRALM",
    "SFTDataModule",
    "TokenizedDataset",
    "build_trainer",
    "collate",
    "linear_warmup_decay",
    "list_checkpoints",
    "lm_loss",
    "load_optimizer_state",
    "optimizer_state_by_name",
    "train_lora",
    "warmup_steps_for",
]
