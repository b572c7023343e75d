"""Which offline target shows a selection effect at 135M on 2 CPU cores?

For each reasoning-gym family of the quickstart pool, fine-tune SmolLM2-135M (the quickstart's
finetune recipe) on an *oracle* selection, ``budget`` examples of that family only (what a
selector that finds the family picks), and compare it with one *random* selection of the
same size from the whole pool and with the base model, on that family's test items
(fresh seeds): target loss (mean answer-token NLL, all ``--loss-items``) and accuracy
(greedy, ``--acc-items``). A family is a good quickstart target when the oracle's gain over
random is large next to the 95% intervals.

    python experiments/quickstart/choose_target.py --out outputs/choose_target [-- overrides]

Writes ``candidates.json`` (one row per family and model) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

import dataselect.config  # noqa: F401  (registers the schema)
from dataselect import models
from dataselect.context import RunContext
from dataselect.data.sources import load_pool, read_source
from dataselect.evaluation.harness import evaluate
from dataselect.evaluation.loss import summarize, target_losses
from dataselect.evaluation.scoring import canonical_number
from dataselect.evaluation.tasks import Benchmark
from dataselect.stages import train_on
from dataselect.training import list_checkpoints

ROOT = Path(__file__).resolve().parents[2]


def answer_type(items) -> str:
    numeric = all(canonical_number(str(e.meta.get("answer", e.answer))) for e in items)
    return "number" if numeric else "text"


def score(model, ctx, bench: Benchmark, acc_items: int, work: Path) -> dict:
    loss = summarize(
        target_losses(model, ctx.tokenizer, [bench], ctx.cfg.model.max_length)[bench.name]
    )
    acc_bench = Benchmark(bench.name, bench.examples[:acc_items], bench.answer_type)
    ev = evaluate(model, ctx.tokenizer, [acc_bench], ctx.cfg.evaluator, work)[bench.name]
    return {
        "loss": loss["value"],
        "loss_stderr": loss["stderr"],
        "loss_n": loss["n"],
        "accuracy": ev["value"],
        "acc_stderr": ev["stderr"],
        "acc_n": ev["n"],
    }


def tuned(ctx, examples, work: Path, seed: int):
    if not list_checkpoints(work):
        work.mkdir(parents=True, exist_ok=True)
        train_on(ctx, examples, ctx.cfg.finetune, work, "finetune", seed)
    base = models.load_base_model(ctx.cfg.model, ctx.cache_dir)
    return models.with_adapter(base, list_checkpoints(work)[-1] / "adapter").merge_and_unload()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="*", default=None, help="default: every pool family")
    ap.add_argument("--budget", type=int, default=52)
    ap.add_argument("--loss-items", type=int, default=100)
    ap.add_argument("--acc-items", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "choose_target")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=quickstart", *args.overrides])
    ctx = RunContext(cfg)
    data_dir = Path(cfg.paths.data_dir)
    pool = load_pool(cfg.pool, data_dir)
    fams = args.families or sorted({e.source.split("/", 1)[1] for e in pool})
    prompts = {e.prompt for e in pool}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "candidates.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    done = {(r["family"], r["model"]) for r in rows}

    def record(fam: str, which: str, model, bench, t0: float, extra: dict | None = None):
        if (fam, which) in done:
            return
        r = {
            "family": fam,
            "model": which,
            **score(model, ctx, bench, args.acc_items, out / "eval" / f"{fam}-{which}"),
        }
        r.update(extra or {}, seconds=time.time() - t0)
        print(json.dumps(r), flush=True)
        rows.append(r)
        rows_path.write_text(json.dumps(rows, indent=1))

    benches = {}
    for fam in fams:
        spec = {"kind": "reasoning_gym", "name": fam, "n": args.loss_items + 50, "seed": 30303}
        items = [e for e in read_source(spec, data_dir) if e.prompt not in prompts][
            : args.loss_items
        ]
        benches[fam] = Benchmark(fam, items, answer_type(items))

    rng = random.Random(args.seed)
    rand = rng.sample(list(pool), args.budget)
    t0 = time.time()
    base = models.load_base_model(cfg.model, ctx.cache_dir).eval()
    for fam in fams:
        record(fam, "base", base, benches[fam], t0)
    del base
    t0 = time.time()
    rmodel = tuned(ctx, rand, out / "ft-random", args.seed).eval()
    for fam in fams:
        share = sum(e.source.endswith("/" + fam) for e in rand)
        record(fam, "random", rmodel, benches[fam], t0, {"from_family": share})
    del rmodel
    for fam in fams:
        if (fam, "oracle") in done:
            continue
        t0 = time.time()
        own = [e for e in pool if e.source.endswith("/" + fam)]
        pick = random.Random(args.seed).sample(own, min(args.budget, len(own)))
        omodel = tuned(ctx, pick, out / f"ft-{fam}", args.seed).eval()
        record(fam, "oracle", omodel, benches[fam], t0, {"from_family": len(pick)})
    print(table(rows))
    print(f"\nmachine: {platform.node()}, date: {time.strftime('%Y-%m-%d')}")


def table(rows: list[dict]) -> str:
    by = {(r["family"], r["model"]): r for r in rows}
    lines = [
        "| family | base loss | random loss | oracle loss | gap / CI half-width | "
        "base acc | random acc | oracle acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fam in sorted({r["family"] for r in rows}):
        b, r, o = (by.get((fam, m)) for m in ("base", "random", "oracle"))
        if not (b and r and o):
            continue
        half = 1.96 * math.hypot(r["loss_stderr"], o["loss_stderr"])
        lines.append(
            f"| {fam} | {b['loss']:.3f} | {r['loss']:.3f} ± {1.96 * r['loss_stderr']:.3f} | "
            f"{o['loss']:.3f} ± {1.96 * o['loss_stderr']:.3f} | "
            f"{(r['loss'] - o['loss']) / half:.1f} | "
            + " | ".join(f"{100 * x['accuracy']:.1f}" for x in (b, r, o))
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
