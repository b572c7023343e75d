"""Shared fixtures: a tiny random Llama + byte-level tokenizer (no hub), small example sets."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHECKOUT = Path(__file__).resolve().parents[1]

# Where a run writes when nothing points it elsewhere (relative to the launch dir, i.e. the
# checkout): Hydra's run and sweep dirs, W&B, Lightning, the default cache. Tests write only
# under their tmp dirs; the session fails if any of these gains an entry (up to 3 levels deep:
# outputs/<date>/<time>, outputs/multirun/<date>/<time>, .cache/dataselect/<stage>/<key>).
WATCHED = ("outputs", "multirun", "wandb", "lightning_logs", ".cache")
WATCH_DEPTH = 3
_BEFORE = pytest.StashKey[set[str]]()
_LEAKED = pytest.StashKey[list[str]]()


def checkout_entries(root: Path = CHECKOUT) -> set[str]:
    """The paths (relative to ``root``) under the watched dirs, ``WATCH_DEPTH`` levels deep."""
    found: set[str] = set()
    stack = [(root / name, 0) for name in WATCHED]
    while stack:
        path, depth = stack.pop()
        if not path.exists() and not path.is_symlink():
            continue
        found.add(path.relative_to(root).as_posix())
        if depth < WATCH_DEPTH and path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):  # vanished or unreadable: nothing to add
                stack.extend((child, depth + 1) for child in path.iterdir())
    return found


@pytest.fixture(scope="session", autouse=True)
def hydra_outputs_under_tmp(tmp_path_factory):
    """Hydra's run and sweep dirs (``conf/config.yaml``) default to ``outputs/`` in the launch
    dir, the checkout: ``${oc.env:DATASELECT_OUTPUTS,outputs}/...``. A test that launches the
    CLI and sets only ``paths.output_dir`` (the drills' ``python -m dataselect``) still got a
    run dir there, with ``.hydra/`` and ``cli.log``. Point them at the session's tmp dir, for
    this process and every child it starts."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATASELECT_OUTPUTS", str(tmp_path_factory.mktemp("hydra-outputs")))
        yield


def pytest_sessionstart(session):
    session.config.stash[_BEFORE] = checkout_entries()


def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_BEFORE, None)
    if before is None:
        return
    leaked = sorted(checkout_entries() - before)
    session.config.stash[_LEAKED] = leaked
    if leaked and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    leaked = config.stash.get(_LEAKED, [])
    if leaked:
        terminalreporter.section("tests wrote into the checkout", sep="=", red=True, bold=True)
        terminalreporter.line(
            f"new under {CHECKOUT} since the session started (tests must write only under"
            " tmp dirs; or another process, e.g. a `dataselect` run, wrote there meanwhile):"
        )
        for path in leaked[:50]:
            terminalreporter.line(f"  {path}", red=True)
        if len(leaked) > 50:
            terminalreporter.line(f"  ... and {len(leaked) - 50} more")


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
