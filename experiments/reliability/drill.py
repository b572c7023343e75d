"""Fault drills for dataselect: kills at random points of every stage, a concurrent pair, the
bad-input corpus, a full disk, NaN gradients, foreign stores, damaged cache files
(``corruption.py``), determinism (1 vs 2 processes).

    python experiments/reliability/drill.py                    # every drill, 2 kills per stage
    python experiments/reliability/drill.py --kills 5 --seed 1 --only kill
    python experiments/reliability/drill.py --out /tmp/drills --table table.md

Prints the table (drill, outcome, artifacts identical, pass) and exits non-zero if a drill
failed. Every pipeline run is a real ``python -m dataselect`` process on the tiny random
model (CPU), so a kill is a real SIGKILL. The logic lives in ``drills.py`` beside this script
(the tests run the same drills at a small size); ``python experiments/reliability/corpus.py``
prints the table of the bad-input cases.
"""

from __future__ import annotations

import argparse
import platform
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import drills as d
from corruption import corruption_drills

GROUPS = ("kill", "concurrent", "determinism", "disk", "nan", "foreign", "corrupt", "bad-input")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="workspace (default: a temp dir)")
    ap.add_argument("--kills", type=int, default=2, help="random kills per stage")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    ap.add_argument("--only", nargs="*", choices=GROUPS, default=list(GROUPS))
    ap.add_argument("--table", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="dataselect-drills-"))
    ws = d.Workspace.create(root)
    rng = random.Random(args.seed)
    t0 = time.time()
    rows: list[d.Drill] = []

    def report(new: list[d.Drill]) -> None:
        for r in new:
            print(f"[{time.time() - t0:6.0f}s] {'PASS' if r.ok else 'FAIL'} {r.name}: {r.outcome}")
        rows.extend(new)

    if "kill" in args.only:
        for stage in d.kill_stages():
            for k in range(args.kills):
                report([d.kill_drill(ws, stage, rng, f"kill-{stage}-{k}")])
            report([d.kill_after_progress_drill(ws, stage)])
    if "concurrent" in args.only:
        report([d.concurrent_drill(ws)])
    if "determinism" in args.only:
        report([d.determinism_drill(ws)])
    if "disk" in args.only:
        report([d.full_disk_drill(ws)])
    if "nan" in args.only:
        report([d.nan_drill(ws)])
    if "foreign" in args.only:
        report([d.foreign_store_drill(ws, w) for w in ("model", "sketch")])
    if "corrupt" in args.only:
        report(corruption_drills(ws))
    if "bad-input" in args.only:
        report(d.bad_input_drills(ws))
    passed = sum(r.ok for r in rows)
    head = (
        f"{passed}/{len(rows)} drills passed in {time.time() - t0:.0f} s on {platform.node()} "
        f"({platform.machine()}, {platform.python_version()}), "
        f"{time.strftime('%Y-%m-%d')}: `python {' '.join(map(shlex.quote, sys.argv))}`"
    )
    text = f"{head}\n\n{d.table(rows)}\n"
    print("\n" + text)
    if args.table:
        args.table.write_text(text)
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
