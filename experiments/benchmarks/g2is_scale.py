"""G2IS at scale: graph + walk on a synthetic 100,000 x 8,192 fp16 store, 1% budget.

The store holds clustered unit vectors (``--clusters`` centers + noise); the target's 16
validation gradients come from clusters 0 and 1 (G2IS's PCA is centered: its components are
the directions along which the validation gradients differ). Each step is timed with the
process's peak RSS reset before it (Linux ``/proc/self/clear_refs``), so the memory column
is that step's own peak. The whole exact graph is timed on a ``--exact-sample`` subset and
extrapolated (its cost grows as n^2 d); the walk uses on-demand neighbour lists (default).

    python experiments/benchmarks/g2is_scale.py [--n 100000] [--dim 8192]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from dataselect.data.records import Example
from dataselect.data.targets import Target
from dataselect.features.store import GradientStore, StoreWriter
from dataselect.features.stores import CheckpointFeatures, FeatureSet
from dataselect.selectors.g2is import G2ISSelector, core_knowledge, g2is_walk, largest_remainder
from dataselect.selectors.graph import NeighbourLists, knn_graph


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


class Step:
    rows: list[tuple[str, float, float]] = []

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.rows.append((self.name, time.perf_counter() - self.t0, rss_mb("VmHWM")))


def clustered(rng, centers, n, noise):
    lab = rng.integers(0, len(centers), n)
    x = centers[lab] + noise * rng.standard_normal((n, centers.shape[1])).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), lab


def ex(i: str) -> Example:
    return Example(
        i, "synthetic", ({"role": "user", "content": i}, {"role": "assistant", "content": "a"})
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--clusters", type=int, default=50)
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--exact-sample", type=int, default=10_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((args.clusters, args.dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    spec = {"model": "synthetic", "checkpoint": "c", "sketch": {}, "layout": {}}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        with Step("write store (fp16, 10k-row chunks)"):
            w = StoreWriter(Path(tmp) / "pool", args.dim, args.n, spec, "float16", 8192)
            labels = []
            for s in range(0, args.n, 10_000):
                m = min(10_000, args.n - s)
                x, lab = clustered(rng, centers, m, noise=0.05)
                labels.append(lab)
                w.add([f"p{i}" for i in range(s, s + m)], x, [1] * m, [1.0] * m)
            pool_store = w.close()
            labels = np.concatenate(labels)
            v = StoreWriter(Path(tmp) / "val", args.dim, 16, spec, "float32", 64)
            vx, _ = clustered(rng, centers[:2], 16, noise=0.05)  # a 2-cluster target
            val_store = v.add([f"v{i}" for i in range(16)], vx, [1] * 16, [1.0] * 16) or v.close()
        pool = [ex(f"p{i}") for i in range(args.n)]
        target = Target.single("synthetic", [ex(f"v{i}") for i in range(16)], [ex("v0")])
        features = FeatureSet(
            [
                CheckpointFeatures(
                    "epoch_1", 1.0, GradientStore(pool_store.path), GradientStore(val_store.path)
                )
            ]
        )
        budget = round(args.budget * args.n)
        sel_cfg = G2ISSelector()
        with Step("load + L2-normalize the store (float32)"):
            X = features.checkpoints[0].train.features(normalize=True)
            V = features.checkpoints[0].val.features()
        with Step("core knowledge: PCA of 16 validation gradients + budget split"):
            core = core_knowledge(V, sel_cfg.val_variance, None, sel_cfg.orient)
            budgets = largest_remainder(budget, core.weights)
        with Step(f"walk, on-demand neighbour lists (K=100, budget {budget})"):
            nbrs = NeighbourLists(X, sel_cfg.k_neighbors, "on_demand")
            walk = g2is_walk(X, core.components, budgets, nbrs, sel_cfg.anchor_pool, sel_cfg.delta)
        order = walk.order
        del X, V, nbrs, walk  # free the store copy before the selector loads its own
        with Step("the same through G2ISSelector.select (load + PCA + walk)"):
            sel = G2ISSelector().select(pool, target, budget, seed=0, features=features)
        assert sel.ids == [f"p{r}" for r in order]
        m = args.exact_sample
        with Step(f"exact graph on a {m:,}-row sample (K=100)"):
            X = pool_store.features(np.arange(m), normalize=True)
            knn_graph(X, 100)
            del X
    total = time.perf_counter() - t_start
    picked = np.array([int(i[1:]) for i in sel.ids])
    d = sel.diagnostics
    print(
        f"\n{args.n:,} x {args.dim:,} fp16 store, {args.clusters} clusters; target's clusters "
        f"hold {int((labels < 2).sum()):,} examples\n"
    )
    print("| step | seconds | peak RSS (MB) |\n|---|---|---|")
    for name, sec, peak in Step.rows:
        print(f"| {name} | {sec:.1f} | {peak:,.0f} |")
    exact = Step.rows[-1][1] * (args.n / m) ** 2
    print(f"| exact graph, all {args.n:,} rows (extrapolated n^2) | ~{exact:,.0f} | |")
    print(
        f"\nselected {d['selected']} of {budget} (under-fill {d['underfill']}, fallbacks "
        f"{d['fallbacks']}, graph rows computed {d['graph_nodes_computed']}); "
        f"{100 * (labels[picked] < 2).mean():.1f}% from the target's clusters; "
        f"total {total:.0f} s"
    )
    print(f"machine: {platform.node()}; date {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    main()
