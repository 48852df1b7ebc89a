"""`FusedEncoderStack`: consecutive `FusedEncoderLayer`s (a whole BERT encoder) in one kernel call.

    y = layers[-1](... layers[1](layers[0](x, mask), mask) ..., mask)

The kernels run layer after layer without returning to Python (csrc/encoder_layer.cpp, `encoder_stack`): no
Python call per layer, and with whole sequences per thread a chunk of sequences goes on to the next layer as soon
as it is through the previous one, so no thread waits for the others between layers. Results are the layers'
own, bit for bit (int8; float32 CSR layers up to the last bits, as between any two tilings).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ops import _extension as ext
from ..ops.attention import _mask_args
from .encoder_layer import FusedEncoderLayer, _attention_int8, _StepCounters, norm_args


class FusedEncoderStack:
    """Runs `layers` (FusedEncoderLayer, same hidden size and heads) one after the other. Inference only.

    Call: `x` (batch, seq, hidden) float32, `mask` None or as `hf_sparse.ops.attention` takes it (the same for every
    layer) -> float32 (batch, seq, hidden). The one-call path needs what each layer's fast path needs (see
    FusedEncoderLayer); otherwise the layers are called one by one. Each layer's `chunk_tokens`,
    `split_sequences`, `pack_qkv` and `feature_major` are the first layer's here."""

    def __init__(self, layers: Sequence[FusedEncoderLayer]):
        layers = list(layers)
        if not layers or not all(isinstance(layer, FusedEncoderLayer) for layer in layers):
            raise ValueError(
                f"FusedEncoderStack: expected FusedEncoderLayers, got {[type(x).__name__ for x in layers]}"
            )
        shapes = {(layer.hidden, layer.heads, layer.head_dim) for layer in layers}
        if len(shapes) != 1:
            raise ValueError(f"FusedEncoderStack: layers of different shapes (hidden, heads, head_dim): {shapes}")
        self.layers = layers
        self._norms = [norm for layer in layers for norm in (layer.norm1, layer.norm2)]
        self._plan = None
        if all(layer._plan is not None for layer in layers):
            self._plan = ext._C.EncoderStack([layer._plan for layer in layers])

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None = None, attention: str = "bf16") -> torch.Tensor:
        """`attention`: "bf16" or "int8", as for FusedEncoderLayer."""
        int8 = _attention_int8(attention, "FusedEncoderStack")
        first = self.layers[0]
        norms = norm_args(self._norms) if self._plan is not None and first.takes(x, mask) else None
        if norms is None:
            for layer in self.layers:
                x = layer(x, mask, attention)
            return x
        batch, seq, _ = x.shape
        kind, mk, sb, sh, sq = _mask_args(mask, batch, first.heads, seq, "FusedEncoderStack")
        y = torch.empty_like(x)
        scratch = torch.empty_like(x) if len(self.layers) > 1 else y  # the layers' outputs alternate with y
        ptrs, eps = norms
        with _StepCounters() as counters:
            flags = self._plan.run(
                x.data_ptr(), y.data_ptr(), scratch.data_ptr(), batch, seq, kind,
                mk.data_ptr() if mk is not None else 0, sb, sh, sq, ptrs, eps,
                first.chunk_tokens, first.split_sequences,
                bool(first.pack_qkv), bool(first.feature_major), int8, ext._num_threads or torch.get_num_threads(),
                counters.address,
            )  # fmt: skip
        for layer in self.layers:
            layer._split_flags = flags
        return y

    def reference(self, x: torch.Tensor, mask: torch.Tensor | None = None, attention: str = "bf16") -> torch.Tensor:
        """Pure torch: each layer's `reference` in turn."""
        for layer in self.layers:
            x = layer.reference(x, mask, attention)
        return x

    def __repr__(self) -> str:
        return f"FusedEncoderStack({len(self.layers)} x {self.layers[0]!r})"


__all__ = ["FusedEncoderStack"]
