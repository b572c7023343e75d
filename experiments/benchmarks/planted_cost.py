"""Cheap vs expensive: planted-benchmark precision of every selector against what it costs.

Reads the ``planted.jsonl`` (or older ``planted.json``) files that
``experiments/planted/run_planted.py`` writes (one row per family x selector x seed x budget,
with the run's own cost ledger; ``--budget`` keeps one budget) and prints, per selector:
precision per family and its mean, the seconds to build what the selection rests on from
scratch (warmup + pool passes: shared by every target that reuses them), the seconds a new
target costs (its validation side + the selection), and the bytes stored per pool example.
Writes a plot of mean precision against seconds for one target from scratch.

``--costs DIR``: take the costs from another run_planted.py output instead (rows matched by
selector label), e.g. one family run alone on a quiet machine with an empty cache, so that
every pass is built once, sequentially, with nothing else running.

    python experiments/benchmarks/planted_cost.py outputs/planted_baselines \
        outputs/planted_random outputs/planted_gradients --plot \
        experiments/benchmarks/planted_cost.png
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from statistics import mean, median


def load(dirs: list[Path], budget: float | None = None) -> list[dict]:
    """The rows of each dir's planted.json (the old script) or planted.jsonl (run_planted.py
    now, one row per line, several budgets: ``budget`` keeps one ``budget_cfg``)."""
    rows = []
    for d in dirs:
        path = next((d / n for n in ("planted.jsonl", "planted.json") if (d / n).is_file()), d)
        if not path.is_file():
            raise SystemExit(f"{path}: no planted.json(l) (run experiments/planted/run_planted.py)")
        text = path.read_text()
        rows += (
            json.loads(text)
            if path.suffix == ".json"
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    if budget is not None:
        rows = [r for r in rows if r.get("budget_cfg") == budget]
    elif len({r.get("budget_cfg") for r in rows}) > 1:
        raise SystemExit("rows at several budgets: pick one with --budget")
    return rows


def with_costs(rows: list[dict], cost_rows: list[dict]) -> list[dict]:
    """``rows`` with their cost fields replaced by those of ``cost_rows`` (by selector)."""
    fields = ("setup_seconds", "target_seconds", "bytes_per_pool_example")
    by = {}
    for r in cost_rows:
        by.setdefault(r["selector"], r)
    missing = sorted({r["selector"] for r in rows} - set(by))
    if missing:
        raise SystemExit(f"--costs has no row for {missing}")
    return [{**r, **{f: by[r["selector"]][f] for f in fields}} for r in rows]


def summarize(rows: list[dict]) -> tuple[list[str], list[dict]]:
    families = list(dict.fromkeys(r["family"] for r in rows))
    out = []
    for sel in dict.fromkeys(r["selector"] for r in rows):
        mine = [r for r in rows if r["selector"] == sel]
        per_family = {
            f: mean(r["precision"] for r in mine if r["family"] == f)
            for f in families
            if any(r["family"] == f for r in mine)
        }
        setup = max(r.get("setup_seconds", 0.0) for r in mine)  # built once, reused after
        target = median(r.get("target_seconds", 0.0) for r in mine)
        out.append(
            {
                "selector": sel,
                "per_family": per_family,
                "precision": mean(per_family.values()),
                "complete": len(per_family) == len(families),
                "seeds": len({r["seed"] for r in mine}),
                "setup_seconds": setup,
                "target_seconds": target,
                "seconds": setup + target,
                "bytes": max(r.get("bytes_per_pool_example", 0.0) for r in mine),
                "under_filled": sum(r.get("picked", r["budget"]) < r["budget"] for r in mine),
            }
        )
    out.sort(key=lambda s: -s["precision"])
    return families, out


def _sec(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2f}"


def table(families: list[str], summary: list[dict], base: float) -> str:
    head = ["selector", *families, "mean", "setup s", "per-target s", "bytes / pool ex."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [f"{s['per_family'][f]:.3f}" if f in s["per_family"] else "-" for f in families]
        label = s["selector"] + (f" ({s['seeds']} seeds)" if s["seeds"] > 1 else "")
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | **{s['precision']:.3f}** | {_sec(s['setup_seconds'])}"
            + f" | {_sec(s['target_seconds'])}"
            + f" | {s['bytes']:,.0f} |"
        )
    lines.append(f"\nbase rate (a random pick): {base:.3f}")
    return "\n".join(lines)


GRADIENT = ("less", "g2is", "gist")  # selectors on LoRA gradients; the rest are baselines


def plot(summary: list[dict], base: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    for s in summary:
        x = max(s["seconds"], 0.01)
        gradient = s["selector"].split()[0] in GRADIENT
        ax.scatter(x, s["precision"], s=40, color="tab:red" if gradient else "tab:blue")
        label = s["selector"].replace("selector.", "")
        ax.annotate(label, (x, s["precision"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")  # fmt: skip
    ax.scatter([], [], color="tab:red", label="gradient selectors")
    ax.scatter([], [], color="tab:blue", label="baselines")
    ax.axhline(base, color="grey", ls="--", lw=1, label=f"base rate {base:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("seconds for one target from scratch (warmup + pool passes + target side)")
    ax.set_ylabel("precision (share of the selection from the target family)")
    ax.set_title(
        "Planted benchmark: precision vs cost\n(SmolLM2-135M, 1,050-example pool, 2 CPU cores)"
    )
    ax.set_ylim(0, 1.08)
    ax.legend(loc="center left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="run_planted.py --out dirs")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--costs", type=Path, default=None, help="a run_planted.py dir: its costs")
    ap.add_argument("--budget", type=float, default=None, help="keep the rows at this budget")
    args = ap.parse_args()
    rows = load(args.dirs, args.budget)
    if args.costs:
        rows = with_costs(rows, load([args.costs], args.budget))
    families, summary = summarize(rows)
    base = mean(r["base_rate"] for r in rows)
    print(table(families, summary, base))
    if args.plot:
        plot(summary, base, args.plot)
        print(f"\nplot: {args.plot}")
    print(
        f"\nmachine: {platform.node()} ({platform.processor() or 'cpu'}), "
        f"date: {time.strftime('%Y-%m-%d')}, rows: {len(rows)}"
    )
    assert all(math.isfinite(s["precision"]) for s in summary)


if __name__ == "__main__":
    main()
