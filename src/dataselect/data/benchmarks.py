"""GSM8K and BIG-Bench Hard as sources, read from the upstream file layouts or the hub.

Source kinds (registered with :func:`dataselect.data.sources.register_reader`):

- ``gsm8k``: ``split`` (train | test), optional ``n`` + ``seed`` (a seeded subset), ``from``
  (auto | local | hub). Local: ``<data_dir>/gsm8k/<split>.jsonl``; hub: ``openai/gsm8k``.
  The worked solution loses its calculator annotations (``<<48/2=24>>``) and its
  ``#### 72`` line becomes ``The answer is 72.``, the form of the chain-of-thought exemplars.
- ``gsm8k_cot``: the 8 standard chain-of-thought exemplars (Wei et al., 2022), read from the
  copy lm-evaluation-harness ships (``lm_eval/tasks/gsm8k/gsm8k-cot.yaml``).
- ``bbh``: test items of ``tasks`` (``all`` or a list) from ``<data_dir>/bbh/<task>.json``,
  else the hub (``lukaemon/bbh``). System turn = the task description of its CoT prompt.
- ``bbh_cot``: the 3 chain-of-thought exemplars per task from ``bbh/cot-prompts/<task>.txt``
  (else lm-eval's bundled copy). ``demos: 2`` gives LESS's validation set: each exemplar
  with the other two of its task as earlier chat turns and the loss on its own answer only
  (``meta.loss = "last"``); ``demos: 0`` gives the plain exemplars (evaluation few-shot).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from dataselect.data.readers import iter_json_records
from dataselect.data.records import Example, RecordError, make_example
from dataselect.data.sources import register_reader

BBH_TASKS = (
    "boolean_expressions",
    "causal_judgement",
    "date_understanding",
    "disambiguation_qa",
    "dyck_languages",
    "formal_fallacies",
    "geometric_shapes",
    "hyperbaton",
    "logical_deduction_five_objects",
    "logical_deduction_seven_objects",
    "logical_deduction_three_objects",
    "movie_recommendation",
    "multistep_arithmetic_two",
    "navigate",
    "object_counting",
    "penguins_in_a_table",
    "reasoning_about_colored_objects",
    "ruin_names",
    "salient_translation_error_detection",
    "snarks",
    "sports_understanding",
    "temporal_sequences",
    "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects",
    "web_of_lies",
    "word_sorting",
)
COT_TRIGGER = "Let's think step by step."
_CALC = re.compile(r"<<[^>]*>>")
_ANSWER_IS = re.compile(r"[Tt]he answer is (.*?)\.?\s*$", re.S)


def _local_or_hub(spec: dict[str, Any], path: Path) -> str:
    """'local' or 'hub': where to read a source from (``from: auto`` prefers local files)."""
    where = spec.get("from", "auto")
    if where not in ("auto", "local", "hub"):
        raise RecordError(f"source {spec}: 'from' must be auto, local or hub, got {where!r}")
    if where == "auto":
        return "local" if path.exists() else "hub"
    if where == "local" and not path.exists():
        raise FileNotFoundError(f"{path} not found (set paths.data_dir or DATASELECT_DATA_DIR)")
    return where


def _hub_rows(path: str, name: str | None, split: str, what: Path) -> list[dict]:
    try:
        import datasets

        return [dict(r) for r in datasets.load_dataset(path, name, split=split)]
    except Exception as e:  # offline, missing dataset, ...
        raise FileNotFoundError(
            f"{what} not found locally and the hub dataset {path} ({name or 'default'}, "
            f"{split}) could not be loaded ({type(e).__name__}: {e}); set paths.data_dir "
            "(or DATASELECT_DATA_DIR) to a directory in the upstream layout"
        ) from e


def _subset(items: list, n: int | None, seed: int) -> list:
    """A seeded subset of ``n`` items in file order (all when ``n`` is null)."""
    if n is None:
        return items
    if not 1 <= int(n) <= len(items):
        raise RecordError(f"asked for n={n} items of a source with {len(items)}")
    keep = sorted(random.Random(seed).sample(range(len(items)), int(n)))
    return [items[i] for i in keep]


# ---- GSM8K -------------------------------------------------------------------------------


def gsm8k_solution(answer: str, where: str) -> tuple[str, str]:
    """(chain-of-thought text ending in "The answer is N.", N) from a GSM8K answer field."""
    if "####" not in answer:
        raise RecordError(f"{where}: field 'answer' has no '#### <number>' line")
    body, final = answer.rsplit("####", 1)
    final = final.strip().replace(",", "")
    if not final:
        raise RecordError(f"{where}: field 'answer' has an empty '####' line")
    steps = _CALC.sub("", body).strip()
    return (f"{steps}\nThe answer is {final}." if steps else f"The answer is {final}."), final


def _gsm8k_example(rec: dict, split: str, i: int, where: str) -> Example:
    for f in ("question", "answer"):
        if not isinstance(rec.get(f), str) or not rec[f].strip():
            raise RecordError(f"{where}: field {f!r} must be a non-empty string")
    text, final = gsm8k_solution(rec["answer"], where)
    return make_example(
        f"gsm8k/{split}/{i}",
        f"gsm8k/{split}",
        [{"role": "user", "content": rec["question"]}, {"role": "assistant", "content": text}],
        {"answer": final, "subtask": "gsm8k"},
        where=where,
    )


@register_reader("gsm8k")
def read_gsm8k(spec: dict[str, Any], data_dir: Path) -> list[Example]:
    split = spec.get("split", "test")
    path = Path(spec.get("dir") or Path(data_dir) / "gsm8k") / f"{split}.jsonl"
    if _local_or_hub(spec, path) == "local":
        rows = [(f"{path}:{line}", rec) for line, rec in iter_json_records(path)]
    else:
        hub = _hub_rows("openai/gsm8k", "main", split, path)
        rows = [(f"openai/gsm8k[{split}][{i}]", r) for i, r in enumerate(hub)]
    out = [_gsm8k_example(rec, split, i, where) for i, (where, rec) in enumerate(rows)]
    return _subset(out, spec.get("n"), int(spec.get("seed", 0)))


@cache
def _lm_eval_yaml(relative: str) -> dict:
    import importlib.util

    import yaml

    root = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks"
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval's bundled task file {path} is missing")

    class Loader(yaml.SafeLoader):  # lm-eval YAMLs use !function tags
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return yaml.load(path.read_text(), Loader=Loader)  # noqa: S506  (SafeLoader subclass)


@register_reader("gsm8k_cot")
def read_gsm8k_cot(spec: dict[str, Any], data_dir: Path) -> list[Example]:
    samples = _lm_eval_yaml("gsm8k/gsm8k-cot.yaml")["fewshot_config"]["samples"]
    out = []
    for i, s in enumerate(samples):
        final = _ANSWER_IS.search(s["target"])
        answer = final.group(1).strip() if final else ""
        out.append(
            make_example(
                f"gsm8k/cot/{i}",
                "gsm8k/cot",
                [
                    {"role": "user", "content": s["question"]},
                    {"role": "assistant", "content": s["target"]},
                ],
                {"answer": answer, "subtask": "gsm8k"},
                where=f"gsm8k-cot exemplar {i}",
            )
        )
    return out


# ---- BBH ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CotPrompt:
    task: str
    description: str
    shots: tuple[tuple[str, str], ...]  # (question, answer starting "Let's think step by step.")


def bbh_tasks(spec: dict[str, Any]) -> list[str]:
    tasks = spec.get("tasks", "all")
    tasks = list(BBH_TASKS) if tasks == "all" else [str(t) for t in tasks]
    unknown = sorted(set(tasks) - set(BBH_TASKS))
    if unknown:
        raise RecordError(f"unknown BBH tasks {unknown}; known: {list(BBH_TASKS)}")
    return tasks


def parse_cot_prompt(task: str, text: str, where: str) -> CotPrompt:
    """Parse an upstream ``cot-prompts/<task>.txt``: canary, ``-----``, description, shots."""
    if "-----" in text:
        text = text.split("-----", 1)[1]
    blocks = re.split(r"\n\s*\n(?=Q: )", text.strip())
    description, shots = blocks[0].strip(), []
    for k, block in enumerate(blocks[1:], start=1):
        if not block.startswith("Q: ") or "\nA: " not in block:
            raise RecordError(f"{where}: exemplar {k} is not a 'Q: ... A: ...' block")
        q, a = block[3:].split("\nA: ", 1)
        shots.append((q.strip(), a.strip()))
    if not shots:
        raise RecordError(f"{where}: no 'Q: ... A: ...' exemplars after the description")
    return CotPrompt(task, description, tuple(shots))


def read_cot_prompt(task: str, data_dir: Path, spec: dict[str, Any]) -> CotPrompt:
    path = Path(data_dir) / "bbh" / "cot-prompts" / f"{task}.txt"
    if _local_or_hub(spec, path) == "local":
        return parse_cot_prompt(task, path.read_text(encoding="utf-8"), str(path))
    # no hub copy of the prompts: lm-eval ships them in its BBH task files
    cfg = _lm_eval_yaml(f"bbh/cot_fewshot/{task}.yaml")
    shots = tuple(
        (s["input"].strip(), f"{COT_TRIGGER}\n{s['target'].strip()}")
        for s in cfg["fewshot_config"]["samples"]
    )
    return CotPrompt(task, cfg["description"].strip(), shots)


def final_answer(cot: str, where: str) -> str:
    m = _ANSWER_IS.search(cot.strip())
    if not m:
        raise RecordError(f"{where}: the exemplar's answer has no 'the answer is ...'")
    return m.group(1).strip()


@register_reader("bbh")
def read_bbh(spec: dict[str, Any], data_dir: Path) -> list[Example]:
    out = []
    for task in bbh_tasks(spec):
        path = Path(data_dir) / "bbh" / f"{task}.json"
        if _local_or_hub(spec, path) == "local":
            rows = [(f"{path}:{i}", rec) for i, rec in iter_json_records(path)]
        else:
            hub = _hub_rows("lukaemon/bbh", task, "test", path)
            rows = [(f"lukaemon/bbh[{task}][{i}]", r) for i, r in enumerate(hub)]
        prompt = read_cot_prompt(task, data_dir, spec)
        for i, (where, rec) in enumerate(rows):
            for f in ("input", "target"):
                if not isinstance(rec.get(f), str) or not rec[f].strip():
                    raise RecordError(f"{where}: field {f!r} must be a non-empty string")
            out.append(
                make_example(
                    f"bbh/{task}/{i}",
                    f"bbh/{task}",
                    [
                        {"role": "system", "content": prompt.description},
                        {"role": "user", "content": rec["input"]},
                        {"role": "assistant", "content": rec["target"]},
                    ],
                    {"answer": rec["target"].strip(), "subtask": task},
                    where=where,
                )
            )
    return out


@register_reader("bbh_cot")
def read_bbh_cot(spec: dict[str, Any], data_dir: Path) -> list[Example]:
    demos = int(spec.get("demos", 2))
    out = []
    for task in bbh_tasks(spec):
        prompt = read_cot_prompt(task, data_dir, spec)
        if not 0 <= demos < len(prompt.shots):
            raise RecordError(f"bbh_cot {task}: demos={demos} needs more than {demos} exemplars")
        for i, (q, a) in enumerate(prompt.shots):
            others = [s for j, s in enumerate(prompt.shots) if j != i][:demos]
            turns = [{"role": "system", "content": prompt.description}]
            for dq, da in others:
                turns += [{"role": "user", "content": dq}, {"role": "assistant", "content": da}]
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            meta = {"answer": final_answer(a, f"{task} exemplar {i}"), "subtask": task}
            if demos:
                meta["loss"] = "last"
            out.append(
                make_example(f"bbh_cot/{task}/{i}", f"bbh_cot/{task}", turns, meta, where=task)
            )
    return out
