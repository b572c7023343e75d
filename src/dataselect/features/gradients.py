"""Per-example LoRA gradients and their LESS feature transforms (sgd | sign | adam).

g[b] is the gradient of example b's mean next-token loss (nats/token) over its own answer
tokens (labels != -100, shifted as in ``lm_loss``) w.r.t. the trainable (LoRA) parameters,
each flattened like ``p.reshape(-1)`` and concatenated in ``named_parameters`` order: (B, D)
float32. ``method="batched"`` does one forward and one backward for the whole batch: forward
hooks keep every LoRA Linear's input x (B, T, in) and its output; ``torch.autograd.grad`` of
sum_b loss_b w.r.t. the (small) lora_A outputs runs the backward, during which tensor hooks on
each output receive go (B, T, out) and write grad_W[b] = go[b]^T x[b] (B, out, in). No weight
gradient is ever accumulated, so no ``.grad`` is touched. ``method="loop"`` is the reference:
one unpadded forward/backward per example. ``per_example_reduced`` runs the same hooks but keeps
a caller's linear function of each weight's (go, x) instead of go[b]^T x[b] (the factorized
sketch: ``factorized.py``), so no (B, D) matrix is ever formed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from dataselect.data.formatting import IGNORE_INDEX

log = logging.getLogger(__name__)

GRADIENT_TYPES = ("sgd", "sign", "adam")

# reduce(k, go, x) -> (B, width_k): what the hooks keep of the k-th trainable weight's
# per-example gradient go[b]^T x[b], from go (B, T, out) and x (B, T, in), both float32.
Reduce = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def lora_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, param) of the trainable parameters, in ``model.named_parameters()`` order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters (is it a PeftModel with LoRA?)")
    return named


def grad_dim(model) -> int:
    """D: total number of trainable (LoRA) parameters."""
    return sum(p.numel() for _, p in lora_parameters(model))


def _answer_counts(labels: torch.Tensor) -> torch.Tensor:
    """(B,) number of answer tokens per row after the next-token shift; raises on empty rows."""
    count = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    empty = torch.nonzero(count == 0).flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no answer tokens (labels all -100): gradient is NaN")
    return count


def _per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token cross-entropy (nats/token) of each row over its own answer tokens."""
    logits, labels = logits[:, :-1].float(), labels.to(logits.device)
    ce = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    )  # fmt: skip
    return ce.view(labels.size(0), -1).sum(1) / _answer_counts(labels)


def _linear_owners(modules, params) -> list[tuple[torch.nn.Linear, str]] | None:
    """(Linear module, "weight" | "bias") owning each param, or None if batched cannot apply."""
    owner = {}
    for m in modules:
        if getattr(m, "lora_variant", None):  # DoRA & co. use lora_A/B weights directly
            return None
        if type(m) is torch.nn.Linear:
            for attr in ("weight", "bias"):
                p = getattr(m, attr)
                if p is not None and p.requires_grad:
                    owner[id(p)] = (m, attr)
    found = [owner.get(id(p)) for _, p in params]
    return None if any(o is None for o in found) else found


def _batched(
    model,
    batch: dict[str, torch.Tensor],
    params,
    owners,
    reduce: Reduce | None = None,
    widths: Sequence[int] | None = None,
) -> torch.Tensor:
    n = batch["input_ids"].size(0)
    grads: dict[int, torch.Tensor] = {}  # id(param) -> (B, *param.shape) or (B, width) float32
    index = {id(p): k for k, (_, p) in enumerate(params)}

    def put(p: torch.Tensor, g: torch.Tensor) -> None:  # adds up if a module ran twice
        grads[id(p)] = grads[id(p)] + g if id(p) in grads else g

    outputs: dict[int, torch.Tensor] = {}  # id -> output of a hooked module (kept alive)
    chained: set[int] = set()  # outputs of modules fed by a hooked module (lora_B's)

    def writer(module: torch.nn.Linear, x: torch.Tensor):
        def on_grad(go: torch.Tensor) -> None:
            go = go.detach().float().reshape(n, -1, module.out_features)
            xf = x.float().reshape(n, -1, module.in_features)
            w = module.weight
            if w.requires_grad and reduce is not None:
                put(w, reduce(index[id(w)], go, xf))
            elif w.requires_grad:  # (B, out, T) @ (B, T, in) -> (B, out, in)
                put(w, torch.bmm(go.mT, xf))
            if module.bias is not None and module.bias.requires_grad:
                put(module.bias, go.sum(1))

        return on_grad

    def forward_hook(module, args, output):
        if not output.requires_grad:
            return
        x = args[0]
        if id(x) in outputs:
            chained.add(id(output))
        output.register_hook(writer(module, x.detach()))
        outputs[id(output)] = output

    handles = [m.register_forward_hook(forward_hook) for m in dict.fromkeys(m for m, _ in owners)]
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        loss = _per_example_loss(out.logits, batch["labels"]).sum()
        del out
        # Ask only for the grads of outputs that are not downstream of another hooked output
        # (lora_A's, r wide): each lora_B output lies on the path to its own lora_A output, so
        # its hook runs too, and the big (B, T, out) grads are freed as the backward goes.
        wanted = [t for k, t in outputs.items() if k not in chained]
        if wanted:
            torch.autograd.grad(loss, wanted, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        outputs.clear()
    widths = [p.numel() for _, p in params] if widths is None else widths
    flat = [  # zeros for a LoRA module that did not run or does not reach the loss
        grads[id(p)].reshape(n, -1) if id(p) in grads else p.new_zeros(n, w).float()
        for (_, p), w in zip(params, widths, strict=True)
    ]
    return torch.cat(flat, dim=1)


def _loop(model, batch: dict[str, torch.Tensor], params) -> torch.Tensor:
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    lengths = mask.sum(1).tolist() if mask is not None else [ids.size(1)] * ids.size(0)
    tensors = [p for _, p in params]
    rows = []
    for b, length in enumerate(lengths):
        x, y = ids[b : b + 1, :length], labels[b : b + 1, :length]
        out = model(input_ids=x, attention_mask=torch.ones_like(x))
        loss = _per_example_loss(out.logits, y).sum()
        gs = torch.autograd.grad(loss, tensors, allow_unused=True)
        gs = [torch.zeros_like(p) if gp is None else gp for p, gp in zip(tensors, gs, strict=True)]
        rows.append(torch.cat([gp.float().reshape(-1) for gp in gs]))
    return torch.stack(rows)


def _run(model, batch: dict[str, torch.Tensor], compute) -> torch.Tensor:
    """``compute(modules, params, batch)`` on the parameters' device, in eval mode (modes
    restored afterwards), with the answer-token and finiteness checks of ``per_example_grads``."""
    params = lora_parameters(model)
    _answer_counts(batch["labels"])
    device = params[0][1].device
    batch = {
        k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels") if k in batch
    }
    modules = list(model.modules())
    modes = [m.training for m in modules]
    if any(modes):
        model.eval()
    try:
        with torch.enable_grad():
            g = compute(modules, params, batch)
    finally:
        if any(modes):  # train() first (it may have side effects), then the exact flags
            model.train(modes[0])
            for m, mode in zip(modules, modes, strict=True):
                m.training = mode
    bad = [] if torch.isfinite(g.sum(1)).all() else torch.nonzero(~g.isfinite().all(1)).flatten()
    if len(bad):
        raise FloatingPointError(f"non-finite per-example gradients in rows {bad.tolist()}")
    return g


def per_example_grads(
    model, batch: dict[str, torch.Tensor], method: str = "batched"
) -> torch.Tensor:
    """(B, D) float32 per-example gradients of a right-padded ``collate`` batch (see module doc).

    The model runs in eval mode (dropout off) and its modes are restored afterwards. Raises
    ValueError naming the rows with no answer token, FloatingPointError naming non-finite rows.
    ``batched`` falls back to ``loop`` (with a warning) when a trainable parameter is not the
    weight/bias of a plain ``nn.Linear`` called as a module (e.g. DoRA, embedding LoRA)."""
    if method not in ("batched", "loop"):
        raise ValueError(f"method must be 'batched' or 'loop', got {method!r}")

    def compute(modules, params, batch):
        owners = _linear_owners(modules, params) if method == "batched" else None
        if method == "batched" and owners is None:
            log.warning("per_example_grads: trainable params are not all nn.Linear; using 'loop'")
        return _batched(model, batch, params, owners) if owners else _loop(model, batch, params)

    return _run(model, batch, compute)


def hooks_apply(model) -> bool:
    """Whether ``per_example_reduced`` applies: every trainable parameter is the weight of a
    plain ``nn.Linear`` (LoRA's lora_A / lora_B without bias; not DoRA, not embedding LoRA)."""
    owners = _linear_owners(list(model.modules()), lora_parameters(model))
    return owners is not None and all(attr == "weight" for _, attr in owners)


def per_example_reduced(
    model, batch: dict[str, torch.Tensor], reduce: Reduce, widths: Sequence[int]
) -> torch.Tensor:
    """(B, sum(widths)) float32: ``reduce(k, go, x)`` (B, widths[k]) of every trainable weight
    k (``lora_parameters`` order), concatenated; zeros for a module that did not run. One
    batched forward/backward as ``per_example_grads`` (same checks, eval mode), but the
    (B, out, in) gradients are never formed. ``reduce`` must be linear in go: the results of a
    module that runs twice add up. Needs ``hooks_apply(model)``."""
    if not hooks_apply(model):
        raise ValueError(
            "per_example_reduced needs every trainable parameter to be the weight of a plain "
            "nn.Linear (LoRA without bias, no DoRA); materialize with per_example_grads instead"
        )

    def compute(modules, params, batch):
        if len(widths) != len(params):
            raise ValueError(f"{len(widths)} widths for {len(params)} trainable parameters")
        owners = _linear_owners(modules, params)
        return _batched(model, batch, params, owners, reduce, widths)

    return _run(model, batch, compute)


def _moments(g, state: torch.Tensor, beta: float, square: bool) -> torch.Tensor:
    """m' = b1 m + (1-b1) g, or v' = b2 v + (1-b2) g^2 (``square``): (B, D) float32."""
    if state.numel() != g.size(1):
        raise ValueError(f"adam state has {state.numel()} coordinates, g has {g.size(1)}")
    s = state.to(g.device, torch.float32).reshape(1, -1)
    g = g.float()
    return torch.addcmul(s * beta, g, g, value=1 - beta) if square else torch.lerp(s, g, 1 - beta)


def adam_features(
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    step: int | None = None,
    form: str = "less",
) -> torch.Tensor:
    """(B, D) float32 Adam update direction of each example's g (B, D) from the state m, v (D,).

    ``less`` (LESS's code): m' / sqrt(v' + eps), no bias correction. ``textbook``: bias-corrected
    with t = step + 1 (``step`` = optimizer steps taken, required), mhat / (sqrt(vhat) + eps)."""
    b1, b2 = float(betas[0]), float(betas[1])
    m, v = _moments(g, exp_avg, b1, False), _moments(g, exp_avg_sq, b2, True)
    if form == "less":
        return m / torch.sqrt(v + eps)
    if form == "textbook":
        if step is None:
            raise ValueError("adam form 'textbook' needs the optimizer step count")
        t = int(step) + 1
        return (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
    raise ValueError(f"adam form must be 'less' or 'textbook', got {form!r}")


def eps_dominance(
    g: torch.Tensor, exp_avg_sq: torch.Tensor, betas: Sequence[float], eps: float
) -> torch.Tensor:
    """(B,) share in [0, 1] of coordinates where eps > v' (the preconditioner is ~constant)."""
    return (_moments(g, exp_avg_sq, float(betas[1]), True) < eps).float().mean(1)


def flat_adam_state(
    state: Mapping[str, Mapping[str, torch.Tensor]],
    names: Sequence[str],
    shapes: Sequence[torch.Size] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp_avg, exp_avg_sq), each (D,) float32, concatenated in ``names`` order.

    ``names`` must be the model's ``lora_parameters`` names; ``shapes`` (optional, aligned with
    ``names``) are checked too. Raises ValueError naming a missing, extra or mis-shaped entry."""
    names, known = list(names), set(names)
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"saved adam state has no entry for parameter(s) {missing[:5]}")
    extra = [n for n in state if n not in known]
    if extra:
        raise ValueError(f"saved adam state has parameter(s) the model lacks: {extra[:5]}")
    ms, vs = [], []
    for i, n in enumerate(names):
        m, v = state[n].get("exp_avg"), state[n].get("exp_avg_sq")
        if m is None or v is None:
            raise ValueError(f"saved adam state of {n!r} lacks exp_avg or exp_avg_sq")
        want = tuple(shapes[i]) if shapes is not None else tuple(m.shape)
        if tuple(m.shape) != want or tuple(v.shape) != want:
            raise ValueError(
                f"saved adam state of {n!r} has shapes {tuple(m.shape)}/{tuple(v.shape)}, "
                f"parameter is {want}"
            )
        ms.append(m.float().reshape(-1))
        vs.append(v.float().reshape(-1))
    return torch.cat(ms), torch.cat(vs)


def to_features(
    g: torch.Tensor,
    gradient_type: str,
    adam: tuple[torch.Tensor, torch.Tensor] | None = None,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    step: int | None = None,
    adam_form: str = "less",
) -> torch.Tensor:
    """(B, D) float32 features: ``sgd`` g, ``sign`` sign(g), ``adam`` ``adam_features`` of g
    with ``adam`` = (exp_avg, exp_avg_sq) from ``flat_adam_state``."""
    if gradient_type == "sgd":
        return g.float()
    if gradient_type == "sign":
        return torch.sign(g).float()
    if gradient_type == "adam":
        if adam is None:
            raise ValueError("gradient_type 'adam' needs the checkpoint's (exp_avg, exp_avg_sq)")
        return adam_features(g, adam[0], adam[1], betas, eps, step, form=adam_form)
    raise ValueError(f"gradient_type must be one of {GRADIENT_TYPES}, got {gradient_type!r}")
