"""The results table of a sweep: one row per (model, task, selector, budget), averaged over
seeds, written as markdown, LaTeX, CSV and two plots.

Units: RunRecord and report.csv keep metrics.json's fractions (0-1); Row, the tables and
summary.csv are in percent (points), the unit papers print and ``reference`` uses. The target
loss (mean answer-token NLL of the test items' reference answers, in nats) is reported as is;
lower is better, so a selector that helps has a negative delta vs random.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

RANDOM = "random"
BASE = "base (no fine-tuning)"
METHOD = "method"  # reference key: the selector whose number the bare "<task>" keys are
RUN_COLUMNS = ["dir", "model", "task", "selector", "budget_cfg", "budget", "seed"]
RUN_COLUMNS += ["value", "stderr", "micro", "n"]  # report.csv, one line per run and task
RUN_COLUMNS += ["loss", "loss_stderr", "loss_n"]
SINGLE = "†"  # marks a one-seed row: its ± is the evaluation's stderr, not a std over seeds


class ReportError(Exception):
    """The directory is missing or holds no finished run."""


@dataclass(frozen=True)
class RunRecord:
    """One evaluated task of one finished run (a run evaluating gsm8k+bbh gives two)."""

    dir: Path
    model: str
    task: str
    selector: str
    budget_cfg: float | int | None  # as configured: fraction (float) or count (int)
    budget: int | None  # examples selected
    seed: int | None
    value: float
    stderr: float | None
    micro: float | None
    n: int | None
    base: float | None
    base_stderr: float | None
    base_micro: float | None
    loss: float | None  # target loss of the fine-tuned model
    loss_stderr: float | None
    loss_n: int | None
    base_loss: float | None
    base_loss_stderr: float | None
    reference: dict[str, Any]
    sources: dict[str, int]
    overrides: tuple[str, ...]


@dataclass
class Sweep:
    """What a directory holds: task results of finished runs, and the runs that have none."""

    records: list[RunRecord]
    incomplete: list[Path]  # .hydra/ but no metrics.json: failed or still running
    not_evaluated: list[Path]  # metrics.json without "finetuned"

    @property
    def n_runs(self) -> int:
        return len({r.dir for r in self.records})


@dataclass(frozen=True)
class Row:
    """One line of the table; accuracies in percent."""

    model: str
    task: str
    selector: str
    budget_cfg: float | int | None
    selected: float | None  # mean examples selected over seeds
    mean: float
    std: float | None  # sample std over seeds (ddof=1); None with one seed
    stderr: float | None  # the single run's evaluation stderr, set only with one seed
    n_seeds: int
    micro: float | None
    delta_vs_random: float | None  # mean - random's mean at the same model/task/budget
    paper: float | None
    loss: float | None = None  # target loss: mean over seeds
    loss_std: float | None = None  # over seeds (ddof=1); None with one seed
    loss_stderr: float | None = None  # the single run's evaluation stderr, one seed only
    loss_delta_vs_random: float | None = None


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_run_dirs(root: Path, skip: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(dirs with a metrics.json, dirs with .hydra/ but no metrics.json) under ``root``."""
    finished, incomplete = [], []
    skip = skip.resolve() if skip is not None else None
    for d, subdirs, files in os.walk(root):
        here = Path(d)
        if "metrics.json" in files:
            finished.append(here)
        elif ".hydra" in subdirs:
            incomplete.append(here)
        subdirs[:] = [s for s in subdirs if not s.startswith(".") and (here / s).resolve() != skip]
    return sorted(finished, key=_natural), sorted(incomplete, key=_natural)


def load_run(run_dir: Path) -> list[RunRecord]:
    """One record per task the fine-tuned model was evaluated on ([] if it was not)."""
    m = json.loads((run_dir / "metrics.json").read_text())
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else None
    sizes, base = m.get("sizes") or {}, m.get("base") or {}

    def loss(res: dict | None, key: str) -> Any:
        return ((res or {}).get("target_loss") or {}).get(key)

    return [
        RunRecord(
            dir=run_dir,
            model=m.get("model_name") or "?",
            task=task,
            selector=m.get("selector") or "?",
            budget_cfg=m.get("budget_cfg", sizes.get("budget")),
            budget=sizes.get("budget"),
            seed=m.get("seed"),
            value=float(res["value"]),
            stderr=_num(res.get("stderr")),
            micro=_num(res.get("micro")),
            n=res.get("n"),
            base=_num((base.get(task) or {}).get("value")),
            base_stderr=_num((base.get(task) or {}).get("stderr")),
            base_micro=_num((base.get(task) or {}).get("micro")),
            loss=_num(loss(res, "value")),
            loss_stderr=_num(loss(res, "stderr")),
            loss_n=loss(res, "n"),
            base_loss=_num(loss(base.get(task), "value")),
            base_loss_stderr=_num(loss(base.get(task), "stderr")),
            reference=m.get("reference") or {},
            sources=m.get("selection_sources") or {},
            overrides=tuple(overrides or ()),
        )
        for task, res in (m.get("finetuned") or {}).items()
    ]


def collect_runs(root: Path, skip: Path | None = None) -> Sweep:
    """Every run under ``root`` (``skip``: a dir not to descend into, the report's own)."""
    root = Path(root)
    finished, incomplete = find_run_dirs(root, skip)
    records, not_evaluated = [], []
    for d in finished:
        try:
            found = load_run(d)
        except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
            log.warning("%s: unreadable metrics.json (%s), counted as incomplete", d, e)
            incomplete.append(d)
            continue
        records += found
        if not found:
            not_evaluated.append(d)

    def names(ds: list[Path]) -> str:
        return ", ".join(str(d.relative_to(root)) for d in ds)

    if incomplete:
        log.warning("%d incomplete run(s), skipped: %s", len(incomplete), names(incomplete))
    if not_evaluated:
        log.warning(
            "%d run(s) not evaluated, skipped: %s", len(not_evaluated), names(not_evaluated)
        )
    return Sweep(records, incomplete, not_evaluated)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def paper_number(reference: dict[str, Any], selector: str, task: str) -> float | None:
    """The paper's number for one row of the table, from a preset's ``reference`` block.

    ``reference["<selector>/<task>"]`` is a row of the paper's table (a baseline, "full" for
    the whole pool, "base" for the model without fine-tuning); the bare ``reference["<task>"]``
    is the paper's own method, the selector named by ``reference["method"]``, and only that
    selector's row gets it: a baseline the paper reports no number for gets none.
    """
    v = _number(reference.get(f"{selector}/{task}"))
    if v is None and reference.get(METHOD) == selector:
        v = _number(reference.get(task))
    return v


def _paper(records: list[RunRecord], selector: str, task: str) -> float | None:
    """The first paper number any of the group's runs carries (they share one preset)."""
    for r in records:
        v = paper_number(r.reference, selector, task)
        if v is not None:
            return v
    return None


def _warn_undeclared(records: list[RunRecord]) -> None:
    """A reference with bare "<task>" numbers but no "method" can't say whose they are."""
    tasks = {r.task for r in records}
    for source in sorted(
        {
            str(r.reference.get("source", "?"))
            for r in records
            if METHOD not in r.reference
            and any(_number(r.reference.get(t)) is not None for t in tasks)
        }
    ):
        log.warning(
            "reference %r has '<task>' numbers but no 'method' naming the selector they belong"
            " to: they are shown on no row (add reference.method)",
            source,
        )


def _budget_key(b: float | int | None) -> tuple[int, float]:
    """Fractions before counts, each ascending."""
    return (2, 0.0) if b is None else (0 if isinstance(b, float) else 1, float(b))


def row_key(row: Row) -> tuple:
    """Task, model, the base row first, budget, then random before the other selectors."""
    budget = _budget_key(row.budget_cfg)
    return (row.task, row.model, row.selector != BASE, budget, row.selector != RANDOM, row.selector)


def _spread(values: list[float], stderr: float | None) -> dict[str, Any]:
    """mean, sample std (ddof=1), and with one value its stderr instead of a std."""
    one = len(values) == 1
    return {
        "mean": statistics.fmean(values),
        "std": None if one else statistics.stdev(values),
        "stderr": stderr if one else None,
        "n_seeds": len(values),
    }


def _losses(values: list[float | None], stderr: float | None) -> dict[str, Any]:
    """Row fields of the target loss: mean over seeds, std (or the one run's stderr)."""
    xs = [x for x in values if x is not None]
    if not xs:
        return {}
    return {
        "loss": statistics.fmean(xs),
        "loss_std": statistics.stdev(xs) if len(xs) > 1 else None,
        "loss_stderr": stderr if len(xs) == 1 else None,
    }


def summarize(records: list[RunRecord]) -> list[Row]:
    """Group by (model, task, selector, budget); mean and std over seeds, delta vs random;
    one base row per (model, task) from the distinct base values."""
    _warn_undeclared(records)
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    bases: dict[tuple[str, str], dict[float, RunRecord]] = defaultdict(dict)
    for r in records:
        groups[(r.model, r.task, r.selector, r.budget_cfg)].append(r)
        if r.base is not None:
            bases[(r.model, r.task)].setdefault(r.base, r)  # identical across runs: dedupe
    random_mean = {
        (m, t, b): statistics.fmean(100 * r.value for r in rs)
        for (m, t, s, b), rs in groups.items()
        if s == RANDOM
    }
    random_loss = {
        (m, t, b): _mean([r.loss for r in rs]) for (m, t, s, b), rs in groups.items() if s == RANDOM
    }
    rows = []
    for (model, task, selector, budget_cfg), rs in groups.items():
        seeds = [r.seed for r in rs]
        if len(set(seeds)) < len(seeds):
            log.warning(
                "%s/%s/%s/%s: repeated seeds %s, averaged as if independent runs",
                *(model, task, selector, budget_cfg, seeds),
            )
        spread = _spread([100 * r.value for r in rs], _pct(rs[0].stderr))
        ref = random_mean.get((model, task, budget_cfg))
        delta = None if selector == RANDOM or ref is None else spread["mean"] - ref
        losses = _losses([r.loss for r in rs], rs[0].loss_stderr)
        ref_loss = random_loss.get((model, task, budget_cfg))
        if selector != RANDOM and ref_loss is not None and losses.get("loss") is not None:
            losses["loss_delta_vs_random"] = losses["loss"] - ref_loss
        rows.append(
            Row(
                model=model,
                task=task,
                selector=selector,
                budget_cfg=budget_cfg,
                selected=_mean([r.budget for r in rs]),
                micro=_pct(_mean([r.micro for r in rs])),
                delta_vs_random=delta,
                paper=_paper(rs, selector, task),
                **spread,
                **losses,
            )
        )
    for (model, task), distinct in bases.items():
        first = next(iter(distinct.values()))
        mine = [r for r in records if (r.model, r.task) == (model, task)]
        rows.append(
            Row(
                model=model,
                task=task,
                selector=BASE,
                budget_cfg=None,
                selected=None,
                micro=_pct(_mean([r.base_micro for r in distinct.values()])),
                delta_vs_random=None,
                paper=_paper(mine, "base", task),
                **_spread([100 * v for v in distinct], _pct(first.base_stderr)),
                **_losses([first.base_loss], first.base_loss_stderr),
            )
        )
    return sorted(rows, key=row_key)


def budget_label(b: float | int | None) -> str:
    """0.05 -> "5%", 100 -> "100"."""
    if b is None:
        return ""
    return f"{round(100 * b, 6):g}%" if isinstance(b, float) else str(b)


def _cells(row: Row) -> dict[str, str]:
    err = row.std if row.std is not None else row.stderr
    acc = f"{row.mean:.1f}" + ("" if err is None else f" ± {err:.1f}")
    if row.std is None and err is not None:
        acc += SINGLE
    delta = row.delta_vs_random
    loss_err = row.loss_std if row.loss_std is not None else row.loss_stderr
    loss = "" if row.loss is None else f"{row.loss:.3f}"
    if row.loss is not None and loss_err is not None:
        loss += f" ± {loss_err:.3f}" + (SINGLE if row.loss_std is None else "")
    dl = row.loss_delta_vs_random
    return {
        "task": row.task,
        "model": row.model,
        "selector": row.selector,
        "budget": budget_label(row.budget_cfg),
        "selected": "" if row.selected is None else f"{row.selected:.0f}",
        "accuracy": acc,
        "micro": "" if row.micro is None else f"{row.micro:.1f}",
        "seeds": str(row.n_seeds),
        "delta": "—" if delta is None else f"{delta:+.1f}",
        "paper": "" if row.paper is None else f"{row.paper:.1f}",
        "loss": loss,
        "loss_delta": "—" if dl is None else f"{dl:+.3f}",
    }


def _columns(rows: list[Row]) -> list[tuple[str, str, str]]:
    """(key, markdown header, LaTeX header); model, micro and paper only when they inform."""
    cols = [("task", "task", "Task")]
    if len({r.model for r in rows}) > 1:
        cols.append(("model", "model", "Model"))
    cols += [
        ("selector", "selector", "Selector"),
        ("budget", "budget", "Budget"),
        ("selected", "selected", "Selected"),
        ("accuracy", "accuracy (%)", r"Accuracy (\%)"),
    ]
    if any(r.micro is not None for r in rows):
        cols.append(("micro", "micro (%)", r"Micro (\%)"))
    cols += [("seeds", "seeds", "Seeds"), ("delta", "Δ vs random", r"$\Delta$ vs random")]
    if any(r.loss is not None for r in rows):
        cols += [
            ("loss", "target loss", "Target loss"),
            ("loss_delta", "Δ loss vs random", r"$\Delta$ loss vs random"),
        ]
    if any(r.paper is not None for r in rows):
        cols.append(("paper", "paper", "Paper"))
    return cols


def _single_note(rows: list[Row]) -> list[str]:
    if any(r.std is None and r.stderr is not None for r in rows):
        return [f"{SINGLE} one seed: ± is the evaluation's standard error, not a std over seeds."]
    return []


def to_markdown(rows: list[Row], title: str | None = None, notes: list[str] = ()) -> str:
    """The table as GitHub markdown, with footnotes and ``notes`` below it."""
    cols = _columns(rows)
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = _cells(row)
        lines.append("| " + " | ".join(cells[c[0]] for c in cols) + " |")
    tail = _single_note(rows) + list(notes)
    return "\n".join(lines + ([""] + tail if tail else [])) + "\n"


_TEX = {
    "\\": r"\textbackslash{}",
    "_": r"\_",
    "%": r"\%",
    "&": r"\&",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
}


def tex_escape(text: str) -> str:
    """Escape LaTeX specials; ± and † become math, the em dash an en dash."""
    out = "".join(_TEX.get(c, c) for c in text)
    return out.replace("±", r"$\pm$").replace(SINGLE, r"$^\dagger$").replace("—", "--")


def to_latex(rows: list[Row], caption: str | None = None) -> str:
    """The table as a booktabs ``table`` float, a midrule between tasks."""
    cols = _columns(rows)
    align = "".join("l" if c[0] in ("task", "model", "selector") else "r" for c in cols)
    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(rf"\caption{{{tex_escape(caption)}}}")
    lines += [rf"\begin{{tabular}}{{{align}}}", r"\toprule"]
    lines += [" & ".join(c[2] for c in cols) + r" \\", r"\midrule"]
    for i, row in enumerate(rows):
        if i and row.task != rows[i - 1].task:
            lines.append(r"\midrule")
        cells = _cells(row)
        lines.append(" & ".join(tex_escape(cells[c[0]]) for c in cols) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\\[2pt]{{\footnotesize {tex_escape(n)}}}" for n in _single_note(rows)]
    return "\n".join(lines + [r"\end{table}"]) + "\n"


def composition(records: list[RunRecord], top: int = 12) -> dict[tuple, dict[str, float]]:
    """Share of selected examples per source for each (model, task, selector, budget) group,
    summed over seeds; the ``top`` sources overall by count, the rest as "other"."""
    groups: dict[tuple, Counter] = defaultdict(Counter)
    for r in records:
        if r.sources:
            groups[(r.model, r.task, r.selector, r.budget_cfg)].update(r.sources)
    totals = sum(groups.values(), Counter())
    keep = [s for s, _ in totals.most_common(top)]
    out = {}
    for key, counts in groups.items():
        total = sum(counts.values())
        shares = {s: counts[s] / total for s in keep if counts[s]}
        other = total - sum(counts[s] for s in keep)
        if other:
            shares["other"] = other / total
        out[key] = shares
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_budget(rows: list[Row], path: Path) -> Path:
    """One panel per task: accuracy vs budget per selector (std error bars), base dashed."""
    plt = _pyplot()
    tasks = sorted({r.task for r in rows})
    multi = len({r.model for r in rows}) > 1
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 3.8), squeeze=False)
    colors: dict[tuple[str, str], Any] = {}
    for ax, task in zip(axes[0], tasks, strict=True):
        mine = [r for r in rows if r.task == task]
        tuned = [r for r in mine if r.selector != BASE and r.budget_cfg is not None]
        as_pct = all(isinstance(r.budget_cfg, float) for r in tuned)
        lines: dict[tuple[str, str], list[Row]] = defaultdict(list)
        for r in tuned:
            lines[(r.model, r.selector)].append(r)
        for (model, selector), rs in lines.items():
            pts = sorted(
                ((100 * r.budget_cfg if as_pct else (r.selected or r.budget_cfg), r) for r in rs),
                key=lambda p: p[0],
            )
            color = colors.setdefault((model, selector), f"C{len(colors) % 10}")
            ax.errorbar(
                [x for x, _ in pts],
                [r.mean for _, r in pts],
                yerr=[r.std if r.std is not None else (r.stderr or 0.0) for _, r in pts],
                marker="o",
                capsize=3,
                color=color,
                label=f"{selector} ({model})" if multi else selector,
            )
        for r in mine:
            if r.selector == BASE:
                label = f"base ({r.model})" if multi else "base"
                ax.axhline(r.mean, linestyle="--", color="gray", linewidth=1, label=label)
        ax.set_title(task)
        ax.set_xlabel("budget (% of pool)" if as_pct else "budget (examples selected)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_composition(records: list[RunRecord], path: Path, top: int = 12) -> Path | None:
    """One stacked horizontal bar of source shares per group; None when no run has sources."""
    shares = composition(records, top)
    if not shares:
        return None
    plt = _pyplot()
    keys = sorted(
        shares,
        key=lambda k: (k[1], k[0], _budget_key(k[3]), k[2] != RANDOM, k[2]),
    )
    multi = len({k[0] for k in keys}) > 1
    labels = [
        f"{t} · {s} · {budget_label(b)}" + (f" · {m}" if multi else "") for m, t, s, b in keys
    ]
    sources = list(dict.fromkeys(s for k in keys for s in shares[k] if s != "other"))
    sources.sort(key=lambda s: -sum(shares[k].get(s, 0.0) for k in keys))
    sources += ["other"] * any("other" in shares[k] for k in keys)
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.45 * len(keys)))
    cmap = plt.get_cmap("tab20")
    left = [0.0] * len(keys)
    for i, src in enumerate(sources):
        width = [shares[k].get(src, 0.0) for k in keys]
        color = "lightgray" if src == "other" else cmap(i % 20)
        ax.barh(range(len(keys)), width, left=left, color=color, label=src)
        left = [a + b for a, b in zip(left, width, strict=True)]
    ax.set_yticks(range(len(keys)), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of selected examples")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def sweep_overrides(root: Path, records: list[RunRecord]) -> list[str]:
    """The sweep's command-line overrides: from Hydra's multirun.yaml when present, else
    each run's overrides merged as key=v1,v2 (what ``-m`` would take for a grid)."""
    multirun = Path(root) / "multirun.yaml"
    if multirun.exists():
        hydra = (yaml.safe_load(multirun.read_text()) or {}).get("hydra") or {}
        task = (hydra.get("overrides") or {}).get("task")
        if task:
            return [str(o) for o in task]
    values: dict[str, list[str]] = {}
    for overrides in dict.fromkeys(r.overrides for r in records):
        for o in overrides:
            k, _, v = str(o).partition("=")
            if v not in values.setdefault(k, []):
                values[k].append(v)
    return [f"{k}={','.join(v)}" for k, v in values.items()]


def write_report(
    root: Path, out: Path | None = None, name: str | None = None, command: str | None = None
) -> dict[str, Path]:
    """Collect, summarize and write every report file under ``out`` (default root/report)."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root}: no such directory")
    out = Path(out) if out is not None else root / "report"
    sweep = collect_runs(root, skip=out)
    if not sweep.records:
        raise ReportError(
            f"{root}: no finished run (no metrics.json with fine-tuned results; "
            f"{len(sweep.incomplete)} incomplete, {len(sweep.not_evaluated)} not evaluated)"
        )
    rows = summarize(sweep.records)
    out.mkdir(parents=True, exist_ok=True)

    overrides = sweep_overrides(root, sweep.records)
    footer = (
        f"Runs: {sweep.n_runs} finished, {len(sweep.incomplete)} incomplete, "
        f"{len(sweep.not_evaluated)} not evaluated."
        + (f" Sweep overrides: `{' '.join(overrides)}`." if overrides else "")
        + (f" Command: `{command}`." if command else "")
    )
    sources = sorted({str(r.reference["source"]) for r in sweep.records if "source" in r.reference})
    models = sorted({r.model for r in sweep.records})
    notes = [f"Model: {models[0]}."] if len(models) == 1 else []
    notes += ([f"Paper: {'; '.join(sources)}."] if sources else []) + [footer]

    paths = {"md": out / "report.md", "tex": out / "report.tex"}
    paths["md"].write_text(to_markdown(rows, name, notes))
    paths["tex"].write_text(to_latex(rows, name))

    paths["csv"] = out / "report.csv"
    with open(paths["csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RUN_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in sweep.records:
            writer.writerow({**asdict(r), "dir": r.dir.relative_to(root).as_posix()})
    paths["summary"] = out / "summary.csv"
    with open(paths["summary"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)

    if any(r.loss is not None for r in sweep.records):
        from dataselect.report import effect

        erows = effect.effect_rows(sorted({r.dir for r in sweep.records}, key=_natural))
        paths["effect"] = out / "effect.md"
        paths["effect"].write_text(
            "## Against random and the base model (95% intervals)\n\n"
            + effect.to_markdown(erows)
            + f"\n{effect.NOTE}\n"
        )
        (out / "effect.json").write_text(json.dumps(effect.summary(erows), indent=1))
    paths["accuracy_vs_budget"] = plot_accuracy_vs_budget(rows, out / "accuracy_vs_budget.png")
    comp = plot_composition(sweep.records, out / "composition.png")
    if comp is None:
        log.warning("no run has selection_sources: composition.png not drawn")
    else:
        paths["composition"] = comp
    return paths
