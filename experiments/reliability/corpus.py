"""The bad-input corpus: every way a researcher's data or config can be wrong, and what the
pipeline must do about it. This list is the single source of truth; ``tests/test_bad_input.py``
and the drill (``experiments/reliability/drill.py``) iterate over ``CASES``.

Each ``Case`` writes its bad file(s) into a directory and returns the Hydra overrides that run
the pipeline on them with the tiny test model (``model=tiny_random``, ``pool=jsonl``, a small
``gsm_symbolic`` target; see ``base_overrides``). ``run_case`` composes that config and runs
the case's *entry*, the public call a user's run goes through, stopping as early as possible:

- ``load_pool``: ``load_pool(cfg.pool, paths.data_dir)``;
- ``load_target``: ``load_target(cfg.target, paths.data_dir)``;
- ``select``: load target and pool, then the graph's select stage (``stages.select_build``:
  decontamination, tokenizing the candidates, ``resolve_budget``, the selector) without the
  warmup;
- ``validation_tokens``: load the target, then ``features.stores.validation_tokens`` (what the
  features stage of a gradient selector does first);
- ``pipeline`` (``run_case(..., entry="pipeline")``, for drills): ``run_pipeline(cfg)``
  itself; the overrides stop at ``stage=select``, so at most the tiny warmup is trained.

Expectation per case: an exception (type, a regex, and literal strings the message must
contain: the file path, ``:line``, the field, the config key), or a counted skip (a count in
``Outcome.counts`` and ids that must not reach the pool / the selection).

Policy: a malformed record is an error by default, since a broken line in a researcher's own
file is a bug to fix, not data to lose. ``on_error: skip`` is the documented opt-in for big
scraped pools (the LESS and Infinity-Instruct presets): skipped records are counted per file
(``load_pool(...).skipped``, ``skipped_malformed`` here) and warned about once per source. A
pool example whose answer the model's ``max_length`` cuts away is a counted skip
(``dropped_no_answer_tokens``): it is a property of the model's context, not bad data, and
training on it would give a NaN gradient. A validation example cut the same way is an error:
validation defines the target, and silently shrinking it changes what selection aims at.
Everything else is an error; nothing ends in a silent empty selection.

At ``entry="pipeline"`` every case ends the same way: the pipeline counts the pool's skipped
records in ``metrics["sizes"]["skipped_malformed"]`` and resolves the budget against the
tokenized pool before the warmup (an impossible budget costs no training).

The table of the cases (class, name, input, entry, expected outcome) is generated from
``CASES`` by ``cases_table()``; ``python experiments/reliability/corpus.py`` prints it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataselect.data.records import RecordError
from dataselect.selectors.base import BudgetError

ENTRIES = ("load_pool", "load_target", "select", "validation_tokens", "pipeline")
_RG = "{{kind: reasoning_gym, name: gsm_symbolic, n: {n}, seed: {seed}}}"
LONG_PROMPT = "Summarize this text. " + "word " * 800  # ~4k byte tokens: past max_length 1024


@dataclass(frozen=True)
class Expect:
    """An error (``error`` + ``match`` regex + literal ``names``, ``{dir}`` = the case's
    directory) or a counted skip (``skip`` = a key of ``Outcome.counts``, ``count``)."""

    error: type[BaseException] | None = None
    match: str = ""
    names: tuple[str, ...] = ()
    skip: str = ""
    count: int = 0
    absent_ids: tuple[str, ...] = ()  # ids that must not reach the pool / the selection

    def literal_names(self, work_dir: Path) -> list[str]:
        return [n.replace("{dir}", str(work_dir)) for n in self.names]


@dataclass(frozen=True)
class Case:
    name: str
    number: int  # the bad-input class (1-10), the first column of ``cases_table()``
    what: str
    write: Callable[[Path], list[str]]  # writes the bad files into a dir -> Hydra overrides
    expect: Expect
    entry: str = "load_pool"  # the cheapest public call that meets the bad input


@dataclass
class Outcome:
    counts: dict[str, Any] = field(default_factory=dict)
    ids: set[str] = field(default_factory=set)  # what reached the pool / target / selection


# ---- writing bad inputs ------------------------------------------------------------------


def _q(value: Any) -> str:
    """A Hydra-quoted string (paths may hold characters the override grammar reserves)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _src(path: Any, **options: Any) -> str:
    """A json source as a Hydra flow mapping: ``{kind: json, path: '...', ...}``."""
    extra = "".join(f", {k}: {v}" for k, v in options.items())
    return f"{{kind: json, path: {_q(path)}{extra}}}"


def _write(path: Path, lines: list[Any]) -> Path:
    """One line per item: a dict as JSON, a str or bytes as is (broken lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = [
        line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line))
        for line in lines
    ]
    data = b"".join((r if isinstance(r, bytes) else r.encode()) + b"\n" for r in raw)
    path.write_bytes(data)  # no lines: an empty (0-byte) file
    return path


def record(i: int, prefix: str = "p") -> dict[str, str]:
    return {"id": f"{prefix}{i}", "prompt": f"What is {i} plus {i}?", "completion": str(2 * i)}


def write_pool(d: Path, lines: list[Any], name: str = "pool.jsonl", **options: Any) -> list[str]:
    """Write one pool file; the override that makes it the pool."""
    return [f"pool.sources=[{_src(_write(d / name, lines), **options)}]"]


def _qa(i: int, prefix: str = "v") -> dict[str, str]:
    return {
        "id": f"{prefix}{i}",
        "question": f"A farmer has {i} hens and buys {i + 2} more. How many hens now?",
        "answer": f"{i} + {i + 2} = {2 * i + 2}. The answer is {2 * i + 2}.",
    }


def base_overrides(work_dir: Path, cache_dir: Path | None = None) -> list[str]:
    """The tiny-model run every case starts from (as ``tests/test_pipeline.py``'s ``FAST``):
    a 4-record good pool (``<dir>/good_pool.jsonl``, written here), a small offline target,
    the random selector, ``stage=select``."""
    work_dir = Path(work_dir)
    good = _write(work_dir / "good_pool.jsonl", [record(i) for i in range(1, 5)])
    return [
        "model=tiny_random",
        "logger=csv",
        "selector=random",
        "pool=jsonl",
        f"pool.sources=[{_src(good)}]",
        f"target.gsm_symbolic.validation=[{_RG.format(n=4, seed=3)}]",
        f"target.gsm_symbolic.test=[{_RG.format(n=6, seed=4)}]",
        "stage=select",
        "budget=2",
        "warmup.epochs=1",
        "warmup.fraction=0.5",
        "finetune.epochs=1",
        "evaluator.max_gen_toks=8",
        "evaluator.limit=3",
        "evaluator.batch_size=3",
        f"paths.data_dir={_q(work_dir)}",
        f"paths.cache_dir={_q(cache_dir or work_dir / 'cache')}",
        f"paths.output_dir={_q(work_dir / 'out')}",
    ]


def merge_overrides(base: list[str], extra: list[str]) -> list[str]:
    """``base`` with ``extra`` on top: an extra key replaces the base's; ``target=X`` drops
    the base's ``target.*`` keys (they belong to the default target)."""

    def key(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~")

    replaced = {key(o) for o in extra}
    new_target = "target" in replaced
    kept = [
        o
        for o in base
        if key(o) not in replaced and not (new_target and key(o).startswith("target."))
    ]
    return kept + list(extra)


# ---- the cases ---------------------------------------------------------------------------


def _malformed_json(d: Path, **options: Any) -> list[str]:
    broken = '{"id": "broken", "prompt": "q3",'  # cut off mid-record
    return write_pool(d, [record(1), record(2), broken, record(4)], **options)


def _truncated_pool(d: Path) -> list[str]:
    long = {"id": "long1", "prompt": LONG_PROMPT, "completion": "Words."}
    return [*write_pool(d, [record(1), record(2), long, record(3), record(4)]), "budget=1.0"]


def _truncated_validation(d: Path) -> list[str]:
    long = {"id": "vlong", "question": LONG_PROMPT, "answer": "The answer is 1."}
    val = _write(d / "val.jsonl", [_qa(1), long])
    return ["selector=less", f"target.gsm_symbolic.validation=[{_src(val)}]"]


def _all_test_dropped(d: Path) -> list[str]:
    val = _write(d / "val.jsonl", [_qa(i) for i in range(3)])
    test = _write(d / "test.jsonl", [{**_qa(i, "t"), "answer": "It is 0."} for i in range(3)])
    return [
        f"target.gsm_symbolic.validation=[{_src(val)}]",
        f"target.gsm_symbolic.test=[{_src(test)}]",
    ]


def _missing_data_dir_file(d: Path) -> list[str]:
    (d / "data").mkdir(parents=True, exist_ok=True)
    return [
        "target=gsm8k",
        "target.gsm8k.validation=[{kind: gsm8k, split: train, n: 4, seed: 1, from: local}]",
        f"paths.data_dir={_q(d / 'data')}",
    ]


def _budget(value: str) -> Callable[[Path], list[str]]:
    return lambda d: [f"budget={value}"]


def _budget_case(name: str, value: str, match: str, *names: str) -> Case:
    return Case(
        name,
        6,
        f"budget={value} on a 4-candidate pool",
        _budget(value),
        Expect(BudgetError, match, (value, "4 candidates", *names)),
        "select",
    )


POOL = r"pool jsonl \(pool\.sources\[0\]\): "

CASES: list[Case] = [
    # 1. malformed JSON line
    Case(
        "malformed_json",
        1,
        "a JSONL line cut off mid-record (line 3)",
        _malformed_json,
        Expect(RecordError, POOL + r".*pool\.jsonl:3: invalid JSON", ("{dir}/pool.jsonl:3",)),
    ),
    Case(
        "malformed_json_skipped",
        1,
        "the same file with on_error: skip",
        lambda d: _malformed_json(d, on_error="skip"),
        Expect(skip="skipped_malformed", count=1, absent_ids=("broken",)),
    ),
    Case(
        "non_utf8_line",
        1,
        "a JSONL line with bytes that are not UTF-8 (line 2)",
        lambda d: write_pool(
            d, [record(1), b'{"prompt": "caf\xe9", "completion": "x"}', record(3)]
        ),
        Expect(RecordError, POOL + r".*pool\.jsonl:2: not UTF-8", ("{dir}/pool.jsonl:2",)),
    ),
    # 2. a record missing a required field
    Case(
        "missing_field",
        2,
        "an instruction/output record without 'output' (line 2)",
        lambda d: write_pool(
            d, [record(1), {"id": "a2", "instruction": "Add 2 and 2."}, record(3)]
        ),
        Expect(
            RecordError,
            POOL + r".*pool\.jsonl:2: field 'output' is missing",
            ("{dir}/pool.jsonl:2", "'output'"),
        ),
    ),
    Case(
        "missing_field_qa",
        2,
        "a question/answer record without 'answer' (line 3)",
        lambda d: write_pool(d, [_qa(1), _qa(2), {"id": "q3", "question": "How many?"}]),
        Expect(
            RecordError,
            POOL + r".*pool\.jsonl:3: field 'answer' is missing",
            ("{dir}/pool.jsonl:3", "'answer'"),
        ),
    ),
    Case(
        "null_field",
        2,
        "a prompt/completion record whose completion is null (line 2)",
        lambda d: write_pool(d, [record(1), {"id": "n2", "prompt": "Hi?", "completion": None}]),
        Expect(
            RecordError,
            POOL + r".*pool\.jsonl:2: field 'completion' must be a string, got NoneType",
            ("{dir}/pool.jsonl:2", "'completion'"),
        ),
    ),
    # 3. empty answer
    Case(
        "empty_answer",
        3,
        "an instruction/output record whose output is whitespace (line 3)",
        lambda d: write_pool(
            d, [record(1), record(2), {"id": "a3", "instruction": "Hi.", "output": " \n"}]
        ),
        Expect(
            RecordError,
            POOL + r".*pool\.jsonl:3: record 'a3': field 'output' \(the answer\) is empty",
            ("{dir}/pool.jsonl:3", "'output'", "'a3'"),
        ),
    ),
    Case(
        "empty_answer_chat",
        3,
        "a chat record whose assistant turn is empty (line 2)",
        lambda d: write_pool(
            d,
            [
                record(1),
                {
                    "id": "c2",
                    "messages": [
                        {"role": "user", "content": "Hello?"},
                        {"role": "assistant", "content": ""},
                    ],
                },
            ],
        ),
        Expect(
            RecordError,
            POOL + r".*pool\.jsonl:2: record 'c2': field 'messages\[1\]\.content'",
            ("{dir}/pool.jsonl:2", "'messages[1].content'"),
        ),
    ),
    Case(
        "empty_answer_skipped",
        3,
        "an empty and a whitespace answer with on_error: skip, selecting every candidate",
        lambda d: [
            *write_pool(
                d,
                [
                    record(1),
                    {"id": "e1", "prompt": "Empty?", "completion": ""},
                    record(2),
                    {"id": "e2", "prompt": "Blank?", "completion": "   "},
                    record(3),
                ],
                on_error="skip",
            ),
            "budget=1.0",
        ],
        Expect(skip="skipped_malformed", count=2, absent_ids=("e1", "e2")),
        "select",
    ),
    # 4. answer truncated away at max_length
    Case(
        "truncated_answer_pool",
        4,
        "a pool example whose ~4k-token prompt leaves no answer token within 1024",
        _truncated_pool,
        Expect(skip="dropped_no_answer_tokens", count=1, absent_ids=("long1",)),
        "select",
    ),
    Case(
        "truncated_answer_validation",
        4,
        "a validation example whose answer is cut away (gradient selectors read validation)",
        _truncated_validation,
        Expect(
            ValueError,
            r"target gsm_symbolic: 1 validation examples have no answer tokens within 1024",
            ("target.gsm_symbolic.max_length",),
        ),
        "validation_tokens",
    ),
    # 5. duplicate ids
    Case(
        "duplicate_id_in_file",
        5,
        "two records with id 'dup' (lines 2 and 4)",
        lambda d: write_pool(
            d, [record(1), {**record(2), "id": "dup"}, record(3), {**record(4), "id": "dup"}]
        ),
        Expect(
            RecordError,
            r"pool jsonl: duplicate id 'dup'",
            ("{dir}/pool.jsonl:2", "{dir}/pool.jsonl:4", "id_prefix"),
        ),
    ),
    Case(
        "duplicate_id_across_sources",
        5,
        "two sources of one pool share id 'x1' (a.jsonl:1, b.jsonl:2)",
        lambda d: [
            "pool.sources=["
            + _src(_write(d / "a.jsonl", [record(1, "x"), record(2, "x")]))
            + ","
            + _src(_write(d / "b.jsonl", [record(3, "y"), record(1, "x")]))
            + "]"
        ],
        Expect(
            RecordError,
            r"pool jsonl: duplicate id 'x1'",
            ("{dir}/a.jsonl:1", "{dir}/b.jsonl:2", "id_prefix"),
        ),
    ),
    # 6. impossible budgets (the pool has 4 candidates)
    _budget_case("budget_over_pool", "100", r"budget 100 is larger than the pool \(4 candidates\)"),
    _budget_case("budget_zero", "0", r"budget count 0 must be at least 1"),
    _budget_case("budget_negative", "-3", r"budget count -3 must be at least 1"),
    _budget_case("budget_fraction_zero", "0.0", r"budget fraction 0\.0 must be in \(0, 1\]"),
    _budget_case("budget_fraction_over_one", "1.5", r"budget fraction 1\.5 must be in \(0, 1\]"),
    # 7. empty validation set
    Case(
        "empty_validation_file",
        7,
        "target.gsm_symbolic.validation reads an empty file",
        lambda d: [f"target.gsm_symbolic.validation=[{_src(_write(d / 'val.jsonl', []))}]"],
        Expect(
            RecordError,
            r"target gsm_symbolic validation \(target\.gsm_symbolic\.validation\[0\]\): "
            r".*no records",
            ("{dir}/val.jsonl",),
        ),
        "load_target",
    ),
    Case(
        "validation_n_zero",
        7,
        "a validation source with n: 0",
        lambda d: [
            "target.gsm_symbolic.validation="
            "[{kind: reasoning_gym, name: gsm_symbolic, n: 0, seed: 3}]"
        ],
        Expect(
            RecordError,
            r"target gsm_symbolic validation \(target\.gsm_symbolic\.validation\[0\]\): ",
            ("field 'n' must be at least 1, got 0",),
        ),
        "load_target",
    ),
    Case(
        "validation_no_sources",
        7,
        "target.gsm_symbolic.validation=[]",
        lambda d: ["target.gsm_symbolic.validation=[]"],
        Expect(
            RecordError,
            r"target gsm_symbolic: no validation sources",
            ("target.gsm_symbolic.validation",),
        ),
        "load_target",
    ),
    # 8. no test items
    Case(
        "empty_test_file",
        8,
        "target.gsm_symbolic.test reads a file of blank lines",
        lambda d: [f"target.gsm_symbolic.test=[{_src(_write(d / 'test.jsonl', ['', '  ']))}]"],
        Expect(
            RecordError,
            r"target gsm_symbolic test \(target\.gsm_symbolic\.test\[0\]\): .*no records",
            ("{dir}/test.jsonl",),
        ),
        "load_target",
    ),
    Case(
        "all_test_items_dropped",
        8,
        "every test item repeats a validation prompt, so all are dropped",
        _all_test_dropped,
        Expect(
            RecordError,
            r"target gsm_symbolic: no test items: all 3 test items",
            ("{dir}/test.jsonl", "target.gsm_symbolic.test"),
        ),
        "load_target",
    ),
    # 9. missing files
    Case(
        "missing_pool_file",
        9,
        "a pool source whose absolute path does not exist",
        lambda d: [f"pool.sources=[{_src(d / 'missing.jsonl')}]"],
        Expect(
            FileNotFoundError,
            POOL + r"data file not found: ",
            ("{dir}/missing.jsonl", "pool.sources[0].path"),
        ),
    ),
    Case(
        "missing_relative_pool_file",
        9,
        "a pool source whose relative path is not under paths.data_dir",
        lambda d: [f"pool.sources=[{_src('pools/missing.jsonl')}]"],
        Expect(
            FileNotFoundError,
            POOL + r"data file not found: ",
            ("{dir}/pools/missing.jsonl", "pool.sources[0].path or paths.data_dir"),
        ),
    ),
    Case(
        "missing_data_dir_file",
        9,
        "target=gsm8k with a paths.data_dir that lacks gsm8k/train.jsonl",
        _missing_data_dir_file,
        Expect(
            FileNotFoundError,
            r"target gsm8k validation \(target\.gsm8k\.validation\[0\]\): ",
            ("{dir}/data/gsm8k/train.jsonl", "paths.data_dir"),
        ),
        "load_target",
    ),
    # 10. empty pools
    Case(
        "empty_pool_file",
        10,
        "the pool's only file is empty",
        lambda d: [f"pool.sources=[{_src(_write(d / 'pool.jsonl', []))}]"],
        Expect(RecordError, POOL + r".*pool\.jsonl: no records", ("{dir}/pool.jsonl",)),
    ),
    Case(
        "all_records_skipped",
        10,
        "every record of the pool is malformed, with on_error: skip",
        lambda d: write_pool(
            d, ["{not json", {"foo": 1}, {"prompt": "q", "completion": ""}], on_error="skip"
        ),
        Expect(
            RecordError,
            POOL + r".*pool\.jsonl: all 3 records were skipped as malformed",
            ("{dir}/pool.jsonl:1", "{dir}/pool.jsonl:2"),
        ),
    ),
    Case(
        "no_pool_sources",
        10,
        "pool=jsonl without sources",
        lambda d: ["pool.sources=[]"],
        Expect(RecordError, r"pool jsonl: no sources", ("pool.sources",)),
    ),
    Case(
        "no_candidates_left",
        10,
        "every pool example is truncated away, so no candidate is left to select",
        lambda d: write_pool(
            d,
            [
                {"id": f"long{i}", "prompt": f"{i}. {LONG_PROMPT}", "completion": "Ok."}
                for i in range(2)
            ],
        ),
        Expect(BudgetError, r"budget 2: the pool has no candidates left", ()),
        "select",
    ),
]
BY_NAME = {c.name: c for c in CASES}


def _cell(text: str) -> str:
    """A Markdown table cell: ``|`` escaped, on one line."""
    return text.replace("|", "\\|").replace("\n", " ")


def _outcome(exp: Expect) -> str:
    if exp.error is None:
        out = f"skip: `{exp.skip}` = {exp.count}"
        if exp.absent_ids:
            ids = ", ".join(f"`{i}`" for i in exp.absent_ids)
            out += f"; ids {ids} absent from the pool / the selection"
        return out
    out = f"{exp.error.__name__} matching `{exp.match}`"
    if exp.names:
        names = ", ".join(f"`{n.replace('{dir}', '<dir>')}`" for n in exp.names)
        out += f"; the message names {names}"
    return out


def cases_table(cases: list[Case] | None = None) -> str:
    """The cases (default: all of ``CASES``) as a Markdown table, one row per case."""
    lines = [
        "| # | case | input | entry | outcome (`<dir>` = the case's directory) |",
        "|---|---|---|---|---|",
    ]
    for c in CASES if cases is None else cases:
        cells = (str(c.number), c.name, c.what, f"`{c.entry}`", _outcome(c.expect))
        lines.append("| " + " | ".join(_cell(x) for x in cells) + " |")
    return "\n".join(lines)


# ---- running a case ----------------------------------------------------------------------


def compose_case(case: Case, work_dir: Path, cache_dir: Path | None = None):
    """Write the case's files into ``work_dir``; the composed run config."""
    from hydra import compose, initialize_config_dir

    from dataselect.config import CONF_DIR

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    overrides = merge_overrides(base_overrides(work_dir, cache_dir), case.write(work_dir))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def run_case(
    case: Case, work_dir: Path, cache_dir: Path | None = None, entry: str | None = None
) -> Outcome:
    """Run the case through ``entry`` (default: the case's own); raises what the run raises.

    Counts: ``skipped_malformed`` (the pool's skipped records) and the pipeline's ``sizes``
    (``dropped_no_answer_tokens``, ``candidates``, ...) where the entry reaches selection."""
    from dataselect.data.sources import load_pool
    from dataselect.data.targets import load_target

    entry = entry or case.entry
    if entry not in ENTRIES:
        raise ValueError(f"case {case.name}: entry {entry!r} not in {ENTRIES}")
    cfg = compose_case(case, work_dir, cache_dir)
    data_dir = Path(cfg.paths.data_dir)
    if entry == "load_pool":
        pool = load_pool(cfg.pool, data_dir)
        return Outcome(
            {"skipped_malformed": pool.n_skipped, "pool": len(pool)}, {e.id for e in pool}
        )
    if entry == "load_target":
        target = load_target(cfg.target, data_dir)
        return Outcome(dict(target.stats), {e.id for e in target.validation + target.test})
    from dataselect.context import RunContext

    if entry == "pipeline":
        from dataselect.pipeline import run_pipeline

        metrics = run_pipeline(cfg)
        sel = Path(cfg.paths.output_dir) / "selection.jsonl"
        ids = (
            {json.loads(x)["id"] for x in sel.read_text().splitlines()} if sel.is_file() else set()
        )
        return Outcome(dict(metrics.get("sizes", {})), ids)
    target = load_target(cfg.target, data_dir)
    ctx = RunContext(cfg)
    if entry == "validation_tokens":
        from dataselect.features.stores import validation_tokens

        toks = validation_tokens(ctx, target)
        return Outcome({"validation": len(toks)}, {t.id for t in toks})
    from hydra.utils import instantiate

    from dataselect import stages

    pool = load_pool(cfg.pool, data_dir)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    inputs = stages.RunInputs(pool, target, instantiate(cfg.selector))
    got = stages.select_build(ctx, inputs, {"features": stages.StageResult(None)})
    return Outcome({**got.sizes, "skipped_malformed": pool.n_skipped}, set(got.ids))


def verify(
    case: Case, work_dir: Path, cache_dir: Path | None = None, entry: str | None = None
) -> str:
    """Run the case and check its expectation; a one-line summary, or ``AssertionError``."""
    exp = case.expect
    try:
        out = run_case(case, work_dir, cache_dir, entry)
    except Exception as e:
        if exp.error is None or not isinstance(e, exp.error):
            raise AssertionError(
                f"{case.name}: expected {_expected(case)}, got {type(e).__name__}: {e}"
            ) from e
        msg = str(e)
        missing = [n for n in exp.literal_names(Path(work_dir)) if n not in msg]
        if not re.search(exp.match, msg) or missing:
            raise AssertionError(
                f"{case.name}: {type(e).__name__} message {msg!r} does not match "
                f"{exp.match!r} or lacks {missing}"
            ) from e
        return f"{case.name}: {type(e).__name__}: {msg}"
    if exp.error is not None:
        raise AssertionError(f"{case.name}: expected {_expected(case)}, got no error")
    got = out.counts.get(exp.skip)
    leaked = sorted(set(exp.absent_ids) & out.ids)
    if got != exp.count or leaked:
        raise AssertionError(
            f"{case.name}: expected {exp.skip}={exp.count} and none of {exp.absent_ids}, "
            f"got {exp.skip}={got} and {leaked} (counts {out.counts})"
        )
    return f"{case.name}: skipped, {exp.skip}={got}"


def _expected(case: Case) -> str:
    exp = case.expect
    if exp.error is not None:
        return f"{exp.error.__name__} matching {exp.match!r}"
    return f"a counted skip {exp.skip}={exp.count}"


if __name__ == "__main__":
    print(cases_table())
