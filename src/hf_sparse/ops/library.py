"""The kernels as torch operators, `torch.ops.hf_sparse.*`, with fake (meta) implementations.

These are what torch.compile, torch.export and fake tensors see. Each op checks its tensors (dtype, shape,
contiguity, device; the C++ side checks the panel pointers), then runs the C++ kernel, or the pure-torch
reference from `layouts.py` when the extension is missing. `PackedLinear` calls the extension directly when
nothing is tracing, which saves the dispatcher's few microseconds per call; both paths run the same kernel.

Ops (all return float32 (..., out_features); `activation` is "none", "gelu" or "tanh"; tensors as in `Layout`):
    int8_block4_linear(x, ptr, cols, values, weight_sum, weight_scale, bias?, in_features, out_features, activation)
    int8_csr_linear(x, ptr, cols, values, weight_sum, weight_scale, bias?, in_features, out_features, activation)
    int8_dense_linear(x, panels, weight_sum, weight_scale, bias?, in_features, out_features, activation)
    fp32_csr_linear(x, ptr, cols, values, bias?, in_features, out_features, activation)
    int8_block4_ffn(x, ptr1, cols1, values1, weight_sum1, weight_scale1, bias1?, ptr2, ..., bias2?, in_features,
                    hidden_features, out_features, activation1, activation2)
        second(activation1(first(x))) for two int8 4-block weights in one call (`FusedFFN`).
"""

from __future__ import annotations

import math

import torch

from . import _extension as ext
from .layouts import ACTIVATIONS, MAX_IN_FEATURES, Layout, _check_tensor, activation_code, get_handler, num_panels


_lib = torch.library.Library("hf_sparse", "DEF")
_lib.define(
    "int8_block4_linear(Tensor x, Tensor ptr, Tensor cols, Tensor values, Tensor weight_sum, Tensor weight_scale, "
    "Tensor? bias, int in_features, int out_features, str activation) -> Tensor"
)
_lib.define(
    "int8_csr_linear(Tensor x, Tensor ptr, Tensor cols, Tensor values, Tensor weight_sum, Tensor weight_scale, "
    "Tensor? bias, int in_features, int out_features, str activation) -> Tensor"
)
_lib.define(
    "int8_dense_linear(Tensor x, Tensor panels, Tensor weight_sum, Tensor weight_scale, Tensor? bias, "
    "int in_features, int out_features, str activation) -> Tensor"
)
_lib.define(
    "fp32_csr_linear(Tensor x, Tensor ptr, Tensor cols, Tensor values, Tensor? bias, int in_features, "
    "int out_features, str activation) -> Tensor"
)

_lib.define(
    "int8_block4_ffn(Tensor x, Tensor ptr1, Tensor cols1, Tensor values1, Tensor weight_sum1, Tensor weight_scale1, "
    "Tensor? bias1, Tensor ptr2, Tensor cols2, Tensor values2, Tensor weight_sum2, Tensor weight_scale2, "
    "Tensor? bias2, int in_features, int hidden_features, int out_features, str activation1, str activation2) "
    "-> Tensor"
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
        raise ValueError(
            f"{where}: x has shape {tuple(x.shape)}, its last dimension must be in_features={in_features}"
        )
    if x.dtype != torch.float32:
        x = x.float()
    return x.reshape(-1, in_features).contiguous()


def _check_common(in_features: int, out_features: int, activation: str, where: str) -> None:
    if not 1 <= in_features <= MAX_IN_FEATURES:
        raise ValueError(f"{where}: in_features={in_features} must be in [1, {MAX_IN_FEATURES}]")
    if out_features < 1:
        raise ValueError(f"{where}: out_features={out_features} must be >= 1")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: activation={activation!r} is not supported; choose one of {sorted(ACTIVATIONS)}")


def _check_sparse(t: dict, n: int, columns: int, values_dtype: torch.dtype, where: str, per: int = 1) -> None:
    """per: column indices per stored value (4 for int8 CSR)."""
    _check_tensor("ptr", t["ptr"], torch.int32, (num_panels(columns) * n + 1,), where)
    _check_tensor("values", t["values"], values_dtype, None, where)
    _check_tensor("cols", t["cols"], torch.uint16, (per * t["values"].shape[0],), where)


def _check_epilogue(t: dict, n: int, int8: bool, where: str) -> None:
    if int8:
        _check_tensor("weight_sum", t["weight_sum"], torch.int32, (n,), where)
        _check_tensor("weight_scale", t["weight_scale"], torch.float32, (n,), where)
    if t.get("bias") is not None:
        _check_tensor("bias", t["bias"], torch.float32, (n,), where)


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def _run(layout: Layout, x, t: dict, k: int, n: int, activation: str, where: str):
    x2 = as_rows(x, k, where)
    m = x2.shape[0]
    if ext._C is None:
        y = get_handler(layout).reference(x2, t, n, k, activation)
        return y.reshape(*x.shape[:-1], n)
    y = torch.empty((m, n), dtype=torch.float32)
    act, nt = activation_code(activation), ext.get_num_threads()
    if layout in (Layout.INT8_BLOCK4, Layout.INT8_CSR):
        ext._C.i8_sparse_raw(
            x2.data_ptr(), m, _ptr(t["ptr"]), _ptr(t["cols"]), _ptr(t["values"]), _ptr(t["weight_sum"]),
            _ptr(t["weight_scale"]), _ptr(t.get("bias")), n, k, t["values"].shape[0], y.data_ptr(), act, nt, False,
            layout is Layout.INT8_CSR,
        )  # fmt: skip
    elif layout is Layout.INT8_DENSE:
        ext._C.i8_dense_raw(
            x2.data_ptr(), m, _ptr(t["panels"]), _ptr(t["weight_sum"]), _ptr(t["weight_scale"]), _ptr(t.get("bias")),
            n, k, y.data_ptr(), act, nt, False,
        )  # fmt: skip
    else:
        ext._C.f32_sparse_raw(
            x2.data_ptr(), m, _ptr(t["ptr"]), _ptr(t["cols"]), _ptr(t["values"]), _ptr(t.get("bias")), n, k,
            t["cols"].shape[0], y.data_ptr(), act, nt,
        )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


def _int8_sparse_linear(
    layout, x, ptr, cols, values, weight_sum, weight_scale, bias, in_features, out_features, activation
):
    """The int8 sparse ops: 4-block (one column index per value) or CSR (four)."""
    where = f"hf_sparse::{layout.value}_linear"
    _check_common(in_features, out_features, activation, where)
    t = {"ptr": ptr, "cols": cols, "values": values, "weight_sum": weight_sum, "weight_scale": weight_scale}
    t["bias"] = bias
    per = 4 if layout is Layout.INT8_CSR else 1
    _check_sparse(t, out_features, math.ceil(in_features / 4), torch.int32, where, per=per)
    _check_epilogue(t, out_features, True, where)
    return _run(layout, x, t, in_features, out_features, activation, where)


@torch.library.impl(_lib, "int8_block4_linear", "CPU")
def _int8_block4_linear(x, *args):
    return _int8_sparse_linear(Layout.INT8_BLOCK4, x, *args)


@torch.library.impl(_lib, "int8_csr_linear", "CPU")
def _int8_csr_linear(x, *args):
    return _int8_sparse_linear(Layout.INT8_CSR, x, *args)


@torch.library.impl(_lib, "int8_dense_linear", "CPU")
def _int8_dense_linear(x, panels, weight_sum, weight_scale, bias, in_features, out_features, activation):
    where = "hf_sparse::int8_dense_linear"
    _check_common(in_features, out_features, activation, where)
    shape = (math.ceil(out_features / 16), math.ceil(in_features / 4), 16, 4)
    _check_tensor("panels", panels, torch.int8, shape, where, ndim=4)
    t = {"panels": panels, "weight_sum": weight_sum, "weight_scale": weight_scale, "bias": bias}
    _check_epilogue(t, out_features, True, where)
    return _run(Layout.INT8_DENSE, x, t, in_features, out_features, activation, where)


@torch.library.impl(_lib, "fp32_csr_linear", "CPU")
def _fp32_csr_linear(x, ptr, cols, values, bias, in_features, out_features, activation):
    where = "hf_sparse::fp32_csr_linear"
    _check_common(in_features, out_features, activation, where)
    t = {"ptr": ptr, "cols": cols, "values": values, "bias": bias}
    _check_sparse(t, out_features, in_features, torch.float32, where)
    _check_epilogue(t, out_features, False, where)
    return _run(Layout.FP32_CSR, x, t, in_features, out_features, activation, where)


_BLOCK4_NAMES = ("ptr", "cols", "values", "weight_sum", "weight_scale", "bias")


@torch.library.impl(_lib, "int8_block4_ffn", "CPU")
def _int8_block4_ffn(x, *args):
    *tensors, k, hidden, n, act1, act2 = args
    where = "hf_sparse::int8_block4_ffn"
    _check_common(k, hidden, act1, where)
    _check_common(hidden, n, act2, where)
    layers = []
    for i, (rows, cols) in enumerate(((hidden, k), (n, hidden))):
        t = dict(zip(_BLOCK4_NAMES, tensors[6 * i : 6 * i + 6]))
        what = f"{where} (weight {i + 1})"
        _check_sparse(t, rows, math.ceil(cols / 4), torch.int32, what)
        _check_epilogue(t, rows, True, what)
        layers.append(t)
    x2 = as_rows(x, k, where)
    m = x2.shape[0]
    t1, t2 = layers
    if ext._C is None:
        handler = get_handler(Layout.INT8_BLOCK4)
        h = handler.reference(x2, t1, hidden, k, act1)
        return handler.reference(h, t2, n, hidden, act2).reshape(*x.shape[:-1], n)
    y = torch.empty((m, n), dtype=torch.float32)
    ext._C.i8_ffn_raw(
        x2.data_ptr(), m, [_ptr(t1[a]) for a in _BLOCK4_NAMES], [_ptr(t2[a]) for a in _BLOCK4_NAMES], k, hidden, n,
        t1["cols"].shape[0], t2["cols"].shape[0], y.data_ptr(), activation_code(act1), activation_code(act2),
        ext.get_num_threads(), False, False,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


def _fake_out(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


@torch.library.register_fake("hf_sparse::int8_block4_linear")
def _int8_block4_linear_fake(x, ptr, cols, values, weight_sum, weight_scale, bias, in_features, out_features, act):
    return _fake_out(x, out_features)


@torch.library.register_fake("hf_sparse::int8_csr_linear")
def _int8_csr_linear_fake(x, ptr, cols, values, weight_sum, weight_scale, bias, in_features, out_features, act):
    return _fake_out(x, out_features)


@torch.library.register_fake("hf_sparse::int8_dense_linear")
def _int8_dense_linear_fake(x, panels, weight_sum, weight_scale, bias, in_features, out_features, activation):
    return _fake_out(x, out_features)


@torch.library.register_fake("hf_sparse::fp32_csr_linear")
def _fp32_csr_linear_fake(x, ptr, cols, values, bias, in_features, out_features, activation):
    return _fake_out(x, out_features)


@torch.library.register_fake("hf_sparse::int8_block4_ffn")
def _int8_block4_ffn_fake(x, *args):
    return _fake_out(x, args[-3])


# The op of each layout run by C++ kernels, and the order of its tensor arguments.
OPS = {
    Layout.INT8_BLOCK4: ("int8_block4_linear", ("ptr", "cols", "values", "weight_sum", "weight_scale", "bias")),
    Layout.INT8_CSR: ("int8_csr_linear", ("ptr", "cols", "values", "weight_sum", "weight_scale", "bias")),
    Layout.INT8_DENSE: ("int8_dense_linear", ("panels", "weight_sum", "weight_scale", "bias")),
    Layout.FP32_CSR: ("fp32_csr_linear", ("ptr", "cols", "values", "bias")),
}
