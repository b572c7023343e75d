"""Did selecting pay off? Each run against random and the base model, with 95% intervals.

One row per fine-tuned run and task (and one for the base model): its target loss and
accuracy, each with a 95% confidence interval, and its difference from the random selection
at the same task, budget and seed.

- Target loss: mean of per-item losses +- 1.96 standard errors. Its difference from random
  is *paired*: both models score the same test items, so the interval is that of the mean
  per-item difference (``target_loss.jsonl`` in each run dir), much tighter than the two
  intervals side by side.
- Accuracy: Wilson score interval (it stays inside [0, 1] and is not empty at 0 of 40); its
  difference from random is unpaired, +- 1.96 sqrt(se1^2 + se2^2).

"Above random" means the selector's loss interval lies entirely below random's (lower loss
is better): the two intervals do not overlap.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataselect.report.multirun import BASE, RANDOM

Z = 1.959964  # two-sided 95%
NOTE = (
    "Target loss: mean answer-token NLL of the test items' reference answers (nats; lower is"
    " better), mean ± 1.96 SE; Δ vs random is paired over the same items. Accuracy: Wilson"
    " interval; Δ unpaired. 'vs random': whether the loss intervals are apart."
)


@dataclass
class Interval:
    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def pct(self) -> str:
        return f"{100 * self.mean:.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def wilson(p: float, n: int) -> Interval:
    """Wilson score interval of a proportion ``p`` of ``n`` trials."""
    if n <= 0:
        return Interval(p, math.nan, math.nan)
    denom = 1 + Z**2 / n
    centre = (p + Z**2 / (2 * n)) / denom
    half = Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def item_losses(run_dir: Path, model: str = "finetuned") -> dict[str, dict[str, float]]:
    """``{benchmark: {item id: nll}}`` of one model (finetuned | base) in a run dir."""
    path = Path(run_dir) / "target_loss.jsonl"
    out: dict[str, dict[str, float]] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["model"] == model:
            out.setdefault(r["benchmark"], {})[r["id"]] = float(r["nll"])
    return out


def paired_difference(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], task: str):
    """Mean per-item loss difference a - b over the task's items both scored (a task with
    subtasks: the mean of the subtasks' mean differences, as its loss is a macro mean), with
    a 95% interval; None if they share no item."""
    benches = [k for k in a if (k == task or k.startswith(task + "/")) and k in b]
    means, variances = [], []
    for k in benches:
        common = [i for i in a[k] if i in b[k]]
        if not common:
            continue
        d = [a[k][i] - b[k][i] for i in common]
        means.append(statistics.fmean(d))
        variances.append(statistics.variance(d) / len(d) if len(d) > 1 else 0.0)
    if not means:
        return None
    m = statistics.fmean(means)
    half = Z * math.sqrt(sum(variances)) / len(means)
    return Interval(m, m - half, m + half)


@dataclass
class EffectRow:
    task: str
    selector: str
    budget: int | None
    seed: int | None
    from_target: str  # "52/52": selected examples whose source names the task
    loss: Interval | None
    loss_delta: Interval | None  # vs random, paired
    accuracy: Interval
    acc_delta: Interval | None  # vs random, unpaired
    n_loss: int | None
    n_acc: int
    vs_random: str = ""  # the loss intervals: "better (CIs apart)" | "worse (...)" | "overlap"


def _from_target(m: dict, task: str) -> str:
    sources = m.get("selection_sources") or {}
    total = sum(sources.values())
    hits = sum(v for s, v in sources.items() if s.rsplit("/", 1)[-1] == task)
    return f"{hits}/{total}" if total else ""


def _acc(res: dict) -> Interval:
    return wilson(float(res["value"]), int(res["n"]))


def _loss(res: dict) -> Interval | None:
    tl = res.get("target_loss")
    if not tl:
        return None
    half = Z * tl["stderr"] if not math.isnan(tl["stderr"]) else math.nan
    return Interval(tl["value"], tl["value"] - half, tl["value"] + half)


def effect_rows(run_dirs: list[Path]) -> list[EffectRow]:
    """Rows for every finished, evaluated run (and one base row per task), random first."""
    runs = []
    for d in run_dirs:
        m = json.loads((Path(d) / "metrics.json").read_text())
        if m.get("finetuned"):
            runs.append((Path(d), m))
    rows: list[EffectRow] = []
    bases: dict[str, EffectRow] = {}

    def random_of(task: str, m: dict):
        same = [
            (d, r)
            for d, r in runs
            if r["selector"] == RANDOM
            and task in r["finetuned"]
            and r["sizes"]["budget"] == m["sizes"]["budget"]
        ]
        exact = [(d, r) for d, r in same if r.get("seed") == m.get("seed")]
        return (exact or same or [None])[0]

    for d, m in runs:
        for task, res in m["finetuned"].items():
            ref = random_of(task, m) if m["selector"] != RANDOM else None
            loss_delta = acc_delta = None
            vs = ""
            if ref is not None:
                rd, rm = ref
                loss_delta = paired_difference(item_losses(d), item_losses(rd), task)
                r_res = rm["finetuned"][task]
                se = math.hypot(float(res["stderr"]), float(r_res["stderr"]))
                diff = float(res["value"]) - float(r_res["value"])
                acc_delta = Interval(diff, diff - Z * se, diff + Z * se)
                vs = verdict(_loss(res), _loss(r_res))
            tl = res.get("target_loss") or {}
            rows.append(
                EffectRow(
                    task,
                    m["selector"],
                    m["sizes"].get("budget"),
                    m.get("seed"),
                    _from_target(m, task),
                    _loss(res),
                    loss_delta,
                    _acc(res),
                    acc_delta,
                    tl.get("n"),
                    int(res["n"]),
                    vs,
                )
            )
            base = (m.get("base") or {}).get(task)
            if base is not None and task not in bases:
                btl = base.get("target_loss") or {}
                bases[task] = EffectRow(
                    task, BASE, None, None, "", _loss(base), None,
                    _acc(base), None, btl.get("n"), int(base["n"]),
                )  # fmt: skip
    rows += bases.values()
    order = {RANDOM: 1, BASE: 2}
    return sorted(
        rows, key=lambda r: (r.task, order.get(r.selector, 0), r.selector, r.budget or 0, r.seed)
    )


def verdict(loss: Interval | None, random_loss: Interval | None) -> str:
    """Where a loss interval lies against random's: below it (better), above, or overlapping."""
    if loss is None or random_loss is None:
        return ""
    if loss.high < random_loss.low:
        return "better (CIs apart)"
    if loss.low > random_loss.high:
        return "worse (CIs apart)"
    return "CIs overlap"


def to_markdown(rows: list[EffectRow]) -> str:
    head = [
        "task",
        "selection",
        "from target",
        "target loss [95% CI]",
        "Δ loss vs random [95% CI, paired]",
        "accuracy % [95% CI]",
        "Δ acc vs random (pts)",
        "n (loss / acc)",
        "vs random",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        label = r.selector if r.budget is None else f"{r.selector} ({r.budget}, seed {r.seed})"
        cells = [
            r.task,
            label,
            r.from_target,
            "" if r.loss is None else str(r.loss),
            "—"
            if r.loss_delta is None
            else f"{r.loss_delta.mean:+.3f} [{r.loss_delta.low:+.3f}, {r.loss_delta.high:+.3f}]",
            r.accuracy.pct(),
            "—"
            if r.acc_delta is None
            else f"{100 * r.acc_delta.mean:+.1f} "
            f"[{100 * r.acc_delta.low:+.1f}, {100 * r.acc_delta.high:+.1f}]",
            f"{r.n_loss or ''} / {r.n_acc}",
            r.vs_random,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(rows: list[EffectRow]) -> list[dict[str, Any]]:
    """Machine-readable rows (for effect.json)."""

    def iv(x: Interval | None):
        return None if x is None else {"mean": x.mean, "low": x.low, "high": x.high}

    return [
        {
            "task": r.task,
            "selector": r.selector,
            "budget": r.budget,
            "seed": r.seed,
            "from_target": r.from_target,
            "loss": iv(r.loss),
            "loss_delta_vs_random": iv(r.loss_delta),
            "accuracy": iv(r.accuracy),
            "accuracy_delta_vs_random": iv(r.acc_delta),
            "n_loss": r.n_loss,
            "n_accuracy": r.n_acc,
            "vs_random": r.vs_random,
        }
        for r in rows
    ]
