"""`FusedEncoderLayer`: a post-LayerNorm transformer encoder layer (BERT, RoBERTa, DistilBERT...) in one kernel call.

    qkv = QKV(x)                  Q, K and V packed side by side (`pack_linears`): one activation quantization
    ctx = attention(qkv, mask)    `hf_sparse.ops.attention`, read from and written in place of the head split/merge
    a   = LN1(O(ctx) + x)         the attention-output Linear, then `add_layernorm` (residual add + LayerNorm)
    y   = LN2(FFN(a) + a)         the FFN as one call (`FusedFFN`), then `add_layernorm`

(six steps, run by `hf_sparse._C.EncoderLayer` without returning to Python in between).

Dropout is the identity (inference). The attention's numerics are bfloat16 Q, K, V and probabilities (docs/kernels.md,
"Attention"). Nothing here knows about transformers: `hf_sparse.integrations` decides when a model's layer may run
this way (never with HF_SPARSE_ATTENTION=fp32) and falls back to the layer's own forward otherwise.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops import FusedFFN, PackedLinear, add_layernorm, attention, attention_int8_reference, attention_reference
from ..ops import _extension as ext
from ..ops.attention import _mask_args
from ..ops.packed_linear import can_call_directly


# Whole sequences per chunk, about this many tokens: a chunk's intermediates stay in L2 from one step to the next
# (the packed Q/K/V output alone is 6 x hidden bytes per token). 128 against 256 on BERT-base 90% int8 at batch 16
# (benchmarks/RESULTS.md, "Chunk size"): 4-block 1.02-1.06x faster, unstructured even.
CHUNK_TOKENS = 128


def _attention_int8(attention: str, where: str) -> bool:
    """Whether `attention` asks for the int8 attention; a ValueError unless it is "bf16" or "int8"."""
    if attention == "bf16":
        return False
    if attention == "int8":
        return True
    raise ValueError(f"{where}: attention={attention!r}; use 'bf16' or 'int8' (fp32 attention is the model's own)")


def norm_args(norms: list[nn.LayerNorm]) -> tuple[list[int], list[float]] | None:
    """The addresses of each LayerNorm's weight and bias, and its eps, as they are now (the kernels read them at every
    call); None when a parameter is missing, not float32 or not contiguous (a model cast to another dtype: the
    composed path runs). One pass over the modules: after a kernel call they are cold."""
    f32 = torch.float32
    ptrs, eps = [], []
    for norm in norms:
        params = norm._parameters
        for t in (params.get("weight"), params.get("bias")):
            if t is None or t.dtype is not f32 or not t.is_contiguous():
                return None
            ptrs.append(t.data_ptr())
        eps.append(norm.eps)
    return ptrs, eps


class _StepCounters:
    """The kernels' per-step nanosecond counters while `FusedEncoderLayer.step_times` is set (a profiler's dict),
    added to it on exit; `address` is 0 (no counters) otherwise."""

    def __enter__(self):
        self.times = FusedEncoderLayer.step_times
        self.counters = torch.zeros(len(ext._C.LAYER_STEPS), dtype=torch.int64) if self.times is not None else None
        self.address = self.counters.data_ptr() if self.counters is not None else 0
        return self

    def __exit__(self, *exc) -> None:
        if self.times is not None and exc[0] is None:
            for step, ns in zip(ext._C.LAYER_STEPS, self.counters.tolist()):
                self.times[step] = self.times.get(step, 0.0) + ns * 1e-9


class FusedEncoderLayer:
    """`y = LN2(FFN(a) + a)` with `a = LN1(O(attention(QKV(x))) + x)`, on hf_sparse's kernels. Inference only.

    Args:
        qkv: Q, K and V packed together by `pack_linears` (three equal splits of heads * head_dim, no activation).
        out: the attention-output Linear (heads * head_dim -> hidden).
        ffn: the FFN (`fuse_ffn(first, second)`, the activation fused into `first`).
        norm1 / norm2: the LayerNorms after the attention and after the FFN (float32; read at every call, so their
            parameters may be updated in place).
        heads: attention heads.
        scale: multiplies q . k (usually head_dim ** -0.5).

    Call: `x` (batch, seq, hidden) float32, `mask` None or as `hf_sparse.ops.attention` takes it -> float32
    (batch, seq, hidden).

    Threads (csrc/encoder_layer.cpp says why): with several threads and at least as many sequences as threads,
    each thread runs whole chunks of sequences through all six steps alone ("sequences"); the sequences left over
    (and all of them when there are fewer than threads) run one at a time with their tokens split into blocks, about
    one per thread, that share only their K/V rows ("tokens"); short sequences, or `layer.split_sequences = False`,
    split every step over the threads ("steps"). `layer.parallelism` holds the ones the last call used. int8 results
    are the same in every case (float32 CSR layers: up to the last bits).

    With sparse int8 Q/K/V weights, a head_dim that is a multiple of 16, sequences of at least 32 tokens and the
    AVX512-BF16 attention, the Q/K/V product writes its outputs in bfloat16 straight into the layouts the attention
    reads (`layer.qkv_packed` says whether the last call did): no float32 Q/K/V rows, no packing in the attention,
    the same results bit for bit (both round to bfloat16 the same way). The AVX-512 int8 attention takes them the
    same way as int8 codes and per-token scales. `layer.pack_qkv = False` turns it off.

    With int8 4-block weights (FFN fused), the AVX-512 kernels and hidden size and sequence length multiples of 16,
    the chunks and token blocks a thread runs alone go through the steps after the attention on feature-major tiles
    (no transposes between the products and the LayerNorms; docs/kernels.md): the same results bit for bit
    (`layer.ran_feature_major` says whether the last call did; `layer.feature_major = False` turns it off).

    `FusedEncoderLayer.step_times`, None normally, may be set by a profiler (benchmarks/speed) to a dict: every
    fast-path call then adds each step's share of its wall time, in seconds, under the step's name ("qkv", "wait",
    "attention", "out", "norm1", "ffn", "norm2"; "wait" is token blocks' wait for each other's K/V): the fast path
    has no modules for forward hooks to time.
    """

    step_times: dict[str, float] | None = None

    def __init__(
        self, qkv: PackedLinear, out: PackedLinear, ffn: FusedFFN, norm1: nn.LayerNorm, norm2: nn.LayerNorm,
        heads: int, scale: float,
    ):  # fmt: skip
        width = out.in_features
        if qkv.splits != (width, width, width) or qkv.activation != "none":
            raise ValueError(
                f"FusedEncoderLayer: qkv must be Q, K, V of width {width} each with no activation, got splits "
                f"{qkv.splits} and activation {qkv.activation!r}"
            )
        hidden = out.out_features
        if qkv.in_features != hidden or ffn.in_features != hidden or ffn.out_features != hidden:
            raise ValueError(
                f"FusedEncoderLayer: sizes do not chain: qkv reads {qkv.in_features}, out writes {hidden}, ffn maps "
                f"{ffn.in_features} -> {ffn.out_features}"
            )
        for name, norm in (("norm1", norm1), ("norm2", norm2)):
            if type(norm) is not nn.LayerNorm or tuple(norm.normalized_shape) != (hidden,):
                raise ValueError(f"FusedEncoderLayer: {name} must be an nn.LayerNorm over ({hidden},), got {norm!r}")
        if heads < 1 or width % heads:
            raise ValueError(f"FusedEncoderLayer: heads={heads} must divide the attention width {width}")
        self.qkv, self.out, self.ffn, self.norm1, self.norm2 = qkv, out, ffn, norm1, norm2
        self.chunk_tokens = CHUNK_TOKENS
        self.split_sequences = True
        self.pack_qkv = True
        self.feature_major = True
        self._split_flags = 0  # how the last fast-path call split its work (`parallelism`)
        self.heads, self.head_dim, self.scale = int(heads), width // heads, float(scale)
        self.width, self.hidden = width, hidden
        self._plan = None
        if all(p.runs_extension for p in (qkv, out, ffn.first, ffn.second)):
            first, second = ffn.first, ffn.second
            self._plan = ext._C.EncoderLayer(
                qkv._handle, out._handle, first._handle, second._handle, ffn.fused, out._act, first._act,
                second._act, self.heads, self.head_dim, self.scale,
            )  # fmt: skip

    def __deepcopy__(self, memo):  # the copied model's LayerNorms, the same (never modified) packed weights
        new = copy.copy(self)
        new.norm1, new.norm2 = copy.deepcopy(self.norm1, memo), copy.deepcopy(self.norm2, memo)
        return new

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None = None, attention: str = "bf16") -> torch.Tensor:
        """`attention`: "bf16" or "int8", the attention's numerics (`hf_sparse.ops.attention`'s `precision`)."""
        int8 = _attention_int8(attention, "FusedEncoderLayer")
        norms = norm_args([self.norm1, self.norm2]) if self._plan is not None and self.takes(x, mask) else None
        if norms is None:
            return self._composed(x, mask, attention)
        ptrs, (eps1, eps2) = norms
        batch, seq, _ = x.shape
        kind, mk, sb, sh, sq = _mask_args(mask, batch, self.heads, seq, "FusedEncoderLayer")
        y = torch.empty_like(x)
        with _StepCounters() as counters:
            self._split_flags = self._plan.run(
                x.data_ptr(), y.data_ptr(), batch, seq, kind, mk.data_ptr() if mk is not None else 0, sb, sh, sq,
                ptrs, eps1, eps2, self.chunk_tokens,
                self.split_sequences, bool(self.pack_qkv), bool(self.feature_major), int8,
                ext._num_threads or torch.get_num_threads(),
                counters.address,
            )  # fmt: skip
        return y

    def takes(self, x: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """Whether the kernels take this input as it is (the LayerNorms are checked by `norm_args`)."""
        return (
            can_call_directly(x) and x.dtype is torch.float32 and x.dim() == 3 and x.shape[2] == self.hidden
            and x.is_contiguous() and (mask is None or can_call_directly(mask))
        )  # fmt: skip

    @property
    def parallelism(self) -> frozenset[str]:
        """How the last fast-path call split its work over the threads: "sequences", "tokens", "steps" (see above)."""
        return frozenset(name for name, bit in ext._C.LAYER_PARALLELISM if self._split_flags & bit)

    @property
    def qkv_packed(self) -> bool:
        """Whether the last fast-path call wrote Q/K/V straight into the attention's packed layout (see above; after
        a FusedEncoderStack call: whether it did for any of the stack's layers)."""
        return bool(self._split_flags & ext._C.LAYER_PACKED_QKV)

    @property
    def ran_feature_major(self) -> bool:
        """Whether the last fast-path call ran its steps on feature-major tiles (see above; after a FusedEncoderStack
        call: whether it did for the stack)."""
        return bool(self._split_flags & ext._C.LAYER_FEATURE_MAJOR)

    def _norm(self, norm: nn.LayerNorm, vp: int, rp: int, yp: int, m: int, nt: int) -> None:
        """y = norm(v + r) over m rows (addresses of float32 rows, hidden wide)."""
        n = self.hidden
        ext._C.add_layernorm_raw(vp, n, rp, n, m, n, norm.weight.data_ptr(), norm.bias.data_ptr(), norm.eps, yp, n, nt)

    def _composed(self, x: torch.Tensor, mask: torch.Tensor | None, precision: str = "bf16") -> torch.Tensor:
        """The same calls through the torch ops (tracing, fake tensors, or without the extension)."""
        batch, seq = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x.reshape(batch * seq, -1))
        ctx = attention((q, k, v), heads=self.heads, batch=batch, mask=mask, scale=self.scale, precision=precision)
        a = add_layernorm(self.out(ctx).reshape(x.shape), x, **self._affine(self.norm1))
        return add_layernorm(self.ffn(a), a, **self._affine(self.norm2))

    @staticmethod
    def _affine(norm: nn.LayerNorm) -> dict:
        w, b = norm.weight, norm.bias
        return {
            "weight": None if w is None else w.detach(),
            "bias": None if b is None else b.detach(),
            "eps": norm.eps,
        }

    def reference(self, x: torch.Tensor, mask: torch.Tensor | None = None, attention: str = "bf16") -> torch.Tensor:
        """Pure torch: each step's reference (int8 numerics, `attention_reference` or, with attention="int8",
        `attention_int8_reference`, torch's LayerNorm)."""
        attend = (
            attention_int8_reference
            if _attention_int8(attention, "FusedEncoderLayer.reference")
            else attention_reference
        )
        batch, seq = x.shape[0], x.shape[1]
        x = x.float()
        with torch.no_grad():
            q, k, v = self.qkv.reference(x.reshape(batch * seq, -1))
            ctx = attend(q, k, v, batch, self.heads, mask, False, self.scale)
            a = self.norm1(self.out.reference(ctx).reshape(x.shape) + x)
            return self.norm2(self.ffn.reference(a) + a)

    def __repr__(self) -> str:
        return (
            f"FusedEncoderLayer(heads={self.heads}, head_dim={self.head_dim}, hidden={self.hidden}, "
            f"qkv={self.qkv.layout.value}, out={self.out.layout.value}, ffn_fused={self.ffn.fused})"
        )


__all__ = ["FusedEncoderLayer"]
