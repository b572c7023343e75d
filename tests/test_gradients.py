"""Per-example LoRA gradients (batched hooks vs loop vs autograd) and the sgd/sign/adam features."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model

from dataselect.data.formatting import IGNORE_INDEX, Tokenized
from dataselect.features.gradients import (
    adam_features,
    eps_dominance,
    flat_adam_state,
    grad_dim,
    lora_parameters,
    per_example_grads,
    to_features,
)
from dataselect.models import with_lora
from dataselect.training import collate, lm_loss, load_optimizer_state, train_lora

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
TRAINER = OmegaConf.create(
    {"accelerator": "cpu", "devices": 1, "precision": "32-true", "strategy": "auto"}
)


def load_model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.config.use_cache = False
    return model


def lora_model(model_dir, targets, seed=0):
    """LoRA (dropout 0.1, so eval mode matters) with random B, so every grad is non-zero."""
    cfg = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": targets})
    model = with_lora(load_model(model_dir), cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def examples(lengths=(21, 7, 14, 30, 9), answers=(5, 3, 1, 12, 9)) -> list[Tokenized]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i, (n, k) in enumerate(zip(lengths, answers, strict=True)):
        ids = torch.randint(3, 200, (n,), generator=gen).tolist()
        out.append(Tokenized(f"ex-{i}", ids, [IGNORE_INDEX] * (n - k) + ids[n - k :]))
    return out


def reference(model, exs: list[Tokenized]) -> torch.Tensor:
    """Plain autograd on each example alone, unpadded, in eval mode."""
    model.eval()
    params = [p for _, p in lora_parameters(model)]
    rows = []
    for ex in exs:
        ids = torch.tensor([ex.input_ids])
        loss = lm_loss(model(input_ids=ids).logits, torch.tensor([ex.labels]))
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max over rows of max |a - b| / max |b|."""
    return ((a - b).abs().amax(1) / b.abs().amax(1)).max().item()


def assert_clean(model) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._backward_hooks, name
        assert not m._forward_pre_hooks, name
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("targets", [ATTN, ATTN + MLP], ids=["attn", "attn+mlp"])
def test_per_example_grads_match_autograd(tiny_model_dir, targets, caplog):
    model = lora_model(tiny_model_dir, targets)
    exs = examples()
    ref = reference(model, exs)
    assert ref.shape == (len(exs), grad_dim(model)) and (ref.abs().amax(1) > 0).all()
    batch = collate(exs, pad_id=0)
    model.train()  # per_example_grads must switch dropout off and restore the mode
    for method in ("batched", "loop"):
        g = per_example_grads(model, batch, method=method)
        assert g.dtype == torch.float32 and g.shape == ref.shape
        assert rel_err(g, ref) < 1e-5, method
        assert all(m.training for m in model.modules())
        assert_clean(model)
    # Examples do not mix: a row's gradient does not depend on its batch mates.
    alone = per_example_grads(model, collate(exs[1:2], pad_id=0))
    assert rel_err(alone, ref[1:2]) < 1e-5
    assert "using 'loop'" not in caplog.text  # the hook path ran, not the fallback


def test_lora_parameters_order_and_dim(tiny_model_dir):
    model = lora_model(tiny_model_dir, ATTN)
    named = lora_parameters(model)
    assert [n for n, _ in named] == [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n, _ in named)
    assert grad_dim(model) == sum(p.numel() for _, p in named)
    with pytest.raises(ValueError, match="no trainable"):
        lora_parameters(load_model(tiny_model_dir).requires_grad_(False))


def test_dora_falls_back_to_loop(tiny_model_dir, caplog):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_dir), cfg)
    exs = examples()[:3]
    g = per_example_grads(model, collate(exs, pad_id=0), method="batched")
    assert rel_err(g, reference(model, exs)) < 1e-5
    assert "using 'loop'" in caplog.text
    assert_clean(model)


@pytest.mark.parametrize("gradient_type", ["sgd", "sign", "adam"])
def test_features_batched_equal_loop(tiny_model_dir, gradient_type):
    model = lora_model(tiny_model_dir, ATTN)
    batch = collate(examples(), pad_id=0)
    gen = torch.Generator().manual_seed(2)
    d = grad_dim(model)
    adam = (1e-3 * torch.randn(d, generator=gen), 1e-6 * torch.rand(d, generator=gen))
    feats = {
        method: to_features(
            per_example_grads(model, batch, method=method), gradient_type, adam, step=3
        )
        for method in ("batched", "loop")
    }
    a, b = feats["batched"], feats["loop"]
    if gradient_type == "sign":  # sign may only flip on coordinates at round-off level
        g = per_example_grads(model, batch, method="loop")
        clear = g.abs() > 1e-4 * g.abs().amax(1, keepdim=True)
        assert torch.equal(a[clear], b[clear]) and (a == b).float().mean() > 0.999
    else:
        assert rel_err(a, b) < 1e-5


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """2 optimizer steps of train_lora (8 examples, batch 4, 1 epoch): a real saved AdamW state."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    cfg = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ATTN})
    model = with_lora(load_model(tiny_model_dir), cfg, seed=0)
    stage = OmegaConf.create(
        {"epochs": 1, "lr": 1e-2, "weight_decay": 0.0, "warmup_ratio": 0.0, "batch_size": 4,
         "grad_accum": 1, "betas": [0.8, 0.99], "eps": 1e-8, "max_steps": None}
    )  # fmt: skip
    out = tmp_path_factory.mktemp("adam")
    dirs = train_lora(model, tok, examples(range(10, 18), range(1, 9)), stage, TRAINER, out, 0)
    state, meta = load_optimizer_state(dirs[-1])
    return model, state, meta


def test_adam_features_match_hand_formula(trained):
    model, state, meta = trained
    named = lora_parameters(model)
    names = [n for n, _ in named]
    m, v = flat_adam_state(state, names, shapes=[p.shape for _, p in named])
    assert torch.equal(m, torch.cat([state[n]["exp_avg"].reshape(-1) for n in names]))
    assert torch.equal(v, torch.cat([state[n]["exp_avg_sq"].reshape(-1) for n in names]))
    assert meta["step"] == 2 and (v > 0).any()
    g = per_example_grads(model, collate(examples(), pad_id=0))
    b1, b2, eps, t = 0.8, 0.99, 1e-8, 3  # the saved betas; t = step + 1
    m1, v1 = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    less = m1 / torch.sqrt(v1 + eps)
    textbook = (m1 / (1 - b1**t)) / (torch.sqrt(v1 / (1 - b2**t)) + eps)
    kw = {"betas": meta["betas"], "eps": meta["eps"], "step": meta["step"]}
    got = to_features(g, "adam", (m, v), **kw)
    assert rel_err(got, less) < 1e-6
    assert torch.equal(got, adam_features(g, m, v, **kw))  # "less" is the default form
    got_tb = to_features(g, "adam", (m, v), adam_form="textbook", **kw)
    assert rel_err(got_tb, textbook) < 1e-6
    assert rel_err(got_tb, got) > 1e-2
    assert torch.equal(to_features(g, "sgd"), g)
    assert torch.equal(to_features(g, "sign"), torch.sign(g))
    with pytest.raises(ValueError, match="needs the optimizer step"):
        adam_features(g, m, v, form="textbook")


def test_eps_dominance_hand_worked():
    g = torch.tensor([[0.0, 1e-3, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    v = torch.tensor([0.0, 0.0, 0.0, 1e-5])
    # v' = 0.999 v + 0.001 g^2: row 0 -> [0, 1e-9, 1e-3, 9.99e-6], eps wins on 2 of 4.
    share = eps_dominance(g, v, betas=(0.9, 0.999), eps=1e-8)
    assert share.tolist() == [0.5, 0.0]


def test_no_answer_tokens_and_failures_leave_model_clean(tiny_model_dir):
    model = lora_model(tiny_model_dir, ATTN)
    exs = examples()[:3]
    exs[1] = Tokenized("empty", exs[1].input_ids, [IGNORE_INDEX] * len(exs[1].input_ids))
    for method in ("batched", "loop"):
        with pytest.raises(ValueError, match=r"rows \[1\]"):
            per_example_grads(model, collate(exs, pad_id=0), method=method)
        assert_clean(model)
    # Only the first label (never predicted after the shift) is not an answer token either.
    only_first = [Tokenized("first", [5, 6, 7], [5, IGNORE_INDEX, IGNORE_INDEX])]
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        per_example_grads(model, collate(only_first, pad_id=0))
    # An error inside the forward (token id out of range) still removes the hooks and the mode.
    model.train()
    bad = collate([Tokenized("oob", [5, 10**6, 7], [5, 6, 7])], pad_id=0)
    with pytest.raises(IndexError):
        per_example_grads(model, bad)
    assert_clean(model)
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="method"):
        per_example_grads(model, collate(examples()[:1], pad_id=0), method="vmap")


def test_non_finite_gradient_raises(tiny_model_dir):
    model = lora_model(tiny_model_dir, ATTN)
    with torch.no_grad():
        lora_parameters(model)[0][1][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"rows \[0, 1\]"):
        per_example_grads(model, collate(examples()[:2], pad_id=0))
    assert_clean(model)


def test_mismatched_adam_state_raises():
    names = ["a.lora_A.weight", "a.lora_B.weight"]
    good = {n: {"exp_avg": torch.zeros(2, 3), "exp_avg_sq": torch.ones(2, 3)} for n in names}
    m, v = flat_adam_state(good, names, shapes=[(2, 3), (2, 3)])
    assert m.shape == v.shape == (12,)
    with pytest.raises(ValueError, match="a.lora_B.weight"):
        flat_adam_state({names[0]: good[names[0]]}, names)
    with pytest.raises(ValueError, match=r"a.lora_A.weight.*\(2, 3\).*\(3, 2\)"):
        flat_adam_state(good, names, shapes=[(3, 2), (2, 3)])
    skew = {**good, names[1]: {"exp_avg": torch.zeros(2, 3), "exp_avg_sq": torch.ones(6)}}
    with pytest.raises(ValueError, match="a.lora_B.weight"):
        flat_adam_state(skew, names)
    with pytest.raises(ValueError, match="model lacks.*b.lora_A"):
        flat_adam_state({**good, "b.lora_A.weight": good[names[0]]}, names)
    g = torch.ones(2, 12)
    with pytest.raises(ValueError, match="needs the checkpoint"):
        to_features(g, "adam")
    with pytest.raises(ValueError, match="coordinates"):
        to_features(g, "adam", (torch.zeros(11), torch.zeros(11)))
    with pytest.raises(ValueError, match="gradient_type"):
        to_features(g, "rademacher")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("gradient_type", ["sgd", "adam"])
def test_batched_gradients_on_cuda_match_cpu(tiny_model_dir, gradient_type):
    """The batched hooks on a CUDA device give the CPU's per-example gradients and features
    (up to summation order), and the loop reference on CUDA agrees with both."""
    batch = collate(examples(), pad_id=0)
    cpu = lora_model(tiny_model_dir, ATTN + MLP)
    gpu = lora_model(tiny_model_dir, ATTN + MLP).cuda()
    g_cpu = per_example_grads(cpu, batch)
    g_gpu = per_example_grads(gpu, batch)
    assert g_gpu.device.type == "cuda"
    assert rel_err(g_gpu.cpu(), g_cpu) < 1e-4
    assert rel_err(per_example_grads(gpu, batch, method="loop").cpu(), g_cpu) < 1e-4
    D = grad_dim(cpu)
    adam = (torch.full((D,), 1e-3), torch.full((D,), 1e-6))
    f_cpu = to_features(g_cpu, gradient_type, adam)
    f_gpu = to_features(g_gpu, gradient_type, tuple(t.cuda() for t in adam))
    assert rel_err(f_gpu.cpu(), f_cpu) < 1e-4
