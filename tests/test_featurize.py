"""Featurizing into a store: resumable after a kill, bit-identical to an uninterrupted pass."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from dataselect.data.formatting import tokenize_examples
from dataselect.features import featurize as fz
from dataselect.features.gradients import grad_dim
from dataselect.features.sketch import SketchSpec
from dataselect.features.store import GradientStore, StoreWriter
from dataselect.models import with_adapter, with_lora
from dataselect.training import list_checkpoints, train_lora

LORA = OmegaConf.create(
    {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
)
TRAIN = OmegaConf.create({"epochs": 1, "lr": 1e-2, "batch_size": 4, "warmup_ratio": 0.0})
CPU = OmegaConf.create({"accelerator": "cpu", "devices": 1})
real_collate = fz.collate


@pytest.fixture()
def setup(tiny_model_dir, tiny_tokenizer, toy_examples, tmp_path):
    from transformers import AutoModelForCausalLM

    toks, _ = tokenize_examples(tiny_tokenizer, toy_examples, 256)
    model = with_lora(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), LORA, seed=0)
    train_lora(model, tiny_tokenizer, toks, TRAIN, CPU, tmp_path / "warm", seed=0)
    (ckpt,) = list_checkpoints(tmp_path / "warm")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model = with_adapter(base, ckpt / "adapter", trainable=True)
    return model, toks, ckpt, tiny_tokenizer.pad_token_id


def run(model, toks, ckpt, pad_id, out, gtype, max_tokens=None):
    sketch = SketchSpec("sjlt", grad_dim(model), 32, seed=1)
    return fz.featurize(
        model,
        toks,
        out,
        gradient_type=gtype,
        sketch=sketch,
        spec={"model": "tiny"},
        checkpoint=ckpt,
        pad_id=pad_id,
        batching=fz.Batching(batch_size=2, shard_size=4, max_tokens=max_tokens),
        dtype="float32",
    )


def snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("gtype", ["sgd", "adam"])
def test_killed_featurization_resumes_to_identical_store(setup, tmp_path, monkeypatch, gtype):
    model, toks, ckpt, pad = setup
    whole = run(model, toks, ckpt, pad, tmp_path / "whole", gtype)
    assert len(whole) == len(toks) == 12 and whole.meta["spec"]["gradient_type"] == gtype

    real_write, calls = StoreWriter.write_shard, []

    def dying_write(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # after 1 full shard (4 rows), inside the second
            raise KeyboardInterrupt("killed")
        return real_write(self, *a, **k)

    monkeypatch.setattr(StoreWriter, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run(model, toks, ckpt, pad, tmp_path / "resumed", gtype)
    monkeypatch.setattr(StoreWriter, "write_shard", real_write)
    with pytest.raises(FileNotFoundError):  # never readable while incomplete
        GradientStore(tmp_path / "resumed")

    seen = []
    monkeypatch.setattr(
        fz,
        "collate",
        lambda chunk, pad_id: seen.extend(t.id for t in chunk) or real_collate(chunk, pad_id),
    )
    resumed = run(model, toks, ckpt, pad, tmp_path / "resumed", gtype)
    assert len(seen) == 8, "the resumed pass recomputes only the rows after the finished shard"
    assert snapshot(tmp_path / "resumed") == snapshot(tmp_path / "whole")
    assert resumed.ids == whole.ids


def test_adam_store_records_eps_share(setup, tmp_path):
    model, toks, ckpt, pad = setup
    store = run(model, toks, ckpt, pad, tmp_path / "a", "adam")
    share = fz.eps_share(store)
    assert share is not None and 0.0 <= share <= 1.0
    assert fz.eps_share(run(model, toks, ckpt, pad, tmp_path / "s", "sgd")) is None


def test_token_batches_bound_padded_tokens_and_keep_order():
    from dataselect.data.formatting import Tokenized
    from dataselect.features.featurize import token_batches

    toks = [Tokenized(str(i), [1] * n, [1] * n) for i, n in enumerate([10, 10, 10, 50, 60, 200])]
    batches = list(token_batches(toks, batch_size=4, max_tokens=120))
    assert [[t.id for t in b] for b in batches] == [["0", "1", "2"], ["3", "4"], ["5"]]
    assert all(len(b) * max(len(t.input_ids) for t in b) <= 120 for b in batches[:2])
    assert [len(b) for b in token_batches(toks, batch_size=4, max_tokens=None)] == [4, 2]


def test_token_budget_changes_batches_not_features(setup, tmp_path):
    model, toks, ckpt, pad = setup
    a = run(model, toks, ckpt, pad, tmp_path / "a", "sgd")
    longest = max(len(t.input_ids) for t in toks)
    b = run(model, toks, ckpt, pad, tmp_path / "b", "sgd", max_tokens=longest)  # 1 per batch
    assert a.ids == b.ids
    np.testing.assert_allclose(a.features(), b.features(), rtol=1e-4, atol=1e-6)


def test_nan_gradients_name_their_examples_and_leave_no_shard(setup, tmp_path):
    """A NaN in the adapter: the error names the batch's example ids; nothing is trusted."""
    import torch

    model, toks, ckpt, pad = setup
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        p.view(-1)[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite.*of batch \['toy-\d+'.*check these"):
        run(model, toks, ckpt, pad, tmp_path / "nan", "sgd")
    assert not list((tmp_path / "nan").glob("shard_*"))
    with pytest.raises(FileNotFoundError):
        GradientStore(tmp_path / "nan")
