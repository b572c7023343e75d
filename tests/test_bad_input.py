"""The bad-input corpus (``experiments/reliability/corpus.py``): every case ends in a clear error
naming the file, line, field or config key, or in a counted skip whose records never reach the
pool or the selection. Each case runs through the public call a run makes (``load_pool``,
``load_target``, ``run_select``, ``validation_tokens``) on the tiny model; nothing is trained."""

from __future__ import annotations

import json
import logging
import re

import corpus
import pytest
from corpus import CASES, Expect, run_case, verify

from dataselect.data.records import RecordError

ERRORS = [c for c in CASES if c.expect.error is not None]
SKIPS = [c for c in CASES if c.expect.error is None]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One cache (the tiny model, built once) for every case."""
    return tmp_path_factory.mktemp("bad_input_cache")


def test_the_corpus_covers_every_bad_input_class():
    assert sorted({c.number for c in CASES}) == list(range(1, 11))
    assert len({c.name for c in CASES}) == len(CASES)
    assert all(c.entry in corpus.ENTRIES for c in CASES)
    for c in ERRORS:
        assert c.expect.match and not c.expect.skip, c.name
    for c in SKIPS:
        assert c.expect.skip and c.expect.count > 0 and c.expect.absent_ids, c.name
    documented = corpus.cases_table()
    for c in CASES:  # the generated table lists every case
        assert f"| {c.number} | {c.name} |" in documented, c.name


@pytest.mark.parametrize("case", ERRORS, ids=lambda c: c.name)
def test_bad_input_raises_a_clear_error(case, tmp_path, cache_dir):
    with pytest.raises(case.expect.error) as err:
        run_case(case, tmp_path, cache_dir)
    msg = str(err.value)
    assert re.search(case.expect.match, msg), msg
    for name in case.expect.literal_names(tmp_path):
        assert name in msg, f"{name!r} not in {msg!r}"


@pytest.mark.parametrize("case", SKIPS, ids=lambda c: c.name)
def test_documented_skip_is_counted_and_never_reaches_the_pool(case, tmp_path, cache_dir, caplog):
    with caplog.at_level(logging.WARNING):
        out = run_case(case, tmp_path, cache_dir)
    assert out.counts[case.expect.skip] == case.expect.count, out.counts
    assert out.ids and not set(case.expect.absent_ids) & out.ids
    assert caplog.records, "a skip is always reported in a warning"


def test_verify_checks_what_the_tests_check(tmp_path, cache_dir):
    """``verify`` (the drill's entry) passes the corpus' own cases and fails a wrong one."""
    for name in ("malformed_json", "malformed_json_skipped", "budget_zero"):
        assert verify(corpus.BY_NAME[name], tmp_path / name, cache_dir).startswith(name)
    wrong = corpus.Case(
        "wrong",
        1,
        "expects a skip where there is an error",
        corpus.BY_NAME["malformed_json"].write,
        Expect(skip="skipped_malformed", count=1),
    )
    with pytest.raises(AssertionError, match="wrong: expected a counted skip"):
        verify(wrong, tmp_path / "wrong", cache_dir)


def test_skipped_records_never_reach_the_pool_or_the_selection(tmp_path, cache_dir):
    """Every kind of malformed record, skipped: counted per file, ids absent from the pool and
    from a selection of every candidate."""
    bad = [
        {"id": "bad-empty", "prompt": "Empty answer?", "completion": ""},
        {
            "id": "bad-blank",
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}],
        },
        {"id": "bad-missing", "instruction": "No output field."},
        {"id": "bad-null", "prompt": "Null?", "completion": None},
        {"id": "bad-shape", "text": "no known shape"},
        '{"id": "bad-json", "prompt": ',
    ]
    good = [corpus.record(i) for i in range(1, 5)]
    rows = [row for pair in zip(good, bad, strict=False) for row in pair] + bad[len(good) :]

    def write(d):
        return [*corpus.write_pool(d, rows, on_error="skip"), "budget=1.0"]

    case = corpus.Case("all_kinds_skipped", 1, "", write, Expect(), "select")
    sel = run_case(case, tmp_path / "sel", cache_dir)
    assert sel.counts["skipped_malformed"] == len(bad) and sel.counts["pool"] == len(good)
    assert sel.ids == {g["id"] for g in good}
    pool = run_case(case, tmp_path / "pool", cache_dir, entry="load_pool")
    assert pool.ids == {g["id"] for g in good}
    assert pool.counts == {"skipped_malformed": len(bad), "pool": len(good)}


def test_skip_counts_are_per_file_and_summed_across_sources(tmp_path):
    from dataselect.data.sources import read_sources

    for name, n_bad in (("a", 1), ("b", 2)):
        lines = [json.dumps(corpus.record(i, name)) for i in range(3)] + ["{oops"] * n_bad
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    specs = [{"kind": "json", "path": f"{n}.jsonl", "on_error": "skip"} for n in ("a", "b")]
    pool = read_sources(specs, tmp_path, "pool p", "pool.sources")
    assert len(pool) == 6 and pool.n_skipped == 3
    assert pool.skipped == {str(tmp_path / "a.jsonl"): 1, str(tmp_path / "b.jsonl"): 2}
    capped = read_sources([{**specs[1], "cap": 2}], tmp_path, "pool p")
    assert len(capped) == 2 and capped.n_skipped == 2  # a cap keeps the count


def test_sources_refuse_zero_sizes(tmp_path):
    from dataselect.data.sources import read_sources

    (tmp_path / "p.jsonl").write_text(json.dumps(corpus.record(1)) + "\n")
    with pytest.raises(RecordError, match=r"pool p \(pool\.sources\[0\]\): .*'cap'"):
        read_sources(
            [{"kind": "json", "path": "p.jsonl", "cap": 0}], tmp_path, "pool p", "pool.sources"
        )
    with pytest.raises(RecordError, match=r"needs field 'path'"):
        read_sources([{"kind": "json"}], tmp_path, "pool p")
