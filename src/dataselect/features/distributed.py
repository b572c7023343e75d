"""Featurizing across processes: Lightning DDP ranks or a Slurm array, one store.

A store is a set of independent shards (``store.py``), and a shard's bytes do not depend on
which process computes it (``featurize.compute_shards`` batches within a shard). So a pass
splits by shards: shard ``i`` goes to rank (or array task) ``i mod n``; every worker loads
its own copy of the model at the checkpoint and writes its shards into the same store, under
a per-shard lock; the coordinator (the process that holds the artifact's cache lock) then
closes the store, which checks that every shard is there. The result is the single-process
store, byte for byte.

- ``mode=ddp``: ``Trainer.predict`` with ``DDPStrategy(start_method="spawn")`` (``gloo`` on
  CPU, ``nccl`` on GPUs): each rank's dataloader yields its shard indices.
- ``mode=submitit``: ``executor.map_array`` over the shard groups (Slurm when ``sbatch`` is
  there, else local processes); a task that dies leaves its finished shards, and the
  coordinator computes whatever is still missing itself.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from dataselect.features.featurize import FeaturizeJob, compute_shards
from dataselect.features.store import GradientStore

log = logging.getLogger(__name__)


@dataclass
class ModelAt:
    """Picklable recipe for the model a worker featurizes with: the base model plus one
    checkpoint's adapter (trainable, so its gradients exist)."""

    model_cfg: dict
    cache_dir: str
    adapter_dir: str

    def __call__(self):
        from omegaconf import OmegaConf

        from dataselect import models

        base = models.load_base_model(OmegaConf.create(self.model_cfg), Path(self.cache_dir))
        return models.with_adapter(base, Path(self.adapter_dir), trainable=True)


def shard_groups(shards: list[int], n: int) -> list[list[int]]:
    """Round-robin: worker ``w`` gets ``shards[w::n]`` (long examples come first in a store, so
    round-robin spreads the expensive shards); empty groups dropped."""
    return [g for g in (shards[w::n] for w in range(n)) if g]


def subset(job: FeaturizeJob, shards: list[int]) -> FeaturizeJob:
    """The job restricted to ``shards``' examples (what a worker needs to be sent)."""
    return replace(job, examples={r: job.examples[r] for i in shards for r in job.shard_rows(i)})


class ShardFeaturizer(L.LightningModule):
    """One DDP rank: loads the model in ``setup`` (so the strategy places it on the rank's
    device), predicts over its shard indices, writes each shard; returns nothing."""

    def __init__(self, job: FeaturizeJob, load_model: ModelAt, shards: list[int]):
        super().__init__()
        self.job, self.load_model, self.shards = job, load_model, shards
        self.net = None

    def setup(self, stage: str) -> None:
        self.net = self.load_model()

    def predict_dataloader(self) -> DataLoader:
        """One batch per rank: the list of its shards (so the sketch, the Adam state and the
        store's writer are set up once per rank, not per shard)."""
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = self.shards[rank::world]
        log.info("featurize rank %d/%d: %d shards", rank, world, len(mine))
        return DataLoader([mine], batch_size=None, shuffle=False)

    def predict_step(self, shards: list[int], batch_idx: int) -> None:
        shards = [int(i) for i in shards]
        compute_shards(self.net, self.job, shards, self.job.writer(tidy=False), bar=False)


def featurize_ddp(
    job: FeaturizeJob, load_model: ModelAt, devices: int, accelerator: str = "cpu"
) -> GradientStore:
    """Fill ``job``'s store with ``devices`` DDP ranks (spawned); returns the closed store."""
    from lightning.pytorch.strategies import DDPStrategy

    writer = job.writer()  # the coordinator: meta.json, and tidies what killed runs left
    todo = writer.pending_shards()
    if todo:
        backend = "gloo" if accelerator == "cpu" else None
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=devices,
            strategy=DDPStrategy(start_method="spawn", process_group_backend=backend),
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            inference_mode=False,  # per-example gradients need autograd
            use_distributed_sampler=False,  # the module splits by shard itself
        )
        log.info("featurize: %d shards over %d DDP ranks (%s)", len(todo), devices, accelerator)
        trainer.predict(ShardFeaturizer(job, load_model, todo), return_predictions=False)
    return writer.close()


def run_array_task(job: FeaturizeJob, load_model: ModelAt, shards: list[int]) -> int:
    """One array task: compute ``shards`` (skipping those another process holds or finished)."""
    return compute_shards(load_model(), job, shards, job.writer(tidy=False))


def make_executor(submitit_cfg: dict, default_folder: Path):
    import submitit

    params = dict(submitit_cfg)
    cluster = params.pop("cluster", None)
    folder = Path(params.pop("folder", None) or default_folder)
    if cluster is None and shutil.which("sbatch") is None:
        cluster = "local"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def featurize_array(
    job: FeaturizeJob, load_model: ModelAt, tasks: int, executor, fallback_model=None
) -> GradientStore:
    """Fill ``job``'s store with a submitit array of ``tasks`` jobs over the same cache, wait
    for them, compute any shard a failed task left (in this process), close the store."""
    writer = job.writer()
    groups = shard_groups(writer.pending_shards(), tasks)
    if groups:
        log.info("featurize: %d shards as a %d-task array", sum(map(len, groups)), len(groups))
        jobs = executor.map_array(
            run_array_task,
            [subset(job, g) for g in groups],
            [load_model] * len(groups),
            groups,
        )
        for j, g in zip(jobs, groups, strict=True):
            try:
                j.result()
            except Exception as err:  # its finished shards stay; the rest is done below
                log.warning("featurize: array task %s (shards %s) failed: %s", j.job_id, g, err)
    missing = writer.pending_shards()
    if missing:
        log.warning("featurize: computing %d shards the array left here", len(missing))
        compute_shards(fallback_model or load_model(), job, missing, writer)
    return writer.close()
