"""compress / decompress / validate: exact round trips, the documented byte layouts, and refusal of bad tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_sparse.export import CheckpointError, WeightFormat, compress, decompress, format_for, validate
from hf_sparse.quantization import dequantize_weight_int8, quantize_weight_int8
from hf_sparse.sparsity import get_pattern


SHAPES = [(830, 545), (511, 350), (5, 3)]
PATTERNS = ["unstructured", "4-block", "2:4", "1:8", "3:7"]
DTYPES = ["float32", "bfloat16", "float16", "int8"]


def sparse_weight(shape, pattern: str, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A random weight whose zeros follow `pattern` (N:M groups sometimes keep fewer than N)."""
    g = torch.Generator().manual_seed(seed)
    out, cols = shape
    w = torch.randn(shape, generator=g)
    if pattern == "unstructured":
        keep = torch.rand(shape, generator=g) < 0.3
    elif pattern == "4-block":
        keep = (torch.rand(out, math.ceil(cols / 4), generator=g) < 0.25).repeat_interleave(4, 1)[:, :cols]
    else:
        n, m = (int(v) for v in pattern.split(":"))
        groups = math.ceil(cols / m)
        scores = torch.rand(out, groups, m, generator=g)
        keep = torch.zeros(out, groups, m, dtype=torch.bool)
        keep.scatter_(-1, scores.topk(n, dim=-1).indices, True)
        keep &= torch.rand(out, groups, 1, generator=g) < 0.8  # some groups fully pruned
        keep = keep.reshape(out, -1)[:, :cols]
    weight = (w * keep).to(dtype)
    assert get_pattern(pattern).follows(weight != 0)
    return weight


def reference(weight: torch.Tensor, dtype: str) -> torch.Tensor:
    if dtype == "int8":
        return dequantize_weight_int8(*quantize_weight_int8(weight))
    return weight.to(getattr(torch, dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_exact(shape, pattern, dtype):
    source_dtype = torch.float32 if dtype in ("float32", "int8") else getattr(torch, dtype)
    weight = sparse_weight(shape, pattern, dtype=source_dtype)
    tensors = compress(weight, dtype=dtype, pattern=pattern)
    fmt = format_for(pattern)
    assert validate(tensors, fmt, dtype) == weight.shape
    out = decompress(tensors, fmt, dtype)
    expected = reference(weight, dtype)
    assert out.dtype == expected.dtype
    assert torch.equal(out, expected), (out - expected).abs().max()


@pytest.mark.parametrize("pattern", ["unstructured", "4-block", "2:4"])
def test_compressed_is_smaller_than_dense(pattern):
    weight = sparse_weight((830, 545), pattern)
    for dtype in DTYPES:
        tensors = compress(weight, dtype=dtype, pattern=pattern)
        stored = sum(t.numel() * t.element_size() for t in tensors.values())
        dense = weight.numel() * torch.empty((), dtype=getattr(torch, dtype)).element_size()
        assert stored < dense, (pattern, dtype, stored, dense)


def test_bitmask_is_the_legacy_compressed_tensors_layout():
    weight = sparse_weight((511, 350), "unstructured")
    t = compress(weight, WeightFormat.BITMASK)
    assert t["shape"].tolist() == [511, 350] and t["shape"].dtype == torch.int64
    np.testing.assert_array_equal(t["bitmask"].numpy(), np.packbits((weight != 0).numpy(), axis=1, bitorder="little"))
    counts = (weight != 0).sum(1)
    assert t["row_offsets"].dtype == torch.int64
    assert torch.equal(t["row_offsets"], torch.cumsum(counts, 0) - counts)
    assert torch.equal(t["compressed"], weight[weight != 0])


def _bits(byte_row: torch.Tensor) -> list[int]:
    return [(int(b) >> j) & 1 for b in byte_row for j in range(8)]


def test_block4_layout_matches_the_spec():
    """A second, loop-by-loop decoder written from the WeightFormat.BLOCK4 docstring."""
    weight = sparse_weight((13, 22), "4-block", seed=3)
    t = compress(weight, WeightFormat.BLOCK4)
    out, cols = t["shape"].tolist()
    values = t["compressed"].tolist()
    decoded = torch.zeros(out, cols)
    pos = 0
    for r in range(out):
        bits = _bits(t["block_bitmask"][r])
        for b in range(math.ceil(cols / 4)):
            if bits[b]:
                for j in range(4):
                    if 4 * b + j < cols:
                        decoded[r, 4 * b + j] = values[pos + j]
                    else:
                        assert values[pos + j] == 0
                pos += 4
    assert pos == len(values)
    assert torch.equal(decoded, weight)


def test_nm_layout_matches_the_spec():
    """A second decoder for WeightFormat.NM: w-bit little-endian indices, N slots per group."""
    weight = sparse_weight((9, 21), "3:7", seed=5)  # 7 needs w = 3 bits; 21 % 7 == 0
    t = compress(weight, WeightFormat.NM, pattern="3:7")
    assert t["nm_pattern"].tolist() == [3, 7]
    out, cols = t["shape"].tolist()
    values = t["compressed"].reshape(out, -1).tolist()
    decoded = torch.zeros(out, cols)
    for r in range(out):
        bits = _bits(t["nm_indices"][r])
        for s in range(3 * 3):  # 3 groups x 3 slots
            index = sum(bits[3 * s + k] << k for k in range(3))
            decoded[r, 7 * (s // 3) + index] = values[r][s]
    assert torch.equal(decoded, weight)


def test_int8_codes_and_scales_are_the_numerics_ones():
    weight = sparse_weight((830, 545), "4-block")
    t = compress(weight, dtype="int8", pattern="4-block")
    q, scale = quantize_weight_int8(weight)
    assert torch.equal(t["weight_scale"], scale.reshape(-1, 1))
    assert torch.equal(decompress(t, "block4-bitmask", "int8"), dequantize_weight_int8(q, scale))


def test_compress_refuses_weights_off_pattern():
    weight = sparse_weight((8, 8), "unstructured")
    weight[2, 4:8] = 1.0  # a full group of 4
    with pytest.raises(ValueError, match=r"row 2, columns \[4, 8\) hold 4 non-zeros; pattern 2:4 allows at most 2"):
        compress(weight, pattern="2:4")
    with pytest.raises(ValueError, match="2-D float"):
        compress(torch.ones(3, 4, 5), pattern="unstructured")
    with pytest.raises(ValueError, match="Unknown weight format 'csr'"):
        compress(weight, "csr")
    with pytest.raises(ValueError, match="pattern '2:4' is stored as 'nm-index', not 'sparse-bitmask'"):
        compress(weight, "sparse-bitmask", pattern="2:4")


def _tensors(fmt, dtype="float32"):
    """A (6, 10) weight whose short last block / group is stored: columns 2, 3 of every 4 are 0."""
    weight = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    weight[:, 2::4] = weight[:, 3::4] = 0
    return compress(weight, fmt, dtype, pattern="2:4" if fmt == "nm-index" else None)


def _set(t, key, value):
    t[key] = value


TAMPERS = [
    ("sparse-bitmask", "float32", lambda t: t.pop("row_offsets"), "'w.row_offsets' is missing"),
    ("sparse-bitmask", "float32", lambda t: _set(t, "extra", torch.zeros(1)), "'w.extra' is unexpected"),
    ("sparse-bitmask", "float32", lambda t: _set(t, "compressed", t["compressed"].half()), "has dtype torch.float16"),
    (
        "sparse-bitmask",
        "float32",
        lambda t: t["row_offsets"].add_(1),
        "row_offsets' does not match the bitmask: row 0",
    ),
    ("sparse-bitmask", "float32", lambda t: _set(t, "compressed", t["compressed"][:-1]), "'w.compressed' has shape"),
    ("sparse-bitmask", "float32", lambda t: t["bitmask"][:, -1].bitwise_or_(0x80), "sets bits past column 10"),
    ("sparse-bitmask", "float32", lambda t: _set(t, "shape", torch.tensor([6, -10])), "must be > 0"),
    ("sparse-bitmask", "float32", lambda t: _set(t, "shape", torch.tensor([6, 20])), "'w.bitmask' has shape"),
    ("block4-bitmask", "float32", lambda t: t["block_bitmask"].bitwise_or_(0x80), "sets bits past block 3"),
    ("block4-bitmask", "float32", lambda t: t["compressed"].fill_(1.0), "non-zero values past column 10"),
    ("block4-bitmask", "int8", lambda t: t["compressed"].__setitem__(0, -128), "int8 code -128"),
    (
        "block4-bitmask",
        "int8",
        lambda t: t["weight_scale"].zero_(),
        "'w.weight_scale' holds a value that is not finite",
    ),
    ("block4-bitmask", "int8", lambda t: t.pop("weight_scale"), "'w.weight_scale' is missing"),
    ("nm-index", "float32", lambda t: t["nm_indices"].fill_(0), "strictly increasing"),
    ("nm-index", "float32", lambda t: _set(t, "nm_pattern", torch.tensor([4, 4])), "N:M needs 0 < N < M"),
    ("nm-index", "float32", lambda t: _set(t, "nm_pattern", torch.tensor([1, 8])), "'w.nm_indices' has shape"),
    ("dense", "int8", lambda t: _set(t, "weight", t["weight"].float()), "has dtype torch.float32"),
]


@pytest.mark.parametrize("fmt, dtype, tamper, message", TAMPERS)
def test_validate_names_the_tensor_at_fault(fmt, dtype, tamper, message):
    tensors = _tensors(fmt, dtype)
    validate(tensors, fmt, dtype, name="w")
    tamper(tensors)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate(tensors, fmt, dtype, name="w")
    with pytest.raises(CheckpointError):
        decompress(tensors, fmt, dtype, name="w")


def test_nm_index_out_of_range():
    # M = 3 stores 2-bit positions, so 3 is encodable but out of range
    weight = sparse_weight((4, 6), "1:3")
    tensors = compress(weight, pattern="1:3")
    tensors["nm_indices"] = torch.full_like(tensors["nm_indices"], 0xFF)
    tensors["nm_indices"][:, -1] &= 0x0F  # keep the padding bits 0: 2 groups x 1 slot x 2 bits = 4 bits per row
    with pytest.raises(CheckpointError, match="holds a position >= M=3: index out of range"):
        validate(tensors, "nm-index", name="w")


def test_nm_padding_slots_must_hold_zero():
    weight = sparse_weight((4, 9), "2:4")  # the last group has 1 column, so a spare slot points past column 9
    tensors = compress(weight, pattern="2:4")
    validate(tensors, "nm-index", name="w")
    tensors["compressed"].fill_(1.0)
    with pytest.raises(CheckpointError, match="'w.compressed' holds non-zero values past column 9"):
        validate(tensors, "nm-index", name="w")
