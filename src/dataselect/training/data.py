"""Batches of tokenized chat examples: right-padded tensors and a seeded shuffling DataModule.

The shuffle order of epoch ``e`` is a function of ``(seed, e)`` only (``EpochShuffleSampler``),
never of how many epochs this process has already iterated, so a run resumed at epoch ``e`` from
a checkpoint sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dataselect.data.formatting import IGNORE_INDEX, Tokenized


class TokenizedDataset(Dataset):
    """A map-style dataset over ``Tokenized`` examples (kept as python lists until collation)."""

    def __init__(self, examples: list[Tokenized]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Tokenized:
        return self.examples[i]


def collate(batch: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: ``input_ids`` with ``pad_id``, ``attention_mask`` with 0,
    ``labels`` with -100. All tensors are int64 of shape (batch, max_len)."""
    n, width = len(batch), max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(batch):
        k = len(ex.input_ids)
        input_ids[i, :k] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[i, :k] = 1
        labels[i, :k] = torch.tensor(ex.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for the shuffle of ``epoch`` (0-based). Distinct ``(seed, epoch)`` pairs give
    unrelated streams (with ``seed + epoch``, seed 1 epoch 0 would replay seed 0 epoch 1)."""
    state = np.random.SeedSequence([seed & (2**64 - 1), epoch]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of ``range(n)`` drawn from a generator seeded by ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before every training epoch (also the first epoch after a resume).
    ``__iter__`` is lazy: the permutation is drawn at the first ``next()``, so an iterator created
    before ``set_epoch`` (Lightning creates the first one while setting up the data) still uses the
    epoch set afterwards."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        yield from torch.randperm(self.n, generator=gen).tolist()


class SFTDataModule(L.LightningDataModule):
    """Training data only; the order of epoch ``e`` depends on ``(seed, e)`` alone.

    The loader's own generator (seeded once) only feeds worker base seeds, so creating iterators
    never draws from the global torch RNG that LoRA dropout uses; collation uses no randomness."""

    def __init__(
        self, train: list[Tokenized], batch_size: int, pad_id: int, seed: int, num_workers: int = 0
    ):
        super().__init__()
        self.dataset = TokenizedDataset(train)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self.dataset), self.seed),
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=partial(collate, pad_id=self.pad_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
