"""The results table a run prints: selector, budget, target, accuracy and target loss (each
+- its stderr), n."""

from __future__ import annotations

import csv
import math
from typing import Any

from rich.console import Console
from rich.table import Table

COLUMNS = ["selector", "budget", "target", "model", "accuracy", "n", "target loss", "loss n"]
TEXT = COLUMNS[:4]


def _pm(value: float, err: float, digits: int) -> str:
    return f"{value:.{digits}f}" + ("" if math.isnan(err) else f" +- {err:.{digits}f}")


def result_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """Rows of the table from a run's metrics.json content."""
    rows = []
    budget = metrics["sizes"]["budget"]
    share = budget / metrics["sizes"]["candidates"]
    for which, label in (("finetuned", "fine-tuned"), ("base", "base (no fine-tuning)")):
        for bench, m in (metrics.get(which) or {}).items():
            loss = m.get("target_loss")
            rows.append(
                {
                    "selector": metrics["selector"] if which == "finetuned" else "-",
                    "budget": f"{budget} ({100 * share:.1f}%)" if which == "finetuned" else "-",
                    "target": bench,
                    "model": label,
                    "accuracy": _pm(100 * m["value"], 100 * float(m["stderr"]), 1),
                    "n": str(m["n"]),
                    "target loss": "" if loss is None else _pm(loss["value"], loss["stderr"], 3),
                    "loss n": "" if loss is None else str(loss["n"]),
                }
            )
    return rows


def write_csv(metrics: dict[str, Any], path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(result_rows(metrics))


def print_results(metrics: dict[str, Any], console: Console | None = None) -> str:
    """Print the table with rich; return it as markdown too (for README and logs)."""
    rows = result_rows(metrics)
    table = Table(title=f"dataselect results ({metrics['model_name']})")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in TEXT else "right")
    for r in rows:
        table.add_row(*(r[c] for c in COLUMNS))
    (console or Console()).print(table)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r[c] for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)
