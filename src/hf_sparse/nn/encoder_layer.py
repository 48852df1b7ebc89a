"""`FusedEncoderLayer`: a post-LayerNorm transformer encoder layer (BERT, RoBERTa, DistilBERT...) in six kernel calls.

    qkv = QKV(x)                  Q, K and V packed side by side (`pack_linears`): one activation quantization
    ctx = attention(qkv, mask)    `hf_sparse.ops.attention`, read from and written in place of the head split/merge
    a   = LN1(O(ctx) + x)         the attention-output Linear, then `add_layernorm` (residual add + LayerNorm)
    y   = LN2(FFN(a) + a)         the FFN as one call (`FusedFFN`), then `add_layernorm`

Dropout is the identity (inference). The attention's numerics are bfloat16 Q, K, V and probabilities (docs/kernels.md,
"Attention"). Nothing here knows about transformers: `hf_sparse.integrations` decides when a model's layer may run
this way (never with HF_SPARSE_ATTENTION=fp32) and falls back to the layer's own forward otherwise.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops import FusedFFN, PackedLinear, add_layernorm, attention, attention_reference
from ..ops import _extension as ext
from ..ops.attention import _mask_args
from ..ops.packed_linear import can_call_directly


CHUNK_TOKENS = 256


def _no_hook(step: str | None) -> None:
    pass


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

    `FusedEncoderLayer.step_hook`, None normally, may be set by a profiler (benchmarks/speed) to a callable run with
    None before each chunk of sequences and with the step's name ("qkv", "attention", "out", "norm1", "ffn",
    "norm2") after each kernel call: the fast path has no modules for forward hooks to time.
    """

    step_hook = None

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
        self.heads, self.head_dim, self.scale = int(heads), width // heads, float(scale)
        self.width, self.hidden = width, hidden
        self._direct = all(p.runs_extension for p in (qkv, out, ffn.first, ffn.second))

    def __deepcopy__(self, memo):  # the copied model's LayerNorms, the same (never modified) packed weights
        new = copy.copy(self)
        new.norm1, new.norm2 = copy.deepcopy(self.norm1, memo), copy.deepcopy(self.norm2, memo)
        return new

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not (
            self._direct and can_call_directly(x) and x.dtype is torch.float32 and x.dim() == 3
            and x.shape[2] == self.hidden and x.is_contiguous() and (mask is None or can_call_directly(mask))
            and self._norms_ok()
        ):  # fmt: skip
            return self._composed(x, mask)
        batch, seq, hidden = x.shape
        kind, mk, sb, sh, sq = _mask_args(mask, batch, self.heads, seq, "FusedEncoderLayer")
        nt = ext._num_threads or torch.get_num_threads()
        # Whole sequences at a time, about CHUNK_TOKENS tokens: a chunk's intermediates stay in L2 from one call to
        # the next (the Q/K/V output alone is 12 x hidden bytes per token).
        per = max(1, min(batch, self.chunk_tokens // max(seq, 1)))
        m = per * seq
        w = self.width
        qkv = torch.empty((m, 3 * w), dtype=torch.float32)
        ctx = torch.empty((m, w), dtype=torch.float32)
        a = torch.empty((m, hidden), dtype=torch.float32)
        h = torch.empty((m, self.ffn.hidden_features), dtype=torch.float32) if not self.ffn.fused else None
        y = torch.empty((batch, seq, hidden), dtype=torch.float32)
        bytes_per_seq = seq * hidden * 4
        for b0 in range(0, batch, per):
            nb = min(per, batch - b0)
            self._chunk(
                x.data_ptr() + b0 * bytes_per_seq, y.data_ptr() + b0 * bytes_per_seq, nb, seq, qkv, ctx, a, h,
                kind, mk.data_ptr() + b0 * sb * mk.element_size() if mk is not None else 0, sb, sh, sq, nt,
            )  # fmt: skip
        return y

    def _chunk(self, xp, yp, nb, seq, qkv, ctx, a, h, kind, mp, sb, sh, sq, nt):
        """One chunk of `nb` sequences: x at address xp -> y at address yp (float32, hidden wide, contiguous)."""
        c, w, m = ext._C, self.width, nb * seq
        hook = FusedEncoderLayer.step_hook or _no_hook
        hook(None)
        self.qkv._handle.run(xp, m, qkv.data_ptr(), 0, nt, False)
        hook("qkv")
        p = qkv.data_ptr()
        c.attention_raw(
            p, p + 4 * w, p + 8 * w, 3 * w, 3 * w, 3 * w, ctx.data_ptr(), w, nb, seq, self.heads, self.head_dim,
            self.scale, False, kind, mp, sb, sh, sq, nt,
        )  # fmt: skip
        hook("attention")
        ap = a.data_ptr()
        self.out._handle.run(ctx.data_ptr(), m, ap, self.out._act, nt, False)
        hook("out")
        self._norm(self.norm1, ap, xp, ap, m, nt)
        hook("norm1")
        first, second = self.ffn.first, self.ffn.second
        if self.ffn.fused:
            c.Packed.run_ffn(first._handle, second._handle, ap, m, yp, first._act, second._act, nt)
        else:
            first._handle.run(ap, m, h.data_ptr(), first._act, nt, False)
            second._handle.run(h.data_ptr(), m, yp, second._act, nt, False)
        hook("ffn")
        self._norm(self.norm2, yp, ap, yp, m, nt)
        hook("norm2")

    def _norms_ok(self) -> bool:
        """float32 contiguous LayerNorm parameters (a model cast to another dtype runs the composed path)."""
        for norm in (self.norm1, self.norm2):
            w, b = norm.weight, norm.bias
            if w is None or b is None or w.dtype is not torch.float32 or b.dtype is not torch.float32:
                return False
            if not (w.is_contiguous() and b.is_contiguous()):
                return False
        return True

    def _norm(self, norm: nn.LayerNorm, vp: int, rp: int, yp: int, m: int, nt: int) -> None:
        """y = norm(v + r) over m rows (addresses of float32 rows, hidden wide)."""
        n = self.hidden
        ext._C.add_layernorm_raw(vp, n, rp, n, m, n, norm.weight.data_ptr(), norm.bias.data_ptr(), norm.eps, yp, n, nt)

    def _composed(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The same calls through the torch ops (tracing, fake tensors, or without the extension)."""
        batch, seq = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x.reshape(batch * seq, -1))
        ctx = attention((q, k, v), heads=self.heads, batch=batch, mask=mask, scale=self.scale)
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

    def reference(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pure torch: each step's reference (int8 numerics, `attention_reference`, torch's LayerNorm)."""
        batch, seq = x.shape[0], x.shape[1]
        x = x.float()
        with torch.no_grad():
            q, k, v = self.qkv.reference(x.reshape(batch * seq, -1))
            ctx = attention_reference(q, k, v, batch, self.heads, mask, False, self.scale)
            a = self.norm1(self.out.reference(ctx).reshape(x.shape) + x)
            return self.norm2(self.ffn.reference(a) + a)

    def __repr__(self) -> str:
        return (
            f"FusedEncoderLayer(heads={self.heads}, head_dim={self.head_dim}, hidden={self.hidden}, "
            f"qkv={self.qkv.layout.value}, out={self.out.layout.value}, ffn_fused={self.ffn.fused})"
        )


__all__ = ["FusedEncoderLayer"]
