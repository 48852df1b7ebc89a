"""`sparse-bitmask`: unstructured sparsity in the legacy compressed-tensors layout (one bit per weight)."""

from __future__ import annotations

import math

import torch

from ..bits import pack_bits, padding_bits_set, unpack_bits
from ..errors import CheckpointError
from ..formats import Codec, WeightFormat, expect, expect_shape, register_codec


@register_codec
class BitmaskCodec(Codec):
    format = WeightFormat.BITMASK
    names = ("shape", "bitmask", "row_offsets", "compressed")

    def encode(self, stored, keep, pattern) -> dict[str, torch.Tensor]:
        counts = keep.sum(1)
        return {
            "shape": torch.tensor(stored.shape, dtype=torch.int64),
            "bitmask": pack_bits(keep),
            "row_offsets": torch.cumsum(counts, 0) - counts,
            "compressed": stored[keep],  # boolean indexing walks row-major
        }

    def check(self, tensors, name) -> tuple[int, int]:
        out, cols = expect_shape(tensors, name)
        bitmask = expect(tensors, name, "bitmask", torch.uint8, (out, math.ceil(cols / 8)))
        if padding_bits_set(bitmask, cols):
            raise CheckpointError(f"tensor '{name}.bitmask' sets bits past column {cols}; they must be 0")
        counts = unpack_bits(bitmask, cols).sum(1)
        offsets = expect(tensors, name, "row_offsets", torch.int64, (out,))
        expected = torch.cumsum(counts, 0) - counts
        bad = torch.nonzero(offsets != expected).flatten()
        if bad.numel():
            r = int(bad[0])
            raise CheckpointError(
                f"tensor '{name}.row_offsets' does not match the bitmask: row {r} starts at {int(offsets[r])}, "
                f"the bitmask's counts put it at {int(expected[r])}"
            )
        expect(tensors, name, "compressed", shape=(int(counts.sum()),))
        return out, cols

    def decode(self, tensors) -> torch.Tensor:
        out, cols = (int(v) for v in tensors["shape"])
        values = tensors["compressed"]
        weight = torch.zeros(out, cols, dtype=values.dtype)
        weight[unpack_bits(tensors["bitmask"], cols)] = values
        return weight
