"""`nm-index`: N:M sparsity, N value slots per group of M input weights plus each slot's in-group position."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...sparsity.patterns import NMPattern
from ..bits import index_bits, pack_uints, padding_bits_set, unpack_uints
from ..errors import CheckpointError
from ..formats import Codec, WeightFormat, expect, expect_shape, register_codec


def _groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """(out, in) -> (out, ceil(in / m), m), zero-padded."""
    return F.pad(t, (0, (-t.shape[1]) % m)).reshape(t.shape[0], -1, m)


@register_codec
class NMCodec(Codec):
    format = WeightFormat.NM
    names = ("shape", "nm_pattern", "nm_indices", "compressed")

    def encode(self, stored, keep, pattern) -> dict[str, torch.Tensor]:
        if not isinstance(pattern, NMPattern):
            raise ValueError(f"format 'nm-index' needs an N:M pattern such as '2:4', got pattern={pattern!r}")
        n, m = pattern.n, pattern.m
        out, cols = stored.shape
        kept = _groups(keep, m)
        counts = kept.sum(-1)
        if bool((counts > n).any()):
            row, group = (int(i) for i in torch.nonzero(counts > n)[0])
            raise ValueError(
                f"row {row}, columns [{group * m}, {group * m + m}) hold {int(counts[row, group])} non-zeros; "
                f"pattern {n}:{m} allows at most {n}"
            )
        # slots: the kept positions first, then the lowest free ones; then in increasing position order
        position = torch.arange(m)
        rank = torch.where(kept, position, position + m)
        slots = torch.sort(torch.argsort(rank, dim=-1, stable=True)[..., :n], dim=-1).values
        values = torch.gather(_groups(stored, m), -1, slots)
        return {
            "shape": torch.tensor([out, cols], dtype=torch.int64),
            "nm_pattern": torch.tensor([n, m], dtype=torch.int64),
            "nm_indices": pack_uints(slots.reshape(out, -1), index_bits(m)),
            "compressed": values.reshape(-1),
        }

    def check(self, tensors, name) -> tuple[int, int]:
        out, cols = expect_shape(tensors, name)
        n, m = (int(v) for v in expect(tensors, name, "nm_pattern", torch.int64, (2,)))
        if not 0 < n < m <= 64:
            raise CheckpointError(f"tensor '{name}.nm_pattern' holds ({n}, {m}); N:M needs 0 < N < M <= 64")
        groups = math.ceil(cols / m)
        width = index_bits(m)
        packed = expect(tensors, name, "nm_indices", torch.uint8, (out, math.ceil(groups * n * width / 8)))
        if padding_bits_set(packed, groups * n * width):
            raise CheckpointError(f"tensor '{name}.nm_indices' sets padding bits past its last index; they must be 0")
        values = expect(tensors, name, "compressed", shape=(out * groups * n,))
        slots = unpack_uints(packed, groups * n, width).reshape(out, groups, n)
        if bool((slots >= m).any()):
            raise CheckpointError(f"tensor '{name}.nm_indices' holds a position >= M={m}: index out of range")
        if n > 1 and bool((slots.diff(dim=-1) <= 0).any()):
            raise CheckpointError(
                f"tensor '{name}.nm_indices' repeats a position or is out of order in a group; positions must be "
                "strictly increasing"
            )
        column = torch.arange(groups).reshape(1, -1, 1) * m + slots
        if bool((values.reshape(out, groups, n)[column >= cols] != 0).any()):
            raise CheckpointError(
                f"tensor '{name}.compressed' holds non-zero values past column {cols}; they must be 0"
            )
        return out, cols

    def decode(self, tensors) -> torch.Tensor:
        out, cols = (int(v) for v in tensors["shape"])
        n, m = (int(v) for v in tensors["nm_pattern"])
        groups = math.ceil(cols / m)
        slots = unpack_uints(tensors["nm_indices"], groups * n, index_bits(m)).reshape(out, groups, n)
        values = tensors["compressed"]
        weight = torch.zeros(out, groups, m, dtype=values.dtype)
        weight.scatter_(-1, slots, values.reshape(out, groups, n))
        return weight.reshape(out, -1)[:, :cols].contiguous()
