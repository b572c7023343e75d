"""Fault drills: kill the pipeline at random points, run it twice at once, feed it bad input,
fill its disk, poison its gradients; then check it lost nothing and trusted nothing broken.

Each drill returns a ``Drill(name, outcome, identical, ok)`` row: ``identical`` says whether
the artifacts a drill ended with are byte-identical to an uninterrupted reference run
(``digest`` below: every result-bearing file of every cache entry), ``ok`` whether the drill
passed. ``experiments/reliability/drill.py`` runs them all and prints the table; the tests run
each one at a small size.

Every pipeline run here is a real ``python -m dataselect`` process on the tiny random model,
so a kill is a real SIGKILL: no ``finally`` runs, no buffer is flushed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Files whose bytes record how or when an artifact was made, not what it holds.
VOLATILE = {"COMPLETE", "train_log.json"}
VOLATILE_DIRS = {"lm_eval", "lm_eval_tasks", "csv", "wandb", "lightning_logs"}

# The tiny pipeline every drill runs: a LESS selection (so every stage has real work), small
# shards (so a featurize kill lands between shards), 3 warmup epochs (between checkpoints),
# a two-task target (two benchmarks).
TINY = [
    "logger=csv",
    "selector=less",
    "pool.sources=[{kind: reasoning_gym, name: chain_sum, n: 48, seed: 1},"
    "{kind: reasoning_gym, name: gsm_symbolic, n: 16, seed: 2}]",
    "target.gsm_symbolic.validation=[{kind: reasoning_gym, name: gsm_symbolic, n: 4, seed: 3}]",
    "target.gsm_symbolic.test=[{kind: reasoning_gym, name: gsm_symbolic, n: 6, seed: 4}]",
    # a second task, so evaluation has two benchmarks to resume between
    "+target.chain_sum={validation: [{kind: reasoning_gym, name: chain_sum, n: 2, seed: 5}],"
    " test: [{kind: reasoning_gym, name: chain_sum, n: 4, seed: 6}]}",
    "budget=8",
    "warmup.epochs=3",
    "warmup.fraction=0.25",
    "finetune.epochs=2",
    "features.shard_size=8",
    "features.sketch.dim=64",
    "evaluator.max_gen_toks=8",
    "evaluator.limit=4",
    "evaluator.batch_size=2",
    "evaluator.include_base=false",
]


@dataclass
class Drill:
    name: str
    outcome: str
    identical: bool | None  # None: nothing to compare (an error was the expected end)
    ok: bool


@dataclass
class Workspace:
    """A drill directory: a tiny model outside any cache (its path is in adapter configs, so
    every run must see the same one) and the reference run's cache."""

    root: Path
    model: Path

    @classmethod
    def create(cls, root: Path) -> Workspace:
        from dataselect.models import build_tiny_random

        root.mkdir(parents=True, exist_ok=True)
        model = root / "tiny-model"
        if not (model / "config.json").is_file():
            build_tiny_random(model, seed=0)
        return cls(root, model)

    def overrides(self, cache: Path, out: Path, *extra: str) -> list[str]:
        return [
            *TINY,
            "model=tiny_random",
            f"model.name={self.model}",
            f"paths.cache_dir={cache}",
            f"paths.output_dir={out}",
            *extra,
        ]

    def start(self, name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
        """A pipeline process with its own cache ``root/name/cache``; stdout+stderr to a log."""
        run_dir = self.root / name
        run_dir.mkdir(parents=True, exist_ok=True)
        return self.start_in(run_dir / "cache", run_dir / f"out{_count(run_dir)}", *extra)

    def start_in(self, cache: Path, out: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
        out.mkdir(parents=True, exist_ok=True)
        log = out / "run.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
        env["DATASELECT_OUTPUTS"] = str(out / "hydra")  # Hydra's run dir: not the checkout
        env["DATASELECT_PROGRESS_EVERY"] = "0"  # a progress line per batch: the log shows them
        cmd = [sys.executable, "-m", "dataselect", *self.overrides(cache, out, *extra)]
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        return proc, log

    def run(self, name: str, *extra: str, timeout: float = 900) -> tuple[int, str]:
        proc, log = self.start(name, *extra)
        return _wait(proc, timeout), log.read_text()

    def reference(self) -> Path:
        """The uninterrupted run's cache (made once per workspace)."""
        cache = self.root / "reference" / "cache"
        if not (self.root / "reference" / "done").is_file():
            rc, text = self.run("reference")
            if rc != 0:
                raise RuntimeError(f"the reference run failed:\n{text[-3000:]}")
            (self.root / "reference" / "done").write_text("")
        return cache


@functools.cache
def cache_stages() -> tuple[str, ...]:
    """The cache folders the drills' run writes, in graph order: read off the dry run of the
    same config (the stage graph is declared once, in ``dataselect.stages``)."""
    from hydra import compose, initialize_config_dir

    from dataselect import plan
    from dataselect.config import CONF_DIR

    with (
        tempfile.TemporaryDirectory() as tmp,
        initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"),
    ):
        paths = [f"paths.cache_dir={tmp}/c", f"paths.output_dir={tmp}/o"]
        steps = plan.plan(compose("config", overrides=[*TINY, "model=tiny_random", *paths])).steps
    return tuple(dict.fromkeys(s.stage for s in steps))


def kill_stages() -> tuple[str, ...]:
    """The graph's stages the kill drills interrupt: those with a unit of work to resume from
    (``PROGRESS``); the others finish in well under a second."""
    from dataselect.stages import STAGES

    return tuple(s.name for s in STAGES if s.name in PROGRESS)


def _count(run_dir: Path) -> int:
    return len(list(run_dir.glob("out*")))


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9


def digest(cache: Path) -> dict[str, str]:
    """``stage/key/file`` -> sha256 for every result-bearing file of every complete artifact
    (timings, logs and lock files left out); partial work dirs are not artifacts."""
    out = {}
    for stage in cache_stages():
        for art in sorted((cache / stage).glob("[!.]*")):
            for f in sorted(art.rglob("*")):
                rel = f.relative_to(art)
                if (
                    f.is_file()
                    and f.name not in VOLATILE
                    and not f.name.startswith(".")
                    and not VOLATILE_DIRS & set(rel.parts)
                ):
                    out[f"{stage}/{art.name}/{rel}"] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def digest_dirs(cache: Path) -> set[str]:
    return {"/".join(k.split("/")[:2]) for k in digest(cache)}


def differences(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def partial_stages(cache: Path) -> list[str]:
    """Stages with a work dir in progress (what a kill interrupts)."""
    return [s for s in cache_stages() if any((cache / s).glob(".*.partial"))]


def stage_seconds(cache: Path) -> dict[str, float]:
    """How long each stage took in a run (from the COMPLETE markers)."""
    out: dict[str, float] = {}
    for stage in cache_stages():
        for marker in (cache / stage).glob("*/COMPLETE"):
            out[stage] = out.get(stage, 0.0) + json.loads(marker.read_text())["seconds"]
    return out


# ---- the drills --------------------------------------------------------------------------


def kill_drill(ws: Workspace, stage: str, rng: random.Random, name: str | None = None) -> Drill:
    """SIGKILL the pipeline at a random moment of ``stage`` (uniform over the stage's reference
    duration, from the moment its work dir appears), re-run it, compare with the reference."""
    ref = digest(ws.reference())
    seconds = stage_seconds(ws.root / "reference" / "cache").get(stage, 1.0)
    name = name or f"kill-{stage}-{rng.randrange(10**6)}"
    proc, log = ws.start(name)
    cache = ws.root / name / "cache"
    deadline = time.time() + 600
    while not any((cache / stage).glob(".*.partial")):
        if proc.poll() is not None or time.time() > deadline:
            text = log.read_text()[-2000:]
            return Drill(
                name, f"stage {stage} never started (rc {proc.returncode}): {text}", None, False
            )
        time.sleep(0.005)
    delay = rng.uniform(0, seconds)
    time.sleep(delay)
    at = partial_stages(cache)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    rc, text = ws.run(name)
    got = digest(cache)
    diff = differences(ref, got)
    found = re.findall(r"\] - ([^\n]*resuming[^\n]*)", text)
    resumed = [re.sub(r" \(?/\S+", "", m)[:70] for m in found]  # paths left out
    where = f"killed {delay:.2f}s into {stage} (in progress: {', '.join(at) or 'none'})"
    outcome = f"{where}; re-run rc {rc}: {'; '.join(resumed) or 'nothing to resume'}"
    if diff:
        outcome += f"; differs: {diff[:3]}"
    return Drill(name, outcome, not diff, killed and rc == 0 and not diff)


# What a stage has finished when a kill should find something to resume, and what the re-run
# then says.
PROGRESS = {
    "warmup": ("epoch_1/COMPLETE", "resuming from epoch_1"),
    "features": ("shard_00002.COMPLETE", "featurize: resuming"),
    "finetune": ("epoch_1/COMPLETE", "resuming from epoch_1"),
    "evaluate": ("lm_eval/results/*.json", "benchmarks already done, resuming"),
}


def kill_when_written(ws: Workspace, run: str, stage: str, marker: str) -> tuple[Path | None, str]:
    """Start run ``run`` and SIGKILL it once ``stage``'s work dir holds ``marker``. Returns
    (that work dir, "") or (None, why it never got there)."""
    proc, log = ws.start(run)
    cache = ws.root / run / "cache"
    deadline = time.time() + 600
    while not (found := list((cache / stage).glob(f".*.partial/{marker}"))):
        if proc.poll() is not None or time.time() > deadline:
            text = log.read_text()[-2000:]
            return None, f"{stage} never reached {marker} (rc {proc.returncode}): {text}"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return found[0].parents[len(Path(marker).parts) - 1], ""


def kill_after_progress_drill(ws: Workspace, stage: str, name: str | None = None) -> Drill:
    """SIGKILL the pipeline as soon as ``stage`` has finished a unit of work (an epoch
    checkpoint, a shard, a benchmark): the re-run must resume from it, not start over, and end
    with the reference artifacts."""
    ref = digest(ws.reference())
    marker, says = PROGRESS[stage]
    name = name or f"kill-{stage}-after-progress"
    cache = ws.root / name / "cache"
    _, failed = kill_when_written(ws, name, stage, marker)
    if failed:
        return Drill(name, failed, None, False)
    rc, text = ws.run(name)
    diff = differences(ref, digest(cache))
    resumed = says in text
    outcome = f"killed after {stage} wrote {marker}; re-run rc {rc}: " + (
        "resumed (" + says + ")" if resumed else "DID NOT RESUME"
    )
    if diff:
        outcome += f"; differs: {diff[:3]}"
    return Drill(name, outcome, not diff, rc == 0 and resumed and not diff)


def concurrent_drill(ws: Workspace) -> Drill:
    """Two processes on one empty cache at once: each artifact is built once, both succeed,
    the cache equals the reference."""
    ref = digest(ws.reference())
    cache = ws.root / "concurrent" / "cache"
    procs = [ws.start_in(cache, ws.root / "concurrent" / f"out{i}") for i in range(2)]
    rcs = [_wait(p, 900) for p, _ in procs]
    texts = [log.read_text() for _, log in procs]
    built = Counter(m for t in texts for m in re.findall(r"\] - \w+: built (\S+)", t))
    waits = sum(t.count("waiting for") for t in texts)
    diff = differences(ref, digest(cache))
    once = bool(built) and set(built.values()) == {1}
    n_art = len(digest_dirs(cache))
    outcome = (
        f"rc {rcs}; {len(built)} artifacts built, {max(built.values(), default=0)}x at most "
        f"({n_art} in the cache); {waits} waits for the other process"
    )
    return Drill("concurrent pair", outcome, not diff, rcs == [0, 0] and once and not diff)


def determinism_drill(ws: Workspace) -> Drill:
    """The same config and seed on fresh caches: the same selected ids, in order, with one
    process (the reference run, and once more) and with 2 DDP featurizing ranks."""
    ws.reference()
    sel = {"reference": (ws.root / "reference" / "out0" / "selection.jsonl").read_text()}
    for name, extra in (
        ("det-a", []),
        ("det-ddp", ["features.distributed.mode=ddp", "features.distributed.devices=2"]),
    ):
        rc, text = ws.run(name, "stage=select", *extra)
        if rc != 0:
            return Drill("determinism", f"{name} failed: {text[-1500:]}", None, False)
        sel[name] = (ws.root / name / "out0" / "selection.jsonl").read_text()
    same = len(set(sel.values())) == 1
    n = len(sel["det-a"].splitlines())
    outcome = f"{n} ids; run twice and 1 vs 2 processes: {'same order' if same else 'DIFFER'}"
    return Drill("determinism (runs, 1 vs 2 processes)", outcome, same, same)


def _in_child(code: str, timeout: float = 600) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
    )
    return proc.returncode, proc.stdout + proc.stderr


def _pipeline_code(ws: Workspace, cache: Path, out: Path, *extra: str, before: str = "") -> str:
    """Python that runs the pipeline in-process (so a fault can be patched in first)."""
    overrides = ws.overrides(cache, out, *extra)
    return f"""
import errno, os, sys
import numpy as np
from hydra import compose, initialize_config_dir
import dataselect.config
from dataselect.cli import main_cfg
from dataselect.config import CONF_DIR
{before}
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose("config", overrides={overrides!r})
try:
    main_cfg(cfg)
except BaseException as err:
    print("ERROR", type(err).__name__, err, file=sys.stderr)
    sys.exit(3)
"""


FULL_DISK = """
import dataselect.features.store as store_mod
_real, _n = np.lib.format.write_array, [0]
def _full(fh, arr, **kw):
    _n[0] += 1
    if _n[0] == 3:  # the third shard finds the disk full, half-way through
        fh.write(b"\\x93NUMPY" + b"x" * 64)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _real(fh, arr, **kw)
np.lib.format.write_array = _full
"""


def full_disk_drill(ws: Workspace) -> Drill:
    """The disk fills while a shard is written: a clear error naming the shard, no partial
    shard left, and the re-run resumes to the reference store."""
    ref = {k: v for k, v in digest(ws.reference()).items() if k.startswith("features")}
    cache, out = ws.root / "full-disk" / "cache", ws.root / "full-disk" / "out"
    rc, text = _in_child(_pipeline_code(ws, cache, out, "stage=features", before=FULL_DISK))
    err = next((ln for ln in text.splitlines() if ln.startswith("ERROR")), "")
    work = next((cache / "features").glob(".*.partial"), None)
    files = sorted(p.name for p in work.iterdir()) if work else []
    complete = {f.split(".")[0] for f in files if f.endswith(".COMPLETE")}
    orphans = [f for f in files if f.startswith("shard_") and f.split(".")[0] not in complete]
    rc2, text2 = ws.run("full-disk", "stage=features")
    got = {k: v for k, v in digest(cache).items() if k.startswith("features")}
    diff = differences(ref, got)
    clear = "No space left on device while writing shard 2" in err and "no partial shard" in err
    outcome = f"{err[:110]}...; partial shard files left: {len(orphans)}; re-run rc {rc2}"
    ok = rc == 3 and clear and not orphans and rc2 == 0 and not diff
    return Drill("disk full while writing a shard", outcome, not diff, ok)


def _error_drill(ws: Workspace, name: str, rc: int, text: str, expect: str) -> Drill:
    err = next((ln for ln in text.splitlines() if ln.startswith("ERROR")), text[-300:])
    ok = rc == 3 and expect in err
    return Drill(name, err.replace(str(ws.root), "<ws>")[:240], None, ok)


NAN_WARMUP = """
import torch
from dataselect.training import checkpoint as ck
_real = ck.EpochCheckpoint.on_train_epoch_end
def _poisoned(self, trainer, pl_module):
    for n, p in pl_module.named_parameters():
        if p.requires_grad and "lora_B" in n:
            with torch.no_grad():
                p.fill_(float("nan"))
    return _real(self, trainer, pl_module)
ck.EpochCheckpoint.on_train_epoch_end = _poisoned
"""


def nan_drill(ws: Workspace) -> Drill:
    """A warmup whose weights became NaN: the run stops with an error naming the cause and
    leaves no artifact a later run would trust."""
    cache, out = ws.root / "nan" / "cache", ws.root / "nan" / "out"
    rc, text = _in_child(_pipeline_code(ws, cache, out, "stage=features", before=NAN_WARMUP))
    trusted = [p for s in ("warmup", "features") for p in (cache / s).glob("[!.]*")]
    drill = _error_drill(ws, "NaN / inf gradients", rc, text, "non-finite")
    drill.ok = drill.ok and not trusted
    return drill


def _store_at(cache: Path, epoch: str) -> Path:
    """The pool store of warmup checkpoint ``epoch`` in a cache."""
    for p in (cache / "features").glob("[!.]*"):
        if json.loads((p / "meta.json").read_text())["spec"]["checkpoint"].endswith(epoch):
            return p
    raise FileNotFoundError(f"no pool store at {epoch} in {cache}")


def foreign_store_drill(ws: Workspace, what: str) -> Drill:
    """A cache entry swapped for a store built for another sketch seed (``what=sketch``) or
    another model (``what=model``): the run refuses it, naming the difference."""
    import shutil

    from dataselect.features.store import GradientStore

    ref = ws.reference()
    cache = ws.root / f"foreign-{what}" / "cache"
    if cache.exists():
        shutil.rmtree(cache)
    shutil.copytree(ref, cache)
    store = _store_at(cache, "epoch_1")
    if what == "sketch":
        other = "features.sketch.seed=99"
    else:  # the same architecture, other weights: a store whose rows look just as plausible
        from dataselect.models import build_tiny_random

        second = ws.root / "tiny-model-2"
        if not (second / "config.json").is_file():
            build_tiny_random(second, seed=1)
        other = f"model.name={second}"
    rc, text = ws.run(f"foreign-{what}-build", other, "stage=features")
    donor_cache = ws.root / f"foreign-{what}-build" / "cache"
    donor = _store_at(donor_cache, "epoch_1")
    shutil.rmtree(store)
    shutil.copytree(donor, store)  # the cache now lies: the key says one thing, the store another
    GradientStore(store)  # still a well-formed store
    rc, text = _in_child(_pipeline_code(ws, cache, ws.root / f"foreign-{what}" / "out"))
    expect = "sketch.seed" if what == "sketch" else "model.name"
    drill = _error_drill(ws, f"gradient store from another {what}", rc, text, expect)
    drill.ok = drill.ok and "not written for this run" in text
    return drill


def bad_input_drills(ws: Workspace, entry: str = "pipeline") -> list[Drill]:
    """Every case of the bad-input corpus (``corpus.py`` beside this file), through
    ``run_pipeline`` itself: a clear error (file, line, field) or a counted skip."""
    import corpus

    rows = []
    for case in corpus.CASES:
        d = ws.root / "bad-input" / case.name
        try:
            line = corpus.verify(case, d, ws.root / "bad-input-cache", entry=entry)
            ok = True
        except AssertionError as err:
            line, ok = str(err), False
        outcome = line.split(": ", 1)[-1].replace(str(d), "<dir>")
        rows.append(Drill(f"bad input: {case.name}", outcome[:160], None, ok))
    return rows


def table(rows: list[Drill]) -> str:
    def yes(v: bool | None) -> str:
        return "n/a" if v is None else ("yes" if v else "NO")

    lines = ["| drill | outcome | artifacts identical | pass |", "|---|---|---|---|"]
    for r in rows:
        outcome = r.outcome.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.name} | {outcome} | {yes(r.identical)} | {yes(r.ok)} |")
    return "\n".join(lines)
