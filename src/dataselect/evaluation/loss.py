"""Target loss: how well a model predicts the reference answers of the target's test items.

Beside the papers' accuracy, every evaluation reports the mean per-token negative
log-likelihood (nats) of each test item's reference answer given its prompt, formatted
exactly as training formats an example (the chat template, loss on the final answer's tokens
only; GSM8K's answer is the worked solution, BBH's the answer after the task's question). One
forward pass per item, so it covers far more items than generation can, and it moves where a
small model's accuracy sits at zero: it measures what the fine-tuning taught, not whether it
was enough to get the final number right.

Per item: ``nll`` = mean over its answer tokens (items weigh equally, like accuracy's).
Per benchmark: the mean over items and its standard error (sample std / sqrt(n)); a task with
subtasks (BBH) averages its subtasks (macro), as its accuracy does.
"""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any

import numpy as np

from dataselect.data.formatting import tokenize_examples
from dataselect.evaluation.tasks import Benchmark, select_items

log = logging.getLogger(__name__)
METRIC = "target_loss"


def summarize(items: list[dict]) -> dict[str, Any]:
    """Mean of per-item losses with its standard error; ``tokens`` scored in all."""
    values = [it["nll"] for it in items]
    n = len(values)
    return {
        "metric": METRIC,
        "value": statistics.fmean(values),
        "stderr": statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan"),
        "n": n,
        "tokens": int(sum(it["tokens"] for it in items)),
    }


def aggregate(subtasks: dict[str, dict]) -> dict[str, Any]:
    """Macro mean over subtasks (each subtask's mean weighs equally), stderr combined as
    independent means: sqrt(sum of variances) / k."""
    k = len(subtasks)
    var = [0.0 if math.isnan(r["stderr"]) else r["stderr"] ** 2 for r in subtasks.values()]
    return {
        "metric": METRIC,
        "value": sum(r["value"] for r in subtasks.values()) / k,
        "stderr": math.sqrt(sum(var)) / k,
        "n": sum(r["n"] for r in subtasks.values()),
        "tokens": sum(r["tokens"] for r in subtasks.values()),
    }


def target_losses(
    model,
    tokenizer,
    benchmarks: list[Benchmark],
    max_length: int,
    limit: Any = None,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, list[dict]]:
    """Per benchmark, ``[{"id", "nll", "tokens"}]`` for its test items (``limit``: an int,
    a mapping by task name as ``evaluator.limit``, or null for all), in item order.

    An item whose answer is cut off entirely by ``max_length`` cannot be scored: it is left
    out and logged, never counted as zero."""
    from dataselect.evaluation.harness import task_limit
    from dataselect.features.passes import answer_nll, lm_pass

    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: dict[str, list[dict]] = {}
    try:
        for bench in benchmarks:
            items = select_items(bench.examples, task_limit(limit, bench.name), seed)
            toks, stats = tokenize_examples(tokenizer, items, max_length)
            if stats.dropped_no_answer_tokens:
                log.warning(
                    "target loss %s: %d of %d items have no answer token within %d tokens, "
                    "left out (e.g. %s)",
                    *(bench.name, stats.dropped_no_answer_tokens, len(items), max_length),
                    stats.dropped_ids[:3],
                )
            if not toks:
                raise ValueError(
                    f"target loss {bench.name}: none of its {len(items)} items has an answer "
                    f"token within {max_length} tokens (raise the task's max_length)"
                )
            rows = lm_pass(
                model, toks, pad, answer_nll, batch_size, what=f"target loss {bench.name}"
            )
            if not np.isfinite(rows).all():
                bad = [t.id for t, r in zip(toks, rows, strict=True) if not np.isfinite(r).all()]
                raise FloatingPointError(f"target loss {bench.name}: non-finite for {bad[:5]}")
            out[bench.name] = [
                {"id": t.id, "nll": float(s / c), "tokens": int(c)}
                for t, (s, c) in zip(toks, rows, strict=True)
            ]
    finally:
        model.train(was_training)
    return out
