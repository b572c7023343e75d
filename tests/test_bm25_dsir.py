"""The BM25 and DSIR baselines: scores equal the libraries' own (bm25s; the authors'
data-selection package run end to end), selections equal hand-worked answers, and the pool
side is keyed without the target and reused by a second target."""

from __future__ import annotations

import json
import math
from pathlib import Path

import bm25s
import numpy as np
import pytest
from data_selection import HashedNgramDSIR
from omegaconf import OmegaConf

from dataselect.context import RunContext, Sizes
from dataselect.data.records import make_example
from dataselect.data.targets import Target
from dataselect.features.passes import example_text
from dataselect.features.request import FeatureInputs
from dataselect.selectors.bm25 import BM25Index, BM25Pass, BM25Selector, query_scores
from dataselect.selectors.dsir import (
    DSIRPass,
    DSIRSelector,
    example_lengths,
    importance_weights,
    ngram_counts,
)

CONF = Path(__file__).resolve().parents[1] / "conf"

POOL_TEXTS = [  # (prompt, answer)
    ("How do zebras graze on the savanna grass?", "Zebras graze the savanna grass in herds."),
    ("Bake the bread at what temperature?", "Bake bread at 220 degrees."),
    ("What is 12 plus 30?", "12 plus 30 is 42."),
    ("Name a large animal of the savanna.", "The elephant roams the savanna."),
    ("Whisk the eggs with sugar for the cake.", "Whisk until the eggs are pale."),
    ("What is 7 times 6?", "7 times 6 is 42."),
    ("Do lions hunt zebras on the savanna?", "Lions hunt zebras and antelopes."),
    ("Knead the dough for the bread.", "Knead the dough ten minutes."),
    ("Tell me a joke.", "Why did the chicken cross the road?"),
    ("Add 5 and 9.", "5 plus 9 is 14."),
]


def ex(i: str, prompt: str, answer: str, source: str = "toy", subtask: str | None = None):
    meta = {"subtask": subtask} if subtask else {}
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return make_example(i, source, msgs, meta)


@pytest.fixture()
def pool():
    src = ["animals", "cooking", "math"]
    return [
        ex(f"p{i}", q, a, source=src[0 if "savanna" in q else 1 if i in (1, 4, 7) else 2])
        for i, (q, a) in enumerate(POOL_TEXTS)
    ]


def target_of(*prompts: str, name: str = "t") -> Target:
    val = [ex(f"{name}-v{i}", p, "answer", subtask=name) for i, p in enumerate(prompts)]
    return Target.single(name, val, val)


# ---- BM25 -----------------------------------------------------------------------------------


def test_bm25_scores_equal_an_independent_bm25s_index(pool):
    """Our index and query path against a bm25s index built here the library's plain way
    (string tokens, its own vocabulary numbering): the same score vectors."""
    texts = [example_text(e, "all") for e in pool]
    queries = ["zebras on the savanna", "bread dough", "what is 42", "nothing matches xyzzy"]
    ours = BM25Pass().index(texts)
    got = query_scores(ours, queries, "en")

    ref = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    ref.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    for q, row in zip(queries, got, strict=True):
        words = bm25s.tokenize(q, stopwords="en", return_ids=False, show_progress=False)[0]
        words = [w for w in words if w in ref.vocab_dict]
        want = ref.get_scores(words) if words else np.zeros(len(texts))
        np.testing.assert_allclose(row, want, rtol=1e-6, atol=0)
    assert got[3].max() == 0.0 and got[0].argmax() == 0  # p0 has zebras and savanna twice


def test_bm25_one_term_equals_lucene_by_hand():
    """score = idf * tf / (tf + k1 (1 - b + b |d| / avgdl)), idf = ln(1 + (N - df + .5) /
    (df + .5)) (Lucene; bm25s's ``lucene``), on documents without stopwords or 1-char words."""
    docs = ["zebra zebra grass", "zebra lion", "bread oven flour dough", "grass"]
    k1, b = 1.2, 0.6
    got = query_scores(BM25Pass(k1=k1, b=b, stopwords=None).index(docs), ["zebra"], None)[0]
    n, df = len(docs), 2
    lengths = [len(d.split()) for d in docs]
    avg = sum(lengths) / n
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    want = [
        idf * tf / (tf + k1 * (1 - b + b * dl / avg))
        for tf, dl in zip([2, 1, 0, 0], lengths, strict=True)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_bm25_selects_the_example_sharing_the_query_rare_terms(pool):
    index = BM25Index([e.id for e in pool], BM25Pass().index([example_text(e) for e in pool]), "en")
    sel = BM25Selector().select(pool, target_of("Why do zebras graze?"), 2, 0, index)
    # "zebras" is in p0 (prompt and answer) and p6; "graze" only in p0
    assert sel.ids == ["p0", "p6"]
    assert sel.scores[0] > sel.scores[1] > 0
    assert sel.diagnostics["composition"] == {"animals": 2}
    assert sel.diagnostics["aggregate"] == "max"

    # candidates are a subset of the indexed pool, looked up by id (p0 removed: overlap)
    sel = BM25Selector().select(pool[1:], target_of("Why do zebras graze?"), 1, 0, index)
    assert sel.ids == ["p6"]


def test_bm25_aggregate_max_or_sum_over_queries():
    """Two queries: d0 matches "zebra" best, d1 matches both: max picks d0, sum picks d1."""
    docs = ["zebra zebra zebra zebra", "zebra giraffe", "bread", "oven", "flour", "dough"]
    pool = [ex(f"d{i}", d, "ok") for i, d in enumerate(docs)]
    index = BM25Index([e.id for e in pool], BM25Pass().index(docs), "en")
    target = target_of("zebra", "giraffe")
    s = index.scores(["zebra", "giraffe"])  # (query, doc)
    assert s[1, 0] == 0 and s[0, 0] > s[1, 1] > s[0, 1] > 0  # the setup, as intended
    best_max = BM25Selector(aggregate="max").select(pool, target, 1, 0, index)
    best_sum = BM25Selector(aggregate="sum").select(pool, target, 1, 0, index)
    assert best_max.ids == ["d0"] and best_max.scores == [s[0, 0]]
    assert best_sum.ids == ["d1"] and best_sum.scores == [s[0, 1] + s[1, 1]]


def test_bm25_ties_break_by_pool_order():
    pool = [ex(f"d{i}", t, "ok") for i, t in enumerate(["oven", "zebra", "zebra", "bread"])]
    index = BM25Index([e.id for e in pool], BM25Pass().index([example_text(e) for e in pool]), "en")
    sel = BM25Selector().select(pool, target_of("zebra"), 2, 0, index)
    assert sel.ids == ["d1", "d2"] and sel.scores[0] == sel.scores[1]
    sel = BM25Selector().select(pool[::-1], target_of("zebra"), 2, 0, index)
    assert sel.ids == ["d2", "d1"]


def test_bm25_query_is_the_prompt_by_default(pool):
    """The validation answer ("bread") is not part of the default query."""
    index = BM25Index([e.id for e in pool], BM25Pass().index([example_text(e) for e in pool]), "en")
    val = [ex("v", "Do zebras graze?", "bread dough bread dough")]
    target = Target.single("t", val, val)
    assert BM25Selector().select(pool, target, 1, 0, index).ids == ["p0"]
    assert BM25Selector(query="all").select(pool, target, 1, 0, index).ids == ["p7"]


# ---- DSIR -----------------------------------------------------------------------------------


def package_dsir(tmp: Path, pool, target: Target, min_example_length: int) -> HashedNgramDSIR:
    """The authors' HashedNgramDSIR on jsonl files of the pool's and the target's text, fit on
    every token, one process, its log importance weights computed."""

    def jsonl(name: str, examples) -> str:
        rows = [{"id": e.id, "text": example_text(e, "all")} for e in examples]
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp / name)

    raw, val = jsonl("raw.jsonl", pool), jsonl("val.jsonl", target.validation)
    dsir = HashedNgramDSIR(
        [raw], [val], str(tmp / "dsir"), num_proc=1, min_example_length=min_example_length
    )
    dsir.fit_importance_estimator(num_tokens_to_fit="all")
    dsir.compute_importance_weights()
    return dsir


def test_dsir_weights_equal_the_package_end_to_end(pool, tmp_path):
    """HashedNgramDSIR on jsonl files (fit on every token, one process) against our pool
    counts + target counts: the same features, probabilities, lengths and log weights."""
    target = target_of("Do zebras graze on the savanna?", "What do lions hunt on the savanna?")
    dsir = package_dsir(tmp_path, pool, target, 0)
    texts = [example_text(e, "all") for e in pool]
    (npy,) = (tmp_path / "dsir" / "log_importance_weights").glob("*.npy")
    theirs = np.load(npy)

    counts = DSIRPass().featurize(pool)
    assert counts.counts.shape == (len(pool), 10000)
    for row, text in zip(counts.counts.toarray(), texts, strict=True):
        np.testing.assert_array_equal(row, dsir.featurizer(text))
    np.testing.assert_array_equal(counts.raw_totals / counts.raw_totals.sum(), dsir.raw_probs)
    target_totals = DSIRSelector().target_totals(target)
    np.testing.assert_array_equal(target_totals / target_totals.sum(), dsir.target_probs)
    (meta,) = (tmp_path / "dsir" / "perexample_metadata").glob("*.npy")
    np.testing.assert_array_equal(example_lengths(counts.counts, 2), np.load(meta))

    w = importance_weights(counts.counts, counts.raw_totals, target_totals)
    np.testing.assert_allclose(w.fast, theirs, rtol=0, atol=1e-9)
    np.testing.assert_allclose(w.canonical(np.arange(len(pool))), theirs, rtol=0, atol=1e-9)
    assert np.all(np.abs(w.canonical(np.arange(len(pool))) - w.fast) <= w.tol)


def test_dsir_topk_selects_what_the_package_selects(pool, tmp_path):
    """The package's resample(top_k=True) with its length filter = our topk mode."""
    target = target_of("Do zebras graze on the savanna?")
    dsir = package_dsir(tmp_path, pool, target, 13)
    dsir.resample(
        str(tmp_path / "out"), num_to_sample=3, cache_dir=str(tmp_path / "tmp"), top_k=True
    )
    theirs = {
        json.loads(line)["id"] for f in (tmp_path / "out").glob("*.jsonl") for line in f.open()
    }

    sel = DSIRSelector(mode="topk", min_example_length=13).select(
        pool, target, 3, 0, DSIRPass().featurize(pool)
    )
    assert set(sel.ids) == theirs and len(theirs) == 3
    assert sel.scores == sorted(sel.scores, reverse=True)
    assert sel.ids[0] == "p0"  # the savanna-zebra-grazing example is the most target-like
    assert sel.diagnostics["too_short"] > 0  # the filter was active


def test_dsir_weights_by_hand():
    """Unigrams of one-word documents: w(x) = log(p_t(x) + 1e-8) - log(p_raw(x) + 1e-8)."""
    texts = ["apple", "pear", "pear"]
    counts = ngram_counts(texts, ngrams=1, num_buckets=1_000_003)
    raw = np.asarray(counts.sum(axis=0)).ravel()
    target = np.asarray(ngram_counts(["apple"], ngrams=1, num_buckets=1_000_003).sum(axis=0))
    w = importance_weights(counts, raw, target.ravel())
    apple = math.log(1 + 1e-8) - math.log(1 / 3 + 1e-8)
    pear = math.log(1e-8) - math.log(2 / 3 + 1e-8)
    np.testing.assert_allclose(w.fast, [apple, pear, pear], rtol=1e-12)


def test_dsir_resample_is_seeded_and_draws_by_weight(pool):
    """Copies weigh the same: a resample of one draws each zebra copy about equally often
    (and never a bread one, ~1e2 nats lighter), where topk always takes the first copy."""
    texts = ["zebras graze the savanna grass"] * 4 + ["bake the bread in the oven"] * 4
    copies = [ex(f"c{i}", t, "ok") for i, t in enumerate(texts)]
    counts = DSIRPass().featurize(copies)
    target = target_of("Do zebras graze on the savanna grass?")
    sel = DSIRSelector()
    a, b = sel.select(copies, target, 3, 5, counts), sel.select(copies, target, 3, 5, counts)
    assert a.ids == b.ids and a.scores == sorted(a.scores, reverse=True)
    draws = [sel.select(copies, target, 1, s, counts).ids[0] for s in range(200)]
    assert {i: draws.count(i) for i in ("c0", "c1", "c2", "c3")} == pytest.approx(
        dict.fromkeys(("c0", "c1", "c2", "c3"), 50), abs=20
    )
    assert len(draws) == 200 and all(d in ("c0", "c1", "c2", "c3") for d in draws)
    topk = DSIRSelector(mode="topk")
    assert topk.select(copies, target, 5, 0, counts).ids == ["c0", "c1", "c2", "c3", "c4"]
    on_pool = topk.select(pool, target, 10, 0, DSIRPass().featurize(pool))
    assert on_pool.ids[0] == "p0" and a.diagnostics["mode"] == "resample"


def test_dsir_min_example_length_filters_and_errors_name_the_numbers(pool):
    counts = DSIRPass().featurize(pool)
    target = target_of("Do zebras graze on the savanna?")
    lengths = dict(zip(counts.ids, example_lengths(counts.counts, 2), strict=True))
    n_ok = sum(v >= 14 for v in lengths.values())
    assert 0 < n_ok < len(pool)  # wordpunct words: punctuation counts
    sel = DSIRSelector(min_example_length=14).select(pool, target, n_ok, 0, counts)
    assert {i for i in sel.ids} == {i for i, v in lengths.items() if v >= 14}
    assert sel.diagnostics["too_short"] == len(pool) - n_ok
    with pytest.raises(ValueError, match=f"budget {n_ok + 1} but only {n_ok} of 10 candidates"):
        DSIRSelector(min_example_length=14).select(pool, target, n_ok + 1, 0, counts)


# ---- keys, cache, config ----------------------------------------------------------------------


def _cfg(tmp: Path, target: str):
    return OmegaConf.create(
        {
            "paths": {"cache_dir": str(tmp / "cache"), "output_dir": str(tmp / "out")},
            "pool": {"name": "toy", "sources": [{"kind": "jsonl", "path": "toy.jsonl"}]},
            "target": {target: {"validation": [{"kind": "jsonl", "path": f"{target}.jsonl"}]}},
        }
    )


@pytest.mark.parametrize("request_", [BM25Pass(), DSIRPass()], ids=["bm25", "dsir"])
def test_pool_side_is_target_agnostic_and_cached_once(request_, pool, tmp_path):
    """Two targets: one pool key; the second target's build reuses the pool artifact."""
    assert not request_.needs_warmup()
    cfg_a, cfg_b = _cfg(tmp_path, "zebras"), _cfg(tmp_path, "bread")
    assert request_.key(cfg_a) == request_.key(cfg_b)
    other_pool = OmegaConf.merge(cfg_a, {"pool": {"name": "other"}})
    assert request_.key(other_pool) != request_.key(cfg_a)
    (planned,) = request_.estimate(cfg_a, Sizes(len(pool), 1, 1, 1, None))
    assert planned.key == request_.key(cfg_a) and planned.examples == len(pool)

    ctx = RunContext(cfg_a)
    t_a = target_of("Do zebras graze on the savanna grass?", name="zebras")
    t_b = target_of("Knead the dough to bake bread.", name="bread")
    first = request_.build(ctx, FeatureInputs(pool, t_a, None))
    second = request_.build(RunContext(cfg_b), FeatureInputs(pool, t_b, None))
    (art1,), (art2,) = first.artifacts, second.artifacts
    assert not art1.hit and art2.hit and art1.path == art2.path
    assert art1.cost == "pool" and first.key == second.key == request_.key(cfg_a)

    selector = BM25Selector() if isinstance(request_, BM25Pass) else DSIRSelector(mode="topk")
    assert selector.request() == request_
    assert selector.select(pool, t_a, 1, 0, second.value).ids == ["p0"]
    assert selector.select(pool, t_b, 1, 0, second.value).ids == ["p7"]


@pytest.mark.parametrize("name", ["bm25", "dsir"])
def test_configs_compose_and_instantiate(name):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import dataselect.config  # noqa: F401  (registers base_config)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"selector={name}", "paths.output_dir=/tmp/x"])
    sel = instantiate(cfg.selector)
    if name == "bm25":
        assert isinstance(sel, BM25Selector)
        assert (sel.query, sel.aggregate, sel.k1, sel.b, sel.method, sel.stopwords) == (
            "prompt", "max", 1.5, 0.75, "lucene", "en",
        )  # fmt: skip
    else:
        assert isinstance(sel, DSIRSelector)
        assert (sel.mode, sel.target_text, sel.ngrams, sel.num_buckets) == (
            "resample", "all", 2, 10000,
        )  # fmt: skip
        assert sel.min_example_length == 0
    assert not sel.request().needs_warmup()


@pytest.mark.parametrize(("name", "stage"), [("bm25", "bm25_index"), ("dsir", "dsir_ngrams")])
def test_pipeline_trains_no_warmup_and_a_new_target_reuses_the_pool_pass(tmp_path, name, stage):
    """End to end on the tiny model's tokenizer (stage=select): no warmup; a second target
    (other validation examples) builds nothing over the pool."""
    from test_pipeline import run

    m = run(tmp_path, f"selector={name}", "stage=select")
    assert m["cache_hits"] == {stage: False, "select": False}
    assert m["cost"]["pool_passes_computed_this_run"] == 1
    assert sum(m["diagnostics"]["composition"].values()) == 8
    val = "[{kind: reasoning_gym, name: gsm_symbolic, n: 4, seed: 7}]"
    m2 = run(tmp_path, f"selector={name}", "stage=select", f"target.gsm_symbolic.validation={val}")
    assert m2["cache_hits"] == {stage: True, "select": False}
    assert m2["cost"]["pool_passes_computed_this_run"] == 0
