"""Benchmarks as lm-eval tasks: one JSONL data file and one generated task YAML each.

The YAML is plain lm-eval 0.4.13 config: ``dataset_path: json`` on the local JSONL file,
``output_type: generate_until`` with greedy decoding, and ``process_results`` pointing (via
``!function``) at :func:`dataselect.evaluation.scoring.process_results`, so the scoring logic
lives in this package and the generated files hold only data and wiring.

Few-shot demonstrations go inline into ``fewshot_config.samples`` (sampler ``first_n``): with a
chat template lm-eval renders them as earlier user/assistant turns (``fewshot_as_multiturn``),
exactly as ``dataselect.data.formatting`` renders a multi-turn training example.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dataselect.data.records import Example
from dataselect.data.targets import Task
from dataselect.evaluation.scoring import ANSWER_TYPES

TASK_PREFIX = "dataselect_"
SCORER = "dataselect.evaluation.scoring.process_results"
# Turn-boundary markers of common chat templates; a stop string that never occurs is harmless.
CHAT_STOPS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|eot_id|>", "<|user|>")


@dataclass
class Benchmark:
    name: str  # e.g. "gsm_symbolic"; the lm-eval task is "dataselect_gsm_symbolic"
    examples: list[Example]  # test items; gold answer = ex.meta["answer"] (fallback ex.answer)
    answer_type: str = "number"  # "number" or "text", see dataselect.evaluation.scoring
    fewshot: list[Example] = field(default_factory=list)  # demonstrations, earlier chat turns

    @property
    def task_name(self) -> str:
        return TASK_PREFIX + "".join(c if c.isalnum() else "_" for c in self.name)


def task_benchmarks(task: Task) -> list[Benchmark]:
    """One lm-eval benchmark per subtask of a task's test items (``bbh/date_understanding``),
    or one named after the task; each gets the demonstrations of its subtask."""
    subtasks: dict[str, list[Example]] = {}
    for ex in task.test:
        subtasks.setdefault(ex.subtask, []).append(ex)
    out = []
    for sub, items in subtasks.items():
        shots = [f for f in task.fewshot if f.subtask == sub]
        if not shots and len(subtasks) == 1:
            shots = list(task.fewshot)
        name = task.name if len(subtasks) == 1 else f"{task.name}/{sub}"
        out.append(Benchmark(name, items, task.answer_type, shots))
    return out


def select_items(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """All items if ``limit`` is None, else the first ``limit`` after a shuffle seeded by ``seed``.

    Subsets are nested: the items chosen for a smaller limit are among those for a larger one.
    """
    if limit is None:
        return list(examples)
    if limit < 0:
        raise ValueError(f"evaluator.limit must be >= 0 or null, got {limit}")
    order = list(examples)
    random.Random(seed).shuffle(order)
    return order[:limit]


def gold(ex: Example) -> str:
    return str(ex.meta.get("answer", ex.answer))


def system_turn(ex: Example) -> str:
    return next((m["content"] for m in ex.messages if m["role"] == "system"), "")


def stop_sequences(tokenizer, chat: bool) -> list[str]:
    """Generation stops: the EOS token plus turn markers (chat) or a blank line (plain text)."""
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    stops += list(CHAT_STOPS) if chat else ["\n\n"]
    return list(dict.fromkeys(stops))


def write_task(
    bench: Benchmark,
    items: list[Example],
    fewshot: list[Example],
    task_dir: Path,
    until: list[str],
    max_gen_toks: int,
    chat: bool = True,
) -> Path:
    """Write ``<task>.jsonl`` and ``<task>.yaml`` into ``task_dir``; returns the YAML path.

    Without a chat template lm-eval joins the system text to the first question with no
    separator, so there it gets a blank line of its own.
    """
    if bench.answer_type not in ANSWER_TYPES:
        raise ValueError(f"benchmark {bench.name!r}: answer_type must be one of {ANSWER_TYPES}")
    task_dir.mkdir(parents=True, exist_ok=True)
    data = (task_dir / f"{bench.task_name}.jsonl").resolve()
    with data.open("w") as f:
        for ex in items:
            system = system_turn(ex)
            doc = {
                "id": ex.id,
                "prompt": ex.prompt,
                "target": gold(ex),
                "answer_type": bench.answer_type,
                "system": system + "\n\n" if system and not chat else system,
            }
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    cfg: dict[str, Any] = {
        "task": bench.task_name,
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(data)},
            # Keep datasets' Arrow cache next to the data, rebuilt on every run.
            "cache_dir": str(task_dir / "hf_datasets_cache"),
            "download_mode": "force_redownload",
        },
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "prompt",  # field names, not Jinja: braces in questions stay literal
        "doc_to_target": "target",
        "description": "system",  # the test item's system turn, if any
        "generation_kwargs": {"until": until, "do_sample": False, "max_gen_toks": max_gen_toks},
        "num_fewshot": len(fewshot),
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    if fewshot:
        samples = [{"prompt": ex.prompt, "target": ex.answer} for ex in fewshot]
        cfg["fewshot_config"] = {"sampler": "first_n", "samples": samples}
    text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
    text += f"process_results: !function {SCORER}\n"
    path = task_dir / f"{bench.task_name}.yaml"
    path.write_text(text)
    return path
