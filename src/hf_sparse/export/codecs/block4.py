"""`block4-bitmask`: 4-block sparsity, one bit per run of 4 input weights, 4 values per stored block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..bits import pack_bits, padding_bits_set, unpack_bits
from ..errors import CheckpointError
from ..formats import Codec, WeightFormat, expect, expect_shape, register_codec


BLOCK = 4


def _blocks(t: torch.Tensor) -> torch.Tensor:
    """(out, in) -> (out, ceil(in / 4), 4), zero-padded."""
    return F.pad(t, (0, (-t.shape[1]) % BLOCK)).reshape(t.shape[0], -1, BLOCK)


@register_codec
class Block4Codec(Codec):
    format = WeightFormat.BLOCK4
    names = ("shape", "block_bitmask", "compressed")

    def encode(self, stored, keep, pattern) -> dict[str, torch.Tensor]:
        kept = _blocks(keep).any(-1)
        return {
            "shape": torch.tensor(stored.shape, dtype=torch.int64),
            "block_bitmask": pack_bits(kept),
            "compressed": _blocks(stored)[kept].reshape(-1),
        }

    def check(self, tensors, name) -> tuple[int, int]:
        out, cols = expect_shape(tensors, name)
        nblocks = math.ceil(cols / BLOCK)
        bitmask = expect(tensors, name, "block_bitmask", torch.uint8, (out, math.ceil(nblocks / 8)))
        if padding_bits_set(bitmask, nblocks):
            raise CheckpointError(f"tensor '{name}.block_bitmask' sets bits past block {nblocks}; they must be 0")
        kept = unpack_bits(bitmask, nblocks)
        values = expect(tensors, name, "compressed", shape=(BLOCK * int(kept.sum()),))
        tail = cols % BLOCK
        if tail:
            block_index = torch.nonzero(kept)[:, 1]
            padding = values.reshape(-1, BLOCK)[block_index == nblocks - 1, tail:]
            if bool((padding != 0).any()):
                raise CheckpointError(
                    f"tensor '{name}.compressed' holds non-zero values past column {cols} in a last block; "
                    "they must be 0"
                )
        return out, cols

    def decode(self, tensors) -> torch.Tensor:
        out, cols = (int(v) for v in tensors["shape"])
        values = tensors["compressed"]
        nblocks = math.ceil(cols / BLOCK)
        blocks = torch.zeros(out, nblocks, BLOCK, dtype=values.dtype)
        blocks[unpack_bits(tensors["block_bitmask"], nblocks)] = values.reshape(-1, BLOCK)
        return blocks.reshape(out, -1)[:, :cols].contiguous()
