"""Bit packing in pure torch, in numpy's `packbits(..., bitorder="little")` order (bit j of byte k is item 8k+j)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _shifts(n: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(n, dtype=dtype, device=like.device)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool (rows, n) -> uint8 (rows, ceil(n / 8)); the padding bits of each row's last byte are 0."""
    rows, n = bits.shape
    b = F.pad(bits.to(torch.uint8), (0, (-n) % 8)).reshape(rows, -1, 8)
    return (b << _shifts(8, b, torch.uint8)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (rows, nbytes) -> bool (rows, n), dropping the padding bits."""
    bits = (packed.unsqueeze(-1) >> _shifts(8, packed, torch.uint8)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :n].bool()


def padding_bits_set(packed: torch.Tensor, n: int) -> bool:
    """Whether any bit past item `n` of a row is 1 (a well-formed file keeps them 0)."""
    if n % 8 == 0 or packed.numel() == 0:
        return False
    return bool((packed[:, -1] >> (n % 8)).any())


def index_bits(m: int) -> int:
    """Bits per index into a group of `m` items: 2 for M=4, 3 for M=8."""
    return max(1, (m - 1).bit_length())


def pack_uints(values: torch.Tensor, width: int) -> torch.Tensor:
    """int (rows, k), each < 2**width -> uint8 (rows, ceil(k * width / 8)): value i takes bits [i*width, (i+1)*width)
    of the row's little-endian bit stream."""
    rows, k = values.shape
    bits = (values.to(torch.int64).unsqueeze(-1) >> _shifts(width, values, torch.int64)) & 1
    return pack_bits(bits.reshape(rows, k * width).bool())


def unpack_uints(packed: torch.Tensor, k: int, width: int) -> torch.Tensor:
    """Inverse of `pack_uints`: uint8 (rows, nbytes) -> int64 (rows, k)."""
    bits = unpack_bits(packed, k * width).reshape(packed.shape[0], k, width).to(torch.int64)
    return (bits << _shifts(width, bits, torch.int64)).sum(-1)
