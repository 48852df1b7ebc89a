"""`PackedLinear`: a Linear weight packed once at load time for the CPU kernels, and the functions that pack it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch._C import _is_torch_function_mode_enabled, _len_torch_dispatch_stack

from ..quantization.numerics import quantize_activation_int8, quantize_weight_int8
from . import _extension as ext
from .layouts import (
    ACTIVATIONS,
    MAX_IN_FEATURES,
    Layout,
    activation_code,
    apply_activation,
    block4_density,
    get_handler,
    quad_count,
)
from .library import OPS, as_rows


# Layout rule, from the crossovers measured by benchmarks/kernels/bench_crossover.py (docs/kernels.md, and
# benchmarks/RESULTS.md): int8 runs 4-block sparse while at most this fraction of 4-blocks hold a nonzero (the
# 4-block kernel matched dense int8 at 0.6-0.7 on the BERT-base shapes), dense int8 above.
INT8_BLOCK4_MAX_DENSITY = 0.55
# Cost of one INT8_CSR entry (4 nonzeros) in 4-blocks, for encoder-sized calls on the AVX-512 VNNI kernels
# (benchmarks/RESULTS.md, "int8 CSR"): 1.45-1.65x a 4-block on 4-block weights at 70-90% sparsity. A weight runs
# CSR when its entries cost less than its 4-blocks and than dense int8.
INT8_CSR_ENTRY_COST = 1.6
# The same two costs where 4-block weights run their generated code (AVX512-VNNI; docs/kernels.md), which makes a
# 4-block ~2x cheaper on dense-ish weights: dense int8 then only wins from ~0.85-0.9 of the 4-blocks nonzero
# (bench_crossover.py, one weight; ~0.87 in BERT-base at batch 16, the code streaming from memory), and a CSR entry
# costs 2.5-3.1 4-blocks (BERT-base at 70 / 80 / 90% unstructured, batch 16: benchmarks/RESULTS.md, "Generated
# 4-block code"). Decoding runs the few-token kernels, not the generated code: the decode rule keeps the costs above.
INT8_BLOCK4_JIT_MAX_DENSITY = 0.85
INT8_CSR_ENTRY_COST_JIT = 2.8
# workload="decode" (token-by-token generation, 1-4 tokens per step): costs relative to dense int8 = 1, affine in
# the stored 4-blocks / CSR entries per 4-block of the weight, fitted on a 12-layer Llama-shaped decoder whose
# weights stream from memory at every step (benchmarks/speed/bench_decode.py; benchmarks/RESULTS.md, "Token-by-token
# decoding"): CSR's time over dense int8's, averaged over 1 and 4 tokens per step, was 1.06-1.07 at 70%
# unstructured, 0.89-0.98 at 80% and 0.81-0.82 at 90% (two runs), so CSR runs from ~75% (at 70%: 0.86-0.93 at
# M = 1 but 1.22-1.26 at M = 4; at 80% M = 4 it is 0.99-1.08x dense int8's time). The vpermt2d
# gather (CPUs without VBMI) is ~2x slower and takes only M <= 2: its slope is doubled (not measured in a decoder).
# 4-blocks: 0.73 at 80% and 0.71 at 90% 4-block sparsity (M = 1), ~1 at ~68% of the 4-blocks nonzero.
INT8_DECODE_BLOCK4_COST = (0.3, 2.2)
INT8_DECODE_CSR_COST = (0.68, 1.28)
INT8_DECODE_CSR_COST_NO_VBMI = (0.6, 2.6)
WORKLOADS = ("batch", "decode")
# fp32 runs CSR sparse while at most this fraction of weights is nonzero (CSR matched torch's F.linear at about
# 0.8 on a busy machine; kept well below, since an idle MKL is faster), torch's dense F.linear above.
FP32_CSR_MAX_DENSITY = 0.4

_INT8_LAYOUTS = (Layout.INT8_BLOCK4, Layout.INT8_CSR, Layout.INT8_DENSE)
_FP32_LAYOUTS = (Layout.FP32_CSR, Layout.FP32_DENSE)


def can_call_directly(x) -> bool:
    """Whether a call may go straight to the C++ kernel rather than through the torch op: not when something
    traces (torch.compile, checked first so that Dynamo stops here, or torch.jit.trace, which would record no op),
    nor for fake or subclass tensors, dispatch or function modes, or autograd."""
    return (
        not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and type(x) is torch.Tensor
        and x.is_cpu
        and not (x.requires_grad and torch.is_grad_enabled())
        and not _len_torch_dispatch_stack()
        and not _is_torch_function_mode_enabled()
    )


class PackedLinear:
    """A packed Linear weight: `y = packed(x)` computes `x @ W^T + bias` (then the fused activation) on the CPU.

    Build it with `pack_linear` / `pack_linears` (or `from_state_dict`), once, at load time.

    Call: `x` (..., in_features) float32 (bfloat16/float16/float64 are converted) -> float32 (..., out_features),
    or a tuple of views split along the last dimension when packed by `pack_linears`. Inference only: there is no
    backward. When nothing traces (torch.compile, fake tensors, dispatch modes), the call goes straight to the C++
    kernel; otherwise through the torch op (`torch.ops.hf_sparse.*`), which runs the same kernel.

    Attributes: layout, scheme ("int8"/"fp32"), in_features, out_features, activation, splits, nnz (stored
    weight entries, padding included), density (nnz / (out x in)), nbytes (bytes of all packed tensors).
    """

    def __init__(
        self,
        layout: Layout | str,
        tensors: dict[str, torch.Tensor | None],
        in_features: int,
        out_features: int,
        *,
        activation: str = "none",
        splits: Sequence[int] | None = None,
    ):
        self.layout = Layout(layout)
        handler = get_handler(self.layout)
        self.scheme = handler.scheme
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        where = f"PackedLinear({self.layout.value}, out_features={out_features}, in_features={in_features})"
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(f"{where}: in_features and out_features must be >= 1")
        if self.layout is not Layout.FP32_DENSE and self.in_features > MAX_IN_FEATURES:
            raise ValueError(f"{where}: in_features must be <= {MAX_IN_FEATURES} for this layout")
        self._act = activation_code(activation)
        self.activation = activation
        if splits is not None:
            splits = tuple(int(s) for s in splits)
            if any(s < 1 for s in splits) or sum(splits) != self.out_features:
                raise ValueError(f"{where}: splits={splits} must be positive and sum to out_features")
        self.splits = splits
        tensors = {name: t for name, t in tensors.items() if t is not None}
        handler.validate(tensors, self.out_features, self.in_features, where)
        self._handle = None
        if ext._C is not None and handler.kind is not None:
            empty_i32, empty_f32 = torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.float32)
            values = tensors.get("values", tensors.get("panels"))
            self._handle = ext._C.Packed(
                handler.kind, self.out_features, self.in_features, tensors.get("ptr", empty_i32),
                tensors.get("cols", torch.empty(0, dtype=torch.uint16)), values.reshape(-1),
                tensors.get("weight_sum", empty_i32), tensors.get("weight_scale", empty_f32),
                tensors.get("bias", empty_f32), "bias" in tensors,
            )  # fmt: skip
            # Zero-copy views of the memory the kernels read: one copy of the weight, owned by the handle.
            tensors = dict(self._handle.tensors())
        self._tensors = tensors
        self._op = None
        self._op_args: tuple = ()
        if self.layout in OPS:
            name, arg_names = OPS[self.layout]
            self._op = getattr(torch.ops.hf_sparse, name).default
            self._op_args = tuple(tensors.get(a) for a in arg_names)

    # ---------------------------------------------------------------------------------------------------------
    # Calling

    def __call__(self, x: torch.Tensor):
        h = self._handle
        if h is not None and can_call_directly(x):
            k, shape = self.in_features, x.shape
            if x.dtype is not torch.float32 or len(shape) == 0 or shape[-1] != k or not x.is_contiguous():
                x = as_rows(x, k, "PackedLinear")  # float32, contiguous; raises naming a wrong shape or dtype
            out = torch.empty((*shape[:-1], self.out_features), dtype=torch.float32)
            h.run(
                x.data_ptr(),
                x.numel() // k,
                out.data_ptr(),
                self._act,
                ext._num_threads or torch.get_num_threads(),
                False,
            )
        else:
            out = self._call_op(x)
        if self.splits is not None:
            return torch.split(out, self.splits, dim=-1)
        return out

    def token_rows(self, x: torch.Tensor, token: int = 0) -> torch.Tensor | None:
        """`self(x[:, token])` for a contiguous float32 CPU tensor (batch, seq, in_features), the rows read in place
        (one kernel call, no copy of the strided slice): BERT's pooler. The same values as slicing first. None where
        the kernels do not take x (no C++ handle, split outputs, another dtype or layout, token out of range,
        tracing): callers then slice and call."""
        h = self._handle
        if h is None or self.splits is not None or not can_call_directly(x):
            return None
        if x.dtype is not torch.float32 or x.dim() != 3 or x.shape[2] != self.in_features or not x.is_contiguous():
            return None
        batch, seq, k = x.shape
        if not 0 <= token < seq:
            return None
        out = torch.empty((batch, self.out_features), dtype=torch.float32)
        if batch:
            nt = ext._num_threads or torch.get_num_threads()
            h.run_rows(x.data_ptr() + token * k * x.element_size(), seq * k, batch, out.data_ptr(), self._act, nt)
        return out

    def _call_op(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.device.type not in ("cpu", "meta"):
            as_rows(x, self.in_features, "PackedLinear")  # a clear error rather than the dispatcher's
        if self._op is not None:
            return self._op(x, *self._op_args, self.in_features, self.out_features, self.activation)
        # FP32_DENSE: torch itself (oneDNN/MKL); torch.compile sees plain torch ops.
        if not isinstance(x, torch.Tensor) or x.shape[-1:] != (self.in_features,):
            as_rows(x, self.in_features, "PackedLinear")  # raises the error that names the problem
        xf = x if x.dtype == torch.float32 else x.float()
        return apply_activation(F.linear(xf, self._tensors["weight"], self._tensors.get("bias")), self.activation)

    def accumulators(self, x: torch.Tensor) -> torch.Tensor:
        """Debug: the exact int32 sums sum_k q_x[m, k] q_w[n, k] the int8 kernel computes, (M, out_features)."""
        if self.scheme != "int8":
            raise ValueError(f"accumulators() exists for int8 layouts, not {self.layout.value}")
        x2 = as_rows(x, self.in_features, "PackedLinear.accumulators")
        if self._handle is None:
            q_x, _ = quantize_activation_int8(x2)
            codes = get_handler(self.layout).dense_codes(self._tensors, self.out_features, self.in_features)
            return (q_x.to(torch.int64) @ codes.to(torch.int64).t()).to(torch.int32)
        out = torch.empty((x2.shape[0], self.out_features), dtype=torch.int32)
        nt = ext._num_threads or torch.get_num_threads()
        self._handle.run(x2.data_ptr(), x2.shape[0], out.data_ptr(), 0, nt, True)
        return out

    # ---------------------------------------------------------------------------------------------------------
    # Inspection and serialisation

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The packed tensors (do not modify them; they are what the kernels read)."""
        return dict(self._tensors)

    @property
    def bias(self) -> torch.Tensor | None:
        return self._tensors.get("bias")

    @property
    def nnz(self) -> int:
        return get_handler(self.layout).nnz(self._tensors, self.out_features, self.in_features)

    @property
    def density(self) -> float:
        return self.nnz / (self.out_features * self.in_features)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    @property
    def jit_bytes(self) -> int:
        """Bytes of machine code (and its reordered weight values) generated for this weight at pack time: int8
        4-block weights on CPUs with AVX512-VNNI, else 0. Not part of `nbytes` or of saved checkpoints."""
        return self._handle.jit_bytes if self._handle is not None else 0

    @property
    def runs_extension(self) -> bool:
        """Whether calls run the C++ kernels (False: the pure-torch reference, or torch itself for fp32_dense)."""
        return self._handle is not None

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight float32 (out, in), bias or None): the dense weight the kernels multiply by, dequantized."""
        w = get_handler(self.layout).unpack(self._tensors, self.out_features, self.in_features)
        b = self._tensors.get("bias")
        return w, (b.clone() if b is not None else None)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The pure-torch result the kernels must reproduce (numerics.int8_linear_reference for int8)."""
        x2 = as_rows(x, self.in_features, "PackedLinear.reference")
        y = get_handler(self.layout).reference(x2, self._tensors, self.out_features, self.in_features, self.activation)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return torch.split(y, self.splits, dim=-1) if self.splits is not None else y

    def config(self) -> dict:
        """What `from_state_dict` needs besides the tensors (JSON-serialisable)."""
        return {
            "layout": self.layout.value,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "activation": self.activation,
            "splits": list(self.splits) if self.splits is not None else None,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The packed tensors, copied (safe to save with safetensors); rebuild with `from_state_dict`."""
        return {name: t.clone() for name, t in self._tensors.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], config: dict) -> PackedLinear:
        """Rebuild from `state_dict()` and `config()`; every tensor is checked (indices in range, sizes
        consistent), so a corrupted or hand-made file raises a ValueError naming the tensor instead of reaching
        a kernel."""
        known = {"layout", "in_features", "out_features", "activation", "splits"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"PackedLinear config has unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(
            Layout(config["layout"]),
            dict(state),
            config["in_features"],
            config["out_features"],
            activation=config.get("activation", "none"),
            splits=config.get("splits"),
        )

    def __repr__(self) -> str:
        return (
            f"PackedLinear(layout={self.layout.value}, in_features={self.in_features}, "
            f"out_features={self.out_features}, density={self.density:.3f}, nbytes={self.nbytes}, "
            f"activation={self.activation!r}, splits={self.splits}, isa={ext.isa() if self._handle else 'torch'})"
        )


# -------------------------------------------------------------------------------------------------------------
# Packing


def _prepare_int8(weight: torch.Tensor, weight_scale: torch.Tensor | None, where: str):
    if weight.dtype == torch.int8:
        if weight_scale is None:
            raise ValueError(f"{where}: int8 weight codes need weight_scale (out_features,) float32")
        scale = weight_scale.detach().cpu().float().reshape(-1)
        if scale.numel() != weight.shape[0]:
            raise ValueError(
                f"{where}: weight_scale has {scale.numel()} entries, expected out_features={weight.shape[0]}"
            )
        if not torch.isfinite(scale).all():
            raise ValueError(f"{where}: weight_scale holds inf or NaN")
        return weight.contiguous(), scale.contiguous()
    if not weight.is_floating_point():
        raise TypeError(f"{where}: weight must be floating point or int8 codes, got {weight.dtype}")
    if weight_scale is not None:
        raise ValueError(f"{where}: weight_scale goes with int8 codes; a float weight is quantized here")
    return quantize_weight_int8(weight)


def _prepare_fp32(weight: torch.Tensor, weight_scale: torch.Tensor | None, where: str):
    if not weight.is_floating_point():
        raise TypeError(f"{where}: scheme='fp32' needs a floating-point weight, got {weight.dtype}")
    if weight_scale is not None:
        raise ValueError(f"{where}: weight_scale is only for scheme='int8'")
    return weight.float().contiguous(), None


def _auto_int8(codes: torch.Tensor, workload: str) -> Layout:
    n, k = codes.shape
    blocks = block4_density(codes)  # 4-blocks holding a nonzero, per 4-block of the weight
    csr = ext.isa() == "avx512_vnni"  # the other instruction sets run CSR on a portable loop
    entries = quad_count(codes) / max(1, n * math.ceil(k / 4)) if csr else 0.0
    costs = {Layout.INT8_BLOCK4: blocks, Layout.INT8_DENSE: INT8_BLOCK4_MAX_DENSITY}
    if csr:
        costs[Layout.INT8_CSR] = INT8_CSR_ENTRY_COST * entries
    if workload != "decode":
        if csr and ext.jit_available() and ext.jit_enabled():
            costs[Layout.INT8_DENSE] = INT8_BLOCK4_JIT_MAX_DENSITY
            costs[Layout.INT8_CSR] = INT8_CSR_ENTRY_COST_JIT * entries
        return min(costs, key=costs.get)
    # decode: the sparse layout the kernels' relative costs prefer (the same at few tokens: a CSR entry costs about
    # 1.6 4-blocks there too), kept when it beats dense int8 at 1-4 tokens per step
    sparse = min((Layout.INT8_BLOCK4, Layout.INT8_CSR) if csr else (Layout.INT8_BLOCK4,), key=costs.get)
    if sparse is Layout.INT8_CSR:
        vbmi = ext.quads_few_variant() == "avx512_vbmi"
        c0, c1 = INT8_DECODE_CSR_COST if vbmi else INT8_DECODE_CSR_COST_NO_VBMI
        return Layout.INT8_CSR if c0 + c1 * entries < 1.0 else Layout.INT8_DENSE
    b0, b1 = INT8_DECODE_BLOCK4_COST
    return Layout.INT8_BLOCK4 if b0 + b1 * blocks < 1.0 else Layout.INT8_DENSE


def _auto_fp32(weight: torch.Tensor, workload: str) -> Layout:
    n, k = weight.shape
    if k > MAX_IN_FEATURES:
        return Layout.FP32_DENSE
    density = int(torch.count_nonzero(weight)) / (n * k)
    return Layout.FP32_CSR if density <= FP32_CSR_MAX_DENSITY else Layout.FP32_DENSE


# scheme -> (prepare the weight, choose a layout automatically, the layouts it allows)
SCHEMES = {
    "int8": (_prepare_int8, _auto_int8, _INT8_LAYOUTS),
    "fp32": (_prepare_fp32, _auto_fp32, _FP32_LAYOUTS),
}


def pack_linears(
    weights: Sequence[torch.Tensor],
    *,
    biases: Sequence[torch.Tensor | None] | None = None,
    scheme: str = "int8",
    weight_scales: Sequence[torch.Tensor | None] | None = None,
    layout: Layout | str | None = None,
    activation: str = "none",
    workload: str = "batch",
) -> PackedLinear:
    """Pack several Linears that read the same input side by side (e.g. attention Q, K, V): one call quantizes
    the input once and returns a tuple of outputs, one per weight (views of one buffer). Stacking output rows is
    exact: each output channel keeps its own scale. Arguments as `pack_linear`, one entry per weight."""
    weights = list(weights)
    if not weights:
        raise ValueError("pack_linears needs at least one weight")
    n_w = len(weights)
    biases = list(biases) if biases is not None else [None] * n_w
    scales = list(weight_scales) if weight_scales is not None else [None] * n_w
    if len(biases) != n_w or len(scales) != n_w:
        raise ValueError(f"pack_linears: got {n_w} weights, {len(biases)} biases and {len(scales)} weight_scales")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is not supported; choose one of {sorted(SCHEMES)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
    if workload not in WORKLOADS:
        raise ValueError(f"workload={workload!r} is not supported; choose one of {list(WORKLOADS)}")
    prepare, auto, allowed = SCHEMES[scheme]
    prepared, bias_parts, in_features = [], [], None
    for i, (w, b, s) in enumerate(zip(weights, biases, scales)):
        where = f"pack_linear(weight #{i})" if n_w > 1 else "pack_linear"
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"{where}: weight must be a 2-D tensor (out_features, in_features), got {_describe(w)}")
        if w.device.type not in ("cpu",):
            raise ValueError(f"{where}: weight is on {w.device}; load it on the CPU first (device_map='cpu')")
        if w.shape[0] < 1 or w.shape[1] < 1:
            raise ValueError(f"{where}: weight has shape {tuple(w.shape)}; both dimensions must be >= 1")
        if in_features is None:
            in_features = w.shape[1]
        elif w.shape[1] != in_features:
            raise ValueError(f"{where}: in_features {w.shape[1]} differs from weight #0's {in_features}")
        prepared.append(prepare(w.detach(), s, where))
        if b is not None:
            if not isinstance(b, torch.Tensor) or b.reshape(-1).numel() != w.shape[0]:
                raise ValueError(f"{where}: bias must have out_features={w.shape[0]} entries, got {_describe(b)}")
            if not torch.isfinite(b).all():
                raise ValueError(f"{where}: bias holds inf or NaN")
        bias_parts.append(b)
    weight = torch.cat([p[0] for p in prepared]) if n_w > 1 else prepared[0][0]
    scale = None
    if scheme == "int8":
        scale = torch.cat([p[1] for p in prepared]) if n_w > 1 else prepared[0][1]
    bias = None
    if any(b is not None for b in bias_parts):
        bias = torch.cat(
            [
                b.detach().float().reshape(-1) if b is not None else torch.zeros(p[0].shape[0])
                for b, p in zip(bias_parts, prepared)
            ]
        ).contiguous()
    if layout is None:
        chosen = auto(weight, workload)
    else:
        chosen = Layout(layout)
        if chosen not in allowed:
            raise ValueError(
                f"layout={chosen.value!r} does not fit scheme={scheme!r}; choose one of {[a.value for a in allowed]}"
            )
    if chosen is not Layout.FP32_DENSE and in_features > MAX_IN_FEATURES:
        raise ValueError(f"in_features={in_features} exceeds {MAX_IN_FEATURES}, the most layout {chosen.value} takes")
    tensors = get_handler(chosen).pack(weight, scale)
    tensors["bias"] = bias
    splits = [p[0].shape[0] for p in prepared] if n_w > 1 else None
    return PackedLinear(chosen, tensors, in_features, weight.shape[0], activation=activation, splits=splits)


def pack_linear(
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    scheme: str = "int8",
    weight_scale: torch.Tensor | None = None,
    layout: Layout | str | None = None,
    activation: str = "none",
    workload: str = "batch",
) -> PackedLinear:
    """Pack one Linear weight (out_features, in_features) with its zeros in place, once, for the CPU kernels.

    Args:
        weight: float weight (quantized here per output channel when scheme="int8"), or int8 codes together
            with `weight_scale` (from a checkpoint).
        bias: (out_features,) or None.
        scheme: "int8" (dynamic per-token int8 activations x int8 weights, int32 sums) or "fp32".
        weight_scale: (out_features,) float32 scales of int8 codes.
        layout: force a `Layout`; None chooses from the zeros. int8: the cheapest of INT8_BLOCK4 (cost: the
            fraction of 4-blocks holding a nonzero), INT8_DENSE (cost INT8_BLOCK4_MAX_DENSITY) and, when the
            AVX-512 VNNI kernels run, INT8_CSR (INT8_CSR_ENTRY_COST per entry of 4 nonzeros): 4-block patterns
            run INT8_BLOCK4, unstructured ones INT8_CSR. Where 4-block weights get generated code
            (`jit_available()`), INT8_BLOCK4_JIT_MAX_DENSITY and INT8_CSR_ENTRY_COST_JIT replace those two
            constants. fp32: FP32_CSR when at most FP32_CSR_MAX_DENSITY of the weights are nonzero, else
            FP32_DENSE.
        activation: "none", "gelu" (exact erf GELU) or "tanh", fused into the kernel's epilogue.
        workload: what the automatic int8 layout is chosen for: "batch" (encoder batches, the rule above) or
            "decode" (token-by-token generation, 1-4 tokens per step: the few-token kernels against dense int8
            in a decoder whose weights stream from memory, costs INT8_DECODE_BLOCK4_COST and
            INT8_DECODE_CSR_COST[_NO_VBMI]), where dense int8 runs below ~75% unstructured sparsity. Ignored when
            `layout` is given and for fp32.
    """
    return pack_linears(
        [weight],
        biases=[bias],
        scheme=scheme,
        weight_scales=[weight_scale],
        layout=layout,
        activation=activation,
        workload=workload,
    )


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


__all__ = [
    "FP32_CSR_MAX_DENSITY",
    "INT8_BLOCK4_JIT_MAX_DENSITY",
    "INT8_BLOCK4_MAX_DENSITY",
    "INT8_CSR_ENTRY_COST",
    "INT8_CSR_ENTRY_COST_JIT",
    "INT8_DECODE_BLOCK4_COST",
    "INT8_DECODE_CSR_COST",
    "INT8_DECODE_CSR_COST_NO_VBMI",
    "WORKLOADS",
    "PackedLinear",
    "pack_linear",
    "pack_linears",
]
