"""Seeded random projections of per-example gradients, (B, D) -> (B, d), without a D x d matrix.

S is the implied D x d matrix, ``project(g) = g @ S``. Kinds: ``rademacher`` (dense, +-1/sqrt(d),
LESS / TRAK), ``gaussian`` (dense, N(0, 1/d)), ``sjlt`` (sparse JL, Kane-Nelson block
construction: the d outputs are cut into ``nnz`` contiguous blocks and coordinate i sends
+-1/sqrt(nnz) to one bucket in each, so its buckets are distinct), ``countsketch`` (sjlt with
nnz = 1), ``none`` (identity, d = D, for exact methods and tests) and ``factorized``
(block-diagonal over the LoRA weights, each block a Kronecker product of two small Rademacher
factors, applied from the hooks without forming the gradient: ``factorized.py`` defines and
applies it; the spec here only carries its ``factor`` and ``blocks``).

Determinism: no torch RNG stream (they differ by device). Each entry comes from a counter c via
SplitMix64, ``h(c) = mix64(key + (c + 1) * 0x9E3779B97F4A7C15)`` (its (c+1)-th output from state
``key = mix64(seed * GAMMA + stream(kind))``), in wrapping int64 torch ops (multiply wraps mod
2^64; logical shift = arithmetic shift & mask), so the matrix is bit-identical on every device:

- rademacher: counter ``i * ceil(d / 64) + j // 64``; S[i, j] < 0 iff bit ``j % 64`` of h.
- gaussian: counter ``i * ceil(d / 2) + j // 2`` gives the Box-Muller pair (j even, j odd):
  u1 = bits 41..63, u2 = bits 18..40 as ``(2k + 1) / 2^24`` (exact in float32; tails cut at
  5.77 sigma), r = sqrt(-2 ln u1), x = pi/2 u2, pair = (s0 r cos x, s1 r sin x) with signs from
  bits 0, 1 (a uniform quadrant + uniform angle in it = a uniform angle). ln, cos, sin are
  float32 polynomials (atanh series after frexp; Taylor on (0, pi/2)) made of +, *, /, sqrt,
  frexp only, which IEEE-754 rounds identically everywhere, unlike libm / CUDA transcendentals.
  All constants are float32 values, so a device evaluating ``tensor op scalar`` in float64 and
  rounding once agrees (double rounding is innocuous for + - * / sqrt since 53 >= 2 * 24 + 2).
  Do not ``torch.compile`` the generators (FMA contraction would change the last bits).
- sjlt / countsketch: counter ``i * nnz + k``; bucket ``lo_k + ((h >>> 32) * size_k) >>> 32``
  in block k = [floor(k d / nnz), floor((k + 1) d / nnz)); sign from bit 0.

Projected outputs may still differ in the last bits across devices (summation order, atomics).

Costs: dense kinds regenerate all D * d entries per ``project`` call (whatever B; measured on this
CPU ~1 ns/entry rademacher, ~13 ns/entry gaussian) plus a B x D x d matmul, so batch as many
examples as memory allows or ``cache_blocks=True``; they are meant for GPUs. Sparse kinds build
the buckets once in O(D nnz) (int32 indices + int8 signs, plus a (d, D) CSR operator: ~13 bytes
per nonzero, 48 MB at D = 921,600, nnz = 4), then cost O(B D nnz) per call.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

KINDS = ("rademacher", "gaussian", "sjlt", "countsketch", "none", "factorized")
DENSE_KINDS = ("rademacher", "gaussian")
INPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HASH_VERSION = "splitmix64-v1"
_STREAM = {"rademacher": 1, "gaussian": 2, "sjlt": 3, "countsketch": 3, "factorized": 4}
_MATCH_KEYS = ("hash", "kind", "dim_in", "dim_out", "seed", "nnz", "input_dtype") + (
    "factor",
    "blocks",
)
_M64 = (1 << 64) - 1
_GAMMA, _MUL1, _MUL2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _chunk(device: torch.device) -> int:
    """Entries generated per step: cache-sized on CPU (2x faster), large on GPUs (launches)."""
    return 1 << 18 if device.type == "cpu" else 1 << 24


def _signed(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >> 63 else x


def mix64_py(z: int) -> int:
    """SplitMix64 finalizer on Python ints (reference for the torch version)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * _MUL1) & _M64
    z = ((z ^ (z >> 27)) * _MUL2) & _M64
    return z ^ (z >> 31)


def _srl(z: Tensor, s: int) -> Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)  # logical right shift of int64


def hash64(key: int, counters: Tensor) -> Tensor:
    """h(c) = mix64(key + (c + 1) * GAMMA) as signed int64 (wrapping); ``counters`` is int64."""
    z = (counters.to(torch.int64) + 1).mul_(_signed(_GAMMA)).add_(_signed(key))
    z ^= _srl(z, 30)
    z.mul_(_signed(_MUL1))
    z ^= _srl(z, 27)
    z.mul_(_signed(_MUL2))
    z ^= _srl(z, 31)
    return z


def _unit23(bits: Tensor) -> Tensor:
    """23-bit integers k -> (2k + 1) / 2^24 in (0, 1), exact in float32."""
    return (bits * 2 + 1).to(torch.float32).mul_(2.0**-24)


def _f32(c: float) -> float:
    """Round a constant to float32 so that float32 and float64 evaluation agree (see below)."""
    return torch.tensor(c, dtype=torch.float32).item()


_LOG_COEFS = [_f32(1 / k) for k in (11, 9, 7, 5, 3, 1)]  # atanh series, Horner order
_COS_COEFS = [_f32((-1) ** k / math.factorial(2 * k)) for k in range(6, -1, -1)]
_SIN_COEFS = [_f32((-1) ** k / math.factorial(2 * k + 1)) for k in range(6, -1, -1)]
_LN2, _HALF_PI, _SQRT_HALF = _f32(math.log(2)), _f32(math.pi / 2), _f32(math.sqrt(0.5))


def _horner(x2: Tensor, coefs: list[float]) -> Tensor:
    p = torch.full_like(x2, coefs[0])
    for c in coefs[1:]:
        p = p * x2 + c
    return p


def _gaussian_pairs(h: Tensor) -> Tensor:
    """(..., n) int64 hashes -> (..., 2n) iid N(0, 1) float32 (Box-Muller, see the module doc)."""
    u1, u2 = _unit23(_srl(h, 41)), _unit23((h >> 18) & ((1 << 23) - 1))
    m, e = torch.frexp(u1)  # u1 = m * 2^e exactly, m in [0.5, 1)
    small = m < _SQRT_HALF
    m = torch.where(small, m * 2, m)
    e = (e - small.to(e.dtype)).to(torch.float32)
    z = (m - 1) / (m + 1)  # ln m = 2 atanh z, |z| <= 0.1716, truncation error ~1e-9
    r = torch.sqrt(-2 * (e * _LN2 + 2 * z * _horner(z * z, _LOG_COEFS)))
    x = u2 * _HALF_PI
    x2 = x * x  # Taylor series to x^12 / x^13 on (0, pi/2): truncation error < 1e-8
    c, sn = _horner(x2, _COS_COEFS), x * _horner(x2, _SIN_COEFS)
    s0, s1 = (1 - 2 * (h & 1).to(torch.float32)), (1 - 2 * ((h >> 1) & 1).to(torch.float32))
    return torch.stack([s0 * r * c, s1 * r * sn], dim=-1).flatten(-2)


@functools.lru_cache(maxsize=8)
def _byte_signs(device: torch.device) -> Tensor:
    """(256, 8) float32: row v holds 1 - 2 * bit t of v, t = 0..7 (the Rademacher lookup)."""
    v = torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)
    return ((v & 1) * -2 + 1).to(torch.float32)


def factor_dims(blocks, factor: int) -> list[tuple[int, int]]:
    """(k_out, k_in) = (min(factor, out), min(factor, in)) of each (out, in) block of a
    factorized sketch: a side no wider than ``factor`` is kept whole (identity factor)."""
    return [(min(factor, o), min(factor, i)) for o, i in blocks]


@dataclass(frozen=True)
class SketchSpec:
    """Everything that determines the matrix. ``to_dict`` goes into the feature store's metadata.

    ``input_dtype``: g is rounded to this dtype first (LESS: float16), the product is float32.
    Normalized on creation: countsketch has nnz = 1; dense kinds and ``none`` have nnz = 0
    (unused); ``none`` has seed = 0 and needs dim_out == dim_in. dim_out > dim_in is allowed for
    the random kinds (a valid, if wasteful, embedding; handy in tests). ``block_rows`` only sets
    the dense kinds' working-set size (block_rows x d floats) and never changes the matrix.
    ``factor`` and ``blocks`` (the (out, in) shapes of the LoRA weights, in parameter order)
    belong to ``factorized`` only (``factorized.factorized_spec`` builds them from a model):
    dim_in = sum out * in, dim_out = sum k_out * k_in (``factor_dims``); other kinds drop them.
    """

    kind: str
    dim_in: int
    dim_out: int
    seed: int = 0
    nnz: int = 4
    block_rows: int = 8192
    input_dtype: str = "float32"
    factor: int = 0
    blocks: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown sketch kind {self.kind!r}; expected one of {KINDS}")
        if self.dim_in < 1 or not 1 <= self.dim_out < 2**31:
            raise ValueError(
                f"need dim_in >= 1, 1 <= dim_out < 2^31 (got {self.dim_in}, {self.dim_out})"
            )
        if self.input_dtype not in INPUT_DTYPES:
            raise ValueError(f"input_dtype must be one of {tuple(INPUT_DTYPES)}")
        if self.block_rows < 1:
            raise ValueError("block_rows must be >= 1")
        nnz = {"countsketch": 1, "sjlt": self.nnz}.get(self.kind, 0)
        if self.kind == "sjlt" and not 1 <= nnz <= self.dim_out:
            raise ValueError(f"sjlt needs 1 <= nnz <= dim_out (got nnz={nnz})")
        if self.kind == "none" and self.dim_out != self.dim_in:
            raise ValueError("kind 'none' is the identity: dim_out must equal dim_in")
        fixed = {"nnz": nnz, "seed": 0 if self.kind == "none" else self.seed}
        for name in ("dim_in", "dim_out", "block_rows", "nnz", "seed"):  # plain ints: JSON-safe
            object.__setattr__(self, name, int(fixed.get(name, getattr(self, name))))
        factorized = self.kind == "factorized"
        blocks = tuple((int(o), int(i)) for o, i in self.blocks) if factorized else ()
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "factor", int(self.factor) if factorized else 0)
        if factorized:
            self._check_factorized()

    def _check_factorized(self) -> None:
        if not self.blocks or self.factor < 1 or min(min(b) for b in self.blocks) < 1:
            raise ValueError(
                "sketch kind 'factorized' needs factor >= 1 and the (out, in) shapes of the LoRA "
                f"weights as blocks (got factor={self.factor}, {len(self.blocks)} blocks): build "
                "its spec with dataselect.features.factorized.factorized_spec(model, factor, seed)"
            )
        d_in = sum(o * i for o, i in self.blocks)
        d_out = sum(a * b for a, b in factor_dims(self.blocks, self.factor))
        if (self.dim_in, self.dim_out) != (d_in, d_out):
            raise ValueError(
                f"factorized sketch of these blocks with factor {self.factor} maps {d_in} -> "
                f"{d_out} dims, spec says {self.dim_in} -> {self.dim_out}"
            )
        if self.input_dtype != "float32":
            raise ValueError("sketch kind 'factorized' needs input_dtype float32 (no g to round)")

    def to_dict(self) -> dict[str, Any]:
        """The matrix's identity (``block_rows`` changes speed, never entries: left out)."""
        skip = {"block_rows"} | (set() if self.kind == "factorized" else {"factor", "blocks"})
        out = {"hash": HASH_VERSION, **{k: v for k, v in asdict(self).items() if k not in skip}}
        if "blocks" in out:  # JSON form: lists, as read back
            out["blocks"] = [list(b) for b in self.blocks]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SketchSpec:
        if d.get("hash", HASH_VERSION) != HASH_VERSION:
            raise ValueError(f"sketch made with hash {d['hash']!r}, this code is {HASH_VERSION}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def key(self) -> int:
        """The SplitMix64 state the entries are drawn from (per seed and kind)."""
        return mix64_py(self.seed * _GAMMA + _STREAM.get(self.kind, 0))

    def describe(self) -> str:
        nnz = f", nnz={self.nnz}" if self.nnz else ""
        if self.kind == "factorized":
            nnz = f", factor={self.factor}, {len(self.blocks)} blocks"
        return f"{self.kind} {self.dim_in}->{self.dim_out} seed={self.seed}{nnz} {self.input_dtype}"


class SketchMismatch(ValueError):
    """Two feature sets were made with different sketches and cannot be compared."""


def _canonical(d: dict[str, Any]) -> dict[str, Any]:
    try:
        return SketchSpec.from_dict(d).to_dict()
    except (TypeError, ValueError):
        return dict(d)


def check_same_sketch(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Raise SketchMismatch naming every differing field (block_rows is ignored: speed only)."""
    ca, cb = _canonical(a), _canonical(b)
    diffs = [
        f"{k}: {ca.get(k, '<missing>')!r} != {cb.get(k, '<missing>')!r}"
        for k in _MATCH_KEYS
        if ca.get(k, "<missing>") != cb.get(k, "<missing>")
    ]
    if diffs:
        raise SketchMismatch(
            "features were made with different sketches; differing fields: " + "; ".join(diffs)
        )


class Sketch:
    """Applies a SketchSpec. ``project(g)``: (B, D) or (D,) float -> (B, d) / (d,) float32.

    ``backend`` (sparse kinds): "csr" multiplies by a (d, D) sparse CSR matrix (2x faster than
    index_add on CPU for nnz=4), "index_add" scatter-adds each of the nnz slots with
    ``index_add_`` (faster for nnz=1); "auto" (default) picks csr iff nnz > 1.
    ``cache_blocks`` (dense kinds): keep generated blocks (float16 for +-1, float32 for
    gaussian) while their total stays under ``cache_bytes``; later calls skip generation.
    """

    def __init__(
        self,
        spec: SketchSpec,
        device: str | torch.device = "cpu",
        *,
        backend: str = "auto",
        cache_blocks: bool = False,
        cache_bytes: int = 2 << 30,
    ) -> None:
        if spec.kind == "factorized":
            raise ValueError(
                "a factorized sketch is applied per LoRA weight: use "
                "dataselect.features.factorized.FactorizedSketch(spec) (or make_sketch(spec))"
            )
        if backend not in ("auto", "csr", "index_add"):
            raise ValueError("backend must be 'auto', 'csr' or 'index_add'")
        if backend == "auto":
            backend = "csr" if spec.nnz > 1 else "index_add"
        self.spec, self.device, self.backend = spec, torch.device(device), backend
        self.cache_blocks, self.cache_bytes = cache_blocks, cache_bytes
        self._cache: dict[tuple[int, str], Tensor] = {}
        self._csr: dict[str, Tensor] = {}
        # (D, nnz) int32 bucket and int8 sign (+-1) of each slot; (D, 0) for the other kinds
        self.indices, self.signs = self._buckets()

    def _buckets(self) -> tuple[Tensor, Tensor]:
        D, d, nnz, dev = self.spec.dim_in, self.spec.dim_out, self.spec.nnz, self.device
        idx = torch.empty(D, nnz, dtype=torch.int32, device=dev)
        sgn = torch.empty(D, nnz, dtype=torch.int8, device=dev)
        if nnz == 0:
            return idx, sgn
        lo = torch.tensor([k * d // nnz for k in range(nnz + 1)], dtype=torch.int64, device=dev)
        step = max(1, _chunk(dev) // nnz)
        for r0 in range(0, D, step):
            r1 = min(D, r0 + step)
            c = torch.arange(r0 * nnz, r1 * nnz, dtype=torch.int64, device=dev).view(-1, nnz)
            h = hash64(self.spec.key, c)
            idx[r0:r1] = lo[:-1] + ((_srl(h, 32) * (lo[1:] - lo[:-1])) >> 32)
            sgn[r0:r1] = 1 - 2 * (h & 1)
        return idx, sgn

    def _csr_on(self, device: torch.device) -> Tensor:
        key = str(device)
        if key not in self._csr:
            D, d, nnz = self.spec.dim_in, self.spec.dim_out, self.spec.nnz
            itype = torch.int32 if D * nnz < 2**31 else torch.int64
            flat = self.indices.to(device).reshape(-1).long()
            order = torch.argsort(flat, stable=True)
            crow = torch.zeros(d + 1, dtype=torch.int64, device=device)
            crow[1:] = torch.cumsum(torch.bincount(flat, minlength=d), 0)
            vals = self.signs.to(device).reshape(-1)[order].float() / math.sqrt(nnz)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._csr[key] = torch.sparse_csr_tensor(
                    crow.to(itype), (order // nnz).to(itype), vals, (d, D)
                )
        return self._csr[key]

    def _generate(self, r0: int, r1: int, device: torch.device) -> Tensor:
        """Unscaled dense rows r0:r1 of S (+-1 or N(0, 1)), float32 (r1 - r0, d).

        Row i uses counters i * W + w: rademacher W = ceil(d / 64) words of 64 signs,
        gaussian W = ceil(d / 2) hashes of a Box-Muller pair (columns 2w, 2w + 1).
        """
        d, rad = self.spec.dim_out, self.spec.kind == "rademacher"
        per_word = 64 if rad else 2
        words = -(-d // per_word)
        out = torch.empty(r1 - r0, d, dtype=torch.float32, device=device)
        step = max(1, _chunk(device) // (words * per_word))
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            rows = torch.arange(a, b, dtype=torch.int64, device=device)[:, None] * words
            h = hash64(self.spec.key, rows + torch.arange(words, device=device))
            if rad:  # byte t of little-endian h holds bits 8t..8t+7
                byte = h.view(torch.uint8).reshape(-1).to(torch.int32)
                vals = _byte_signs(device).index_select(0, byte)  # (n * 8, 8): +-1 per bit
            else:
                vals = _gaussian_pairs(h)
            out[a - r0 : b - r0] = vals.view(b - a, words * per_word)[:, :d]
        return out

    def _block(self, r0: int, r1: int, device: torch.device) -> Tensor:
        ck = (r0, str(device))
        if ck in self._cache:
            return self._cache[ck].float()
        m = self._generate(r0, r1, device)
        if self.cache_blocks:
            store = m.half() if self.spec.kind == "rademacher" else m
            used = sum(t.numel() * t.element_size() for t in self._cache.values())
            if used + store.numel() * store.element_size() <= self.cache_bytes:
                self._cache[ck] = store
        return m

    def entries(self, r0: int = 0, r1: int | None = None) -> Tensor:
        """Rows r0:r1 of the explicit matrix S (scaled), float32 (r1 - r0, d). For tests."""
        s, r1 = self.spec, self.spec.dim_in if r1 is None else r1
        dev = self.device
        if s.kind in DENSE_KINDS:
            return self._generate(r0, r1, dev) / math.sqrt(s.dim_out)
        if s.kind == "none":
            return torch.eye(s.dim_in, device=dev)[r0:r1]
        m = torch.zeros(r1 - r0, s.dim_out, device=dev)
        src = self.signs[r0:r1].to(dev).float() / math.sqrt(s.nnz)
        return m.scatter_add_(1, self.indices[r0:r1].to(dev).long(), src)

    @torch.no_grad()
    def project(self, g: Tensor) -> Tensor:
        """(B, D) -> (B, d) float32 on g's device (a 1-D g gives a 1-D result)."""
        s = self.spec
        if g.shape[-1] != s.dim_in or g.dim() not in (1, 2):
            raise ValueError(f"expected (B, {s.dim_in}) input, got {tuple(g.shape)}")
        x = g.reshape(-1, s.dim_in).to(INPUT_DTYPES[s.input_dtype]).to(torch.float32)
        if s.kind == "none":
            out = x.clone()
        elif s.kind in DENSE_KINDS:
            out = torch.zeros(x.shape[0], s.dim_out, dtype=torch.float32, device=x.device)
            for r0 in range(0, s.dim_in, s.block_rows):
                r1 = min(s.dim_in, r0 + s.block_rows)
                out.addmm_(x[:, r0:r1], self._block(r0, r1, x.device))
            out.mul_(1 / math.sqrt(s.dim_out))
        elif self.backend == "csr":
            try:
                out = (self._csr_on(x.device) @ x.T).T.contiguous()
            except (RuntimeError, NotImplementedError):  # no sparse CSR matmul on this device
                self.backend = "index_add"
                return self.project(g)
        else:
            out = torch.zeros(x.shape[0], s.dim_out, dtype=torch.float32, device=x.device)
            idx, sgn = self.indices.to(x.device), self.signs.to(x.device).float()
            for k in range(s.nnz):
                out.index_add_(1, idx[:, k].long(), x * sgn[:, k])
            out.mul_(1 / math.sqrt(s.nnz))
        return out if g.dim() == 2 else out[0]
