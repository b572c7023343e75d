"""Factorized LoRA sketch (as LoGra, Bergson): per-example projected gradients from the hooks.

For a LoRA weight W (out x in) an example's gradient is G = sum_t go_t x_t^T (go_t: the
gradient of W's output at token t, x_t: its input; ``gradients.py``). With factor matrices
P_out (out x k_out) and P_in (in x k_in) its sketch is the k_out x k_in matrix

    Y = P_out^T G P_in = sum_t (P_out^T go_t) (P_in^T x_t)^T,

computed from the two projected factors: neither G nor a batch's (B, D) gradient matrix is
formed. Flattened row-major, vec(Y) = vec(G) @ (P_out kron P_in), so the sketch is the D x d
matrix S = blockdiag_b(P_out,b kron P_in,b) over the LoRA weights b in ``named_parameters``
order (the layout of ``per_example_grads``): ``FactorizedSketch.entries`` writes it out.

Definition (``SketchSpec("factorized", D, d, seed, factor=k, blocks=((out, in), ...))``, built
by ``factorized_spec``): k_side = min(k, n_side), so d = sum_b k_out,b * k_in,b. A side no wider
than k is kept whole (P = identity, exact: LoRA's rank-r side when k >= r). Otherwise P is the
n x k Rademacher sketch of ``sketch.py`` (entries +-1/sqrt(k)) with seed h(2b + s), s = 0 for
P_out and 1 for P_in, where h(c) is the SplitMix64 stream of the spec's key (``hash64``): the
same bits on every device, like the other kinds. The factors are independent with
E[P P^T] = I, so E[S S^T] = I and sketched inner products are unbiased. Rademacher rather than
Gaussian: S's entries are then +-1/sqrt(k_out k_in), whose low fourth moment keeps the
variance of sketched inner products lowest.

Only SGD features: the sketch is linear in G, which ``gradient_type=sgd`` (and validation
gradients) are. Sign and Adam features are elementwise functions of the full gradient, which
is never formed here; use an sjlt / rademacher sketch for them (``check_gradient_type``).

Costs per weight and batch, T padded tokens (``route="auto"`` takes the fewer flops):
``factors`` projects go and x (T (out k_out + in k_in + k_out k_in)) and gets the exact |G|^2
from Gram matrices, sum_{t,s} (go_t . go_s)(x_t . x_s) (T^2 (out + in)); ``full`` forms G
(T out in) and projects it. Either way one weight's (B, out, in) or (B, T, k) at a time. The
factor matrices (4 bytes x sum_b (out k_out + in k_in)) are cached per device.

Sizes: LoRA r = 8 on SmolLM2-135M's q/k/v/o (240 weights, (8, 576) and (576 | 192, 8)): factor
4 gives d = 3,840, factor 6 gives 8,640, and factor k >= 8 gives 240 * 8 * k. Accuracy: at equal
d its cosine error on real gradients measured 3-4x sjlt's (``factorized_bench.py``, RESULTS.md):
use it where (B, D) gradients do not fit, with a larger d.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from dataselect.features.gradients import (
    hooks_apply,
    lora_parameters,
    per_example_grads,
    per_example_reduced,
)
from dataselect.features.sketch import Sketch, SketchSpec, factor_dims, hash64

log = logging.getLogger(__name__)

ROUTES = ("auto", "factors", "full")
_M64 = (1 << 64) - 1


def factorized_spec(model, factor: int | None, seed: int = 0, dim: int | None = None) -> SketchSpec:
    """The factorized sketch of ``model``'s LoRA weights (their (out, in) shapes, in
    ``lora_parameters`` order) with factor dimension ``factor``; ``factor=None`` takes the
    smallest factor whose output dimension reaches ``dim`` (``auto_factor``)."""
    params = lora_parameters(model)
    if factor is None:
        if dim is None:
            raise ValueError("a factorized sketch needs a factor or a target dim")
        factor = auto_factor([tuple(p.shape) for _, p in params], dim)
    if factor < 1:
        raise ValueError(f"a factorized sketch needs factor >= 1, got {factor}")
    flat = [n for n, p in params if p.dim() != 2]
    if flat:
        raise ValueError(
            f"a factorized sketch needs every trainable parameter to be a 2-D weight; {flat[:3]} "
            "are not (a LoRA bias?): use an sjlt sketch"
        )
    blocks = tuple((int(p.shape[0]), int(p.shape[1])) for _, p in params)
    d = sum(a * b for a, b in factor_dims(blocks, int(factor)))
    D = sum(o * i for o, i in blocks)
    return SketchSpec("factorized", D, d, seed, factor=factor, blocks=blocks)


def auto_factor(blocks, dim: int) -> int:
    """The smallest factor k whose factorized sketch of ``blocks`` ((out, in) shapes) has at
    least ``dim`` dimensions; the largest useful k (every side whole, d = D) if none has."""
    if dim < 1:
        raise ValueError(f"a factorized sketch needs dim >= 1, got {dim}")
    blocks = [(int(o), int(i)) for o, i in blocks]
    top = max(max(b) for b in blocks)

    def d(k: int) -> int:
        return sum(a * b for a, b in factor_dims(blocks, k))

    lo, hi = 1, top  # d is non-decreasing in k: bisect for the first k with d(k) >= dim
    if d(hi) < dim:
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if d(mid) < dim else (lo, mid)
    return lo


def check_gradient_type(spec: SketchSpec | str, gradient_type: str) -> None:
    """Raise unless the features can be sketched by ``spec`` (or a sketch of that kind):
    factorized sketches take SGD features only."""
    kind = spec if isinstance(spec, str) else spec.kind
    if kind == "factorized" and gradient_type != "sgd":
        raise ValueError(
            f"sketch kind 'factorized' cannot sketch {gradient_type!r} features: it projects each "
            "LoRA weight's gradient from its two factors without forming it, which only the "
            f"linear sgd features allow, while {gradient_type} features are elementwise "
            f"functions of the full gradient; use sjlt/rademacher for {gradient_type} features "
            "(or gradient_type=sgd)"
        )


def block_sq_norms(go: Tensor, x: Tensor, route: str = "auto") -> Tensor:
    """(B,) |G_b|^2 of G_b = go[b]^T x[b], from go (B, T, out) and x (B, T, in) (see module)."""
    _, T, o = go.shape
    i = x.size(2)
    if route == "full" or (route == "auto" and T * o * i <= T * T * (o + i)):
        return torch.bmm(go.mT, x).square().sum((1, 2))
    return (torch.bmm(go, go.mT) * torch.bmm(x, x.mT)).sum((1, 2))


class FactorizedSketch:
    """Applies a factorized SketchSpec: ``project(g)`` on (B, D) gradients (the reference and
    the fallback), ``reduce(b, go, x)`` from the hooks, ``entries`` the explicit matrix."""

    def __init__(
        self, spec: SketchSpec, device: str | torch.device = "cpu", route: str = "auto"
    ) -> None:
        if spec.kind != "factorized":
            raise ValueError(f"FactorizedSketch needs kind 'factorized', got {spec.kind!r}")
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        self.spec, self.device, self.route = spec, torch.device(device), route
        self.dims = factor_dims(spec.blocks, spec.factor)
        self.rows, self.cols = [0], [0]  # block b: rows[b]:rows[b+1] of g, cols[b]:... of y
        for (o, i), (ko, ki) in zip(spec.blocks, self.dims, strict=True):
            self.rows.append(self.rows[-1] + o * i)
            self.cols.append(self.cols[-1] + ko * ki)
        seeds = hash64(spec.key, torch.arange(2 * len(spec.blocks))).tolist()
        self.seeds = [s & _M64 for s in seeds]  # factor (b, side): seeds[2 b + side]
        self._factors: dict[tuple[int, str], tuple[Tensor | None, Tensor | None]] = {}

    def factors(self, b: int, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """(P_out, P_in) of block b, float32 (n, k) on ``device``; None for an identity side."""
        key = (b, str(device))
        if key not in self._factors:
            pair = []
            for side, (n, k) in enumerate(zip(self.spec.blocks[b], self.dims[b], strict=True)):
                sub = SketchSpec("rademacher", n, k, seed=self.seeds[2 * b + side])
                pair.append(None if k == n else Sketch(sub, device=device).entries())
            self._factors[key] = (pair[0], pair[1])
        return self._factors[key]

    def _project_block(self, b: int, G: Tensor) -> Tensor:
        """(B, out, in) gradients of block b -> (B, k_out * k_in)."""
        po, pi = self.factors(b, G.device)
        y = G if pi is None else G @ pi
        y = y if po is None else po.mT @ y
        return y.reshape(G.size(0), -1)

    def reduce(self, b: int, go: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(sketch (B, k_out * k_in), |G|^2 (B,)) of block b from go (B, T, out), x (B, T, in)."""
        (_, T, o), i = go.shape, x.size(2)
        ko, ki = self.dims[b]
        po, pi = self.factors(b, go.device)
        full = T * o * i + o * i * ki * (pi is not None) + o * ki * ko * (po is not None)
        via = T * (o * ko * (po is not None) + i * ki * (pi is not None) + ko * ki + T * (o + i))
        if self.route == "full" or (self.route == "auto" and full <= via):
            G = torch.bmm(go.mT, x)
            return self._project_block(b, G), G.square().sum((1, 2))
        a = go if po is None else go @ po
        c = x if pi is None else x @ pi
        y = torch.bmm(a.mT, c).reshape(go.size(0), -1)
        return y, block_sq_norms(go, x, route="factors")

    @torch.no_grad()
    def project(self, g: Tensor) -> Tensor:
        """(B, D) -> (B, d) float32 on g's device (a 1-D g gives a 1-D result)."""
        s = self.spec
        if g.shape[-1] != s.dim_in or g.dim() not in (1, 2):
            raise ValueError(f"expected (B, {s.dim_in}) input, got {tuple(g.shape)}")
        x = g.reshape(-1, s.dim_in).float()
        out = [
            self._project_block(b, x[:, self.rows[b] : self.rows[b + 1]].reshape(-1, o, i))
            for b, (o, i) in enumerate(s.blocks)
        ]
        y = torch.cat(out, dim=1)
        return y if g.dim() == 2 else y[0]

    def entries(self, r0: int = 0, r1: int | None = None) -> Tensor:
        """Rows r0:r1 of the explicit matrix S, float32 (r1 - r0, d). For tests and tiny models."""
        r1 = self.spec.dim_in if r1 is None else r1
        m = torch.zeros(r1 - r0, self.spec.dim_out, device=self.device)
        for b, (o, i) in enumerate(self.spec.blocks):
            lo, hi = max(r0, self.rows[b]), min(r1, self.rows[b + 1])
            if lo >= hi:
                continue
            po, pi = self.factors(b, self.device)
            po = torch.eye(o, device=self.device) if po is None else po
            pi = torch.eye(i, device=self.device) if pi is None else pi
            q = torch.arange(lo, hi, device=self.device) - self.rows[b]  # q = p * in + j
            rows = po[q // i][:, :, None] * pi[q % i][:, None, :]  # kron row: P_out[p] x P_in[j]
            m[lo - r0 : hi - r0, self.cols[b] : self.cols[b + 1]] = rows.reshape(hi - lo, -1)
        return m


def make_sketch(spec: SketchSpec, device: str | torch.device = "cpu"):
    """The applier of any spec: ``FactorizedSketch`` for kind factorized, else ``Sketch``."""
    return FactorizedSketch(spec, device) if spec.kind == "factorized" else Sketch(spec, device)


def per_example_sketch(
    model, batch: dict[str, Tensor], sketch: FactorizedSketch, method: str = "batched"
) -> tuple[Tensor, Tensor]:
    """(features (B, d), |g| (B,)) float32: the factorized sketch of each example's SGD
    gradient (as ``per_example_grads``: eval mode, same checks) and its exact norm, without
    forming the gradients. ``method="loop"``, or a model the batched hooks do not cover (DoRA,
    a LoRA bias), materializes them instead: ``sketch.project(g)``, the same matrix."""
    shapes = tuple(tuple(p.shape) for _, p in lora_parameters(model))
    if shapes != sketch.spec.blocks:
        raise ValueError(
            f"the factorized sketch was built for {len(sketch.spec.blocks)} LoRA weights "
            f"{sketch.spec.blocks[:2]}..., the model has {len(shapes)}: {shapes[:2]}...; "
            "rebuild it with factorized_spec(model, factor, seed)"
        )
    if method not in ("batched", "loop"):
        raise ValueError(f"method must be 'batched' or 'loop', got {method!r}")
    materialize = method == "loop" or not hooks_apply(model)
    if materialize and method == "batched":
        log.warning("factorized sketch: trainable params are not all Linear weights; materializing")
    if materialize:
        g = per_example_grads(model, batch, method=method)
        return sketch.project(g), g.norm(dim=1)
    n = batch["input_ids"].size(0)
    sq = torch.zeros(n, dtype=torch.float32, device=next(model.parameters()).device)
    seen: set[int] = set()

    def reduce(b: int, go: Tensor, x: Tensor) -> Tensor:
        if b in seen:  # the sketch would add up, but |G|^2 of a sum is not a sum
            raise ValueError(
                f"LoRA weight {b} ran twice in one forward (a shared module): the factorized "
                "sketch's norms need one call per weight; use an sjlt sketch"
            )
        seen.add(b)
        y, s = sketch.reduce(b, go, x)
        sq.add_(s.to(sq.device))
        return y

    widths = [ko * ki for ko, ki in sketch.dims]
    feats = per_example_reduced(model, batch, reduce, widths)
    return feats, sq.sqrt()
