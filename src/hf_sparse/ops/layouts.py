"""Packed weight layouts: the bytes each kernel reads, how a weight is packed into them, checked, and unpacked.

One `Layout` enum member per kernel. Its handler (registered in `LAYOUTS`) packs a weight, validates packed
tensors (so a bad file can never make a kernel read out of bounds), unpacks them, and computes the pure-torch
reference result that the C++ kernels must reproduce. docs/kernels.md draws the layouts.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..quantization.numerics import int8_linear_reference
from ..utils.registry import Registry


MAX_IN_FEATURES = 65536  # 255 * 127 * K must fit int32 (u8 x s8 sums), and block indices are uint16


class Layout(str, enum.Enum):
    """How a packed Linear weight is stored. Every layout also holds `bias` (float32 (N,), optional)."""

    INT8_BLOCK4 = "int8_block4"
    """int8 4-block sparse. A 4-block is 4 consecutive input features of one output row (features 4c .. 4c+3);
    the blocks holding a nonzero are stored row by row, in column order:
    `row_ptr` int32 (N+1,): row n owns blocks row_ptr[n] .. row_ptr[n+1]-1;
    `cols` uint16 (nnzb,): block column c; `values` int32 (nnzb,): the 4 int8 codes, byte j = feature 4c+j
    (little-endian; 0 past in_features); `weight_sum` int32 (N,): sum of row n's codes;
    `weight_scale` float32 (N,). Unstructured int8 weights are padded to 4-blocks."""

    INT8_DENSE = "int8_dense"
    """int8 dense, in panels of 16 output channels: `panels` int8 (ceil(N/16), ceil(K/4), 16, 4) with
    panels[p, b, c, j] = code[16 p + c, 4 b + j] (0 past N or K): one 64-byte line is 16 channels x 4 features.
    Plus `weight_sum` int32 (N,) and `weight_scale` float32 (N,)."""

    FP32_CSR = "fp32_csr"
    """float32 CSR sparse: `row_ptr` int32 (N+1,), `cols` uint16 (nnz,) input feature, `values` float32 (nnz,)."""

    FP32_DENSE = "fp32_dense"
    """float32 dense `weight` (N, K), run by torch (F.linear)."""


# Fused epilogue activations: name -> (code passed to the kernels, torch function applied by the reference).
ACTIVATIONS: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor] | None]] = {
    "none": (0, None),
    "gelu": (1, lambda y: F.gelu(y, approximate="none")),
}


def activation_code(name: str) -> int:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name][0]


def apply_activation(y: torch.Tensor, name: str) -> torch.Tensor:
    fn = ACTIVATIONS[name][1]
    return fn(y) if fn is not None else y


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_tensor(
    name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...] | None, where: str, ndim: int = 1
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    _check(t.dtype == dtype, f"{where}: {name} must be {dtype}, got {t.dtype}")
    _check(t.device.type == "cpu", f"{where}: {name} must be on the CPU, got {t.device}")
    _check(t.dim() == ndim, f"{where}: {name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if shape is not None:
        _check(tuple(t.shape) == shape, f"{where}: {name} must have shape {shape}, got {tuple(t.shape)}")
    _check(t.is_contiguous(), f"{where}: {name} must be contiguous; call .contiguous() on it")


def _check_row_ptr(row_ptr: torch.Tensor, nnz: int, where: str) -> None:
    rp = row_ptr.to(torch.int64)
    _check(int(rp[0]) == 0, f"{where}: row_ptr[0] is {int(rp[0])}, must be 0")
    steps = rp[1:] - rp[:-1]
    bad = torch.nonzero(steps < 0)
    if bad.numel():
        i = int(bad[0, 0]) + 1
        raise ValueError(f"{where}: row_ptr decreases at index {i} ({int(rp[i - 1])} -> {int(rp[i])})")
    _check(int(rp[-1]) == nnz, f"{where}: row_ptr[-1] is {int(rp[-1])} but there are {nnz} stored entries")


def _check_cols(cols: torch.Tensor, limit: int, what: str, where: str) -> None:
    if cols.numel():
        c = cols.to(torch.int64)
        bad = torch.nonzero(c >= limit)
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(f"{where}: cols[{i}] = {int(c[i])} is out of range ({what}: {limit})")


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def block4_density(codes: torch.Tensor) -> float:
    """Fraction of 4-blocks (4 consecutive input features of a row) that hold a nonzero."""
    n, k = codes.shape
    kb = math.ceil(k / 4)
    if n == 0:
        return 0.0
    blocks = (_pad_to(codes, n, 4 * kb).reshape(n, kb, 4) != 0).any(-1)
    return float(blocks.sum()) / (n * kb)


class LayoutHandler:
    """Packs, checks, unpacks and runs (in pure torch) one layout."""

    layout: Layout
    scheme: str  # "int8" or "fp32"
    kind: int | None = None  # hf_sparse._C kind, None when torch runs it

    def pack(self, weight: torch.Tensor, scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Int8 schemes: `weight` holds int8 codes and `scale` their fp32 scales; fp32: `weight` is float32."""
        raise NotImplementedError

    def validate(self, t: dict[str, torch.Tensor], out_features: int, in_features: int, where: str) -> None:
        raise NotImplementedError

    def dense_codes(self, t: dict[str, torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
        """The dense (N, K) weight: int8 codes for int8 layouts, float32 values for fp32 ones."""
        raise NotImplementedError

    def nnz(self, t: dict[str, torch.Tensor], out_features: int, in_features: int) -> int:
        """Stored weight entries (int8 layouts count bytes of codes, padding included)."""
        raise NotImplementedError

    def unpack(self, t: dict[str, torch.Tensor], out_features: int, in_features: int) -> torch.Tensor:
        """Dense float32 (N, K) weight, dequantized."""
        w = self.dense_codes(t, out_features, in_features)
        if self.scheme == "int8":
            return w.float() * t["weight_scale"][:, None]
        return w

    def reference(
        self, x: torch.Tensor, t: dict[str, torch.Tensor], out_features: int, in_features: int, activation: str
    ) -> torch.Tensor:
        """x (M, K) float32 -> (M, N) float32, in pure torch (numerics.int8_linear_reference for int8)."""
        w = self.dense_codes(t, out_features, in_features)
        bias = t.get("bias")
        if self.scheme == "int8":
            y = int8_linear_reference(x, w, t["weight_scale"], bias)
        else:
            y = F.linear(x, w, bias)
        return apply_activation(y, activation)

    # Shared pieces
    def _validate_epilogue(self, t: dict[str, torch.Tensor], n: int, where: str) -> None:
        if self.scheme == "int8":
            _check_tensor("weight_sum", t.get("weight_sum"), torch.int32, (n,), where)
            _check_tensor("weight_scale", t.get("weight_scale"), torch.float32, (n,), where)
        if t.get("bias") is not None:
            _check_tensor("bias", t["bias"], torch.float32, (n,), where)


LAYOUTS: Registry[type[LayoutHandler]] = Registry("packed layout", field="layout")
_HANDLERS: dict[str, LayoutHandler] = {}


def get_handler(layout: Layout | str) -> LayoutHandler:
    """The (stateless) handler of a layout; an unknown name raises, listing the known ones."""
    name = layout.value if isinstance(layout, Layout) else layout
    handler = _HANDLERS.get(name)
    if handler is None:
        handler = _HANDLERS[name] = LAYOUTS.get(name)()
    return handler


def _csr(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row pointers and column indices of the True entries of a 2-D mask, row-major."""
    counts = mask.sum(1, dtype=torch.int64)
    row_ptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    cols = torch.nonzero(mask)[:, 1]
    return row_ptr.to(torch.int32), cols.to(torch.int32).to(torch.uint16)


@LAYOUTS.register(Layout.INT8_BLOCK4.value)
class Int8Block4(LayoutHandler):
    layout = Layout.INT8_BLOCK4
    scheme = "int8"
    kind = 0

    def pack(self, weight, scale):
        n, k = weight.shape
        kb = math.ceil(k / 4)
        blocks = _pad_to(weight, n, 4 * kb).reshape(n, kb, 4)
        mask = (blocks != 0).any(-1)
        row_ptr, cols = _csr(mask)
        values = blocks[mask].contiguous().view(torch.int32).reshape(-1)
        return {
            "row_ptr": row_ptr,
            "cols": cols,
            "values": values.contiguous(),
            "weight_sum": weight.sum(1, dtype=torch.int32),
            "weight_scale": scale.float().contiguous(),
        }

    def validate(self, t, out_features, in_features, where):
        n, kb = out_features, math.ceil(in_features / 4)
        _check_tensor("row_ptr", t.get("row_ptr"), torch.int32, (n + 1,), where)
        cols, values = t.get("cols"), t.get("values")
        _check_tensor("cols", cols, torch.uint16, None, where)
        _check_tensor("values", values, torch.int32, (cols.shape[0],), where)
        _check_row_ptr(t["row_ptr"], cols.shape[0], where)
        _check_cols(cols, kb, "4-blocks per row", where)
        self._validate_epilogue(t, n, where)

    def dense_codes(self, t, out_features, in_features):
        n, kb = out_features, math.ceil(in_features / 4)
        codes = torch.zeros(n, kb, 4, dtype=torch.int8)
        rows = torch.repeat_interleave(torch.arange(n), (t["row_ptr"][1:] - t["row_ptr"][:-1]).to(torch.int64))
        codes[rows, t["cols"].to(torch.int64)] = t["values"].view(torch.int8).reshape(-1, 4)
        return codes.reshape(n, 4 * kb)[:, :in_features].contiguous()

    def nnz(self, t, out_features, in_features):
        return 4 * t["cols"].numel()


@LAYOUTS.register(Layout.INT8_DENSE.value)
class Int8Dense(LayoutHandler):
    layout = Layout.INT8_DENSE
    scheme = "int8"
    kind = 1

    def pack(self, weight, scale):
        n, k = weight.shape
        p, kb = math.ceil(n / 16), math.ceil(k / 4)
        panels = _pad_to(weight, 16 * p, 4 * kb).reshape(p, 16, kb, 4).permute(0, 2, 1, 3).contiguous()
        return {
            "panels": panels,
            "weight_sum": weight.sum(1, dtype=torch.int32),
            "weight_scale": scale.float().contiguous(),
        }

    def validate(self, t, out_features, in_features, where):
        shape = (math.ceil(out_features / 16), math.ceil(in_features / 4), 16, 4)
        _check_tensor("panels", t.get("panels"), torch.int8, shape, where, ndim=4)
        self._validate_epilogue(t, out_features, where)

    def dense_codes(self, t, out_features, in_features):
        p, kb = t["panels"].shape[:2]
        return t["panels"].permute(0, 2, 1, 3).reshape(16 * p, 4 * kb)[:out_features, :in_features].contiguous()

    def nnz(self, t, out_features, in_features):
        return out_features * in_features


@LAYOUTS.register(Layout.FP32_CSR.value)
class Fp32Csr(LayoutHandler):
    layout = Layout.FP32_CSR
    scheme = "fp32"
    kind = 2

    def pack(self, weight, scale):
        mask = weight != 0
        row_ptr, cols = _csr(mask)
        return {"row_ptr": row_ptr, "cols": cols, "values": weight[mask].float().contiguous()}

    def validate(self, t, out_features, in_features, where):
        _check_tensor("row_ptr", t.get("row_ptr"), torch.int32, (out_features + 1,), where)
        cols, values = t.get("cols"), t.get("values")
        _check_tensor("cols", cols, torch.uint16, None, where)
        _check_tensor("values", values, torch.float32, (cols.shape[0],), where)
        _check_row_ptr(t["row_ptr"], cols.shape[0], where)
        _check_cols(cols, in_features, "in_features", where)
        self._validate_epilogue(t, out_features, where)

    def dense_codes(self, t, out_features, in_features):
        w = torch.zeros(out_features, in_features, dtype=torch.float32)
        counts = (t["row_ptr"][1:] - t["row_ptr"][:-1]).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(out_features), counts)
        w[rows, t["cols"].to(torch.int64)] = t["values"]
        return w

    def nnz(self, t, out_features, in_features):
        return t["cols"].numel()


@LAYOUTS.register(Layout.FP32_DENSE.value)
class Fp32Dense(LayoutHandler):
    layout = Layout.FP32_DENSE
    scheme = "fp32"
    kind = None

    def pack(self, weight, scale):
        return {"weight": weight.float().contiguous()}

    def validate(self, t, out_features, in_features, where):
        _check_tensor("weight", t.get("weight"), torch.float32, (out_features, in_features), where, ndim=2)
        self._validate_epilogue(t, out_features, where)

    def dense_codes(self, t, out_features, in_features):
        return t["weight"]

    def nnz(self, t, out_features, in_features):
        return int(torch.count_nonzero(t["weight"]))
