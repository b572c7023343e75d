"""Corruption drills: cache files damaged after they were written (a copy gone wrong, a
failing disk, a sync tool), on the drills' tiny pipeline (``drills.py``).

Complete cache entries (a store shard with one byte flipped, another cut short, an adapter
with one byte flipped): each is refused where a run reuses it, naming the file;
``dataselect verify`` reports each; ``dataselect verify --remove`` deletes them; the next
run rebuilds them, and the cache ends equal to the reference run's. Partial work a killed
run left behind (a resume file, a finished shard of an unfinished store) with one byte
flipped: the re-run must not resume from it, recompute it instead, and end equal to the
reference.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from drills import Drill, Workspace, differences, digest, kill_when_written


def slug(name: str) -> str:
    """A drill's directory name (Hydra overrides take no spaces or commas)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def flip_byte(path: Path) -> str:
    """XOR one byte in the middle of ``path`` with 0xFF (the size stays the same)."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return f"byte {at:,} of {path.name} flipped"


def truncate(path: Path) -> str:
    """Cut ``path`` to half its size (a copy that stopped early)."""
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    return f"{path.name} cut from {size:,} to {size // 2:,} bytes"


def _verify(cache: Path, *flags: str) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "dataselect", "verify", str(cache), *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


# (stage, file in its entry, damage): what the complete-entry drill does to a copy of the
# reference cache, all at once (each entry is refused on its own, see below)
DAMAGES = (
    ("features", "shard_00001.npy", flip_byte),
    ("features", "shard_00000.npy", truncate),
    ("warmup", "epoch_1/adapter/adapter_model.safetensors", flip_byte),
)


def complete_entry_drill(ws: Workspace, name: str = "damaged complete entries") -> Drill:
    """``DAMAGES`` in a copy of the reference cache. Each damaged entry is refused where a
    run reuses it (``materialize``, naming the file), and a real run stops on the first it
    meets; ``dataselect verify`` reports every damaged file; ``verify --remove`` deletes
    the entries; the next run rebuilds them, equal to the reference."""
    from dataselect.cache import materialize
    from dataselect.integrity import DamagedArtifact

    ref, run = digest(ws.reference()), slug(name)
    cache = ws.root / run / "cache"
    shutil.rmtree(ws.root / run, ignore_errors=True)
    shutil.copytree(ws.reference(), cache)
    entries, did = {}, []
    for stage, rel, damage in DAMAGES:
        entry = next(p for p in sorted((cache / stage).glob("[!.]*")) if (p / rel).is_file())
        entries.setdefault(entry, []).append(rel)
        did.append(f"{stage}: {damage(entry / rel)}")
    refused = []
    for entry, rels in entries.items():
        try:
            materialize(entry, lambda work: None)
        except DamagedArtifact as e:
            refused += [rel for rel in rels if rel in str(e) and str(entry) in str(e)]
    rc, text = ws.run(run)
    stopped = rc != 0 and any(f"damaged cache entry {e}" in text for e in entries)
    vrc, vtext = _verify(cache)
    reported = [rel for rels in entries.values() for rel in rels if f"  {rel}: " in vtext]
    rrc, _ = _verify(cache, "--remove")
    rc2, _ = ws.run(run)
    diff = differences(ref, digest(cache))
    n = len(DAMAGES)
    outcome = (
        f"{'; '.join(did)}; refused on reuse: {len(refused)}/{n}; run rc {rc}: "
        f"{'stopped, naming the entry' if stopped else 'DID NOT STOP'}; verify rc {vrc}: "
        f"{len(reported)}/{n} reported; verify --remove rc {rrc}; next run rc {rc2}: rebuilt"
    )
    if diff:
        outcome += f"; differs: {diff[:3]}"
    ok = len(refused) == len(reported) == n and stopped and vrc == 1 and rrc == 0
    return Drill(name, outcome, not diff, ok and rc2 == 0 and not diff)


def partial_work_drill(ws: Workspace, name: str, stage: str, marker: str, rel: str) -> Drill:
    """Kill the run once ``stage`` wrote ``marker``, flip a byte of ``rel`` in its work dir:
    the re-run must not trust it (``says``) and end with the reference artifacts."""
    ref, run = digest(ws.reference()), slug(name)
    shutil.rmtree(ws.root / run, ignore_errors=True)
    cache = ws.root / run / "cache"
    work, failed = kill_when_written(ws, run, stage, marker)
    if work is None:
        return Drill(name, failed, None, False)
    what = flip_byte(work / rel)
    rc, text = ws.run(run)
    says = {"warmup": "discarding the checkpoints", "features": "is damaged"}[stage]
    distrusted = says in text and "resuming from epoch_1" not in text
    diff = differences(ref, digest(cache))
    outcome = (
        f"killed after {stage} wrote {marker}, then {what}; re-run rc {rc}: "
        f"{'not trusted, recomputed' if distrusted else 'TRUSTED'}"
    )
    if diff:
        outcome += f"; differs: {diff[:3]}"
    return Drill(name, outcome, not diff, rc == 0 and distrusted and not diff)


def corruption_drills(ws: Workspace) -> list[Drill]:
    return [
        complete_entry_drill(ws),
        partial_work_drill(
            ws,
            "resume file, one byte flipped",
            "warmup",
            "epoch_1/COMPLETE",
            "epoch_1/trainer.ckpt",
        ),
        partial_work_drill(
            ws,
            "finished shard of an unfinished store, one byte flipped",
            "features",
            "shard_00002.COMPLETE",
            "shard_00001.npy",
        ),  # fmt: skip
    ]
