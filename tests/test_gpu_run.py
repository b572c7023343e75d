"""The GPU run script's CPU fallback: every step runs and the table says what it saw."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "gpu_run.py"


def test_gpu_run_cpu_fallback_runs_every_step(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    gpu_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_run)
    out = tmp_path / "out"
    table = gpu_run.main(["--cpu", "--out", str(out), "--n", "8", "--cache", str(tmp_path / "c")])
    steps = [r["step"] for r in table.rows]
    assert steps == [
        "environment",
        "train",
        "featurize sjlt 256",
        "featurize rademacher 256",
        "cuda tests",
        "ddp featurize, 1 rank",
    ]
    rows = {r["step"]: r for r in table.rows}
    assert rows["environment"]["device"] == "cpu"
    assert rows["train"]["examples_per_s"] > 0
    assert all(rows[f"featurize {k} 256"]["examples_per_s"] > 0 for k in ("sjlt", "rademacher"))
    assert rows["ddp featurize, 1 rank"]["identical"] is True
    cuda = rows["cuda tests"]["result"]
    assert "(exit 0)" in cuda
    if not torch.cuda.is_available():  # the CUDA tests exist and are skipped, not missing
        assert "skipped" in cuda and "passed" not in cuda
    saved = json.loads((out / "gpu_run.json").read_text())
    assert [r["step"] for r in saved["rows"]] == steps
    assert "| ddp featurize, 1 rank | same bytes as one process" in (out / "gpu_run.md").read_text()
