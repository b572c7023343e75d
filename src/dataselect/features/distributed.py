"""Pool passes across processes: Lightning DDP ranks or a Slurm array, one store.

Every pool pass is a job of independent shards (``shards.ShardJob``): gradient featurizing
(``featurize.FeaturizeJob``), GIST's exact subspace pass (``project.ProjectJob``) and the
baselines' model passes (``passes.LMPassJob``: perplexity's losses, RDS's hidden states;
``embed.EmbedJob``: sentence embeddings), and a shard's bytes do not depend on which process
computes it (its batches never cross it). So a pass splits by shards: shard ``i`` goes to rank
(or array task) ``i mod n``; every worker loads its own copy of the model (from a picklable
recipe: ``ModelAt``, ``embed.Embedder``) and writes its shards into the same store, under a
per-shard lock; the coordinator (the process that holds the artifact's cache lock) then closes
the store, which checks that every shard is there. The result is the single-process store,
byte for byte (given the same kernels: on CPU the bits of a matmul depend on the thread count,
and Lightning gives each rank cores / ranks threads unless ``OMP_NUM_THREADS`` is set, which
pins them all), and a killed pass, in any mode, keeps its finished shards.

- ``mode=ddp``: ``Trainer.predict`` with ``DDPStrategy(start_method="spawn")`` (``gloo`` on
  CPU, ``nccl`` on GPUs): each rank's dataloader yields its shard indices.
- ``mode=submitit``: ``executor.map_array`` over the shard groups (Slurm when ``sbatch`` is
  there, else local processes); a task that dies leaves its finished shards, and the
  coordinator computes whatever is still missing itself.

``run_sharded`` picks the mode from ``features.distributed``. (BM25's index and DSIR's n-gram
counts have no model and no shards: see their modules.)
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from dataselect.features.shards import ShardJob, compute_shards, fill_store, subset
from dataselect.features.store import GradientStore

log = logging.getLogger(__name__)


@dataclass
class ModelAt:
    """Picklable recipe for the model a worker computes with: the base model plus one
    checkpoint's adapter (trainable, so its gradients exist), or the base alone
    (``adapter_dir=None``: a baseline's forward pass)."""

    model_cfg: dict
    cache_dir: str
    adapter_dir: str | None

    def __call__(self):
        from omegaconf import OmegaConf

        from dataselect import models

        base = models.load_base_model(OmegaConf.create(self.model_cfg), Path(self.cache_dir))
        if self.adapter_dir is None:
            return base
        return models.with_adapter(base, Path(self.adapter_dir), trainable=True)


def shard_groups(shards: list[int], n: int) -> list[list[int]]:
    """Round-robin: worker ``w`` gets ``shards[w::n]`` (long examples come first in a store, so
    round-robin spreads the expensive shards); empty groups dropped."""
    return [g for g in (shards[w::n] for w in range(n)) if g]


class ShardWorker(L.LightningModule):
    """One DDP rank: loads the model in ``setup`` (so the strategy places it on the rank's
    device), predicts over its shard indices, writes each shard; returns nothing."""

    def __init__(self, job: ShardJob, load_model: Callable, shards: list[int]):
        super().__init__()
        self.job, self.load_model, self.shards = job, load_model, shards
        self.net = None

    def setup(self, stage: str) -> None:
        self.net = self.load_model()

    def predict_dataloader(self) -> DataLoader:
        """One batch per rank: the list of its shards (so the job's ``prepare``, e.g. the
        sketch and the Adam state, and the store's writer run once per rank, not per shard)."""
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = self.shards[rank::world]
        log.info("%s rank %d/%d: %d shards", self.job.label, rank, world, len(mine))
        return DataLoader([mine], batch_size=None, shuffle=False)

    def predict_step(self, shards: list[int], batch_idx: int) -> None:
        shards = [int(i) for i in shards]
        compute_shards(self.net, self.job, shards, self.job.writer(tidy=False), bar=False)


ShardFeaturizer = ShardWorker  # its name from when only gradients were featurized this way


def featurize_ddp(
    job: ShardJob, load_model: Callable, devices: int, accelerator: str = "cpu"
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
        log.info("%s: %d shards over %d DDP ranks (%s)", job.label, len(todo), devices, accelerator)
        trainer.predict(ShardWorker(job, load_model, todo), return_predictions=False)
    return writer.close()


def run_array_task(job: ShardJob, load_model: Callable, shards: list[int]) -> int:
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
    job: ShardJob, load_model: Callable, tasks: int, executor, fallback_model=None
) -> GradientStore:
    """Fill ``job``'s store with a submitit array of ``tasks`` jobs over the same cache, wait
    for them, compute any shard a failed task left (in this process), close the store."""
    writer = job.writer()
    groups = shard_groups(writer.pending_shards(), tasks)
    if groups:
        log.info("%s: %d shards as a %d-task array", job.label, sum(map(len, groups)), len(groups))
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
                log.warning("%s: array task %s (shards %s) failed: %s", job.label, j.job_id, g, err)
    missing = writer.pending_shards()
    if missing:
        log.warning("%s: computing %d shards the array left here", job.label, len(missing))
        compute_shards(fallback_model or load_model(), job, missing, writer)
    return writer.close()


MODES = ("none", "ddp", "submitit")


def run_sharded(
    job: ShardJob,
    dist,
    model: Callable[[], object],
    recipe: Callable[[], object],
    release: Callable[[], None] | None = None,
    submitit_folder: Path | None = None,
) -> GradientStore:
    """Fill ``job``'s store as ``dist`` (a ``features.distributed`` config; None = this
    process) says; returns the closed store, the same bytes in every mode.

    ``model()`` gives this process's model (mode none), ``recipe`` is what a worker process
    calls to load its own (picklable), and ``release()`` frees this process's copy before the
    workers load theirs."""
    mode = "none" if dist is None else str(dist.mode)
    if mode not in MODES:
        raise ValueError(f"features.distributed.mode must be none | ddp | submitit, got {mode!r}")
    if mode == "none":
        return fill_store(model(), job)
    if release is not None:
        release()
    if mode == "ddp":
        return featurize_ddp(job, recipe, int(dist.devices), str(dist.accelerator))
    from omegaconf import OmegaConf

    folder = submitit_folder or job.out.parent / "submitit"
    executor = make_executor(OmegaConf.to_container(dist.submitit, resolve=True), folder)
    return featurize_array(job, recipe, int(dist.tasks), executor)
