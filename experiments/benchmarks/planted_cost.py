"""Cheap vs expensive: planted-benchmark precision of every selector against what it costs.

Reads the ``planted.json`` files that ``experiments/planted/run_planted.py`` writes (one row
per family x selector x seed, with the run's own cost ledger) and prints, per selector:
precision per family and its mean, the seconds to build what the selection rests on from
scratch (warmup + pool passes: shared by every target that reuses them), the seconds a new
target costs (its validation side + the selection), and the bytes stored per pool example.
Writes a plot of mean precision against seconds for one target from scratch.

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


def load(dirs: list[Path]) -> list[dict]:
    rows = []
    for d in dirs:
        path = d / "planted.json" if d.is_dir() else d
        if not path.is_file():
            raise SystemExit(f"{path}: no planted.json (run experiments/planted/run_planted.py)")
        rows += json.loads(path.read_text())
    return rows


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


def table(families: list[str], summary: list[dict], base: float) -> str:
    head = ["selector", *families, "mean", "setup s", "per-target s", "bytes / pool ex."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [f"{s['per_family'][f]:.3f}" if f in s["per_family"] else "-" for f in families]
        label = s["selector"] + (f" ({s['seeds']} seeds)" if s["seeds"] > 1 else "")
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | **{s['precision']:.3f}** | {s['setup_seconds']:.0f} | {s['target_seconds']:.1f}"
            + f" | {s['bytes']:,.0f} |"
        )
    lines.append(f"\nbase rate (a random pick): {base:.3f}")
    return "\n".join(lines)


def plot(summary: list[dict], base: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for s in summary:
        x = max(s["seconds"], 0.1)
        gradient = s["setup_seconds"] > 0 and s["bytes"] > 1000
        ax.scatter(x, s["precision"], s=40, color="tab:red" if gradient else "tab:blue")
        ax.annotate(s["selector"], (x, s["precision"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")  # fmt: skip
    ax.axhline(base, color="grey", ls="--", lw=1, label=f"base rate {base:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("seconds for one target from scratch (warmup + pool passes + target side)")
    ax.set_ylabel("precision (share of the selection from the target family)")
    ax.set_title("Planted benchmark: precision vs cost (SmolLM2-135M, 1,050-example pool, CPU)")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="run_planted.py --out dirs")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    rows = load(args.dirs)
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
