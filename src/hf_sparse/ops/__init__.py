"""Sparse and int8 CPU kernels for Linear layers, as torch ops: pack a weight once, call it many times.

    from hf_sparse.ops import pack_linear
    packed = pack_linear(linear.weight, bias=linear.bias, scheme="int8")   # layout chosen from the zeros
    y = packed(x)                                                           # (..., in) -> (..., out) float32

`pack_linears([q, k, v])` packs weights that read the same input side by side (one activation quantization,
outputs returned split); `activation="gelu"` fuses BERT's exact GELU into the kernel; `fuse_ffn(first, second)`
runs a whole FFN (Linear, activation, Linear) as one call; `attention(qkv, heads=...)` runs multi-head
self-attention straight from the packed Q/K/V output (bf16 products, fp32 softmax), `add_layernorm` a residual
add + LayerNorm (`set_attention_precision("fp32")` / HF_SPARSE_ATTENTION=fp32 keeps models on float32 attention,
"int8" runs it on int8 products)
and `embed_layernorm` a BERT-family embedding module (three lookups, their sum and the LayerNorm).
docs/kernels.md has the numerics, the packed layouts, the dispatch rules, the threads and the environment variables.
"""

from ._extension import (
    available_isas,
    extension_available,
    get_num_threads,
    isa,
    jit_available,
    jit_enabled,
    kernel_calls,
    set_isa,
    set_jit,
    set_num_threads,
    set_spin_us,
    set_threads_backend,
    threads_backend,
)
from .attention import (
    attention,
    attention_int8_reference,
    attention_isa,
    attention_precision,
    attention_reference,
    set_attention_precision,
)
from .embeddings import embed_layernorm, embed_layernorm_reference
from .fused_ffn import FusedFFN, fuse_ffn
from .layernorm import add_layernorm, add_layernorm_reference
from .layouts import ACTIVATIONS, LAYOUTS, MAX_IN_FEATURES, Layout, block4_density, get_handler, quad_count
from .packed_linear import (
    FP32_CSR_MAX_DENSITY,
    INT8_BLOCK4_JIT_MAX_DENSITY,
    INT8_BLOCK4_MAX_DENSITY,
    INT8_CSR_ENTRY_COST,
    INT8_CSR_ENTRY_COST_JIT,
    INT8_DECODE_BLOCK4_COST,
    INT8_DECODE_CSR_COST,
    INT8_DECODE_CSR_COST_NO_VBMI,
    WORKLOADS,
    PackedLinear,
    pack_linear,
    pack_linears,
)
from .quantize import quantize_activation


__all__ = [
    "ACTIVATIONS",
    "FP32_CSR_MAX_DENSITY",
    "FusedFFN",
    "INT8_BLOCK4_JIT_MAX_DENSITY",
    "INT8_BLOCK4_MAX_DENSITY",
    "INT8_CSR_ENTRY_COST",
    "INT8_CSR_ENTRY_COST_JIT",
    "INT8_DECODE_BLOCK4_COST",
    "INT8_DECODE_CSR_COST",
    "INT8_DECODE_CSR_COST_NO_VBMI",
    "WORKLOADS",
    "LAYOUTS",
    "MAX_IN_FEATURES",
    "Layout",
    "PackedLinear",
    "add_layernorm",
    "add_layernorm_reference",
    "attention",
    "attention_isa",
    "attention_int8_reference",
    "attention_precision",
    "attention_reference",
    "available_isas",
    "block4_density",
    "embed_layernorm",
    "embed_layernorm_reference",
    "extension_available",
    "fuse_ffn",
    "get_handler",
    "get_num_threads",
    "isa",
    "jit_available",
    "jit_enabled",
    "kernel_calls",
    "pack_linear",
    "pack_linears",
    "quad_count",
    "quantize_activation",
    "set_attention_precision",
    "set_isa",
    "set_jit",
    "set_num_threads",
    "set_spin_us",
    "set_threads_backend",
    "threads_backend",
]
