"""`FusedFFN`: a transformer FFN (Linear, activation, Linear) as one kernel call, for int8 sparse weights.

The two-call version writes the hidden activations (M x 3072 float32 for BERT-base) out token-major, transposing
them in the first kernel's epilogue, then reads them back, transposes and quantizes them in the second. Fused, each
thread takes a tile of tokens through both layers: the hidden activations stay in its scratch memory in the
first kernel's accumulator order ([hidden][tokens]), their per-token maximum is a running lane-wise max, and their
quantization writes the second layer's activation tile directly. Results are identical, bit for bit, to
`second(first(x))`.
"""

from __future__ import annotations

import torch

from . import _extension as ext
from .layouts import Layout, activation_code
from .library import _BLOCK4_NAMES, as_rows
from .packed_linear import PackedLinear, can_call_directly


_FUSABLE = (Layout.INT8_BLOCK4, Layout.INT8_CSR)


class FusedFFN:
    """`second(first(x))` in one call, e.g. BERT's intermediate Linear (with `activation="gelu"`) and output Linear.

    Build it with `fuse_ffn(first, second)`. Calls run the fused kernel when both are int8 sparse (INT8_BLOCK4 or
    INT8_CSR) and the extension is loaded (`fused` is then True); otherwise they just call `second(first(x))`.
    Either way the result equals `second(first(x))` exactly. Inference only. The packed weights are shared, not
    copied. Under tracing (torch.compile) the `int8_block4_ffn` op runs two 4-block weights; a CSR one goes
    through the two Linear ops.

    Call: `x` (..., first.in_features) float (converted to float32 like `PackedLinear`) -> (..., second.out_features)
    float32.
    """

    def __init__(self, first: PackedLinear, second: PackedLinear):
        for name, p in (("first", first), ("second", second)):
            if not isinstance(p, PackedLinear):
                raise TypeError(f"fuse_ffn: {name} must be a PackedLinear, got {type(p).__name__}")
            if p.splits is not None:
                raise ValueError(f"fuse_ffn: {name} was packed by pack_linears (splits={p.splits}); pack it alone")
        if first.out_features != second.in_features:
            raise ValueError(
                f"fuse_ffn: first has out_features={first.out_features} but second has "
                f"in_features={second.in_features}; they must match"
            )
        self.first, self.second = first, second
        self.in_features, self.hidden_features = first.in_features, first.out_features
        self.out_features = second.out_features
        self.fused = all(p.layout in _FUSABLE and p.runs_extension for p in (first, second))
        self._acts = (activation_code(first.activation), activation_code(second.activation))
        # the traced op (int8_block4_ffn) takes two 4-block weights; empty: trace the two Linear ops instead
        op = self.fused and all(p.layout is Layout.INT8_BLOCK4 for p in (first, second))
        self._op_args = tuple(p.tensors.get(a) for p in (first, second) for a in _BLOCK4_NAMES) if op else ()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.second(self.first(x))
        if can_call_directly(x):
            k, shape = self.in_features, x.shape
            if x.dtype is not torch.float32 or len(shape) == 0 or shape[-1] != k or not x.is_contiguous():
                x = as_rows(x, k, "FusedFFN")
            out = torch.empty((*shape[:-1], self.out_features), dtype=torch.float32)
            ext._C.Packed.run_ffn(
                self.first._handle, self.second._handle, x.data_ptr(), x.numel() // k, out.data_ptr(), *self._acts,
                ext._num_threads or torch.get_num_threads(),
            )  # fmt: skip
            return out
        if not self._op_args:
            return self.second(self.first(x))
        if isinstance(x, torch.Tensor) and x.device.type not in ("cpu", "meta"):
            as_rows(x, self.in_features, "FusedFFN")  # a clear error rather than the dispatcher's
        return torch.ops.hf_sparse.int8_block4_ffn.default(
            x, *self._op_args, self.in_features, self.hidden_features, self.out_features, self.first.activation,
            self.second.activation,
        )  # fmt: skip

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The pure-torch result (int8 numerics of `numerics.py`, torch's exact GELU): the kernels' GELU agrees with
        it to ~1e-7 relative, so the fused result matches this to a tolerance, and `second(first(x))` exactly."""
        return self.second.reference(self.first.reference(x))

    def __repr__(self) -> str:
        return f"FusedFFN(fused={self.fused}, first={self.first!r}, second={self.second!r})"


def fuse_ffn(first: PackedLinear, second: PackedLinear) -> FusedFFN:
    """One call for `second(first(x))`: the two Linears of a transformer FFN, packed with `pack_linear` (the
    first usually with `activation="gelu"`). Fused into one kernel when both are int8 sparse; see `FusedFFN`."""
    return FusedFFN(first, second)


__all__ = ["FusedFFN", "fuse_ffn"]
