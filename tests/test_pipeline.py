"""The whole chain on the tiny random model: stages, cache reuse, outputs, multirun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import dataselect.config  # noqa: F401
from dataselect.cli import main_cfg

CONF = Path(__file__).resolve().parents[1] / "conf"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FAST = [
    "model=tiny_random",
    "logger=csv",
    "pool.sources=[{kind: reasoning_gym, name: chain_sum, n: 30, seed: 1},"
    "{kind: reasoning_gym, name: gsm_symbolic, n: 10, seed: 2}]",
    "target.gsm_symbolic.validation=[{kind: reasoning_gym, name: gsm_symbolic, n: 4, seed: 3}]",
    "target.gsm_symbolic.test=[{kind: reasoning_gym, name: gsm_symbolic, n: 6, seed: 4}]",
    "budget=8",
    "warmup.epochs=2",
    "warmup.fraction=0.2",
    "finetune.epochs=1",
    "evaluator.max_gen_toks=8",
    "evaluator.limit=3",
    "evaluator.batch_size=3",
]


def run(tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                *FAST,
                f"paths.cache_dir={tmp_path / 'cache'}",
                f"paths.output_dir={out}",
                *overrides,
            ],
        )
    return main_cfg(cfg)


def multirun(tmp_path: Path, *overrides: str) -> list[dict]:
    """A real ``dataselect -m`` in a subprocess; every job's metrics, in job order."""
    cmd = [
        *(sys.executable, "-m", "dataselect", "-m"),
        *FAST,
        *overrides,
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={tmp_path / 'multi'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(
        (p for p in (tmp_path / "multi").iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )
    return [json.loads((p / "metrics.json").read_text()) for p in jobs]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    return tmp, run(tmp)


def test_all_stages_write_outputs(first_run):
    tmp, m = first_run
    out = tmp / "run0"
    assert m["cache_hits"] == {  # random reads no warmup checkpoint: none is trained
        "select": False,
        "finetune": False,
        "evaluate": False,
        "evaluate_base": False,
    }
    sel = [json.loads(x) for x in (out / "selection.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in sel] == list(range(8)) and len({r["id"] for r in sel}) == 8
    chosen = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["score"], r["rank"]) for r in chosen] == [
        (r["id"], r["score"], r["rank"]) for r in sel
    ]
    # ids are rg/<family>/<seed>/<i>: the rows carry each example's own source and turns
    assert all(r["source"] == f"reasoning_gym/{r['id'].split('/')[1]}" for r in chosen)
    assert all(r["messages"][-1]["role"] == "assistant" for r in chosen)
    saved = json.loads((out / "metrics.json").read_text())
    items = [json.loads(x) for x in (out / "target_loss.jsonl").read_text().splitlines()]
    for which in ("finetuned", "base"):
        r = saved[which]["gsm_symbolic"]
        assert r["n"] == 3 and 0.0 <= r["value"] <= 1.0
        # the target loss covers every test item (loss_limit: null), whatever evaluator.limit
        mine = [x["nll"] for x in items if x["model"] == which]
        loss = r["target_loss"]
        assert loss["n"] == len(mine) == m["target_sizes"]["test"] > 3
        assert loss["value"] == pytest.approx(sum(mine) / len(mine)) and loss["stderr"] > 0
    assert "target loss" in (out / "results.md").read_text()
    assert saved["sizes"]["budget"] == 8 and saved["sizes"]["pool"] == 40
    cands = saved["candidate_sources"]  # base rates: what the selector chose from
    assert sum(cands.values()) == saved["sizes"]["candidates"] and set(cands) == {
        "reasoning_gym/chain_sum",
        "reasoning_gym/gsm_symbolic",
    }
    assert (out / "results.md").read_text().count("gsm_symbolic") == 2
    assert not (tmp / "cache" / "warmup").exists()


def test_an_offline_wandb_run_holds_the_selection_table(tmp_path):
    run(tmp_path, "logger=wandb", "stage=select")
    out = tmp_path / "run0"
    (table,) = (out / "wandb").glob("offline-run-*/files/media/table/selection/examples_*.json")
    got = json.loads(table.read_text())
    assert got["columns"] == ["rank", "id", "source", "score", "prompt", "answer"]
    chosen = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    assert [row[:4] for row in got["data"]] == [
        [r["rank"], r["id"], r["source"], r["score"]] for r in chosen
    ]
    (bars,) = (out / "wandb").glob("offline-run-*/files/media/table/selection/composition*.json")
    counts = {src: n for src, n in json.loads(bars.read_text())["data"]}
    assert sum(counts.values()) == 8 and set(counts) <= {
        "reasoning_gym/chain_sum",
        "reasoning_gym/gsm_symbolic",
    }


def test_warmup_is_trained_when_read_or_asked_for(tmp_path):
    """A selector reading the warmup's checkpoints gets one (2 epochs -> 2 checkpoints with
    name-keyed optimizer state); so does ``stage=warmup`` whatever the selector."""
    m = run(tmp_path, "selector=perplexity", "selector.model=warmup", "stage=select")
    assert m["cache_hits"] == {"warmup": False, "pool_loss": False, "select": False}
    (warm,) = (tmp_path / "cache" / "warmup").glob("[!.]*")
    assert sorted(p.name for p in warm.glob("epoch_*")) == ["epoch_1", "epoch_2"]
    assert run(tmp_path, "stage=warmup")["cache_hits"] == {"warmup": True}


def test_rerun_hits_every_cache(first_run):
    tmp, first = first_run
    m = run(tmp)
    assert all(m["cache_hits"].values()), m["cache_hits"]
    assert m["finetuned"] == first["finetuned"]
    assert (tmp / "run1" / "selection.jsonl").read_text() == (
        tmp / "run0" / "selection.jsonl"
    ).read_text()


def test_changing_budget_reuses_everything_but_the_selection(first_run):
    tmp, _ = first_run
    m = run(tmp, "budget=5", "stage=select")
    assert m["cache_hits"] == {"select": False}
    assert m["sizes"]["budget"] == 5 and "finetuned" not in m


def test_impossible_budget_fails_before_training(tmp_path):
    from dataselect.selectors.base import BudgetError

    with pytest.raises(BudgetError, match="larger than the pool"):
        run(tmp_path, "budget=100000", "warmup.epochs=1")


def test_cli_multirun_shares_warmup(tmp_path):
    """A real Hydra multirun of 2 budgets: one warmup, the second job hits it."""
    warm = ["selector=perplexity", "selector.model=warmup"]
    hits = [m["cache_hits"] for m in multirun(tmp_path, *warm, "budget=4,6", "stage=select")]
    assert hits == [
        {"warmup": False, "pool_loss": False, "select": False},
        {"warmup": True, "pool_loss": True, "select": False},
    ]
    assert len(list((tmp_path / "cache" / "warmup").glob("[!.]*"))) == 1


def test_multirun_of_two_selectors_by_two_budgets_computes_warmup_and_features_once(tmp_path):
    """Acceptance: LESS and G2IS x 2 budgets share one warmup and one pool gradient store."""
    jobs = multirun(tmp_path, "selector=less,g2is", "budget=4,6", "stage=select")
    hits = [m["cache_hits"] for m in jobs]
    assert hits[0] == {"warmup": False, "features": False, "features_val": False, "select": False}
    for h in hits[1:]:
        assert h == {"warmup": True, "features": True, "features_val": True, "select": False}
    cache = tmp_path / "cache"
    assert len(list((cache / "warmup").glob("[!.]*"))) == 1
    assert len(list((cache / "features").glob("[!.]*"))) == 2  # one store per warmup epoch
    assert len(list((cache / "select").glob("[!.]*"))) == 4
    # the logs say so: each job's closing line lists its cache hits
    logs = [next((tmp_path / "multi" / str(i)).glob("*.log")).read_text() for i in range(4)]
    assert "cache hits: none" in logs[0]
    assert all("cache hits: warmup, features, features_val" in log for log in logs[1:])


def test_killed_warmup_is_never_trusted(tmp_path):
    """kill -9 mid-warmup: the rerun finds no artifact, rebuilds it whole, and says so."""
    import os
    import signal
    import time

    args = [
        *FAST,
        "stage=warmup",
        "warmup.epochs=30",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataselect", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    warm = tmp_path / "cache" / "warmup"
    deadline = time.time() + 120
    while not list(warm.glob(".*.partial/epoch_1/COMPLETE")) and time.time() < deadline:
        assert proc.poll() is None, "warmup finished before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(warm.glob(".*.partial")) and not list(warm.glob("[!.]*"))
    m = run(tmp_path, "stage=warmup", "warmup.epochs=30")
    assert m["cache_hits"] == {"warmup": False}
    (done,) = warm.glob("[!.]*")
    assert (done / "COMPLETE").is_file() and len(list(done.glob("epoch_*"))) == 30


def test_less_pool_store_is_reused_across_targets(tmp_path):
    """A new target costs only its validation gradients; the pool store is shared."""
    less = ["selector=less", "features.sketch.dim=64", "stage=select"]
    m1 = run(tmp_path, *less)
    assert m1["cache_hits"] == {
        "warmup": False,
        "features": False,
        "features_val": False,
        "select": False,
    }
    assert sorted(m1["features"]) == ["epoch_1", "epoch_2"]  # one store per warmup epoch
    assert 0.0 <= m1["features"]["epoch_1"]["adam_eps_share"] <= 1.0
    new_val = (
        "target.gsm_symbolic.validation=[{kind: reasoning_gym, name: chain_sum, n: 4, seed: 500}]"
    )
    m2 = run(tmp_path, *less, new_val)
    assert m2["cache_hits"] == {
        "warmup": True,
        "features": True,
        "features_val": False,
        "select": False,
    }
    assert len(list((tmp_path / "cache" / "features").glob("[!.]*"))) == 2
    assert len(list((tmp_path / "cache" / "features_val").glob("[!.]*"))) == 4


def test_model_name_may_be_a_local_directory(tmp_path, tiny_model_dir):
    m = run(tmp_path, f"model.name={tiny_model_dir}", "stage=warmup", "warmup.epochs=1")
    assert m["cache_hits"] == {"warmup": False} and m["model_name"] == str(tiny_model_dir)


def test_gist_exact_pays_a_pool_pass_per_target_and_sketch_does_not(tmp_path):
    exact = ["selector=gist", "stage=select", "selector.k=3"]
    m1 = run(tmp_path, *exact)
    assert m1["cache_hits"] == {
        "warmup": False,
        "gist_val": False,
        "gist_spectrum": False,
        "gist_pass": False,
        "select": False,
    }
    # full-D validation gradients only at GIST's checkpoint; epoch 2 keeps its spectrum only
    cache = tmp_path / "cache"
    assert [p.name for p in next((cache / "gist_spectrum").glob("[!.]*")).iterdir()] != []
    assert not list((cache / "gist_spectrum").glob("*/G.npy"))
    assert len(list((cache / "gist_val").glob("*/G.npy"))) == 1
    assert m1["cost"]["pool_passes"] == 1 and m1["cost"]["pool_passes_computed_this_run"] == 1
    assert m1["cost"]["bytes_per_pool_example"] < 3 * 4 + 200  # k floats + shard overhead
    assert m1["diagnostics"]["k"] == 3 and set(m1["spectrum"]) == {"epoch_1", "epoch_2"}
    assert (tmp_path / "run0" / "spectrum.png").stat().st_size > 10_000
    new_val = (
        "target.gsm_symbolic.validation=[{kind: reasoning_gym, name: chain_sum, n: 4, seed: 500}]"
    )
    m2 = run(tmp_path, *exact, new_val)
    assert m2["cache_hits"]["warmup"] and not m2["cache_hits"]["gist_pass"]

    sketch = ["selector=gist", "selector.space=sketch", "stage=select", "features.sketch.dim=64"]
    m3 = run(tmp_path, *sketch)
    assert sorted(m3["features"]) == ["epoch_1"]  # one checkpoint, SGD features
    assert m3["features"]["epoch_1"]["gradient_type"] == "sgd"
    m4 = run(tmp_path, *sketch, new_val)
    assert m4["cache_hits"]["features"] and not m4["cache_hits"]["features_val"]
    assert m4["cost"]["pool_passes_computed_this_run"] == 0 and m4["cost"]["pool_passes"] == 1
    # a cached store still reports what it cost to build (from its COMPLETE marker)
    assert m4["cost"]["pool_pass_seconds"] == pytest.approx(m3["cost"]["pool_pass_seconds"])
    assert m4["cost"]["pool_pass_seconds"] > 0 and m4["cost"]["target_seconds"] > 0
    assert m4["diagnostics"]["space"] == "sketch"


def test_random_costs_no_pool_pass(first_run):
    _, m = first_run
    assert m["cost"]["pool_passes"] == 0 and m["cost"]["bytes_per_pool_example"] == 0
    assert set(m["cost"]["stage_seconds"]) >= {"select", "finetune", "evaluate"}


def test_gist_ablations_adam_features_and_variance_rule(tmp_path):
    m = run(
        tmp_path,
        "selector=gist",
        "stage=select",
        "selector.train_gradient=adam",
        "selector.variance=0.9",
        "selector.energy_weight=true",
    )
    spec = m["spectrum"]["epoch_1"]
    assert m["diagnostics"]["k"] == spec["k_90"]  # the fewest components explaining 90%
    assert m["diagnostics"]["explained_variance"] >= 0.9
    (store,) = (tmp_path / "cache" / "gist_pass").glob("[!.]*")
    assert json.loads((store / "meta.json").read_text())["spec"]["gradient_type"] == "adam"


def test_g2is_graph_is_cached_per_store_and_skips_non_candidates(tmp_path):
    g2is = [
        "selector=g2is",
        "selector.graph=exact",
        "selector.k_neighbors=5",
        "stage=select",
        "features.sketch.dim=64",
    ]
    run(tmp_path, *g2is)
    (graph,) = (tmp_path / "cache" / "graph").glob("[!.]*")
    built = (graph / "COMPLETE").stat().st_mtime_ns
    # a target whose validation repeats 4 pool prompts: those 4 are not candidates
    overlap = (
        "target.gsm_symbolic.validation=[{kind: reasoning_gym, name: chain_sum, n: 4, seed: 1}]"
    )
    m = run(tmp_path, *g2is, overlap, "budget=20")
    assert m["sizes"]["removed_target_overlap"] == 4
    assert (graph / "COMPLETE").stat().st_mtime_ns == built  # reused, not rebuilt
    assert len(list((tmp_path / "cache" / "graph").glob("[!.]*"))) == 1
    picked = set(read_selection(tmp_path / "run1"))
    assert not picked & {f"rg/chain_sum/1/{i}" for i in range(4)}
    assert m["diagnostics"]["selected"] + m["diagnostics"]["underfill"] == 20


def read_selection(out: Path) -> list[str]:
    return [json.loads(x)["id"] for x in (out / "selection.jsonl").read_text().splitlines()]


def test_report_on_a_real_multirun(tmp_path):
    """Acceptance: a real 2 selectors x 2 seeds multirun (tiny model, evaluated) becomes a
    table with one row per selector and the means of the runs' own metrics."""
    import statistics

    from dataselect.report.multirun import collect_runs, summarize

    sweep = tmp_path / "multi"
    metrics = multirun(tmp_path, "selector=random,less", "seed=0,1", "warmup.seed=0")
    # the sweep wrote its own report when it ended (hydra callback), the effect table too
    effect = (sweep / "report" / "effect.md").read_text()
    assert effect.count("| gsm_symbolic | less (8, seed ") == 2
    assert effect.count("| gsm_symbolic | random (8, seed ") == 2
    assert effect.count("| gsm_symbolic | base (no fine-tuning) |") == 1
    (sweep / "report" / "effect.md").unlink()
    report = subprocess.run(
        [sys.executable, "-m", "dataselect.report.cli", str(sweep)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert len(list((tmp_path / "cache" / "warmup").glob("[!.]*"))) == 1  # warmup.seed shared
    assert all(m["selection_sources"] and m["target"] == "gsm_symbolic" for m in metrics)
    rows = {r.selector: r for r in summarize(collect_runs(sweep).records)}
    assert set(rows) == {"random", "less", "base (no fine-tuning)"}
    for sel in ("random", "less"):
        values = [
            100 * m["finetuned"]["gsm_symbolic"]["value"] for m in metrics if m["selector"] == sel
        ]
        assert rows[sel].n_seeds == 2
        assert rows[sel].mean == pytest.approx(statistics.mean(values))
        assert rows[sel].std == pytest.approx(statistics.stdev(values))
        losses = [
            m["finetuned"]["gsm_symbolic"]["target_loss"]["value"]
            for m in metrics
            if m["selector"] == sel
        ]
        assert rows[sel].loss == pytest.approx(statistics.mean(losses))
        assert rows[sel].loss_std == pytest.approx(statistics.stdev(losses))
    assert rows["less"].delta_vs_random == pytest.approx(rows["less"].mean - rows["random"].mean)
    assert rows["less"].loss_delta_vs_random == pytest.approx(
        rows["less"].loss - rows["random"].loss
    )
    md = (sweep / "report" / "report.md").read_text()
    assert "| target loss | Δ loss vs random |" in md
    assert f"{rows['less'].loss:.3f} ± {rows['less'].loss_std:.3f}" in md
    assert (sweep / "report" / "effect.md").is_file()  # dataselect-report writes it as well
    assert md.count("| gsm_symbolic") == 3 and "random" in md and "less" in md
    for name in ("report.tex", "report.csv", "summary.csv", "accuracy_vs_budget.png"):
        assert (sweep / "report" / name).stat().st_size > 0
    assert (sweep / "report" / "report.csv").read_text().count("\n") == 1 + 4


@pytest.mark.skipif(not (SHARED / "gsm8k").is_dir(), reason="needs ../shared/data")
def test_evaluator_benchmarks_adds_other_targets(tmp_path):
    """Cross-task table: evaluate the gsm_symbolic selection on GSM8K too."""
    m = run(
        tmp_path,
        "stage=evaluate",
        f"paths.data_dir={SHARED}",
        "evaluator.benchmarks=[gsm_symbolic,gsm8k]",
        "evaluator.num_fewshot=0",
        "evaluator.limit={gsm_symbolic: 2, gsm8k: 2}",
        "evaluator.include_base=false",
    )
    assert set(m["finetuned"]) == {"gsm_symbolic", "gsm8k"}
    assert m["finetuned"]["gsm8k"]["n"] == 2 and m["finetuned"]["gsm_symbolic"]["n"] == 2
    with pytest.raises(ValueError, match="'nope' is not a target"):
        run(tmp_path, "evaluator.benchmarks=[nope]", "evaluator.include_base=false")


def test_multi_task_target_selects_by_subtask_and_evaluates_each_task(tmp_path):
    """target=[a,b]: the union of validation sets with task labels; LESS takes the max over
    subtasks, G2IS and GIST run on it; evaluation reports each task."""
    chain = (
        "+target.chain_sum={validation: [{kind: reasoning_gym, name: chain_sum, n: 4, seed: 700}],"
        " test: [{kind: reasoning_gym, name: chain_sum, n: 3, seed: 800}]}"
    )
    m = run(tmp_path, chain, "selector=less", "evaluator.include_base=false")
    assert m["target"] == "gsm_symbolic+chain_sum"
    assert set(m["finetuned"]) == {"gsm_symbolic", "chain_sum"}
    assert m["target_sizes"]["validation"] == 8
    assert set(m["diagnostics"]["subtask_of_max"]) <= {"gsm_symbolic", "chain_sum"}
    assert sum(m["diagnostics"]["subtask_of_max"].values()) == 8
    g = run(tmp_path, chain, "selector=g2is", "stage=select")
    assert sum(g["selection_sources"].values()) == 8
    s = run(tmp_path, chain, "selector=gist", "selector.space=sketch", "stage=select")
    assert set(s["diagnostics"]["subtask_of_max"]) <= {"gsm_symbolic", "chain_sum"}
    assert sum(s["diagnostics"]["subtask_of_max"].values()) == 8
