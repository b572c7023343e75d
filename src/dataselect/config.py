"""Typed schemas for the Hydra config. YAML files under ``conf/`` hold values; these
dataclasses hold the shape, so a typo or a wrong type fails at compose time, not mid-run.

Registered as ``base_config`` in Hydra's ConfigStore; ``conf/config.yaml`` lists it first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's configs


class Stage(str, Enum):
    all = "all"
    warmup = "warmup"
    features = "features"
    select = "select"
    finetune = "finetune"
    evaluate = "evaluate"


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


@dataclass
class ModelConfig:
    name: str = MISSING  # "tiny-random", "gguf:<package>/<file>", a local dir or a hub id
    revision: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    max_length: int = 512  # tokens per training example (prompt + answer); longer ones are cut
    chat_template: str | None = None  # overrides the tokenizer's template when set
    lora: LoraSettings = field(default_factory=LoraSettings)
    # Reference per-example costs for dry-run estimates when the cache has no measurement:
    # {device: ..., source: ..., seconds_per_example: {train: .., featurize: .., evaluate: ..}}
    cost: dict[str, Any] | None = None


@dataclass
class TrainConfig:
    epochs: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03  # share of optimizer steps with linear lr warmup
    batch_size: int = 8
    grad_accum: int = 1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_steps: int | None = None
    log_every_n_steps: int = 5


@dataclass
class WarmupConfig(TrainConfig):
    fraction: float = 0.05  # share of the pool, drawn at random (seeded), to warm up on
    # seed of the warmup's subset and LoRA init; null = the run's seed. Fix it to share one
    # warmup (and its gradient features) across seeds that then vary selection + fine-tuning.
    seed: int | None = None


@dataclass
class SketchConfig:
    kind: str = "sjlt"  # rademacher | gaussian (dense, LESS/TRAK; GPU) | sjlt | countsketch | none
    # | factorized (per LoRA weight, from the hooks; sgd features only)
    dim: int = 8192  # d, the sketched dimension (factorized: at least d, via the factor)
    factor: int | None = None  # factorized: k per side; None = the smallest k giving >= dim
    seed: int = 0
    nnz: int = 4  # sjlt: nonzeros per input coordinate
    block_rows: int = 8192  # dense kinds: rows of the D x d matrix generated at a time
    input_dtype: str = "float32"  # float16 = LESS's cast before projecting


@dataclass
class DistributedConfig:
    """How a store is computed; never part of its key (every mode writes the same bytes)."""

    mode: str = "none"  # none (this process) | ddp (Lightning DDP ranks) | submitit (array)
    devices: int = 2  # ddp: processes (CPU, gloo) or GPUs
    accelerator: str = "cpu"  # ddp: cpu | gpu | auto
    tasks: int = 2  # submitit: array tasks, each a share of the shards
    # submitit: cluster null = Slurm when sbatch is found, else local processes; "debug" runs
    # in this process. The other keys go to executor.update_parameters (timeout_min,
    # slurm_partition, gpus_per_node, cpus_per_task, mem_gb, ...)
    submitit: dict[str, Any] = field(
        default_factory=lambda: {"cluster": None, "folder": None, "timeout_min": 240}
    )


@dataclass
class FeaturesConfig:
    gradient_type: str = "adam"  # pool features: adam | sgd | sign (validation: always sgd)
    adam_form: str = "less"  # less (code: no bias correction, eps inside sqrt) | textbook
    checkpoints: Any = "all"  # "all" or a list of warmup epochs, e.g. [1]
    method: str = "batched"  # batched (one backward per batch) | loop (one per example)
    batch_size: int = 8
    # padded tokens per batch (batch x longest): long examples get smaller batches, so a
    # backward pass's activations stay bounded (BBH validation at 2k tokens x 8 ran out of
    # 24 GB); null = batch_size alone
    max_batch_tokens: int | None = 4096
    dtype: str = "float16"  # storage dtype of the features
    shard_size: int = 1024  # examples per store shard (the unit of resumption)
    sketch: SketchConfig = field(default_factory=SketchConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass
class EvaluatorConfig:
    benchmarks: list[str] | None = None  # target names to evaluate on; null = the target's own
    batch_size: int = 8
    # test items per benchmark (seeded subsample; for BBH per subtask); null = all; or per
    # task: {gsm8k: 50, bbh: 3}
    limit: Any = None
    seed: int = 1234
    max_gen_toks: int = 256
    apply_chat_template: bool = True
    num_fewshot: int | None = None
    include_base: bool = True  # also score the base model (no fine-tuning) on the same items
    # test items per benchmark for the target loss (one forward pass each, so it can cover
    # many more than generation); null = all; an int or a per-task mapping as ``limit``
    loss_limit: Any = None


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    precision: str = "32-true"
    strategy: str = "auto"


@dataclass
class LoggerConfig:
    wandb: bool = True
    mode: str = "offline"  # offline | online | disabled
    project: str = "dataselect"
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    data_dir: str = MISSING  # real data (GSM8K, BBH files, local pools)
    cache_dir: str = MISSING  # artifacts shared by every run: models, warmups, features, ...
    output_dir: str = MISSING  # this run's directory


@dataclass
class PoolConfig:
    name: str = MISSING
    sources: list[Any] = field(default_factory=list)
    # appended to ``sources``: a pool extends another through its defaults list (a list
    # would replace the other's, not add to it), e.g. conf/pool/cpu_table.yaml
    extra_sources: list[Any] = field(default_factory=list)
    # examples per family, for pools whose sources read ``n: ${pool.per_family}``
    # (conf/pool/planted.yaml: 30; conf/pool/cpu_table.yaml, which extends it: 10)
    per_family: int | None = None
    size: int | None = None  # expected size, for dry-run estimates when the pool can't be read


@dataclass
class TaskConfig:
    """One target task. ``cfg.target`` maps task names to these: ``target=gsm8k`` gives
    ``{gsm8k: ...}``, ``target=[gsm8k,bbh]`` a multi-task target with both."""

    answer_type: str = "number"  # number | text (see dataselect.evaluation.scoring)
    validation: list[Any] = field(default_factory=list)  # sources, as for pools
    test: list[Any] = field(default_factory=list)
    fewshot: list[Any] = field(default_factory=list)  # evaluation demos, matched by subtask
    max_length: int | None = None  # token limit of validation examples (null: model's)


@dataclass
class DecontaminationConfig:
    """Pool examples overlapping the target's test items are removed at selection time."""

    exact: bool = True  # same normalized prompt as a test (or validation) item
    ngram: int = 13  # also any shared word n-gram of this length with a test item; 0 = off


@dataclass
class RunConfig:
    stage: Stage = Stage.all
    dry_run: bool = False  # print the plan (stages, cache hits, estimated cost) and exit
    budget: Any = 0.05  # a fraction of the pool (float) or a count (int)
    budget_rounding: str = "nearest"  # fraction -> count: nearest | floor (the authors' int(p N))
    seed: int = 0
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    # task name -> TaskConfig. Typed as Any because Hydra cannot add a structured value from
    # the command line (+target.x={...}); every task is checked by ``task_config`` on load.
    target: dict[str, Any] = field(default_factory=dict)
    decontamination: DecontaminationConfig = field(default_factory=DecontaminationConfig)
    selector: Any = MISSING  # {_target_: dataselect.selectors...., knobs}
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    finetune: TrainConfig = field(default_factory=TrainConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # Published numbers a preset reproduces, e.g. {bbh: 41.5, random/bbh: 38.9, source: ...};
    # the report prints them beside ours.
    reference: dict[str, Any] | None = None


def pool_sources(pool: Any) -> list[Any]:
    """A pool's sources: ``sources`` then ``extra_sources``."""
    return [*pool.sources, *(pool.get("extra_sources") or [])]


def task_config(name: str, node: Any) -> DictConfig:
    """A task's config checked against ``TaskConfig`` (defaults filled, typos refused)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(OmegaConf.structured(TaskConfig), node)
    except OmegaConfBaseException as e:
        raise ValueError(f"target.{name}: {e}".splitlines()[0]) from e


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=RunConfig)


register()
