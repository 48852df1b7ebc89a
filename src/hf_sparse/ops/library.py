"""The kernels as torch operators, `torch.ops.hf_sparse.*`, with fake (meta) implementations.

These are what torch.compile, torch.export and fake tensors see. Each op checks its tensors (dtype, shape,
contiguity, device; the C++ side checks the row pointers), runs the C++ kernel, or the pure-torch reference
from `layouts.py` when the extension is missing. `PackedLinear` calls the extension directly when nothing is
tracing, which saves the dispatcher's few microseconds per call; both paths run the same kernel.

Ops (all return float32 (..., N); `activation` is "none" or "gelu"):
    int8_block4_linear(x, row_ptr, cols, values, weight_sum, weight_scale, bias?, in_features, activation)
    int8_dense_linear(x, panels, weight_sum, weight_scale, bias?, in_features, activation)
    fp32_csr_linear(x, row_ptr, cols, values, bias?, in_features, activation)
"""

from __future__ import annotations

import math

import torch

from . import _extension as ext
from .layouts import ACTIVATIONS, MAX_IN_FEATURES, Layout, _check_tensor, activation_code, get_handler


_lib = torch.library.Library("hf_sparse", "DEF")
_lib.define(
    "int8_block4_linear(Tensor x, Tensor row_ptr, Tensor cols, Tensor values, Tensor weight_sum, "
    "Tensor weight_scale, Tensor? bias, int in_features, str activation) -> Tensor"
)
_lib.define(
    "int8_dense_linear(Tensor x, Tensor panels, Tensor weight_sum, Tensor weight_scale, Tensor? bias, "
    "int in_features, str activation) -> Tensor"
)
_lib.define(
    "fp32_csr_linear(Tensor x, Tensor row_ptr, Tensor cols, Tensor values, Tensor? bias, int in_features, "
    "str activation) -> Tensor"
)

_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def as_rows(x: torch.Tensor, in_features: int, where: str) -> torch.Tensor:
    """(..., K) float tensor -> contiguous float32 (M, K); bf16/fp16/fp64 are converted."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"{where}: x must be on the CPU (these are CPU kernels), got {x.device}")
    if x.dtype not in _FLOAT_INPUTS:
        raise TypeError(f"{where}: x must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{where}: x has shape {tuple(x.shape)}, its last dimension must be in_features={in_features}")
    if x.dtype != torch.float32:
        x = x.float()
    return x.reshape(-1, in_features).contiguous()


def _check_common(in_features: int, activation: str, where: str) -> None:
    if not 1 <= in_features <= MAX_IN_FEATURES:
        raise ValueError(f"{where}: in_features={in_features} must be in [1, {MAX_IN_FEATURES}]")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: activation={activation!r} is not supported; choose one of {sorted(ACTIVATIONS)}")


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def _run(layout: Layout, x, tensors: dict, n: int, in_features: int, activation: str, where: str):
    x2 = as_rows(x, in_features, where)
    m = x2.shape[0]
    if ext._C is None:
        y = get_handler(layout).reference(x2, tensors, n, in_features, activation)
        return y.reshape(*x.shape[:-1], n)
    y = torch.empty((m, n), dtype=torch.float32)
    act = activation_code(activation)
    nt = ext.get_num_threads()
    t = tensors
    if layout is Layout.INT8_BLOCK4:
        ext._C.i8_sparse_raw(
            x2.data_ptr(), m, _ptr(t["row_ptr"]), _ptr(t["cols"]), _ptr(t["values"]), _ptr(t["weight_sum"]),
            _ptr(t["weight_scale"]), _ptr(t.get("bias")), n, in_features, t["cols"].shape[0], y.data_ptr(), act, nt,
            False,
        )  # fmt: skip
    elif layout is Layout.INT8_DENSE:
        ext._C.i8_dense_raw(
            x2.data_ptr(), m, _ptr(t["panels"]), _ptr(t["weight_sum"]), _ptr(t["weight_scale"]), _ptr(t.get("bias")),
            n, in_features, y.data_ptr(), act, nt, False,
        )  # fmt: skip
    else:
        ext._C.f32_sparse_raw(
            x2.data_ptr(), m, _ptr(t["row_ptr"]), _ptr(t["cols"]), _ptr(t["values"]), _ptr(t.get("bias")), n,
            in_features, t["cols"].shape[0], y.data_ptr(), act, nt,
        )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


def _sparse_tensors(row_ptr, cols, values, bias, where: str, values_dtype, int8: bool, extra: dict) -> int:
    _check_tensor("row_ptr", row_ptr, torch.int32, None, where)
    n = row_ptr.shape[0] - 1
    if n < 0:
        raise ValueError(f"{where}: row_ptr must hold out_features + 1 >= 1 entries")
    _check_tensor("cols", cols, torch.uint16, None, where)
    _check_tensor("values", values, values_dtype, (cols.shape[0],), where)
    if int8:
        _check_tensor("weight_sum", extra["weight_sum"], torch.int32, (n,), where)
        _check_tensor("weight_scale", extra["weight_scale"], torch.float32, (n,), where)
    if bias is not None:
        _check_tensor("bias", bias, torch.float32, (n,), where)
    return n


@torch.library.impl(_lib, "int8_block4_linear", "CPU")
def _int8_block4_linear(x, row_ptr, cols, values, weight_sum, weight_scale, bias, in_features, activation):
    where = "hf_sparse::int8_block4_linear"
    _check_common(in_features, activation, where)
    extra = {"weight_sum": weight_sum, "weight_scale": weight_scale}
    n = _sparse_tensors(row_ptr, cols, values, bias, where, torch.int32, True, extra)
    tensors = {"row_ptr": row_ptr, "cols": cols, "values": values, "bias": bias, **extra}
    return _run(Layout.INT8_BLOCK4, x, tensors, n, in_features, activation, where)


@torch.library.impl(_lib, "int8_dense_linear", "CPU")
def _int8_dense_linear(x, panels, weight_sum, weight_scale, bias, in_features, activation):
    where = "hf_sparse::int8_dense_linear"
    _check_common(in_features, activation, where)
    _check_tensor("weight_scale", weight_scale, torch.float32, None, where)
    n = weight_scale.shape[0]
    _check_tensor("weight_sum", weight_sum, torch.int32, (n,), where)
    _check_tensor("panels", panels, torch.int8, (math.ceil(n / 16), math.ceil(in_features / 4), 16, 4), where, ndim=4)
    if bias is not None:
        _check_tensor("bias", bias, torch.float32, (n,), where)
    tensors = {"panels": panels, "weight_sum": weight_sum, "weight_scale": weight_scale, "bias": bias}
    return _run(Layout.INT8_DENSE, x, tensors, n, in_features, activation, where)


@torch.library.impl(_lib, "fp32_csr_linear", "CPU")
def _fp32_csr_linear(x, row_ptr, cols, values, bias, in_features, activation):
    where = "hf_sparse::fp32_csr_linear"
    _check_common(in_features, activation, where)
    n = _sparse_tensors(row_ptr, cols, values, bias, where, torch.float32, False, {})
    tensors = {"row_ptr": row_ptr, "cols": cols, "values": values, "bias": bias}
    return _run(Layout.FP32_CSR, x, tensors, n, in_features, activation, where)


def _fake_out(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


@torch.library.register_fake("hf_sparse::int8_block4_linear")
def _int8_block4_linear_fake(x, row_ptr, cols, values, weight_sum, weight_scale, bias, in_features, activation):
    return _fake_out(x, row_ptr.shape[0] - 1)


@torch.library.register_fake("hf_sparse::int8_dense_linear")
def _int8_dense_linear_fake(x, panels, weight_sum, weight_scale, bias, in_features, activation):
    return _fake_out(x, weight_scale.shape[0])


@torch.library.register_fake("hf_sparse::fp32_csr_linear")
def _fp32_csr_linear_fake(x, row_ptr, cols, values, bias, in_features, activation):
    return _fake_out(x, row_ptr.shape[0] - 1)


# The op of each layout run by C++ kernels, and the order of its tensor arguments.
OPS = {
    Layout.INT8_BLOCK4: ("int8_block4_linear", ("row_ptr", "cols", "values", "weight_sum", "weight_scale", "bias")),
    Layout.INT8_DENSE: ("int8_dense_linear", ("panels", "weight_sum", "weight_scale", "bias")),
    Layout.FP32_CSR: ("fp32_csr_linear", ("row_ptr", "cols", "values", "bias")),
}
