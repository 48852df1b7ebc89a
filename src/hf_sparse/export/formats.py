"""On-disk weight formats: one string enum keys the exporter, the loader and the kernel choice.

`compress` / `decompress` are the pure-torch reference: `decompress(compress(w, ...))` is `w` exactly for the float
storage dtypes, and the int8 quantize-dequantize of `w` (`hf_sparse.quantization.numerics`) for int8.
The byte layout of each format is in `WeightFormat`'s member docstrings and in docs/format.md.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..quantization.numerics import QMAX, dequantize_weight_int8, quantize_weight_int8
from ..sparsity.patterns import Block4Pattern, NMPattern, Pattern, UnstructuredPattern, get_pattern
from ..utils.registry import Registry
from .errors import CheckpointError


class WeightFormat(str, enum.Enum):
    """How the weight of one converted module is laid out in the safetensors file (`<m>` is the module name).

    Values are stored in the module's storage dtype: "float32", "bfloat16", "float16" or "int8". With int8 the values
    are the codes of `hf_sparse.quantization.numerics` and one more tensor is stored, whatever the format:
    `<m>.weight_scale` float32 (out, 1), the per-output-channel scale (weight = code * scale; codes in [-127, 127]).
    Bits are packed in numpy `packbits(bitorder="little")` order: bit j of byte k is item 8k + j; the padding bits
    of each row's last byte are 0. `<m>.bias`, when the module has one, is stored as usual.
    """

    DENSE = "dense"
    """`<m>.weight` (out, in) row-major in the storage dtype, as a plain checkpoint stores it. Used for int8
    embedding tables (out = vocabulary rows) and int8 Linears that were not pruned."""

    BITMASK = "sparse-bitmask"
    """Unstructured pattern; the legacy compressed-tensors sparse-bitmask layout, readable by its parsers.
    `<m>.shape` int64 (2,) = (out, in);
    `<m>.bitmask` uint8 (out, ceil(in / 8)): bit c of row r is set when weight (r, c) is stored;
    `<m>.row_offsets` int64 (out,): exclusive cumulative sum of the per-row stored counts;
    `<m>.compressed` (stored count,): the stored values, row by row, in column order."""

    BLOCK4 = "block4-bitmask"
    """4-block pattern: the 4 input weights [4b, 4b + 4) of one output row are stored or dropped together.
    `<m>.shape` int64 (2,) = (out, in);
    `<m>.block_bitmask` uint8 (out, ceil(ceil(in / 4) / 8)): bit b of row r is set when block b of row r is stored;
    `<m>.compressed` (4 * stored blocks,): 4 values per stored block, row by row, blocks in column order; columns
    past `in` (the short last block when in % 4 != 0) hold 0. The 4 int8 codes of a block are one VNNI operand."""

    NM = "nm-index"
    """N:M pattern: each group [M g, M g + M) of input weights of a row keeps at most N of them.
    `<m>.shape` int64 (2,) = (out, in);  `<m>.nm_pattern` int64 (2,) = (N, M);
    `<m>.compressed` (out * G * N,), G = ceil(in / M): N value slots per group, row by row, groups in column order;
    `<m>.nm_indices` uint8 (out, ceil(G * N * w / 8)), w = bit length of M - 1 (2 for M = 4, 3 for M = 8): the
    position of each slot inside its group, w bits per slot in the row's little-endian bit stream, strictly
    increasing within a group. A group with fewer than N weights gives its spare slots value 0 at its lowest free
    positions; positions past `in` (a short last group) hold 0."""


#: storage dtype names, as written in the quantization_config
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
}
_PATTERN_FORMATS: dict[type[Pattern], WeightFormat] = {
    UnstructuredPattern: WeightFormat.BITMASK,
    Block4Pattern: WeightFormat.BLOCK4,
    NMPattern: WeightFormat.NM,
}


def dtype_name(dtype: torch.dtype) -> str:
    """ "float32" for torch.float32, and so on, for the storage dtypes; raises for the others."""
    for name, value in STORAGE_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} cannot be stored; storage dtypes: {', '.join(STORAGE_DTYPES)}")


def check_dtype(field: str, value: str) -> str:
    if value not in STORAGE_DTYPES:
        raise ValueError(f"{field}={value!r} is not a storage dtype; use one of {', '.join(STORAGE_DTYPES)}")
    return value


def as_format(value: WeightFormat | str) -> WeightFormat:
    try:
        return WeightFormat(value)
    except ValueError:
        known = ", ".join(f.value for f in WeightFormat)
        raise ValueError(f"Unknown weight format {value!r}; known: {known}") from None


def format_for(pattern: str | Pattern) -> WeightFormat:
    """The on-disk format of a sparsity pattern: unstructured -> sparse-bitmask, 4-block -> block4-bitmask,
    N:M -> nm-index."""
    pattern = get_pattern(pattern) if isinstance(pattern, str) else pattern
    fmt = _PATTERN_FORMATS.get(type(pattern))
    if fmt is None:
        raise ValueError(f"pattern {pattern.name!r} has no on-disk format; supported: unstructured, 4-block, N:M")
    return fmt


# ---- shared checks ---------------------------------------------------------------------------------------------
def expect(
    tensors: dict[str, torch.Tensor],
    name: str,
    suffix: str,
    dtype: torch.dtype | None = None,
    shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """The tensor `<name>.<suffix>`, checked for dtype and shape; raises CheckpointError naming it."""
    t = tensors.get(suffix)
    if t is None:
        raise CheckpointError(f"tensor '{name}.{suffix}' is missing")
    if dtype is not None and t.dtype != dtype:
        raise CheckpointError(f"tensor '{name}.{suffix}' has dtype {t.dtype}, expected {dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"tensor '{name}.{suffix}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def expect_shape(tensors: dict[str, torch.Tensor], name: str) -> tuple[int, int]:
    """The (out, in) held by `<name>.shape` (int64 (2,), both > 0)."""
    t = expect(tensors, name, "shape", torch.int64, (2,))
    out, cols = (int(v) for v in t)
    if out <= 0 or cols <= 0:
        raise CheckpointError(f"tensor '{name}.shape' holds ({out}, {cols}); both sizes must be > 0")
    return out, cols


class Codec(ABC):
    """Encodes one 2-D stored matrix (float values or int8 codes) in one `WeightFormat`, and back."""

    format: ClassVar[WeightFormat]
    #: tensor-name suffixes this format writes (besides `weight_scale` for int8)
    names: ClassVar[tuple[str, ...]]
    #: the suffix holding the values, whose dtype is the storage dtype
    values: ClassVar[str] = "compressed"

    @abstractmethod
    def encode(self, stored: torch.Tensor, keep: torch.Tensor, pattern: Pattern | None) -> dict[str, torch.Tensor]:
        """`stored` (out, in) in the storage dtype, zero wherever `keep` is False -> tensors keyed by suffix."""

    @abstractmethod
    def check(self, tensors: dict[str, torch.Tensor], name: str) -> tuple[int, int]:
        """Raise CheckpointError unless the tensors are a well-formed instance of the format; return (out, in)."""

    @abstractmethod
    def decode(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Checked tensors -> the stored matrix (out, in) in the storage dtype."""


FORMATS: Registry[Codec] = Registry("weight format", field="format")


def register_codec(cls: type[Codec]) -> type[Codec]:
    FORMATS.register(cls.format.value)(cls())
    return cls


def _codec(format: WeightFormat | str) -> Codec:
    return FORMATS.get(as_format(format).value)


# ---- the reference --------------------------------------------------------------------------------------------
def compress(
    weight: torch.Tensor,
    format: WeightFormat | str | None = None,
    dtype: str | None = None,
    *,
    pattern: str | Pattern | None = None,
) -> dict[str, torch.Tensor]:
    """A 2-D float weight -> the tensors of `format`, keyed by name suffix (`compressed`, `bitmask`, ...).

    Args:
        weight: (out, in) float tensor; its zeros are the pruned weights.
        format: the on-disk format; by default the one of `pattern`.
        dtype: storage dtype ("float32", "bfloat16", "float16", "int8"); default: the weight's own dtype.
        pattern: the sparsity pattern ("unstructured", "4-block", "2:4", ...); needed for "nm-index".
    """
    if format is None and pattern is None:
        raise ValueError("compress needs format= or pattern=")
    pattern = get_pattern(pattern) if isinstance(pattern, str) else pattern
    fmt = format_for(pattern) if format is None else as_format(format)
    if pattern is not None and fmt is not WeightFormat.DENSE and format_for(pattern) is not fmt:
        raise ValueError(f"pattern {pattern.name!r} is stored as {format_for(pattern).value!r}, not {fmt.value!r}")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"compress expects a 2-D float weight tensor, got {getattr(weight, 'shape', weight)!r}")
    w = weight.detach().cpu()
    dtype = dtype_name(w.dtype) if dtype is None else check_dtype("dtype", dtype)
    extra = {}
    if dtype == "int8":
        stored, scale = quantize_weight_int8(w)
        extra["weight_scale"] = scale.reshape(-1, 1).contiguous()
    else:
        stored = w.to(STORAGE_DTYPES[dtype])
    tensors = _codec(fmt).encode(stored.contiguous(), w != 0, pattern)
    tensors.update(extra)
    return {k: v.contiguous() for k, v in tensors.items()}


def validate(
    tensors: dict[str, torch.Tensor],
    format: WeightFormat | str,
    dtype: str | None = None,
    *,
    name: str = "weight",
) -> torch.Size:
    """Check a module's tensors (keyed by suffix) against `format` and `dtype`; return the weight's shape.

    Raises CheckpointError naming the tensor `<name>.<suffix>` at fault: missing or unexpected tensors, wrong
    dtypes or shapes, counts that do not add up, indices out of range, non-zero padding, bad scales or int8 codes.
    """
    codec = _codec(format)
    values = expect(tensors, name, codec.values)
    if dtype is None:
        try:
            dtype = dtype_name(values.dtype)
        except ValueError as e:
            raise CheckpointError(f"tensor '{name}.{codec.values}': {e}") from None
    elif dtype not in STORAGE_DTYPES:
        raise CheckpointError(f"module {name!r} declares dtype {dtype!r}; storage dtypes: {', '.join(STORAGE_DTYPES)}")
    expected = set(codec.names) | ({"weight_scale"} if dtype == "int8" else set())
    missing = sorted(expected - set(tensors))
    if missing:
        raise CheckpointError(
            f"tensor '{name}.{missing[0]}' is missing: format {codec.format.value!r} with dtype {dtype} needs "
            f"{', '.join(f'{name}.{s}' for s in sorted(expected))}"
        )
    extra = sorted(set(tensors) - expected)
    if extra:
        raise CheckpointError(
            f"tensor '{name}.{extra[0]}' is unexpected for format {codec.format.value!r} with dtype {dtype}"
        )
    expect(tensors, name, codec.values, STORAGE_DTYPES[dtype])
    out, cols = codec.check(tensors, name)
    if dtype == "int8":
        if bool((values == -QMAX - 1).any()):
            raise CheckpointError(f"tensor '{name}.{codec.values}' holds the int8 code -128; codes are in [-127, 127]")
        scale = expect(tensors, name, "weight_scale", torch.float32, (out, 1))
        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise CheckpointError(f"tensor '{name}.weight_scale' holds a value that is not finite and > 0")
    return torch.Size((out, cols))


def decompress(
    tensors: dict[str, torch.Tensor],
    format: WeightFormat | str,
    dtype: str | None = None,
    *,
    name: str = "weight",
    check: bool = True,
) -> torch.Tensor:
    """The tensors of one module -> its dense weight: in the storage dtype for float formats, float32 for int8.

    `check=False` skips `validate` for tensors already checked (e.g. by `SparseCheckpoint`).
    """
    if check:
        validate(tensors, format, dtype, name=name)
    stored = _codec(format).decode(tensors)
    if stored.dtype == torch.int8:
        return dequantize_weight_int8(stored, tensors["weight_scale"].reshape(-1))
    return stored


def tensor_names(format: WeightFormat | str, dtype: str) -> tuple[str, ...]:
    """The suffixes a module in `format` with storage `dtype` has in the file."""
    names = _codec(format).names
    return (*names, "weight_scale") if dtype == "int8" else names
