"""Run lm-evaluation-harness (0.4.13) offline on an in-memory model, one task per benchmark.

The model is wrapped in ``HFLM(pretrained=model, tokenizer=tokenizer)``; tasks are generated
into ``work_dir/lm_eval_tasks`` (see ``tasks.py``) and loaded with a ``TaskManager`` that
indexes only that folder, so lm-eval's ~200 built-in task folders are not scanned and no
built-in task can clash. With ``apply_chat_template`` the prompt is the tokenizer's chat
template over ``[few-shot user/assistant turns..., user question]`` with the generation
prompt, i.e. the same text ``dataselect.data.formatting.prompt_text`` builds for training.

Benchmarks run one ``simple_evaluate`` call each, and each finished result is written at once
(atomically) to ``work_dir/results/<name>.json`` with a hash of the benchmark's definition, so
a run killed midway (BBH alone has 27 subtasks) resumes with the benchmarks it had not done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dataselect.cache import digest, write_json
from dataselect.data.formatting import ensure_chat_template
from dataselect.evaluation.scoring import extract
from dataselect.evaluation.tasks import (
    TASK_PREFIX,
    Benchmark,
    gold,
    select_items,
    stop_sequences,
    write_task,
)
from dataselect.progress import interactive, progress

log = logging.getLogger(__name__)
METRIC = "exact_match"
RESULT_FORMAT = 1  # bump when the stored result's layout or meaning changes
RESULT_KEYS = {"metric", "value", "stderr", "n", "samples"}


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs every step at INFO; keep WARNING and up (its tqdm bars stay)."""
    logger = logging.getLogger("lm_eval")
    old = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


def _make_lm(model, tokenizer, batch_size: int | str, chat: bool):
    """An ``HFLM`` on the pre-built model that never looks anything up on the hub."""
    from lm_eval.models.huggingface import HFLM

    class LocalHFLM(HFLM):
        advance: Callable[[int], None] = staticmethod(lambda n: None)

        def get_model_info(self) -> dict:
            # HFLM.get_model_info asks HfApi for the model's commit sha (a network call).
            return {"model_num_parameters": sum(p.numel() for p in self._model.parameters())}

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            # In a terminal lm-eval's own bar; without one (a batch log) its bar would be a
            # wall of carriage returns: progress lines per generated batch instead.
            if interactive():
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
            with progress("generating answers", len(requests), unit="items") as advance:
                self.advance = advance
                try:
                    return super().generate_until(requests, disable_tqdm=True)
                finally:
                    del self.advance

        def _model_generate(self, context, *args, **kwargs):
            out = super()._model_generate(context, *args, **kwargs)
            self.advance(int(context.shape[0]))
            return out

    # HFLM warns twice that `pretrained` is a model object: expected here, so not shown.
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    old = hf_log.level
    hf_log.setLevel(logging.ERROR)
    try:
        # add_bos_token=False with a chat template: the template decides every special token,
        # as in training (formatting.py tokenizes with add_special_tokens=False).
        return LocalHFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            add_bos_token=False if chat else None,
        )
    finally:
        hf_log.setLevel(old)


def task_limit(limit: Any, benchmark: str) -> int | None:
    """``evaluator.limit`` for one benchmark: an int for all, or a mapping by task name
    (``bbh`` applies to every ``bbh/<subtask>``); tasks it does not name run in full."""
    if limit is None or isinstance(limit, int):
        return limit
    if hasattr(limit, "get"):
        value = limit.get(benchmark.split("/", 1)[0])
        return None if value is None else int(value)
    raise ValueError(f"evaluator.limit must be null, an int or a mapping, got {limit!r}")


def _stderr(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # "N/A" when n == 1
        return float("nan")


def _samples(logged: list[dict], answer_type: str) -> list[dict]:
    out = []
    for s in sorted(logged, key=lambda s: s["doc_id"]):
        response = s["filtered_resps"][0]
        out.append(
            {
                "id": s["doc"]["id"],
                "prompt": s["arguments"][0][0],  # the exact text the model was given
                "target": s["target"],
                "response": response,
                "extracted": extract(response, answer_type),
                "correct": bool(s[METRIC]),
            }
        )
    return out


def _definition(
    bench: Benchmark, items, fewshot, until, max_gen_toks: int, chat: bool, seed: int, tokenizer
) -> str:
    """A hash of everything that decides a benchmark's result besides the model: its items,
    few-shot demonstrations, answer type and generation settings (and the chat template)."""
    return digest(
        {
            "format": RESULT_FORMAT,
            "name": bench.name,
            "answer_type": bench.answer_type,
            "items": [(ex.id, ex.messages, gold(ex)) for ex in items],
            "fewshot": [(ex.id, ex.messages) for ex in fewshot],
            "until": until,
            "max_gen_toks": max_gen_toks,
            "chat": chat,
            "chat_template": getattr(tokenizer, "chat_template", None) if chat else None,
            "fewshot_seed": seed,
        },
        n=32,
    )


def result_path(work_dir: Path, bench: Benchmark) -> Path:
    """Where ``evaluate`` keeps a finished benchmark's result."""
    return Path(work_dir) / "results" / f"{bench.task_name[len(TASK_PREFIX) :]}.json"


def _load_result(path: Path, bench: Benchmark, definition: str) -> dict | None:
    """The stored result of ``bench`` if it is there, whole, and of this definition."""
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("evaluate: ignoring unreadable result %s (%s); re-running", path, err)
        return None
    result = stored.get("result") if isinstance(stored, dict) else None
    if (
        not isinstance(stored, dict)
        or stored.get("benchmark") != bench.name
        or stored.get("definition") != definition
        or not isinstance(result, dict)
        or not result.keys() >= RESULT_KEYS
    ):
        log.info("evaluate: stored result %s is for another definition; re-running", path)
        return None
    return result


def _run_one(lm, manager, task: str, bench: Benchmark, chat: bool, seed: int) -> dict:
    import lm_eval

    with _quiet_lm_eval():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            task_manager=manager,
            apply_chat_template=chat,
            fewshot_as_multiturn=chat,
            log_samples=True,
            # Greedy decoding needs no randomness: leave the caller's global RNGs alone.
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
            fewshot_random_seed=seed,
        )
    res = results["results"][task]
    samples = _samples(results["samples"][task], bench.answer_type)
    out = {
        "metric": METRIC,
        "value": float(res[f"{METRIC},none"]),
        "stderr": _stderr(res.get(f"{METRIC}_stderr,none")),
        "n": len(samples),
        "samples": samples,
    }
    # exactly what a resumed run reads back from the result file
    return json.loads(json.dumps(out))


def evaluate(model, tokenizer, benchmarks: list[Benchmark], cfg, work_dir: Path) -> dict[str, dict]:
    """Run lm-eval's simple_evaluate on the in-memory model, one benchmark at a time.

    Returns ``{benchmark_name: {"metric": "exact_match", "value": float, "stderr": float,
    "n": int, "samples": [{"id", "prompt", "target", "response", "extracted", "correct"}]}}``.
    ``cfg`` (the ``evaluator`` group) keys: batch_size, limit, seed, max_gen_toks,
    apply_chat_template, num_fewshot; missing keys take the defaults below.

    Resumable: each benchmark's result is written atomically to
    ``work_dir/results/<name>.json`` as soon as it is done, with a hash of the benchmark's
    definition (items, few-shot demonstrations, answer type, generation settings). A later
    call with the same ``work_dir`` reuses every result whose definition still matches
    (an unreadable or mismatched file is re-run) and returns the same dict as an
    uninterrupted run.
    """
    from lm_eval.tasks import TaskManager

    batch_size = cfg.get("batch_size", 8)
    limit, seed = cfg.get("limit", None), int(cfg.get("seed", 0))
    chat = bool(cfg.get("apply_chat_template", True))
    num_fewshot = cfg.get("num_fewshot", None)
    max_gen_toks = int(cfg.get("max_gen_toks", 256))
    if not benchmarks:
        return {}
    names = [b.name for b in benchmarks]
    if len({b.task_name for b in benchmarks}) != len(benchmarks):
        raise ValueError(f"benchmark names must be distinct as lm-eval task names: {names}")

    task_dir = Path(work_dir) / "lm_eval_tasks"
    if chat:
        ensure_chat_template(tokenizer)
    until = stop_sequences(tokenizer, chat)
    done: dict[str, dict] = {}
    todo: list[tuple[Benchmark, list, list, str]] = []
    for bench in benchmarks:
        if not bench.examples:
            raise ValueError(f"benchmark {bench.name!r} has no test items")
        items = select_items(bench.examples, task_limit(limit, bench.name), seed)
        if not items:
            raise ValueError(f"benchmark {bench.name!r}: limit={limit} leaves no test items")
        k = len(bench.fewshot) if num_fewshot is None else min(int(num_fewshot), len(bench.fewshot))
        fewshot = bench.fewshot[:k]
        definition = _definition(bench, items, fewshot, until, max_gen_toks, chat, seed, tokenizer)
        stored = _load_result(result_path(work_dir, bench), bench, definition)
        if stored is not None:
            done[bench.name] = stored
            continue
        write_task(bench, items, fewshot, task_dir, until, max_gen_toks, chat)
        todo.append((bench, items, fewshot, definition))
        log.info(
            "benchmark %s: %d items, %d-shot -> task %s", bench.name, len(items), k, bench.task_name
        )
    if done:
        log.info("evaluate: %d of %d benchmarks already done, resuming", len(done), len(benchmarks))

    if todo:
        was_training = model.training
        try:
            with _quiet_lm_eval():
                lm = _make_lm(model, tokenizer, batch_size, chat)
                manager = TaskManager(include_path=str(task_dir), include_defaults=False)
            for i, (bench, _, _, definition) in enumerate(todo, 1):
                result = _run_one(lm, manager, bench.task_name, bench, chat, seed)
                path = result_path(work_dir, bench)
                path.parent.mkdir(parents=True, exist_ok=True)
                stored = {"benchmark": bench.name, "definition": definition, "result": result}
                write_json(path, stored)
                done[bench.name] = result
                log.info(
                    "%s: %s = %.4f (n=%d) [%d/%d to run]",
                    bench.name,
                    METRIC,
                    result["value"],
                    result["n"],
                    i,
                    len(todo),
                )
        finally:
            model.train(was_training)
    return {b.name: done[b.name] for b in benchmarks}


def aggregate(subtasks: dict[str, dict]) -> dict:
    """Macro (mean of subtask accuracies, the BBH convention) and micro (all items pooled)
    averages of per-subtask results, with standard errors."""
    values = [r["value"] for r in subtasks.values()]
    ns = [r["n"] for r in subtasks.values()]
    k, total = len(values), sum(ns)
    # per-subtask variance of the mean; lm-eval's stderr, or p(1-p)/(n-1) where it gave none
    var = [
        r["stderr"] ** 2
        if not math.isnan(r["stderr"])
        else (r["value"] * (1 - r["value"]) / max(r["n"] - 1, 1))
        for r in subtasks.values()
    ]
    micro = sum(v * n for v, n in zip(values, ns, strict=True)) / total
    return {
        "metric": METRIC,
        "value": sum(values) / k,
        "stderr": math.sqrt(sum(var)) / k,
        "n": total,
        "micro": micro,
        "micro_stderr": math.sqrt(micro * (1 - micro) / max(total - 1, 1)),
        "subtasks": {
            name: {key: r[key] for key in ("value", "stderr", "n")} for name, r in subtasks.items()
        },
    }
