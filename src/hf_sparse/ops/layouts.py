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
PANEL = 128  # columns per panel of the sparse layouts (4-blocks for int8, input features for fp32)


class Layout(str, enum.Enum):
    """How a packed Linear weight is stored. Every layout also holds `bias` (float32 (N,), optional)."""

    INT8_BLOCK4 = "int8_block4"
    """int8 4-block sparse. A 4-block is 4 consecutive input features of one output row (features 4c .. 4c+3);
    the blocks holding a nonzero are stored in column panels of 128 blocks (512 features), panel by panel, then
    row by row, then in column order (panel-major CSR):
    `ptr` int32 (P*N+1,), P = ceil(ceil(K/4) / 128): row n's blocks in panel p are ptr[p*N+n] .. ptr[p*N+n+1]-1;
    `cols` uint16 (nnzb,): block column c; `values` int32 (nnzb,): the 4 int8 codes, byte j = feature 4c+j
    (little-endian; 0 past in_features); `weight_sum` int32 (N,): sum of row n's codes;
    `weight_scale` float32 (N,). Unstructured int8 weights are padded to 4-blocks."""

    INT8_CSR = "int8_csr"
    """int8 unstructured sparse (CSR), nonzeros in quads: each stored entry holds 4 nonzero codes of one row, at any
    4 input features. Panels as INT8_BLOCK4 (512 features); within a panel a row's nonzeros are stored in feature
    order, 4 per entry, the last entry padded with code 0 at the row's first feature of that panel:
    `ptr` int32 (P*N+1,), P = ceil(ceil(K/4) / 128): row n's entries in panel p are ptr[p*N+n] .. ptr[p*N+n+1]-1;
    `cols` uint16 (4*nnzq,): cols[4e+j] = the input feature of code j of entry e; `values` int32 (nnzq,): the 4 int8
    codes, byte j for feature cols[4e+j] (little-endian); `weight_sum` int32 (N,), `weight_scale` float32 (N,).
    For unstructured weights, where a padded 4-block holds ~1.2 nonzeros: the AVX-512 kernel multiplies 4 nonzeros
    per lane (docs/kernels.md)."""

    INT8_DENSE = "int8_dense"
    """int8 dense, in panels of 16 output channels: `panels` int8 (ceil(N/16), ceil(K/4), 16, 4) with
    panels[p, b, c, j] = code[16 p + c, 4 b + j] (0 past N or K): one 64-byte line is 16 channels x 4 features.
    Plus `weight_sum` int32 (N,) and `weight_scale` float32 (N,)."""

    FP32_CSR = "fp32_csr"
    """float32 sparse, panel-major CSR over panels of 128 input features: `ptr` int32 (P*N+1,), P = ceil(K/128),
    row n's entries in panel p are ptr[p*N+n] .. ptr[p*N+n+1]-1; `cols` uint16 (nnz,) input feature;
    `values` float32 (nnz,)."""

    FP32_DENSE = "fp32_dense"
    """float32 dense `weight` (N, K), run by torch (F.linear)."""


# Fused epilogue activations: name -> (code passed to the kernels, torch function applied by the reference).
ACTIVATIONS: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor] | None]] = {
    "none": (0, None),
    "gelu": (1, lambda y: F.gelu(y, approximate="none")),
    "tanh": (2, torch.tanh),
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


def _check_ptr(ptr: torch.Tensor, nnz: int, where: str) -> None:
    p = ptr.to(torch.int64)
    _check(int(p[0]) == 0, f"{where}: ptr[0] is {int(p[0])}, must be 0")
    bad = torch.nonzero(p[1:] < p[:-1])
    if bad.numel():
        i = int(bad[0, 0]) + 1
        raise ValueError(f"{where}: ptr decreases at index {i} ({int(p[i - 1])} -> {int(p[i])})")
    _check(int(p[-1]) == nnz, f"{where}: ptr[-1] is {int(p[-1])} but there are {nnz} stored entries")


def num_panels(columns: int) -> int:
    return math.ceil(columns / PANEL)


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


def _panel_csr(mask: torch.Tensor, panel: int = PANEL) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Panel-major CSR of the True entries of a 2-D (N, columns) mask, `panel` columns per panel: (ptr int32, cols
    uint16, order), where `order` indexes the entries in the flattened mask, in storage order."""
    n, columns = mask.shape
    p = math.ceil(columns / panel)
    panels = F.pad(mask, (0, p * panel - columns)).reshape(n, p, panel).permute(1, 0, 2)  # (P, N, panel)
    counts = panels.sum(-1, dtype=torch.int64).reshape(-1)
    ptr = torch.zeros(p * n + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=ptr[1:])
    idx = torch.nonzero(panels)  # (panel, row, column in panel), in storage order
    cols = idx[:, 0] * panel + idx[:, 2]
    order = idx[:, 1] * columns + cols
    return ptr.to(torch.int32), cols.to(torch.int32).to(torch.uint16), order


def _int8_epilogue(codes: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """What every int8 layout stores besides the codes: the rows' code sums (the kernels' +128 shift) and scales."""
    return {"weight_sum": codes.sum(1, dtype=torch.int32), "weight_scale": scale.float().contiguous()}


def _entry_rows(ptr: torch.Tensor, n: int) -> torch.Tensor:
    """The output row of each stored entry of a panel-major CSR."""
    counts = (ptr[1:] - ptr[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(counts.numel()) % n, counts)


@LAYOUTS.register(Layout.INT8_BLOCK4.value)
class Int8Block4(LayoutHandler):
    layout = Layout.INT8_BLOCK4
    scheme = "int8"
    kind = 0

    def pack(self, weight, scale):
        n, k = weight.shape
        kb = math.ceil(k / 4)
        blocks = _pad_to(weight, n, 4 * kb).reshape(n * kb, 4)
        ptr, cols, order = _panel_csr((blocks != 0).any(-1).reshape(n, kb))
        values = blocks[order].contiguous().view(torch.int32).reshape(-1)
        return {
            "ptr": ptr,
            "cols": cols,
            "values": values.contiguous(),
            **_int8_epilogue(weight, scale),
        }

    def validate(self, t, out_features, in_features, where):
        n, kb = out_features, math.ceil(in_features / 4)
        _check_tensor("ptr", t.get("ptr"), torch.int32, (num_panels(kb) * n + 1,), where)
        cols, values = t.get("cols"), t.get("values")
        _check_tensor("cols", cols, torch.uint16, None, where)
        _check_tensor("values", values, torch.int32, (cols.shape[0],), where)
        _check_ptr(t["ptr"], cols.shape[0], where)
        _check_cols(cols, kb, "4-blocks per row", where)
        self._validate_epilogue(t, n, where)

    def dense_codes(self, t, out_features, in_features):
        n, kb = out_features, math.ceil(in_features / 4)
        codes = torch.zeros(n, kb, 4, dtype=torch.int8)
        codes[_entry_rows(t["ptr"], n), t["cols"].to(torch.int64)] = t["values"].view(torch.int8).reshape(-1, 4)
        return codes.reshape(n, 4 * kb)[:, :in_features].contiguous()

    def nnz(self, t, out_features, in_features):
        return 4 * t["cols"].numel()


def quad_count(codes: torch.Tensor) -> int:
    """Entries of 4 nonzeros an INT8_CSR packing of `codes` (N, K) stores (padding included)."""
    n, k = codes.shape
    p = num_panels(math.ceil(k / 4))
    counts = F.pad(codes != 0, (0, p * 4 * PANEL - k)).reshape(n, p, 4 * PANEL).sum(-1)
    return int(((counts + 3) // 4).sum())


@LAYOUTS.register(Layout.INT8_CSR.value)
class Int8Csr(LayoutHandler):
    layout = Layout.INT8_CSR
    scheme = "int8"
    kind = 3

    def pack(self, weight, scale):
        n, k = weight.shape
        ptr, cols, order = _panel_csr(weight != 0, 4 * PANEL)
        counts = (ptr[1:] - ptr[:-1]).to(torch.int64)  # nonzeros per (panel, row)
        quads = (counts + 3) // 4
        qptr = torch.zeros_like(ptr, dtype=torch.int64)
        torch.cumsum(quads, 0, out=qptr[1:])
        # slot of each nonzero in the padded arrays: its segment's padded start + its rank in the segment
        seg = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        rank = torch.arange(order.numel()) - ptr.to(torch.int64)[seg]
        slot = 4 * qptr[seg] + rank
        total = 4 * int(qptr[-1])
        # padding: code 0 at the segment's first feature (a real column of this row and panel)
        padded_seg = torch.repeat_interleave(torch.arange(counts.numel()), 4 * quads)
        if total:
            first = cols.to(torch.int64)[ptr.to(torch.int64)[:-1].clamp(max=cols.numel() - 1)]
            cols4 = first[padded_seg]
        else:
            cols4 = torch.zeros(0, dtype=torch.int64)
        codes4 = torch.zeros(total, dtype=torch.int8)
        cols4[slot] = cols.to(torch.int64)
        codes4[slot] = weight.reshape(-1)[order]
        return {
            "ptr": qptr.to(torch.int32),
            "cols": cols4.to(torch.int32).to(torch.uint16),
            "values": codes4.view(torch.int32).contiguous(),
            **_int8_epilogue(weight, scale),
        }

    def validate(self, t, out_features, in_features, where):
        n = out_features
        _check_tensor("ptr", t.get("ptr"), torch.int32, (num_panels(math.ceil(in_features / 4)) * n + 1,), where)
        cols, values = t.get("cols"), t.get("values")
        _check_tensor("values", values, torch.int32, None, where)
        _check_tensor("cols", cols, torch.uint16, (4 * values.shape[0],), where)
        _check_ptr(t["ptr"], values.shape[0], where)
        _check_cols(cols, in_features, "in_features", where)
        self._validate_epilogue(t, n, where)

    def dense_codes(self, t, out_features, in_features):
        # summed per (row, feature): padding adds code 0 to a feature the row already has
        rows = _entry_rows(t["ptr"], out_features).repeat_interleave(4)
        codes = torch.zeros(out_features, in_features, dtype=torch.int32)
        codes.index_put_(
            (rows, t["cols"].to(torch.int64)), t["values"].view(torch.int8).to(torch.int32), accumulate=True
        )
        return codes.clamp(-128, 127).to(torch.int8)

    def nnz(self, t, out_features, in_features):
        return t["values"].numel() * 4


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
            **_int8_epilogue(weight, scale),
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
        ptr, cols, order = _panel_csr(weight != 0)
        return {"ptr": ptr, "cols": cols, "values": weight.reshape(-1)[order].float().contiguous()}

    def validate(self, t, out_features, in_features, where):
        _check_tensor("ptr", t.get("ptr"), torch.int32, (num_panels(in_features) * out_features + 1,), where)
        cols, values = t.get("cols"), t.get("values")
        _check_tensor("cols", cols, torch.uint16, None, where)
        _check_tensor("values", values, torch.float32, (cols.shape[0],), where)
        _check_ptr(t["ptr"], cols.shape[0], where)
        _check_cols(cols, in_features, "in_features", where)
        self._validate_epilogue(t, out_features, where)

    def dense_codes(self, t, out_features, in_features):
        w = torch.zeros(out_features, in_features, dtype=torch.float32)
        w[_entry_rows(t["ptr"], out_features), t["cols"].to(torch.int64)] = t["values"]
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
