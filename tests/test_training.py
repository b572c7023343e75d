"""LoRA training: frozen base, answer-only loss, named AdamW state, lr schedule, atomic dirs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dataselect.data.formatting import IGNORE_INDEX, Tokenized, tokenize_examples
from dataselect.models import with_lora
from dataselect.training import (
    LoRALM,
    collate,
    list_checkpoints,
    load_optimizer_state,
    optimizer_state_by_name,
    train_lora,
)

LR = 1e-2
LORA = OmegaConf.create(
    {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
)
TRAINER = OmegaConf.create(
    {"accelerator": "cpu", "devices": 1, "precision": "32-true", "strategy": "auto"}
)


def stage_cfg(**over):
    base = {
        "epochs": 2, "lr": LR, "weight_decay": 0.0, "warmup_ratio": 0.5, "batch_size": 4,
        "grad_accum": 1, "betas": [0.9, 0.999], "eps": 1e-8, "max_steps": None,
        "log_every_n_steps": 1,
    }  # fmt: skip
    return OmegaConf.create({**base, **over})


def load_model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.config.use_cache = False
    return model


def lora_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def tokenized(tiny_model_dir):
    from conftest import toy_add_examples
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    examples = toy_add_examples()
    train, _ = tokenize_examples(tok, examples, max_length=64)
    assert len(train) == 12
    return tok, train


@pytest.fixture(scope="module")
def run(tiny_model_dir, tokenized, tmp_path_factory):
    """One 2-epoch x 3-step run (12 examples, batch 4, warmup_ratio 0.5), with before snapshots."""
    tok, train = tokenized
    model = with_lora(load_model(tiny_model_dir), LORA, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = tmp_path_factory.mktemp("run")
    dirs = train_lora(model, tok, train, stage_cfg(), TRAINER, out, seed=0)
    return {"model": model, "before": before, "dirs": dirs, "out": out}


def test_collate_right_pads():
    batch = collate([Tokenized("a", [5, 6, 7], [-100, 6, 7]), Tokenized("b", [8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_training_changes_lora_only(run):
    model, before = run["model"], run["before"]
    trainable = set(lora_names(model))
    assert trainable and all("lora_" in n for n in trainable)
    for name, p in model.named_parameters():
        if name not in trainable:
            assert torch.equal(p.detach(), before[name]), name
    b_names = [n for n in trainable if "lora_B" in n]
    assert all(torch.count_nonzero(before[n]) == 0 for n in b_names)  # PEFT init: B = 0
    params = dict(model.named_parameters())
    assert all(torch.count_nonzero(params[n]) > 0 for n in b_names)
    assert any(not torch.equal(params[n], before[n]) for n in trainable if "lora_A" in n)


def test_dropout_on_during_fit(tiny_model_dir):
    model = with_lora(load_model(tiny_model_dir), LORA, seed=0).eval()
    LoRALM(model, lr=LR).on_fit_start()
    assert all(m.training for m in model.modules())


def test_epoch_dirs_and_train_log(run):
    out, dirs = run["out"], run["dirs"]
    assert [d.name for d in dirs] == ["epoch_1", "epoch_2"]
    assert list_checkpoints(out) == dirs
    for d in dirs:
        assert (d / "COMPLETE").is_file()
        assert (d / "adapter" / "adapter_config.json").is_file()
        assert (d / "adapter" / "adapter_model.safetensors").is_file()
    # The last checkpoint's adapter is the trained model's LoRA weights.
    saved = load_file(str(dirs[-1] / "adapter" / "adapter_model.safetensors"))
    params = dict(run["model"].named_parameters())
    for key, t in saved.items():
        match = [n for n in params if n.replace(".default", "") == key]
        assert len(match) == 1 and torch.equal(params[match[0]].detach(), t), key
    logged = json.loads((out / "train_log.json").read_text())
    assert [e["epoch"] for e in logged["epochs"]] == [1, 2]
    assert all(math.isfinite(e["train_loss_mean"]) for e in logged["epochs"])
    assert logged["optimizer_steps"] == 6 and logged["examples_seen"] == 24
    assert logged["seconds"] > 0 and logged["examples_per_s"] > 0


def test_optimizer_state_by_name_and_lr_mean(run):
    model = run["model"]
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    # Schedule: 6 steps, ceil(0.5 * 6) = 3 warmup; lr used at step s: s/3 for s<3, (6-s)/3 after.
    used = [LR * f for f in (0, 1 / 3, 2 / 3, 1, 2 / 3, 1 / 3)]
    for e, d in enumerate(run["dirs"], start=1):
        state, meta = load_optimizer_state(d)
        assert meta["param_names"] == lora_names(model)
        assert list(state) == lora_names(model)
        for name, moments in state.items():
            assert set(moments) == {"exp_avg", "exp_avg_sq"}
            assert moments["exp_avg"].shape == shapes[name]
            assert moments["exp_avg_sq"].shape == shapes[name]
        assert any(torch.count_nonzero(m["exp_avg_sq"]) > 0 for m in state.values())
        assert meta["betas"] == [0.9, 0.999] and meta["eps"] == 1e-8
        assert meta["weight_decay"] == 0.0 and meta["epoch"] == e and meta["step"] == 3 * e
        epoch_lrs = used[3 * (e - 1) : 3 * e]
        assert meta["lr_mean"] > 0
        assert meta["lr_mean"] == pytest.approx(sum(epoch_lrs) / 3, rel=1e-9)
        assert meta["lr_last"] == pytest.approx(epoch_lrs[-1], rel=1e-9)
    assert load_optimizer_state(run["dirs"][0])[1]["lr_mean"] == pytest.approx(LR / 3)
    assert load_optimizer_state(run["dirs"][1])[1]["lr_mean"] == pytest.approx(2 * LR / 3)


def test_optimizer_state_looked_up_by_param_object():
    a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([b, a], lr=0.1)  # optimizer order differs from the name order
    (a.sum() * 2 + b.sum() * 3).backward()
    opt.step()
    flat = optimizer_state_by_name(opt, [("a", a), ("b", b)])
    assert torch.allclose(flat["a.exp_avg"], torch.full((2, 3), 0.1 * 2))
    assert torch.allclose(flat["b.exp_avg"], torch.full((4,), 0.1 * 3))
    assert torch.allclose(flat["b.exp_avg_sq"], torch.full((4,), 0.001 * 9))


def test_loss_is_mean_over_answer_tokens(tiny_model_dir, tokenized):
    tok, train = tokenized
    model = with_lora(load_model(tiny_model_dir), LORA, seed=0).eval()
    module = LoRALM(model, lr=LR)
    exs = train[:3]
    with torch.no_grad():
        loss = module(collate(exs, pad_id=tok.pad_token_id))
        total, count = 0.0, 0
        for ex in exs:  # unpadded, one example at a time, answer positions only
            logp = model(input_ids=torch.tensor([ex.input_ids])).logits[0].log_softmax(-1)
            for t in range(1, len(ex.labels)):
                if ex.labels[t] != IGNORE_INDEX:
                    total -= logp[t - 1, ex.labels[t]].item()
                    count += 1
        assert 0 < count < sum(len(ex.input_ids) - 1 for ex in exs)  # prompts are excluded
        assert loss.item() == pytest.approx(total / count, rel=1e-5)
        # Extra padding (a longer all-prompt row) changes nothing.
        filler = Tokenized("pad", [tok.pad_token_id] * 50, [IGNORE_INDEX] * 50)
        padded = module(collate([*exs, filler], pad_id=tok.pad_token_id))
        assert padded.item() == pytest.approx(loss.item(), rel=1e-5)


def test_same_seed_same_adapter_and_grad_accum_max_steps(run, tiny_model_dir, tokenized, tmp_path):
    tok, train = tokenized
    model = with_lora(load_model(tiny_model_dir), LORA, seed=0)
    dirs = train_lora(model, tok, train, stage_cfg(), TRAINER, tmp_path / "again", seed=0)
    for d0, d1 in zip(run["dirs"], dirs, strict=True):
        a = load_file(str(d0 / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(d1 / "adapter" / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # batch 2 x accumulate 2 = 3 optimizer steps per epoch; capped at 4 steps in epoch 2.
    model = with_lora(load_model(tiny_model_dir), LORA, seed=0)
    cfg = stage_cfg(batch_size=2, grad_accum=2, max_steps=4)
    dirs = train_lora(model, tok, train, cfg, TRAINER, tmp_path / "accum", seed=0)
    metas = [load_optimizer_state(d)[1] for d in dirs]
    assert [m["step"] for m in metas] == [3, 4]
    # 4 total steps, 2 warmup: lrs 0, 1/2, 1 | 1/2.
    assert [m["lr_mean"] for m in metas] == pytest.approx([LR / 2, LR / 2])


def test_list_checkpoints_skips_incomplete(tmp_path):
    for name, complete in [("epoch_1", True), ("epoch_2.tmp", False), ("epoch_3", False)]:
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "COMPLETE").write_text("")
    (tmp_path / "epoch_10").mkdir()
    (tmp_path / "epoch_10" / "COMPLETE").write_text("")
    assert [d.name for d in list_checkpoints(tmp_path)] == ["epoch_1", "epoch_10"]
    assert list_checkpoints(tmp_path / "missing") == []


def test_empty_train_raises(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = with_lora(load_model(tiny_model_dir), LORA, seed=0)
    with pytest.raises(ValueError, match="no training examples"):
        train_lora(model, tiny_tokenizer, [], stage_cfg(), TRAINER, tmp_path, seed=0)
