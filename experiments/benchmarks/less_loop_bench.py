"""This framework's featurizing against a LESS-style reference loop, side by side (#15 item 1).

Both sides run in one process on the same model, examples and checkpoint (SmolLM2-135M-
Instruct, LoRA r=8 on q/k/v/o, a few AdamW steps taken here so the Adam state is real), and
produce Adam features sketched to 8192 dimensions.

(a) **reference**: LESS's ``collect_grad_reps`` as its paper and code describe it: batch
    size 1; per example ``loss.backward()``, read and flatten every LoRA ``.grad``, the Adam
    transform m' / sqrt(v' + eps) (LESS's ``obtain_gradients_with_adam``); every 16 examples
    (their ``project_interval``) one dense Rademacher projection to 8192 as TRAK's CPU
    ``BasicProjector`` does it: the D x d matrix regenerated on every call, in column blocks
    of 128 (their ``block_size``), each block drawn from its own seeded generator with
    ``bernoulli_(0.5) * 2 - 1``, then a matmul. The matmul runs in float32 here (TRAK on CPU
    would use the dtype it is given; fp16 matmuls on CPU are slower still).
(b) **this framework**: ``featurize`` as the pipeline runs it: length-sorted batches of 8,
    one forward and one backward per batch with per-example gradients from hooks, the Adam
    transform, the sjlt sketch (nnz 4) to 8192, the fp16 store with checksums.

(c) **plain LoRA training** on the same batches (forward, backward, AdamW step): the
    yardstick of the second target, featurizing >= 1.0x training. A profile splits both into
    their steps (training: forward + backward, optimizer; featurizing: forward + backward with
    the per-example hooks, the Adam transform, the eps-share diagnostic and |g|, the sketch,
    the store write), timed per batch with the same code ``featurize`` runs.

Correctness mode (always run, on ``--check`` examples): both sides project with the same
matrix (this framework's dense Rademacher ``Sketch``, i.e. the reference loop with our
projector, and ``featurize`` with ``sketch.kind=rademacher``), and the features must agree up
to float rounding (the reference's bs=1 loss and our padded batch sum in different orders).

    python experiments/benchmarks/less_loop_bench.py [--n 48] [--check 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from featurize_bench import LORA, MODEL, examples  # noqa: E402  (same model and examples)

from dataselect.features.featurize import Batching, featurize, length_order
from dataselect.features.gradients import (
    eps_dominance,
    flat_adam_state,
    grad_dim,
    lora_parameters,
    per_example_grads,
    to_features,
)
from dataselect.features.sketch import Sketch, SketchSpec
from dataselect.features.store import StoreWriter
from dataselect.models import load_base_model, load_tokenizer, with_lora
from dataselect.training.data import collate

BETAS, EPS = (0.9, 0.999), 1e-8
PROJECT_INTERVAL, TRAK_BLOCK = 16, 128


class TrakBasicRademacher:
    """TRAK's CPU ``BasicProjector`` (rademacher): regenerates its D x d matrix every call."""

    def __init__(self, dim_in: int, dim_out: int, seed: int = 0, block: int = TRAK_BLOCK):
        self.dim_in, self.dim_out, self.block = dim_in, dim_out, block
        self.seeds = [seed + 10_000 * b for b in range(math.ceil(dim_out / block))]
        self.matrix = torch.empty(dim_in, block)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(grads.shape[0], self.dim_out)
        for b, s in enumerate(self.seeds):
            gen = torch.Generator().manual_seed(s)
            self.matrix.bernoulli_(0.5, generator=gen).mul_(2).sub_(1)
            lo, hi = b * self.block, min(self.dim_out, (b + 1) * self.block)
            out[:, lo:hi] = grads @ self.matrix[:, : hi - lo]
        return out / math.sqrt(self.dim_out)  # TRAK leaves the scale out; cosines do not care


def reference_loop(model, toks, pad_id, adam, project) -> np.ndarray:
    """LESS's per-example loop: bs=1 backward, flatten .grad, Adam, project every 16."""
    params = [p for _, p in lora_parameters(model)]
    m, v = adam
    model.eval()  # LESS featurizes with dropout off too
    done, pending = [], []
    for t in toks:
        b = collate([t], pad_id)
        model.zero_grad(set_to_none=True)
        loss = model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]
        ).loss
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        avg = BETAS[0] * m + (1 - BETAS[0]) * g
        avg_sq = BETAS[1] * v + (1 - BETAS[1]) * g * g
        pending.append(avg / torch.sqrt(avg_sq + EPS))
        if len(pending) == PROJECT_INTERVAL:
            done.append(project(torch.stack(pending).half().float()))  # LESS casts to fp16
            pending = []
    if pending:
        done.append(project(torch.stack(pending).half().float()))
    model.zero_grad(set_to_none=True)
    return torch.cat(done).numpy()


def ours(model, toks, pad_id, ckpt: Path, kind: str, out: Path) -> np.ndarray:
    D = grad_dim(model)
    store = featurize(
        model,
        toks,
        out,
        gradient_type="adam",
        sketch=SketchSpec(kind, D, 8192, seed=0, input_dtype="float16"),
        spec={"bench": kind},
        checkpoint=ckpt,
        pad_id=pad_id,
        batching=Batching(batch_size=8, shard_size=1024),
        dtype="float32" if kind == "rademacher" else "float16",
    )
    return store.features(store.index([t.id for t in toks]))


PROFILE_STEPS = {
    "train": ("forward + backward", "AdamW step"),
    "featurize": (
        "forward + backward, per-example hooks",
        "Adam transform",
        "eps share + |g|",
        "sjlt sketch 8192",
        "fp16 store write",
    ),
}


def profile(model, toks, pad_id, adam, meta, out: Path, bs: int = 8) -> dict[str, list[float]]:
    """Seconds per step (``PROFILE_STEPS``) of plain training and of featurizing, over the
    same length-sorted batches of ``bs`` (``featurize``'s order), one after the other."""
    batches = [length_order(toks)[i : i + bs] for i in range(0, len(toks), bs)]
    D = grad_dim(model)
    sketch = Sketch(SketchSpec("sjlt", D, 8192, seed=0, input_dtype="float16"))
    params = [p for _, p in lora_parameters(model)]
    opt = torch.optim.AdamW(params, lr=1e-6)
    train, feat = [0.0, 0.0], [0.0] * 5
    model.train()
    for chunk in batches:
        b = collate(chunk, pad_id)
        t0 = time.perf_counter()
        model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        train[0] += t1 - t0
        train[1] += time.perf_counter() - t1
    model.eval()
    writer = StoreWriter(out, 8192, len(toks), {"bench": "profile"}, "float16", 1024)
    for chunk in batches:
        b = collate(chunk, pad_id)
        t = [time.perf_counter()]
        g = per_example_grads(model, b)
        t.append(time.perf_counter())
        f = to_features(g, "adam", adam, betas=meta["betas"], eps=meta["eps"], step=None)
        t.append(time.perf_counter())
        eps_dominance(g, adam[1], meta["betas"], meta["eps"]).tolist()
        g.norm(dim=1).tolist()
        t.append(time.perf_counter())
        s = sketch.project(f).cpu().numpy()
        t.append(time.perf_counter())
        writer.add([c.id for c in chunk], s, [1] * len(chunk), [0.0] * len(chunk))
        t.append(time.perf_counter())
        for i in range(5):
            feat[i] += t[i + 1] - t[i]
    writer.close()
    return {"train": train, "featurize": feat}


def warm_state(model, toks, pad_id, ckpt: Path, steps: int = 6) -> tuple[torch.Tensor, ...]:
    """A few AdamW steps, saved as a warmup checkpoint would be (optimizer.* files)."""
    from safetensors.torch import save_file

    named = lora_parameters(model)
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-4, betas=BETAS, eps=EPS)
    model.train()
    for s in range(steps):
        b = collate(toks[4 * s : 4 * s + 4], pad_id)
        model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    ckpt.mkdir(parents=True, exist_ok=True)
    flat, names = {}, []
    for n, p in named:
        st = opt.state[p]
        flat[f"{n}.exp_avg"], flat[f"{n}.exp_avg_sq"] = st["exp_avg"], st["exp_avg_sq"]
        names.append(n)
    save_file(flat, str(ckpt / "optimizer.safetensors"))
    meta = {"param_names": names, "betas": list(BETAS), "eps": EPS, "step": steps, "lr_mean": 1e-4}
    (ckpt / "optimizer.json").write_text(__import__("json").dumps(meta))
    state = {n: {"exp_avg": flat[f"{n}.exp_avg"], "exp_avg_sq": flat[f"{n}.exp_avg_sq"]}
             for n in names}  # fmt: skip
    return flat_adam_state(state, names)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=48, help="examples timed on each side")
    ap.add_argument("--check", type=int, default=8, help="examples in the correctness mode")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache", default=".cache/dataselect")
    args = ap.parse_args()
    tok = load_tokenizer(MODEL, Path(args.cache))
    model = with_lora(load_base_model(MODEL, Path(args.cache)), LORA, seed=0)
    D, pad = grad_dim(model), tok.pad_token_id
    toks = examples(tok, args.n + 24)
    warm, toks = toks[:24], toks[24:]
    n_tok = sum(len(t.input_ids) for t in toks) / len(toks)
    print(
        f"# {len(toks)} examples, {n_tok:.0f} tokens/example, D = {D:,}, torch threads "
        f"{torch.get_num_threads()}, {platform.processor() or platform.machine()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "epoch_1"
        adam = warm_state(model, warm, pad, ckpt)

        # correctness: the same dense Rademacher matrix on both sides
        same = Sketch(SketchSpec("rademacher", D, 8192, seed=0, input_dtype="float16"))
        check = toks[: args.check]
        ref = reference_loop(model, check, pad, adam, same.project)
        mine = ours(model, check, pad, ckpt, "rademacher", Path(tmp) / "check")
        cos = cosines(ref, mine)
        rel = np.abs(ref - mine).max() / np.abs(ref).max()
        print(
            f"correctness ({len(check)} examples, same matrix): min cosine {cos.min():.6f}, "
            f"max |diff| / max |value| {rel:.2e}",
            flush=True,
        )

        trak = TrakBasicRademacher(D, 8192)
        rows = []
        for r in range(args.repeats):  # interleaved, so drift hits both sides alike
            t0 = time.perf_counter()
            reference_loop(model, toks, pad, adam, trak.project)
            t_ref = time.perf_counter() - t0
            t0 = time.perf_counter()
            ours(model, toks, pad, ckpt, "sjlt", Path(tmp) / f"s{r}")
            t_ours = time.perf_counter() - t0
            rows.append((len(toks) / t_ref, len(toks) / t_ours))
            print(
                f"repeat {r}: reference {rows[-1][0]:.3f} ex/s, ours {rows[-1][1]:.3f} ex/s, "
                f"ratio {t_ref / t_ours:.1f}",
                flush=True,
            )
        # where the reference's time goes: the same loop without projecting
        t0 = time.perf_counter()
        reference_loop(model, toks, pad, adam, lambda x: x[:, :1])
        t_noproj = time.perf_counter() - t0
        meta = {"betas": BETAS, "eps": EPS}
        profiles = [
            profile(model, toks, pad, adam, meta, Path(tmp) / f"p{r}") for r in range(args.repeats)
        ]
    ref_rate, our_rate = (float(np.median([r[i] for r in rows])) for i in range(2))
    noproj = len(toks) / t_noproj
    rows_out = [
        ("reference: LESS loop, bs=1, TRAK BasicProjector rademacher 8192", ref_rate),
        ("reference without its projection (bs=1 fwd+bwd+Adam only)", noproj),
        ("this framework: featurize, batch 8, sjlt 8192, fp16 store", our_rate),
    ]
    print("\n| path | examples/s | x reference |\n|---|---|---|")
    for what, rate in rows_out:
        print(f"| {what} | {rate:.3f} | {rate / ref_rate:.1f} |")
    prof = {k: np.median([p[k] for p in profiles], axis=0) for k in PROFILE_STEPS}
    t_train, t_feat = prof["train"].sum(), prof["featurize"].sum()
    print(
        f"\n| plain LoRA training, batch 8 (fwd+bwd+AdamW) | {len(toks) / t_train:.3f} | "
        f"{len(toks) / t_train / ref_rate:.1f} |"
    )
    print(f"\nfeaturize / train (profiled passes, median of {args.repeats}): "
          f"{t_train / t_feat:.2f}x\n")  # fmt: skip
    print("| pass | step | s / batch of 8 | share of its pass |\n|---|---|---|---|")
    n_b = math.ceil(len(toks) / 8)
    for k, names in PROFILE_STEPS.items():
        for name, sec in zip(names, prof[k], strict=True):
            print(f"| {k} | {name} | {sec / n_b:.3f} | {sec / prof[k].sum():.0%} |")
    print(
        f"\ncorrectness: min cosine {cos.min():.6f} over {len(check)} examples "
        f"(same Rademacher matrix on both sides)"
    )
    print(
        f"machine: {platform.node()}, {torch.get_num_threads()} threads; "
        f"date {time.strftime('%Y-%m-%d %H:%M')}"
    )


if __name__ == "__main__":
    main()
