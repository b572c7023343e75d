"""Artifacts are byte-identical to the recorded ones: a refactor must not change what a run
stores or selects (else bump ``ARTIFACTS_VERSION`` / ``SELECTION_VERSION`` and re-record).

Three tiny ``stage=select`` runs (LESS, G2IS, exact GIST) share a cache; the digests of every
gradient store's shards and ids, GIST's pool pass and each selection are compared with
``golden/tiny_digests.json``. The runs pin the CPU kernels (MKL's reproducible mode, torch's
and oneDNN's baseline ISA, one thread, OpenBLAS's generic kernel) so that the bytes do not
depend on the machine. Re-record with ``DATASELECT_WRITE_GOLDEN=1 pytest tests/test_digests.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden" / "tiny_digests.json"
PINNED = {
    "MKL_CBWR": "COMPATIBLE",
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "OPENBLAS_CORETYPE": "Prescott",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
RUN = [
    "model=tiny_random",
    "logger=csv",
    "pool.sources=[{kind: reasoning_gym, name: chain_sum, n: 24, seed: 1},"
    "{kind: reasoning_gym, name: gsm_symbolic, n: 8, seed: 2}]",
    "target.gsm_symbolic.validation=[{kind: reasoning_gym, name: gsm_symbolic, n: 4, seed: 3}]",
    "target.gsm_symbolic.test=[{kind: reasoning_gym, name: gsm_symbolic, n: 4, seed: 4}]",
    "budget=6",
    "warmup.epochs=2",
    "warmup.fraction=0.25",
    "features.sketch.dim=64",
    "features.shard_size=8",
    "stage=select",
]
SELECTORS = {
    "less": ["selector=less"],
    "g2is": ["selector=g2is"],
    "gist": ["selector=gist", "selector.k=3"],
}
STORED = ("features", "features_val", "gist_pass", "select")


def digests(cache: Path) -> dict[str, str]:
    """sha256 of every shard, ids file and selection under the stores' and selections' keys."""
    out = {}
    for stage in STORED:
        for f in sorted((cache / stage).glob("[!.]*/*")):
            if f.is_file() and (f.suffix == ".npy" or f.name in ("ids.json", "selection.jsonl")):
                rel = f.relative_to(cache).as_posix()
                out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_stores_and_selections_match_the_recorded_digests(tmp_path):
    env = {**os.environ, **PINNED}
    for name, extra in SELECTORS.items():
        cmd = [
            *(sys.executable, "-m", "dataselect"),
            *RUN,
            *extra,
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / name}",
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    got = digests(tmp_path / "cache")
    assert sum(k.startswith("gist_pass/") for k in got) and sum(
        k.startswith("select/") for k in got
    )
    if os.environ.get("DATASELECT_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(want), "artifact keys or files changed"
    changed = [k for k in want if got[k] != want[k]]
    assert not changed, f"{len(changed)} of {len(want)} artifacts changed bytes: {changed[:5]}"
