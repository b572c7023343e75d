"""Cache keys: what determines each artifact. A key hashes the resolved config that decides
an artifact plus its upstream keys (and ``ARTIFACTS_VERSION``), so a sweep pays once for
what its jobs share."""

from __future__ import annotations

from typing import Any

from omegaconf import Container, DictConfig, OmegaConf

from dataselect.cache import digest
from dataselect.config import pool_sources, task_config

# Salted into every key. Bump it when code changes what an artifact holds for the same config
# (data order, batching, a file layout): a cache then never serves an artifact the current
# code would not build. 2: shard-aligned featurize batches, (seed, epoch) shuffles, resumable
# training checkpoints.
ARTIFACTS_VERSION = 2
# bump when the evaluate artifact's target loss changes meaning (1: mean answer-token NLL)
TARGET_LOSS_FORMAT = 1

# Salted into selection keys only (selections are cheap to redo; warmups and stores are not).
# Bump it when selector code changes what a selection holds for the same features. 1: canonical
# rankings (selectors/ranking.py): ties, rounding-level ones included, break by pool order.
SELECTION_VERSION = 1


def artifact_key(obj: Any) -> str:
    """The one function that names an artifact of the stage graph: a digest of what determines
    it, salted with ``ARTIFACTS_VERSION``."""
    return digest({"artifacts_version": ARTIFACTS_VERSION, "config": obj})


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, Container) else node


# Selector options added after selections were cached, left out of the select key while at
# their default (which keeps the earlier behaviour), so the selections cached before the
# option existed stay valid; any other value is in the key.
LATE_SELECTOR_OPTIONS = {"dataselect.selectors.g2is.G2ISSelector": {"center": True}}


def selector_spec(cfg: DictConfig) -> dict:
    spec = _plain(cfg.selector)
    late = LATE_SELECTOR_OPTIONS.get(spec.get("_target_"), {})
    return {
        k: v
        for k, v in spec.items()
        if not (k in late and (type(v), v) == (type(late[k]), late[k]))
    }


def model_spec(cfg: DictConfig) -> dict:
    m = cfg.model
    return {
        "name": m.name,
        "revision": m.revision,
        "dtype": m.dtype,
        "chat_template": m.chat_template,
        "max_length": m.max_length,
    }


def pool_spec(cfg: DictConfig) -> dict:
    """What determines the pool's examples (``size`` is only an estimate for dry runs)."""
    return {"name": cfg.pool.name, "sources": [_plain(s) for s in pool_sources(cfg.pool)]}


def warmup_seed(cfg: DictConfig) -> int:
    """``warmup.seed``, or the run's seed when it is null."""
    return cfg.seed if cfg.warmup.get("seed") is None else int(cfg.warmup.seed)


def warmup_key(cfg: DictConfig) -> str:
    return artifact_key(
        {
            "model": model_spec(cfg),
            "lora": _plain(cfg.model.lora),
            "pool": pool_spec(cfg),
            "warmup": {k: v for k, v in _plain(cfg.warmup).items() if k != "seed"},
            "seed": warmup_seed(cfg),
        }
    )


def target_spec(cfg: DictConfig) -> dict:
    """Every task of the target, checked and with its defaults filled."""
    return {name: _plain(task_config(name, t)) for name, t in cfg.target.items()}


def validation_spec(cfg: DictConfig) -> dict:
    """What determines the validation examples' tokens: each task's sources and token limit."""
    return {
        name: {"validation": t["validation"], "max_length": t["max_length"]}
        for name, t in target_spec(cfg).items()
    }


def sketch_key(sc: DictConfig) -> dict:
    """What of ``features.sketch`` decides the matrix: ``block_rows`` never does, and
    ``factor`` only for the factorized kind (so adding it kept every other store's key)."""
    skip = {"block_rows"} | (set() if sc.kind == "factorized" else {"factor"})
    return {k: v for k, v in _plain(sc).items() if k not in skip}


def features_keys(cfg: DictConfig, fc: DictConfig, checkpoint: str) -> tuple[str, str]:
    """(pool store key, validation store key) at one warmup checkpoint. The pool store is
    target-agnostic; the validation store is always SGD and depends only on the sketch."""
    common = {
        "model": model_spec(cfg),
        "warmup": warmup_key(cfg),
        "checkpoint": checkpoint,
        "method": fc.method,
        "sketch": sketch_key(fc.sketch),
        "dtype": fc.dtype,
    }
    pool = {
        **common,
        "pool": pool_spec(cfg),
        "gradient_type": fc.gradient_type,
        "adam_form": fc.adam_form,
        "shard_size": fc.shard_size,
    }
    val = {**common, "validation": validation_spec(cfg)}
    return artifact_key(pool), artifact_key(val)


def select_key(cfg: DictConfig, features_key: str | None) -> str:
    rounding = cfg.get("budget_rounding", "nearest")
    # the default is left out of the key, so selections cached before the option existed stay
    # valid; another rounding (a different count for the same fraction) gets its own key
    extra = {} if rounding == "nearest" else {"budget_rounding": rounding}
    return artifact_key(
        {
            **extra,
            "model": model_spec(cfg),
            "pool": pool_spec(cfg),
            "target": target_spec(cfg),
            "selector": selector_spec(cfg),
            "budget": cfg.budget,
            "seed": cfg.seed,
            "features": features_key,
            "decontamination": _plain(cfg.decontamination),  # decides the candidates
            "selection_version": SELECTION_VERSION,
        }
    )


def finetune_key(cfg: DictConfig, selection_hash: str) -> str:
    """``selection_hash`` hashes the selected ids: a changed selection never reuses a model."""
    return artifact_key(
        {
            "model": model_spec(cfg),
            "lora": _plain(cfg.model.lora),
            "selection": selection_hash,
            "finetune": _plain(cfg.finetune),
            "seed": cfg.seed,
        }
    )


def evaluate_key(cfg: DictConfig, adapter_key: str | None) -> str:
    ev = {k: v for k, v in _plain(cfg.evaluator).items() if k != "include_base"}
    return artifact_key(
        {
            "model": model_spec(cfg),
            "adapter": adapter_key,
            "evaluator": ev,
            "target": target_spec(cfg),
            "target_loss": TARGET_LOSS_FORMAT,
        }
    )
