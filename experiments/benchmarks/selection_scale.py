"""Selection at the LESS paper's scale (#15 item 2): 270,679 x 8,192 fp16, 4 checkpoints.

Writes a synthetic pool store once (clustered unit vectors, written in chunks; 4.4 GB under
``--dir``, never in the repository) and four checkpoint stores whose shard files are hard
links to it: four paths, one set of bytes on disk (and in the page cache). A validation store
holds 81 rows over 27 subtasks (BBH's shape); the single-task target uses the same rows as one
subtask. Each selector then runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its
own. Before each run the store's pages are dropped from the page cache (``posix_fadvise
DONTNEED``; ``--warm`` keeps them), so the first read of the store comes from disk.

Data: 50 clusters of 10 sub-clusters; a row is ``c + 0.8 s + g`` (c, s unit directions, g
noise of norm ~1), L2-normalized: cosine ~0.62 inside a sub-cluster, ~0.38 inside a cluster,
~0 across. Validation row j belongs to cluster j // 3 (27 clusters).

G2IS with exact on-demand lists (the default) needs one pass over the store per visited node:
it is measured on a small budget (a sample of visited nodes) and extrapolated to the 1%
walk. The exact whole graph is measured on one pass of ``--exact-queries`` rows and
extrapolated to all rows.

    nice -n 5 python experiments/benchmarks/selection_scale.py [--dir /tmp/selection_scale]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dataselect.data.records import Example
from dataselect.data.targets import Target, Task
from dataselect.features.store import GradientStore, StoreIncomplete, StoreWriter
from dataselect.features.stores import CheckpointFeatures, FeatureSet

N, DIM, CHUNK = 270_679, 8192, 8192
SPEC = {"model": "synthetic", "checkpoint": "c", "sketch": {"kind": "sjlt"}, "layout": {}}
LRS = [2e-5, 1.5e-5, 1e-5, 5e-6]  # the four checkpoints' mean learning rates
N_VAL, N_SUB = 81, 27
LIMIT_S, LIMIT_MB = 300.0, 4096.0

# name: (selector, target, budget share; knobs)
RUNS = {
    "less_bbh_1%": ("less", "bbh", 0.01, {}),
    "less_bbh_5%": ("less", "bbh", 0.05, {}),
    "less_single_1%": ("less", "single", 0.01, {}),
    "less_paper_bbh_1%": ("less", "bbh", 0.01, {"variant": "paper"}),
    "gist_sketch_bbh_1%": ("gist", "bbh", 0.01, {}),
    "gist_sketch_bbh_5%": ("gist", "bbh", 0.05, {}),
    "gist_sketch_single_1%": ("gist", "single", 0.01, {}),
    "g2is_ivf_1%": ("g2is", "bbh", 0.01, {"graph": "ivf"}),
    "g2is_ivf_5%": ("g2is", "bbh", 0.05, {"graph": "ivf"}),
    "g2is_none_1%": ("g2is", "bbh", 0.01, {"graph": "none"}),
    # the exact default on a sample of the walk: one component, budget 28 (27 lists)
    "g2is_on_demand_sample": ("g2is", "bbh", 28 / N, {"graph": "on_demand", "n_components": 1}),
    "g2is_on_demand_batch16_sample": (
        "g2is",
        "bbh",
        28 / N,
        {"graph": "on_demand", "n_components": 1, "graph_batch": 16},
    ),
    "exact_graph_one_pass": ("exact_graph", "bbh", 0.0, {}),
}


def ex(i: str, subtask: str = "t") -> Example:
    msgs = ({"role": "user", "content": i}, {"role": "assistant", "content": "a"})
    return Example(i, "synthetic", msgs, {"subtask": subtask})


def directions(seed: int, m: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((m, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows_of(labels: np.ndarray, sub: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit rows ``c + 0.8 s + g``: cluster ``labels``, sub-cluster ``sub`` (0..9)."""
    centers, subs = directions(1, 50), directions(2, 500)
    x = rng.standard_normal((len(labels), DIM), dtype=np.float32) / np.float32(np.sqrt(DIM))
    x += centers[labels]
    x += 0.8 * subs[labels * 10 + sub]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_pool(path: Path, n: int) -> GradientStore:
    """The pool store, chunk by chunk (each chunk from its own seed, so a resumed write gives
    the same bytes)."""
    try:
        return GradientStore(path)
    except StoreIncomplete:
        pass
    w = StoreWriter(path, DIM, n, SPEC, "float16", 1024)
    t0 = time.perf_counter()
    for start in range(w.done_rows - w.done_rows % CHUNK, n, CHUNK):
        rng = np.random.default_rng([7, start])
        m = min(CHUNK, n - start)
        x = rows_of(rng.integers(0, 50, m), rng.integers(0, 10, m), rng)
        skip = max(0, w.done_rows - start)
        ids = [f"p{i}" for i in range(start + skip, start + m)]
        w.add(ids, x[skip:], [1] * len(ids), [1.0] * len(ids))
        print(f"  wrote {start + m:,} / {n:,} rows ({time.perf_counter() - t0:.0f} s)", flush=True)
    return w.close()


def prepare(root: Path, n: int) -> None:
    feats = root / "features"
    base = write_pool(feats / "pool_c1", n)
    for c in range(2, 5):  # the other checkpoints: their own paths, the same shard files
        d = feats / f"pool_c{c}"
        d.mkdir(exist_ok=True)
        for f in base.path.iterdir():
            if f.is_file() and not (d / f.name).exists():
                os.link(f, d / f.name)
    vpath = feats / "val"
    try:
        GradientStore(vpath)
    except StoreIncomplete:
        rng = np.random.default_rng(11)
        labels = np.arange(N_VAL) // 3
        v = rows_of(labels, rng.integers(0, 10, N_VAL), rng)
        w = StoreWriter(vpath, DIM, N_VAL, SPEC, "float16", 1024)
        w.add([f"v{j}" for j in range(N_VAL)], v, [1] * N_VAL, [1.0] * N_VAL)
        w.close()


def evict(root: Path) -> None:
    """Drop the stores' pages from the page cache (clean pages; no root needed)."""
    for f in (root / "features").rglob("shard_*.npy"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peak_mb() -> float:
    """This process's peak RSS (VmHWM: its own memory map's high-water mark; ``ru_maxrss``
    would carry the parent's over ``exec``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(root: Path, name: str) -> dict:
    """One selector in this (fresh) process; returns its row of the table."""
    from dataselect.selectors.g2is import G2ISSelector
    from dataselect.selectors.gist import GISTSelector
    from dataselect.selectors.graph import NeighbourLists, neighbours_many
    from dataselect.selectors.less import LESSSelector
    from dataselect.selectors.rowsource import UnitRows

    kind, target_kind, share, knobs = RUNS[name]
    t0 = time.perf_counter()
    feats = root / "features"
    val = GradientStore(feats / "val")
    ckpts = [
        CheckpointFeatures(f"epoch_{c}", LRS[c - 1], GradientStore(feats / f"pool_c{c}"), val)
        for c in range(1, 5)
    ]
    n = len(ckpts[0].train)
    pool = [ex(i) for i in ckpts[0].train.ids]
    labels = [f"task{j // 3:02d}" if target_kind == "bbh" else "all" for j in range(N_VAL)]
    validation = [ex(f"v{j}", labels[j]) for j in range(N_VAL)]
    target = Target([Task(target_kind, validation, validation[:1])])
    budget = max(1, round(share * n))
    opened, base_mb = time.perf_counter() - t0, peak_mb()
    diag: dict = {}
    t1 = time.perf_counter()
    if kind == "less":
        sel = LESSSelector(**knobs).select(pool, target, budget, 0, FeatureSet(ckpts))
    elif kind == "gist":
        sel = GISTSelector(space="sketch", **knobs).select(
            pool, target, budget, 0, FeatureSet(ckpts[:1])
        )
    elif kind == "g2is":
        graph_s = [0.0]
        lookup = NeighbourLists.__getitem__

        def timed(self, i):  # the time spent in neighbour lists (computing them)
            t = time.perf_counter()
            try:
                return lookup(self, i)
            finally:
                graph_s[0] += time.perf_counter() - t

        NeighbourLists.__getitem__ = timed
        sel = G2ISSelector(**knobs).select(pool, target, budget, 0, FeatureSet(ckpts))
        d = sel.diagnostics
        keys = ("selected", "underfill", "fallbacks", "n_components", "graph_nodes_computed")
        diag = {k: d[k] for k in (*keys, "graph_lists_used", "graph_passes", "store_rows_read")}
        diag["graph_s"] = round(graph_s[0], 1)
    else:  # one pass of the exact graph: --exact-queries lists
        q = int(os.environ.get("EXACT_QUERIES", "256"))
        X = UnitRows(ckpts[-1].train)
        neighbours_many(X, np.arange(q), 100)
        diag = {"queries": q, "store_rows_read": X.rows_read}
        sel = None
    seconds = time.perf_counter() - t1
    out = {"name": name, "seconds": seconds, "open_s": opened, "peak_mb": peak_mb()}
    out |= {"before_select_mb": base_mb, "budget": budget, "diag": diag}
    if sel is not None:
        out["selected"] = len(sel.ids)
    return out


def status(row: dict) -> str:
    if row["name"].endswith("_sample") or row["name"] == "exact_graph_one_pass":
        return "a sample: extrapolated below"
    ok = row["seconds"] <= LIMIT_S and row["peak_mb"] <= LIMIT_MB
    return "pass" if ok else "FAIL"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/selection_scale"))
    ap.add_argument("--n", type=int, default=N)
    ap.add_argument("--only", nargs="*", default=list(RUNS), help=f"runs, of {list(RUNS)}")
    ap.add_argument("--warm", action="store_true", help="keep the store in the page cache")
    ap.add_argument("--exact-queries", type=int, default=256)
    ap.add_argument("--run", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.run:
        print("RESULT " + json.dumps(run_one(args.dir, args.run)), flush=True)
        return
    t_start = time.perf_counter()
    args.dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prepare(args.dir, args.n)
    print(f"stores ready in {time.perf_counter() - t0:.0f} s under {args.dir}", flush=True)
    rows = []
    env = {**os.environ, "EXACT_QUERIES": str(args.exact_queries)}
    for name in args.only:
        if not args.warm:
            evict(args.dir)
        cmd = [sys.executable, __file__, "--dir", str(args.dir), "--run", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-3000:]}", flush=True)
            continue
        row = json.loads(proc.stdout.split("RESULT ", 1)[1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.n:,} x {DIM:,} fp16 pool, 4 checkpoints (hard links to one store), "
          f"{N_VAL} validation rows; {'warm' if args.warm else 'cold'} page cache\n")  # fmt: skip
    print("| run | budget | select s | peak RSS MB (before select) | <= 5 min, <= 4 GB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['budget']:,} | {r['seconds']:.1f} | "
            f"{r['peak_mb']:,.0f} ({r['before_select_mb']:,.0f}) | {status(r)} |"
        )
    print()
    for r in rows:
        if r["diag"]:
            print(f"{r['name']}: {r['diag']}")
    lists_1 = next((r["diag"] for r in rows if r["name"] == "g2is_ivf_1%"), None)
    for r in rows:
        if not r["name"].endswith("_sample") or not r["diag"]["graph_lists_used"]:
            continue
        d = r["diag"]
        per_pass = d["graph_s"] / max(1, d["graph_passes"])
        per_list = d["graph_s"] / d["graph_lists_used"]  # batched: fewer passes than lists
        line = f"{r['name']}: {per_pass:.1f} s a pass, {d['graph_passes']} passes for the "
        line += f"{d['graph_lists_used']} lists the walk used ({per_list:.1f} s a list)"
        if lists_1:
            need = lists_1["graph_lists_used"]
            line += f" -> ~{per_list * need:,.0f} s for the {need:,} lists of the 1% walk"
        print(line)
    for r in rows:
        if r["name"] == "exact_graph_one_pass":
            q = r["diag"]["queries"]
            total = r["seconds"] * args.n / q
            print(f"exact graph: {r['seconds']:.0f} s for {q} lists -> ~{total:,.0f} s for all")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; machine {platform.node()}, "
          f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}")  # fmt: skip


if __name__ == "__main__":
    main()
