"""Fused multi-head self-attention on the CPU kernels, as a torch op: `hf_sparse::attention`.

    from hf_sparse.ops import attention, pack_linears
    qkv = pack_linears([wq, wk, wv], biases=[bq, bk, bv])        # the (M, 3 * H * D) buffer, split in views
    ctx = attention(qkv(x), heads=12)                             # x (B, S, hidden) -> (B, S, H * D)

Reads Q, K and V straight from the packed Q/K/V output (or any three views with unit column stride) and writes the
context in the layout the attention-output Linear reads, (..., heads * head_dim) with head h in columns
h * D .. h * D + D - 1: no head split or merge copies. Numerics (docs/kernels.md, "Attention"): Q, K, V and the
softmax probabilities rounded to bfloat16 (round to nearest even), products exact, sums and the softmax in float32;
`attention_reference` computes the same in pure torch. The kernels have no float32 path: `HF_SPARSE_ATTENTION=fp32`
(or `set_attention_precision("fp32")`) keeps the backend's models on their own float32 PyTorch attention instead of
the fused encoder layers that call this op.

Masks: None; a key mask (batch, seq); or a 4-D mask broadcastable to (batch, heads, seq, seq), as transformers
builds them. bool masks keep the keys that are True; float masks are added to the scaled scores (transformers'
additive masks, finfo.min or -inf where masked). A query whose keys are all masked (-inf) gets 0, as torch's SDPA.
"""

from __future__ import annotations

import os

import torch

from ..quantization.numerics import quantize_activation_int8
from . import _extension as ext
from .library import _lib
from .packed_linear import can_call_directly


_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, int batch, int heads, Tensor? mask, bool causal, float scale) -> Tensor"
)
_lib.define(
    "attention_int8(Tensor q, Tensor k, Tensor v, int batch, int heads, Tensor? mask, bool causal, float scale) "
    "-> Tensor"
)

#: log(FLT_MIN): probabilities below e^-87.34 are subnormal in float32; the kernels take them as 0
EXP_MIN = -87.33654475
#: int8 attention sums exactly in int32 up to this many keys and head features (255 x 127 x 65536 < 2^31)
INT8_MAX_KEYS = 65536

_FLOAT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_qkv(q, k, v, batch: int, heads: int, where: str) -> tuple[int, int, int]:
    """(M, seq, head_dim) after checking three (M, heads * head_dim) float32 views with unit column stride."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"{where}: {name} must be on the CPU (these are CPU kernels), got {t.device}")
        if t.dtype != torch.float32:
            raise TypeError(f"{where}: {name} must be float32, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{where}: {name} must be 2-D (tokens, heads * head_dim), got shape {tuple(t.shape)}")
        if t.shape != q.shape:
            raise ValueError(f"{where}: q, k and v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                             f"{tuple(v.shape)}")  # fmt: skip
        if (t.shape[1] > 1 and t.stride(1) != 1) or (t.shape[0] > 1 and t.stride(0) < t.shape[1]):
            raise ValueError(f"{where}: {name} must have rows of contiguous features, got strides {t.stride()}")
    m, width = q.shape
    if heads < 1 or width % heads:
        raise ValueError(f"{where}: heads={heads} must divide the feature width {width}")
    if batch < 1 or m % batch:
        raise ValueError(f"{where}: batch={batch} must divide the number of tokens {m}")
    return m, m // batch, width // heads


def _mask_args(mask, batch: int, heads: int, seq: int, where: str):
    """(kind, tensor, stride over sequences, over heads, over queries) for the kernels; tensor None for no mask."""
    if mask is None:
        return 0, None, 0, 0, 0
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.device.type != "cpu":
        raise ValueError(f"{where}: mask must be on the CPU, got {mask.device}")
    if mask.dtype == torch.bool:
        kind = 2
    elif mask.dtype in _FLOAT:
        kind = 1
        mask = mask.float()
    else:
        raise TypeError(f"{where}: mask must be bool (True = attend) or float (added to the scores), got {mask.dtype}")
    given = tuple(mask.shape)
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    if (
        mask.dim() != 4
        or mask.shape[-1] != seq
        or any(size not in (1, full) for size, full in zip(mask.shape[:3], (batch, heads, seq)))
    ):
        raise ValueError(
            f"{where}: mask has shape {given}; expected a key mask (batch={batch}, seq={seq}) or a 4-D "
            f"mask broadcastable to ({batch}, {heads}, {seq}, {seq})"
        )
    if mask.stride(-1) != 1 and seq > 1:
        mask = mask.contiguous()
    strides = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(3))
    if kind == 2:
        mask = mask.view(torch.uint8)
    return kind, mask, *strides


def _exp_scores(s: torch.Tensor, kind: int, mask, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(row max, p = exp(s - row max)) of the scaled scores s (..., seq, seq) after the mask (`_mask_args`' kind and
    tensor) and the causal rule, with the kernels' cut to 0 below e^EXP_MIN; a row without any key has max -inf."""
    if kind == 1:
        s = s + mask
    elif kind == 2:
        s = s.masked_fill(mask == 0, float("-inf"))
    if causal:
        seq = s.shape[-1]
        s = s.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    top = s.amax(-1, keepdim=True)
    x = s - top
    return top, torch.where(x < EXP_MIN, torch.zeros_like(x), torch.exp(x))


def attention_reference(q, k, v, batch: int, heads: int, mask=None, causal: bool = False, scale=None):
    """The pure-torch result the kernels reproduce up to float32 summation order: (M, heads * head_dim) float32.

    s = fp32(bf16(q) . bf16(k)) * scale (+ mask; -inf where a bool mask is False or, causal, key > query),
    p = exp(s - max s) (0 below e^-87.34), out = fp32(sum bf16(p) bf16(v)) / sum p; rows without any key: 0.
    """
    m, seq, d = _check_qkv(q, k, v, batch, heads, "attention_reference")
    scale = d**-0.5 if scale is None else float(scale)
    kind, mk, *_ = _mask_args(mask, batch, heads, seq, "attention_reference")

    def split(t):
        return t.reshape(batch, seq, heads, d).transpose(1, 2).to(torch.bfloat16).double()

    qb, kb, vb = split(q), split(k), split(v)
    s = (qb @ kb.transpose(-1, -2)).float() * scale
    top, p = _exp_scores(s, kind, mk, causal)
    out = (p.to(torch.bfloat16).double() @ vb) / p.double().sum(-1, keepdim=True)
    out = torch.where(top == float("-inf"), torch.zeros_like(out), out)  # no key to attend to
    return out.float().transpose(1, 2).reshape(m, heads * d)


def _quantize_heads(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., d) float32 -> (codes as float64, scales (...) float32) per row, as the kernels quantize activations
    (`quantize_activation_int8`); rows holding inf or NaN get scale NaN, as in the kernels."""
    codes, scales = quantize_activation_int8(t.reshape(-1, t.shape[-1]))
    finite = t.reshape(-1, t.shape[-1]).isfinite().all(-1)
    scales = torch.where(finite, scales, torch.full_like(scales, float("nan")))
    return codes.double().reshape(t.shape), scales.reshape(t.shape[:-1])


def attention_int8_reference(q, k, v, batch: int, heads: int, mask=None, causal: bool = False, scale=None):
    """The pure-torch result of the int8 kernels (docs/kernels.md, "int8 attention"), up to the exponential's last
    bits and the float32 order of the row sum of p: (M, heads * head_dim) float32.

    q, k and v are quantized per token and head like the Linears' activations (codes qc, kc, vc; scales qs, ks, vs);
    s = (float(qc . kc) * (qs * scale)) * ks (+ mask; -inf where masked), p = exp(s - max s) (0 below e^-87.34),
    w = p * vs, pc = round(w * ((1 / max w) * 255)) in 0..255, out = (float(pc . vc) * (max w / 255)) / sum p; rows
    without any key: 0. Both dot products are exact integers.
    """
    m, seq, d = _check_qkv(q, k, v, batch, heads, "attention_int8_reference")
    scale = d**-0.5 if scale is None else float(scale)
    kind, mk, *_ = _mask_args(mask, batch, heads, seq, "attention_int8_reference")

    def split(t):
        return t.reshape(batch, seq, heads, d).transpose(1, 2).float()

    (qc, qs), (kc, ks), (vc, vs) = (_quantize_heads(split(t)) for t in (q, k, v))
    s = ((qc @ kc.transpose(-1, -2)).float() * (qs * scale)[..., None]) * ks[..., None, :]
    top, p = _exp_scores(s, kind, mk, causal)
    w = p * vs[..., None, :]
    wmax = w.amax(-1, keepdim=True)
    winv = torch.where(wmax > 0, wmax.reciprocal() * 255.0, torch.zeros_like(wmax))
    pc = torch.where(w > 0, w * winv, torch.zeros_like(w)).clamp(max=255.0).round()
    out = ((pc.double() @ vc).float() * (wmax / 255.0)) / p.sum(-1, keepdim=True)
    out = torch.where(top == float("-inf"), torch.zeros_like(out), out)  # no key to attend to
    return out.transpose(1, 2).reshape(m, heads * d)


_REFERENCES = {"bf16": attention_reference, "int8": attention_int8_reference}


def _run(q, k, v, batch: int, heads: int, mask, causal: bool, scale: float, where: str, precision: str = "bf16"):
    m, seq, d = _check_qkv(q, k, v, batch, heads, where)
    kind, mk, sb, sh, sq = _mask_args(mask, batch, heads, seq, where)
    if ext._C is None:
        return _REFERENCES[precision](q, k, v, batch, heads, mask, causal, scale)
    out = torch.empty((m, heads * d), dtype=torch.float32)
    ext._C.attention_raw(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), k.stride(0), v.stride(0), out.data_ptr(), heads * d,
        batch, seq, heads, d, scale, causal, kind, mk.data_ptr() if mk is not None else 0, sb, sh, sq,
        precision == "int8", ext.get_num_threads(),
    )  # fmt: skip
    return out


@torch.library.impl(_lib, "attention", "CPU")
def _attention_op(q, k, v, batch, heads, mask, causal, scale):
    return _run(q, k, v, batch, heads, mask, causal, scale, "hf_sparse::attention")


@torch.library.impl(_lib, "attention_int8", "CPU")
def _attention_int8_op(q, k, v, batch, heads, mask, causal, scale):
    return _run(q, k, v, batch, heads, mask, causal, scale, "hf_sparse::attention_int8", "int8")


@torch.library.register_fake("hf_sparse::attention")
def _attention_fake(q, k, v, batch, heads, mask, causal, scale):
    return q.new_empty(q.shape, dtype=torch.float32)


@torch.library.register_fake("hf_sparse::attention_int8")
def _attention_int8_fake(q, k, v, batch, heads, mask, causal, scale):
    return q.new_empty(q.shape, dtype=torch.float32)


def attention(
    qkv, *, heads: int, batch: int | None = None, mask=None, causal: bool = False, scale=None, precision: str = "bf16"
):
    """Multi-head self-attention of `batch` sequences, one kernel call. Inference only (no backward).

    Args:
        qkv: the (..., 3 * heads * head_dim) output of Q/K/V packed side by side (`pack_linears`: Q, then K, then V)
            or a tuple (q, k, v) of (..., heads * head_dim) tensors; float (converted to float32 when it is not).
        heads: number of heads.
        batch: number of sequences when the input is 2-D (tokens of all sequences one after the other); 3-D
            inputs (batch, seq, ...) give it themselves.
        mask: None, a key mask (batch, seq), or a 4-D mask broadcastable to (batch, heads, seq, seq): bool (True =
            attend) or float (added to the scaled scores).
        causal: mask every key after the query (key j > query i), as decoders do.
        scale: multiplies q . k; default head_dim ** -0.5.
        precision: "bf16" (Q, K, V and the probabilities rounded to bfloat16; `attention_reference`) or "int8"
            (Q, K, V quantized per token and head, both products in int8 with int32 sums, ~2x the speed on VNNI
            CPUs; `attention_int8_reference`). docs/kernels.md gives both numerics and their errors.

    Returns: float32 (..., heads * head_dim), the input's leading shape: the context, heads side by side.
    """
    where = "hf_sparse.ops.attention"
    if precision not in _REFERENCES:
        raise ValueError(f"{where}: precision={precision!r}; use 'bf16' or 'int8'")
    if isinstance(qkv, (tuple, list)):
        if len(qkv) != 3:
            raise ValueError(f"{where}: expected (q, k, v), got {len(qkv)} tensors")
        parts = list(qkv)
    elif isinstance(qkv, torch.Tensor):
        if qkv.dim() == 0 or qkv.shape[-1] % 3:
            raise ValueError(f"{where}: qkv has shape {tuple(qkv.shape)}; its last dimension must be 3 * heads * d")
        parts = list(qkv.chunk(3, dim=-1))
    else:
        raise TypeError(f"{where}: qkv must be a tensor or a (q, k, v) tuple, got {type(qkv).__name__}")
    lead = parts[0].shape[:-1]
    if len(lead) == 2:
        if batch is not None and batch != lead[0]:
            raise ValueError(f"{where}: batch={batch} but the input has {lead[0]} sequences")
        batch = lead[0]
    elif len(lead) != 1:
        raise ValueError(
            f"{where}: inputs must be (batch, seq, width) or (tokens, width), got {tuple(parts[0].shape)}"
        )
    elif batch is None:
        batch = 1
    for i, t in enumerate(parts):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: q, k, v must be tensors, got {type(t).__name__}")
        if t.dtype != torch.float32 and t.dtype in _FLOAT:
            t = t.float()
        if t.dim() == 3:
            t = t.flatten(0, 1) if t.stride(0) == t.shape[1] * t.stride(1) else t.reshape(-1, t.shape[-1])
        parts[i] = t
    q, k, v = parts
    width = q.shape[-1] if q.dim() else 0
    if heads < 1 or width % heads:
        raise ValueError(f"{where}: heads={heads} must divide the feature width {width}")
    scale = (width // heads) ** -0.5 if scale is None else float(scale)
    if ext._C is not None and can_call_directly(q) and not (mask is not None and not can_call_directly(mask)):
        out = _run(q, k, v, batch, heads, mask, bool(causal), scale, where, precision)
    else:
        op = torch.ops.hf_sparse.attention_int8 if precision == "int8" else torch.ops.hf_sparse.attention
        out = op.default(q, k, v, batch, heads, mask, bool(causal), scale)
    return out.reshape(*lead, width)


#: environment variable read at every call of a fused encoder layer: "bf16" (default), "int8" or "fp32"
ATTENTION_ENV = "HF_SPARSE_ATTENTION"
ATTENTION_PRECISIONS = ("bf16", "fp32", "int8")
_precision: str | None = None  # set_attention_precision's choice; None: the environment variable's


def _check_precision(value, where: str) -> str:
    if value not in ATTENTION_PRECISIONS:
        raise ValueError(
            f"{where}={value!r} is not an attention precision: use 'bf16' (the default: fused encoder layers, "
            "Q/K/V and the probabilities rounded to bfloat16), 'int8' (fused encoder layers, Q/K/V and the "
            "probabilities quantized to int8: faster, less exact) or 'fp32' (the model's own float32 PyTorch attention)"
        )
    return value


def set_attention_precision(precision: str | None) -> str | None:
    """Attention numerics of the backend's models, for the whole process: "bf16" runs eligible encoder layers fused
    (`hf_sparse.ops.attention`: bfloat16 Q/K/V and probabilities), "fp32" runs them through their own forward (the
    Linears still on the kernels, the attention in the model's float32 PyTorch attention); None goes back to the
    `HF_SPARSE_ATTENTION` environment variable (default "bf16"). Takes effect at the next forward. Returns the
    previous setting (None where the variable was in force), to restore it with."""
    global _precision
    previous = _precision
    _precision = None if precision is None else _check_precision(precision, "set_attention_precision(precision)")
    return previous


def attention_precision() -> str:
    """The attention precision in force: `set_attention_precision`'s, else `HF_SPARSE_ATTENTION` read now (unset or
    empty: "bf16"). An invalid value of the variable raises a ValueError naming it."""
    if _precision is not None:
        return _precision
    value = os.environ.get(ATTENTION_ENV, "").strip()
    return _check_precision(value, ATTENTION_ENV) if value else "bf16"


def attention_isa(precision: str = "bf16") -> str:
    """The attention (and LayerNorm) kernels in use: "avx512_bf16" (AVX512-BF16, with the avx512_vnni level),
    "avx2" (fp32 FMA on the same bf16-rounded values), "scalar", or "reference" (pure torch); for precision "int8"
    the int8 attention's: "avx512_vnni_int8", "avx2_int8" (the AVX2 levels), "scalar_int8" or "reference"."""
    if precision not in _REFERENCES:
        raise ValueError(f"attention_isa: precision={precision!r}; use 'bf16' or 'int8'")
    return ext._C.attention_isa(precision == "int8") if ext._C is not None else "reference"


__all__ = [
    "ATTENTION_ENV",
    "ATTENTION_PRECISIONS",
    "EXP_MIN",
    "attention",
    "attention_isa",
    "attention_precision",
    "attention_reference",
    "set_attention_precision",
]
