"""Planted benchmark: does a selector find the target family in a mixed pool?

Pool: ``conf/pool/planted.yaml``, 55 reasoning-gym families x 30 examples (1,650) in groups
of near neighbours (gsm_symbolic / chain_sum / basic_arithmetic, gcd / lcm, spell_backward /
letter_jumble, ...); model, warmup and fine-tuning settings from ``experiment=quickstart``.
Target: one family F (every family in turn) with 16 validation examples of its own (another
seed). Budgets 1% and 5% of the candidates; warmup seeds 0 1 2 (``warmup.seed`` and ``seed``).
Precision = the share of the budget taken from F; ceiling = min(1, F's candidates / budget)
(30 / 82 at 5%); normalized = precision / ceiling: 1 is perfect at every budget, chance is the
base rate / ceiling. The counts are the run's own metrics (``selection_sources``,
``candidate_sources``, ``sizes.budget``), not recomputed here. The table's spread is the sd
over warmup seeds of the mean over families.

Every run goes through the real pipeline (stage=select) and its cache. The loop is seed-major
(seed, selector, family, budget): a seed's warmup and a selector's pool pass (LESS / SGD
stores, hidden states, losses, embeddings, indexes) are built on the first family and reused
by every other; a new family costs only its validation side, shared by its two budgets. Each
row is appended to ``--results``/planted.jsonl when done; rows already there are skipped, so a
killed run resumes where it stopped.

Default selectors: every selector and baseline but ``full`` (takes everything) and exact GIST
(``gist``, space=exact), whose pool pass depends on the target: a pass over the pool per family
and seed (165), too slow on CPU; its sketch-space version (the shared store) is in. A selector
argument is an option name, optionally with its own overrides in one quoted argument ("bm25
selector.aggregate=sum"), and the row's label. Hydra overrides after ``--`` go to every run
(``pool=quickstart`` swaps the pool). Rows also carry the run ledger's costs (warmup + pool
passes from scratch, per-target seconds, bytes per pool example: benchmarks/planted_cost.py).
Beside the faithful G2IS, three rows take it apart (they share its store, ~2 s a row): the
uncentered PCA (``center=false``), no graph walk (``graph=none``), and both.

One command runs the benchmark (or resumes it) and writes experiments/planted/results/
planted.md (the table), planted.png (its plot) and planted.jsonl (the rows). The rows are
committed, so a later session (a fresh machine, an empty cache) resumes with the rows not yet
there; the run dirs go to ``--out`` (outputs/planted_v2, not committed)::

    python experiments/planted/run_planted.py            # [-- hydra overrides]

``--report-only`` rebuilds planted.md and planted.png from planted.jsonl without running.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
import traceback
from pathlib import Path
from statistics import fmean, median, stdev

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import dataselect.config  # noqa: F401  (registers the schema; the pipeline loads in a run)

ROOT = Path(__file__).resolve().parents[2]
SELECTORS = [
    "random", "less", "g2is", "g2is selector.center=false", "g2is selector.graph=none",
    "g2is selector.graph=none selector.center=false", "gist selector.space=sketch",
    "gist selector.space=sketch selector.energy_weight=true", "bm25",
    "bm25 selector.aggregate=sum", "dsir", "embed", "rds", "rds_plus", "perplexity", "length",
]  # fmt: skip
KEY = ("family", "selector", "seed", "budget_cfg")


def family_overrides(family: str) -> list[str]:
    val = f"{{kind: reasoning_gym, name: {family}, n: 16, seed: 9001}}"
    test = f"{{kind: reasoning_gym, name: {family}, n: 4, seed: 19001}}"
    return [
        "~target",  # whatever the preset's target is
        f"+target.planted_{family}={{validation: [{val}], test: [{test}]}}",
    ]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["experiment=quickstart", "pool=planted", *overrides])


def share_across_runs() -> None:
    """Generate the pool and tokenize each example once per process, not once a run (~3 s
    of a run that reuses everything else); the token memo is kept per model config."""
    import dataselect.pipeline
    from dataselect.context import RunContext

    load, pools, memos = dataselect.pipeline.load_pool, {}, {}

    def spec(node) -> str:
        return json.dumps(OmegaConf.to_container(node, resolve=True), sort_keys=True)

    def load_pool(pool_cfg, data_dir):
        if spec(pool_cfg) not in pools:
            pools[spec(pool_cfg)] = load(pool_cfg, data_dir)
        return copy.copy(pools[spec(pool_cfg)])

    def context(cfg, tracker=None):
        return RunContext(cfg, tracker, _token_memo=memos.setdefault(spec(cfg.model), {}))

    dataselect.pipeline.load_pool = load_pool
    dataselect.pipeline.RunContext = context


def run_one(family: str, selector: str, seed: int, budget, extra: list[str], out: Path) -> dict:
    name, *own = selector.split()
    cfg = compose_cfg(
        [
            f"selector={name}",
            *own,
            *family_overrides(family),
            "stage=select",
            f"budget={budget}",
            f"seed={seed}",
            f"warmup.seed={seed}",
            "logger=csv",
            f"paths.output_dir={out}",
            *extra,
        ]
    )
    from dataselect.pipeline import run_pipeline

    t0 = time.time()
    metrics = run_pipeline(cfg)
    cost, built = metrics["cost"], metrics["cost"]["build_seconds"]
    return {
        "family": family,
        "selector": selector,
        "seed": seed,
        "budget_cfg": budget,
        **precision(metrics, family),
        "seconds": time.time() - t0,
        "cache_hits": metrics["cache_hits"],
        # from scratch: what the selection rests on, whether this run built it or reused it
        "setup_seconds": built.get("warmup", 0.0) + cost["pool_pass_seconds"],
        "target_seconds": cost["target_seconds"] + built.get("select", 0.0),
        "bytes_per_pool_example": cost["bytes_per_pool_example"],
    }


def precision(metrics: dict, family: str) -> dict:
    """A run's precision for ``family``, from its metrics: the selection's and the candidates'
    counts by source, and the budget as a count."""
    source = f"reasoning_gym/{family}"
    n = metrics["sizes"]["budget"]
    hits = metrics["selection_sources"].get(source, 0)
    mine = metrics["candidate_sources"].get(source, 0)
    ceiling = min(1.0, mine / n)
    return {
        "budget": n,
        "picked": sum(metrics["selection_sources"].values()),
        "hits": hits,
        "precision": hits / n,
        "ceiling": ceiling,
        "normalized": hits / n / ceiling if ceiling else 0.0,
        "family_candidates": mine,
        "candidates": sum(metrics["candidate_sources"].values()),
        "base_rate": mine / sum(metrics["candidate_sources"].values()),
    }


def load_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def summarize(rows: list[dict]) -> list[dict]:
    """Per selector x budget: mean normalized precision over families and seeds, spread = sd
    over seeds of the per-seed mean, min / max over families of the per-family mean."""
    out = []
    for sel in dict.fromkeys(r["selector"] for r in rows):
        for b in sorted({r["budget_cfg"] for r in rows if r["selector"] == sel}):
            mine = [r for r in rows if (r["selector"], r["budget_cfg"]) == (sel, b)]
            seeds = sorted({r["seed"] for r in mine})
            per_seed = [fmean(r["normalized"] for r in mine if r["seed"] == s) for s in seeds]
            families = dict.fromkeys(r["family"] for r in mine)
            per_fam = {
                f: fmean(r["normalized"] for r in mine if r["family"] == f) for f in families
            }
            out.append(
                {
                    "selector": sel,
                    "budget_cfg": b,
                    "families": len(per_fam),
                    "seeds": len(seeds),
                    "normalized": fmean(r["normalized"] for r in mine),
                    "spread": stdev(per_seed) if len(per_seed) > 1 else 0.0,
                    "precision": fmean(r["precision"] for r in mine),
                    "min": min(per_fam.values()),
                    "max": max(per_fam.values()),
                    "worst": min(per_fam, key=per_fam.get),
                    "chance": fmean(r["base_rate"] / r["ceiling"] for r in mine),
                }
            )
    return out


def per_family(rows: list[dict], budget) -> tuple[list[str], list[str], dict]:
    """(families, selectors, {(family, selector): mean normalized over seeds}) at ``budget``."""
    mine = [r for r in rows if r["budget_cfg"] == budget]
    fams = list(dict.fromkeys(r["family"] for r in mine))
    sels = list(dict.fromkeys(r["selector"] for r in mine))
    cells = {}
    for f in fams:
        for s in sels:
            xs = [r["normalized"] for r in mine if (r["family"], r["selector"]) == (f, s)]
            if xs:
                cells[f, s] = fmean(xs)
    return fams, sels, cells


def report_budget(rows: list[dict]):
    budgets = sorted({r["budget_cfg"] for r in rows})
    return 0.05 if 0.05 in budgets else budgets[-1]


def short(label: str) -> str:
    return label.replace("selector.", "")


def markdown(rows: list[dict]) -> str:
    summary = sorted(summarize(rows), key=lambda s: (s["budget_cfg"], -s["normalized"]))
    rand = {s["budget_cfg"]: s["normalized"] for s in summary if s["selector"] == "random"}
    lines = [
        "| budget | selector | normalized precision (sd over seeds) | precision | "
        "worst family | best family | families x seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['budget_cfg']:g} | {short(s['selector'])} | **{s['normalized']:.3f}** "
            f"({s['spread']:.3f}) | {s['precision']:.3f} | {s['min']:.3f} ({s['worst']}) | "
            f"{s['max']:.3f} | {s['families']} x {s['seeds']} |"
        )
    for b in sorted({s["budget_cfg"] for s in summary}):
        chance = next(s["chance"] for s in summary if s["budget_cfg"] == b)
        got = f"{rand[b]:.3f}" if b in rand else "not run"
        lines.append(f"\nbudget {b:g}: random selector {got}, chance (base rate / ceiling) "
                     f"{chance:.3f}")  # fmt: skip
    b = report_budget(rows)
    fams, sels, cells = per_family(rows, b)
    lines += [
        f"\nNormalized precision per family at budget {b:g} (mean over seeds):\n",
        "| family | " + " | ".join(short(s) for s in sels) + " |",
        "|---|" + "---|" * len(sels),
    ]
    for f in fams:
        row = [f"{cells[f, s]:.2f}" if (f, s) in cells else "-" for s in sels]
        lines.append(f"| {f} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    budgets = sorted({s["budget_cfg"] for s in summary})
    sels = list(dict.fromkeys(s["selector"] for s in summary))
    b = report_budget(rows)
    fams, hsels, cells = per_family(rows, b)
    fig, (ax, hm) = plt.subplots(
        1, 2, figsize=(18, max(7, 0.2 * len(fams))), gridspec_kw={"width_ratios": [1, 1.2]}
    )
    width = 0.8 / len(budgets)
    for i, bud in enumerate(budgets):
        by = {s["selector"]: s for s in summary if s["budget_cfg"] == bud}
        xs = [j + (i - (len(budgets) - 1) / 2) * width for j in range(len(sels))]
        ys = [by[s]["normalized"] if s in by else 0 for s in sels]
        err = [by[s]["spread"] if s in by else 0 for s in sels]
        bars = ax.bar(xs, ys, width, yerr=err, capsize=2, label=f"budget {bud:g}")
        chance = fmean(s["chance"] for s in by.values())
        ax.axhline(chance, ls="--", lw=1, color=bars.patches[0].get_facecolor(),
                   label=f"chance at {bud:g}: {chance:.3f}")  # fmt: skip
    ax.set_xticks(range(len(sels)), [short(s) for s in sels], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("normalized precision (1 = all of the budget the target family can fill)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("mean over families; error bar: sd over warmup seeds")
    grid = [[cells.get((f, s), float("nan")) for s in hsels] for f in fams]
    im = hm.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
    hm.set_xticks(range(len(hsels)), [short(s) for s in hsels], rotation=60, ha="right",
                  fontsize=7)  # fmt: skip
    hm.set_yticks(range(len(fams)), fams, fontsize=6)
    hm.set_title(f"per family at budget {b:g}")
    fig.colorbar(im, ax=hm, fraction=0.03)
    cands = median(r["candidates"] for r in rows)
    fig.suptitle(f"Planted benchmark: {len(fams)} target families, ~{cands:.0f} candidates")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path) -> str:
    """planted.md and planted.png beside ``out``/planted.jsonl."""
    rows = load_rows(out / "planted.jsonl")
    if not rows:
        raise SystemExit(f"{out / 'planted.jsonl'}: no rows")
    md = markdown(rows)
    (out / "planted.md").write_text(md + "\n")
    plot(rows, out / "planted.png")
    return md


def number(s: str) -> int | float:
    """A budget as the pipeline reads it: a fraction of the candidates, or an int count."""
    return int(s) if s.isdigit() else float(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="+", default=None, help="default: every pool family")
    ap.add_argument("--selectors", nargs="+", default=SELECTORS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budgets", nargs="+", type=number, default=[0.01, 0.05])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "planted_v2")
    ap.add_argument(
        "--results",
        type=Path,
        default=ROOT / "experiments" / "planted" / "results",
        help="where planted.jsonl (the rows), planted.md and planted.png live",
    )
    ap.add_argument("--report-only", action="store_true", help="table + plot from planted.jsonl")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    args = ap.parse_args()
    failed = [] if args.report_only else run_all(args)
    md = write_report(args.results)
    print(md, f"\n\n{args.results / 'planted.md'}, {args.results / 'planted.png'}")
    raise SystemExit(1 if failed else 0)


def run_all(args) -> list[tuple]:
    pool = [s.name for s in compose_cfg(args.overrides).pool.sources if s.kind == "reasoning_gym"]
    families = args.families or pool
    if set(families) - set(pool):
        raise SystemExit(f"not in the pool: {sorted(set(families) - set(pool))}")
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "planted.jsonl"
    done = {tuple(r[k] for k in KEY) for r in load_rows(path)}
    todo = [
        (fam, sel, seed, b)
        for seed in args.seeds
        for sel in args.selectors
        for fam in families
        for b in args.budgets
    ]
    print(f"{len(todo)} rows, {sum(k in done for k in todo)} already done", flush=True)
    share_across_runs()
    t0, failed = time.time(), []
    for i, (fam, sel, seed, b) in enumerate(todo, 1):
        if (fam, sel, seed, b) in done:
            continue
        head = f"[{time.time() - t0:7.0f}s] {i}/{len(todo)} seed {seed} | {sel} | {fam} | {b:g}"
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", sel)
        try:
            r = run_one(
                fam, sel, seed, b, args.overrides, args.out / f"runs/{seed}/{slug}/{fam}-{b:g}"
            )
        except Exception as e:  # noqa: BLE001  (one bad row must not stop hours of others)
            traceback.print_exc()
            print(f"{head}: FAILED {e!r}", flush=True)
            failed.append((fam, sel, seed, b))
            continue
        with path.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(
            f"{head}: {r['hits']}/{r['budget']} precision {r['precision']:.3f} normalized "
            f"{r['normalized']:.3f} ({r['seconds']:.1f}s)",
            flush=True,
        )
    if failed:
        print(f"{len(failed)} rows failed (rerun to retry them): {failed}", flush=True)
    return failed


if __name__ == "__main__":
    main()
