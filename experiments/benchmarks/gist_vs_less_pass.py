"""GIST's per-target pool pass against one LESS store pass, timed side by side in one run.

Same model (the quickstart warmup of SmolLM2-135M, epoch 1), same pool examples, same batch
size: LESS's pass = per-example gradients + Adam transform + sjlt sketch to 8192 + fp16
store; GIST's pass = per-example gradients + P^T g (k = the validation rank) + fp32 store.
Interleaved repeats, so machine drift hits both. Prints the per-checkpoint ratio and the
ratios and break-even target count for a LESS store of 1 and 4 checkpoints.

    python experiments/benchmarks/gist_vs_less_pass.py [--n 96] [--repeats 2]
"""

from __future__ import annotations

import argparse
import platform
import random
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

import dataselect.config  # noqa: F401
from dataselect import models
from dataselect.data.formatting import tokenize_examples
from dataselect.data.sources import load_pool
from dataselect.data.targets import load_target
from dataselect.features.featurize import featurize
from dataselect.features.gradients import flat_adam_state, grad_dim, lora_parameters
from dataselect.features.project import full_gradients, project_pool
from dataselect.features.sketch import SketchSpec
from dataselect.keys import warmup_key
from dataselect.selectors.gist_subspace import task_subspace
from dataselect.training import load_optimizer_state

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=quickstart", "paths.output_dir=/tmp/x"])
    cache = Path(cfg.paths.cache_dir)
    ckpt = cache / "warmup" / warmup_key(cfg) / "epoch_1"
    if not ckpt.is_dir():
        raise SystemExit(f"no quickstart warmup at {ckpt}: run `make quickstart` first")
    tok = models.load_tokenizer(cfg.model, cache)
    model = models.with_adapter(models.load_base_model(cfg.model, cache), ckpt / "adapter", True)
    pool = random.Random(0).sample(load_pool(cfg.pool, Path(cfg.paths.data_dir)), args.n)
    toks, _ = tokenize_examples(tok, pool, cfg.model.max_length)
    val, _ = tokenize_examples(
        tok, load_target(cfg.target, Path(cfg.paths.data_dir)).validation, cfg.model.max_length
    )
    state, meta = load_optimizer_state(ckpt)
    flat_adam_state(state, [n for n, _ in lora_parameters(model)])  # checks the state fits
    sketch = SketchSpec("sjlt", grad_dim(model), 8192, seed=0)
    less_t, gist_t = [], []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        G = full_gradients(model, val, Path(tmp) / "G.npy", tok.pad_token_id)
        sub = task_subspace(G, k=150)
        t_val = time.perf_counter() - t0
        for r in range(args.repeats):
            t0 = time.perf_counter()
            featurize(
                model,
                toks,
                Path(tmp) / f"less{r}",
                gradient_type="adam",
                sketch=sketch,
                spec={},
                checkpoint=ckpt,
                pad_id=tok.pad_token_id,
            )
            less_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            project_pool(model, toks, sub.P, Path(tmp) / f"gist{r}", {}, tok.pad_token_id)
            gist_t.append(time.perf_counter() - t0)
            print(
                f"repeat {r}: LESS pass {less_t[-1]:.1f} s, GIST pass {gist_t[-1]:.1f} s",
                flush=True,
            )
    less, gist = min(less_t), min(gist_t)
    print(
        f"\n{len(toks)} pool examples, {len(val)} validation examples (GIST k = {sub.k}, "
        f"validation gradients + eigh {t_val:.1f} s)\n"
    )
    print("| quantity | 1 LESS checkpoint | 4 LESS checkpoints (paper) |\n|---|---|---|")
    print(
        f"| LESS store pass, s / 1k examples | {1000 * less / len(toks):.0f} "
        f"| {4000 * less / len(toks):.0f} |"
    )
    print(
        f"| GIST pass per target, s / 1k examples | {1000 * gist / len(toks):.0f} "
        f"| {1000 * gist / len(toks):.0f} |"
    )
    print(
        f"| compute ratio GIST / LESS, first target | {100 * gist / less:.0f}% "
        f"| {100 * gist / (4 * less):.0f}% (paper: 25%) |"
    )
    print(f"| break-even number of targets | {less / gist:.2f} | {4 * less / gist:.2f} |")
    print(
        f"\nmachine: {platform.node()}; date {time.strftime('%Y-%m-%d %H:%M')}; "
        f"best of {args.repeats} interleaved repeats"
    )


if __name__ == "__main__":
    main()
