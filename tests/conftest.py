"""Shared fixtures: a tiny random Llama + byte-level tokenizer (no hub), small example sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from dataselect.models import build_tiny_random

    return build_tiny_random(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture()
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.config.use_cache = False
    return model


@pytest.fixture()
def toy_examples():
    from dataselect.data.records import make_example

    out = []
    for i in range(12):
        a, b = i % 5 + 1, i % 3 + 2
        out.append(
            make_example(
                f"toy-{i}",
                "toy/add" if i % 2 else "toy/mul",
                [
                    {"role": "user", "content": f"What is {a} {'+' if i % 2 else '*'} {b}?"},
                    {"role": "assistant", "content": str(a + b if i % 2 else a * b)},
                ],
                {"answer": str(a + b if i % 2 else a * b), "subtask": "add" if i % 2 else "mul"},
            )
        )
    return out


def toy_add_examples(n: int = 12):
    """``n`` one-line additions ("What is i + i % 3?"), for training tests."""
    from dataselect.data.records import make_example

    return [
        make_example(
            f"toy-{i}", "toy/add",
            [{"role": "user", "content": f"What is {i} + {i % 3}?"},
             {"role": "assistant", "content": str(i + i % 3)}],
        )
        for i in range(n)
    ]  # fmt: skip
