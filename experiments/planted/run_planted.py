"""Planted benchmark: does a selector find the target family in a mixed pool?

Pool: the quickstart pool (15 reasoning-gym families x 70 examples, SmolLM2-135M warmup).
Target: one family F, with 16 validation examples of its own (another seed). Budget: the
number of F examples among the candidates (70), so a perfect selector has precision 1 and
random sits at the base rate 70 / 1,050 = 6.7%. Precision = share of the selection from F.

Every run goes through the real pipeline (stage=select) and its cache: the warmup and the
pool's gradient store are computed once and shared by every family, selector and seed; a
new family costs only its 16 validation gradients.

    python experiments/planted/run_planted.py --families gsm_symbolic chain_sum gcd \
        --selectors random less "rds selector.variant=rds" --seeds 0 1 2 -- [hydra overrides]

A selector argument is an option name, optionally followed by its own overrides (one quoted
argument); it is also the row's label. Each row records the selection's cost from the run's
own ledger: seconds to build what it rests on from scratch (warmup, pool passes, target
side, the selection), and bytes stored per pool example.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

import dataselect.config  # noqa: F401  (registers the schema)
from dataselect.data.sources import load_pool
from dataselect.data.targets import candidates, load_target
from dataselect.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[2]


def family_overrides(family: str) -> list[str]:
    val = f"{{kind: reasoning_gym, name: {family}, n: 16, seed: 9001}}"
    test = f"{{kind: reasoning_gym, name: {family}, n: 4, seed: 19001}}"
    return [
        "~target.gsm_symbolic",
        f"+target.planted_{family}={{validation: [{val}], test: [{test}]}}",
    ]


def run_one(family: str, selector: str, seed: int, extra: list[str], out: Path) -> dict:
    name, *own = selector.split()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=quickstart",
                f"selector={name}",
                *own,
                *family_overrides(family),
                "stage=select",
                f"seed={seed}",
                "logger=csv",
                f"paths.output_dir={out}",
                *extra,
            ],
        )
    data_dir = Path(cfg.paths.data_dir)
    target = load_target(cfg.target, data_dir)
    dc = cfg.decontamination  # the pipeline's own rule (quickstart: exact repeats only)
    cands, _ = candidates(load_pool(cfg.pool, data_dir), target, ngram=dc.ngram, exact=dc.exact)
    source = f"reasoning_gym/{family}"
    budget = sum(e.source == source for e in cands)
    cfg.budget = budget
    t0 = time.time()
    metrics = run_pipeline(cfg)
    picked = [json.loads(x)["id"] for x in (out / "selection.jsonl").read_text().splitlines()]
    by_id = {e.id: e.source for e in cands}
    hits = sum(by_id[i] == source for i in picked)
    cost = metrics["cost"]
    built = cost["build_seconds"]
    return {
        "family": family,
        "selector": selector,
        "seed": seed,
        "budget": budget,
        "precision": hits / len(picked),
        "base_rate": budget / len(cands),
        "picked": len(picked),
        "seconds": time.time() - t0,
        "cache_hits": metrics["cache_hits"],
        # from scratch: what the selection rests on, whether this run built it or reused it
        "setup_seconds": built.get("warmup", 0.0) + cost["pool_pass_seconds"],
        "target_seconds": cost["target_seconds"] + built.get("select", 0.0),
        "bytes_per_pool_example": cost["bytes_per_pool_example"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| family | selector | seeds | precision (mean +- sd) | base rate |",
        "|---|---|---|---|---|",
    ]
    keys = sorted({(r["family"], r["selector"]) for r in rows})
    for fam, sel in keys:
        ps = [r["precision"] for r in rows if (r["family"], r["selector"]) == (fam, sel)]
        mean = sum(ps) / len(ps)
        sd = math.sqrt(sum((p - mean) ** 2 for p in ps) / (len(ps) - 1)) if len(ps) > 1 else 0.0
        base = next(r["base_rate"] for r in rows if r["family"] == fam)
        lines.append(f"| {fam} | {sel} | {len(ps)} | {mean:.3f} +- {sd:.3f} | {base:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--families",
        nargs="+",
        default=["gsm_symbolic", "chain_sum", "gcd", "letter_counting", "caesar_cipher"],
    )
    ap.add_argument("--selectors", nargs="+", default=["random", "less"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "planted")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    args = ap.parse_args()
    rows = []
    for fam in args.families:
        for sel in args.selectors:
            for seed in args.seeds:
                slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", sel)
                r = run_one(fam, sel, seed, args.overrides, args.out / f"{fam}-{slug}-{seed}")
                print(json.dumps(r), flush=True)
                rows.append(r)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "planted.json").write_text(json.dumps(rows, indent=1))
    print(
        f"\n{table(rows)}\n\nmachine: {platform.node()} ({platform.processor() or 'cpu'}), "
        f"date: {time.strftime('%Y-%m-%d')}"
    )


if __name__ == "__main__":
    main()
