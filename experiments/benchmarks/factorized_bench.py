"""Factorized LoRA sketch (``features/factorized.py``) against materialize-then-sjlt.

(a) Cosine distortion on real per-example SGD gradients: SmolLM2-135M-Instruct (the GGUF
    converted into ``--cache``, as ``featurize_bench.py``), LoRA on q/k/v/o at r = 8 and
    r = 128, with lora_B drawn N(0, 0.02^2) (a fresh LoRA has B = 0 and so a zero lora_A
    gradient; after warmup both carry gradient), 32 of featurize_bench's examples. For d near
    4,096 and 8,192 (the factor whose d is nearest; the others get exactly that d) and 3 seeds
    each: mean and max |cos(S^T g_i, S^T g_j) - cos(g_i, g_j)| over the 496 pairs, for
    factorized, sjlt, and "blockwise sjlt" (the factorized blocks and per-block dims, an iid
    sparse JL inside each: what the block-diagonal budget costs without the Kronecker
    structure); factorized alone also near 16,384 and 32,768. Then how the gradient energy
    spreads over the LoRA weights. The hook path is checked against ``project(g)`` (the same
    matrix) on the way.
(b) Peak memory and throughput of one gradient pass: a random Llama (hidden 2048, ``--layers``,
    16 heads without GQA, MLP 1024, vocab 2048), LoRA r = 128 on q/k/v/o, so D = layers x 4 x
    128 x (2048 + 2048) per example; ``--tokens`` tokens per example (the last half scored);
    both paths sketch to the factorized d nearest 8,192.
    Each (path, batch) runs in its own process: the model is built, then the sketch (its peak
    RSS is the "sketch build" column; sjlt's CSR operator is built here, not in the first
    batch), then ``--batches`` batches with the peak RSS reset before them (Linux
    ``/proc/self/clear_refs``); examples/s from the median wall time of the batches after the
    first, and CPU seconds per example over them (less sensitive to a shared machine's load).
    ``factorized``:
    ``per_example_sketch`` (features and exact |g| from the hooks); ``sjlt``:
    ``per_example_grads`` (B, D), ``Sketch.project``, ``g.norm`` (what featurize did). Each
    worker runs under RLIMIT_DATA = ``--mem-cap-gib`` (an allocation past it fails in that
    worker instead of pressing on the shared machine), and an sjlt configuration whose (B, D)
    gradients and their concatenation alone exceed the cap is not started. One torch thread
    by default (``--threads``): on this shared 2-core machine two OpenMP threads ran the same
    batches up to 10x slower than one (a descheduled thread stalls every parallel region).

    python experiments/benchmarks/factorized_bench.py [--cache DIR] [--layers 8] [--skip-a]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dataselect.data.formatting import IGNORE_INDEX, Tokenized
from dataselect.features.factorized import FactorizedSketch, factorized_spec, per_example_sketch
from dataselect.features.gradients import grad_dim, per_example_grads
from dataselect.features.sketch import Sketch, SketchSpec
from dataselect.training.data import collate

GIB = 1 << 30
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora(r: int):
    from omegaconf import OmegaConf

    return OmegaConf.create({"r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": TARGETS})


def randomize_b(model, std: float = 0.02, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def rss_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / (1 << 20)
    return float("nan")


def nearest_factor(model, d: int) -> int:
    """The factor whose factorized d is nearest to ``d`` (in ratio)."""
    dims = {k: factorized_spec(model, k).dim_out for k in range(1, 257)}
    return min(dims, key=lambda k: abs(dims[k] / d - 1))


# ---------------------------------------------------------------- (a) distortion


def exact_cosines(g: torch.Tensor) -> torch.Tensor:
    gram = torch.zeros(len(g), len(g), dtype=torch.float64)
    for c in range(0, g.shape[1], 1 << 20):  # float64 in column chunks
        block = g[:, c : c + (1 << 20)].double()
        gram += block @ block.T
    n = gram.diagonal().sqrt()
    return gram / n[:, None] / n[None, :]


def cos_errors(exact: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    sn = torch.nn.functional.normalize(s.double(), dim=1)
    iu = torch.triu_indices(len(s), len(s), 1)
    return ((sn @ sn.T) - exact)[iu[0], iu[1]].abs()


def sketched(kind: str, g: torch.Tensor, spec: SketchSpec) -> torch.Tensor:
    """g sketched by ``kind`` at the factorized ``spec``'s d and seed. ``blockwise sjlt``: the
    same blocks and per-block dims, an iid sparse JL inside each (no Kronecker structure)."""
    if kind == "factorized":
        return FactorizedSketch(spec).project(g)
    if kind == "sjlt":
        return Sketch(SketchSpec("sjlt", spec.dim_in, spec.dim_out, seed=spec.seed)).project(g)
    fs, out = FactorizedSketch(spec), []
    for b, (ko, ki) in enumerate(fs.dims):
        lo, hi = fs.rows[b], fs.rows[b + 1]
        sub = SketchSpec("sjlt", hi - lo, ko * ki, seed=spec.seed * 1_000_003 + b, nnz=4)
        out.append(Sketch(sub).project(g[:, lo:hi]))
    return torch.cat(out, dim=1)


def energy_line(r: int, g: torch.Tensor, model) -> str:
    """How the per-example gradient energy spreads over the LoRA weights (the blocks)."""
    fs = FactorizedSketch(factorized_spec(model, 1))
    spans = zip(fs.rows[:-1], fs.rows[1:], strict=True)
    e = torch.stack([g[:, a:b].square().sum(1) for a, b in spans], 1)
    share = e / e.sum(1, keepdim=True)
    n_eff = (1 / share.square().sum(1)).mean()
    return (
        f"r={r}: per example, the gradient energy is spread over N_eff = 1 / sum share^2 = "
        f"{n_eff:.1f} of {share.shape[1]} LoRA weights (mean over examples); the largest holds "
        f"{share.max(1).values.mean():.0%}, the lora_A weights {share[:, 0::2].sum(1).mean():.0%}"
    )


def distortion(cache: Path, n: int, seeds: int) -> list[str]:
    from featurize_bench import MODEL, batches, examples

    from dataselect.models import load_base_model, load_tokenizer, with_lora

    tok = load_tokenizer(MODEL, cache)
    toks = examples(tok, n)
    lines = [
        "| LoRA r | D | sketch | d | mean abs cos error | max abs cos error | hooks vs g @ S |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    notes = []
    for r in (8, 128):
        model = with_lora(load_base_model(MODEL, cache), lora(r), seed=0)
        randomize_b(model)
        bl = batches(toks, 8)
        g = torch.cat([per_example_grads(model, collate(c, tok.pad_token_id)) for c in bl])
        D, exact = g.shape[1], exact_cosines(g)
        notes.append(energy_line(r, g, model))
        for target in (4096, 8192, 16384, 32768):
            k = nearest_factor(model, target)
            d = factorized_spec(model, k).dim_out
            sketch = FactorizedSketch(factorized_spec(model, k))  # seed 0
            hooks, _ = per_example_sketch(model, collate(bl[-1], tok.pad_token_id), sketch)
            ref = sketch.project(g[-len(hooks) :])
            check = f"{((hooks - ref).abs().max() / ref.abs().max()).item():.1e}"
            kinds = ["factorized", "blockwise sjlt", "sjlt"] if target <= 8192 else ["factorized"]
            for kind in kinds:
                specs = [factorized_spec(model, k, seed) for seed in range(seeds)]
                e = torch.cat([cos_errors(exact, sketched(kind, g, spec)) for spec in specs])
                name = f"{kind} (factor {k})" if kind == "factorized" else f"{kind} (nnz 4)"
                lines.append(
                    f"| {r} | {D:,} | {name} | {d:,} | {e.mean():.4f} | {e.max():.4f} | "
                    f"{check if kind == 'factorized' else ''} |"
                )
                print(lines[-1], flush=True)
        del model, g
    print("\n" + "\n".join(notes), flush=True)
    return lines + [""] + notes


# ---------------------------------------------------------------- (b) memory and throughput


def wide_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dataselect.models import with_lora

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2048, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
    )  # fmt: skip
    base = LlamaForCausalLM(cfg)
    base.config.use_cache = False
    model = with_lora(base, lora(128), seed=0)
    randomize_b(model)
    return model


def token_examples(n: int, length: int) -> list[Tokenized]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(3, 2048, (length,), generator=gen).tolist()
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]
        out.append(Tokenized(f"ex-{i}", ids, labels))
    return out


def worker(cfg: dict) -> dict:
    torch.set_num_threads(cfg["threads"])
    cap = int(cfg["cap_gib"] * GIB)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    model = wide_model(cfg["layers"])
    D, bs = grad_dim(model), cfg["batch"]
    out = {"D": D, "model_gib": rss_gib("VmRSS")}
    k = nearest_factor(model, cfg["d"])  # both paths get the factorized d nearest cfg["d"]
    Path("/proc/self/clear_refs").write_text("5")
    if cfg["path"] == "factorized":
        sketch = FactorizedSketch(factorized_spec(model, k))
        for b in range(len(sketch.spec.blocks)):
            sketch.factors(b, torch.device("cpu"))
    else:
        sketch = Sketch(SketchSpec("sjlt", D, factorized_spec(model, k).dim_out, seed=0))
        sketch.project(torch.zeros(1, D))  # builds the CSR operator
    out["d"], out["factor"], out["sketch_gib"] = sketch.spec.dim_out, k, rss_gib("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")
    out["before_gib"] = rss_gib("VmRSS")
    exs = token_examples(bs * cfg["batches"], cfg["tokens"])
    times, cpu = [], []
    for i in range(cfg["batches"]):
        batch = collate(exs[i * bs : (i + 1) * bs], 0)
        t0, c0 = time.perf_counter(), time.process_time()
        if cfg["path"] == "factorized":
            feats, norms = per_example_sketch(model, batch, sketch)
        else:
            g = per_example_grads(model, batch)
            feats, norms = sketch.project(g), g.norm(dim=1)
            del g
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        del feats, norms
    out["peak_gib"] = rss_gib("VmHWM")
    out["ex_per_s"] = bs / statistics.median(times[1:])
    out["cpu_s_per_ex"] = sum(cpu[1:]) / (bs * (len(cpu) - 1))
    out["first_batch_s"] = times[0]
    return out


def memory_table(args) -> list[str]:
    D = args.layers * 4 * 128 * 4096
    lines = [
        f"D = {D:,} per example ({4 * D / GIB:.3f} GiB in fp32); {args.tokens} tokens/example; "
        f"worker cap RLIMIT_DATA {args.mem_cap_gib} GiB",
        "",
        "| path | batch | d | B x D x 4 bytes | model RSS | sketch build peak | pass peak RSS "
        "| pass peak - before | examples/s | CPU s / example | first batch s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    runs = [(p, int(b)) for b in args.batch_sizes.split(",") for p in ("factorized", "sjlt")]
    for path, bs in runs:
        gbytes = bs * D * 4
        cfg = {
            "path": path, "batch": bs, "layers": args.layers, "tokens": args.tokens,
            "batches": args.batches, "d": 8192, "cap_gib": args.mem_cap_gib,
            "threads": args.threads,
        }  # fmt: skip
        if path == "sjlt" and 2 * gbytes > args.mem_cap_gib * GIB:
            lines.append(
                f"| {path} | {bs} | 8,192 | {gbytes / GIB:.2f} GiB | not run: (B, D) gradients "
                f"+ their concatenation alone exceed the {args.mem_cap_gib} GiB cap ||||||||"
            )
            print(lines[-1], flush=True)
            continue
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(cfg)],
            capture_output=True, text=True, timeout=args.worker_timeout,
        )  # fmt: skip
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            asked = re.search(r"allocate (\d+) bytes", tail)
            why = f"allocating {int(asked[1]) / GIB:.2f} GiB more failed" if asked else tail[:100]
            lines.append(f"| {path} | {bs} | | {gbytes / GIB:.2f} GiB | {why} ||||||||")
        else:
            o = json.loads(proc.stdout.strip().splitlines()[-1])
            d = f"{o['d']:,}" + (f" (factor {o['factor']})" if path == "factorized" else "")
            lines.append(
                f"| {path} | {bs} | {d} | {gbytes / GIB:.2f} GiB | {o['model_gib']:.2f} "
                f"GiB | {o['sketch_gib']:.2f} GiB | {o['peak_gib']:.2f} GiB | "
                f"{o['peak_gib'] - o['before_gib']:.2f} GiB | {o['ex_per_s']:.2f} | "
                f"{o['cpu_s_per_ex']:.2f} | "
                f"{o['first_batch_s']:.1f} |"
            )
        print(lines[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=".cache/dataselect")
    ap.add_argument("--n", type=int, default=32, help="(a) examples")
    ap.add_argument("--seeds", type=int, default=3, help="(a) sketch seeds per row")
    ap.add_argument("--layers", type=int, default=8, help="(b) layers of the wide model")
    ap.add_argument("--tokens", type=int, default=16, help="(b) tokens per example")
    ap.add_argument("--batches", type=int, default=4, help="(b) batches per run (first untimed)")
    ap.add_argument("--batch-sizes", default="8,32,64", help="(b) comma-separated")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (see the docstring)")
    ap.add_argument("--mem-cap-gib", type=float, default=8.0)
    ap.add_argument("--worker-timeout", type=int, default=600)
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(
        f"# {platform.node()}, {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    if not args.skip_a:
        print(f"\n## (a) cosine distortion, {args.n} examples, {args.seeds} seeds per row\n")
        distortion(Path(args.cache), args.n, args.seeds)
    if not args.skip_b:
        print(f"\n## (b) one gradient pass, LoRA r=128 on q/k/v/o, {args.layers} x hidden 2048\n")
        memory_table(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
