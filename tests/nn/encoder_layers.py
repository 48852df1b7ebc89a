"""Fused encoder layers built from random packed weights, for the tests of FusedEncoderLayer and FusedEncoderStack."""

from __future__ import annotations

import torch
from torch import nn


HIDDEN, HEADS, FFN = 48, 4, 96


def _block4(out_features: int, in_features: int, gen: torch.Generator, density: float = 0.3) -> torch.Tensor:
    w = torch.randn(out_features, in_features, generator=gen) * 0.2
    keep = torch.rand(out_features, in_features // 4, generator=gen) < density
    return w * keep.repeat_interleave(4, dim=1)


def _norm(hidden: int, gen: torch.Generator) -> nn.LayerNorm:
    norm = nn.LayerNorm(hidden, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=gen))
        norm.bias.copy_(0.1 * torch.randn(hidden, generator=gen))
    return norm


def make_encoder_layer(seed: int, hidden: int = HIDDEN, heads: int = HEADS, ffn: int = FFN):
    """A FusedEncoderLayer (`hidden` wide, `heads` heads, `ffn` hidden units) of random 4-block int8 weights."""
    from hf_sparse.nn import FusedEncoderLayer
    from hf_sparse.ops import fuse_ffn, pack_linear, pack_linears

    gen = torch.Generator().manual_seed(seed)
    qkv = pack_linears(
        [_block4(hidden, hidden, gen) for _ in range(3)], biases=[torch.randn(hidden, generator=gen) for _ in range(3)]
    )
    out = pack_linear(_block4(hidden, hidden, gen), bias=torch.randn(hidden, generator=gen))
    first = pack_linear(_block4(ffn, hidden, gen), bias=torch.randn(ffn, generator=gen), activation="gelu")
    second = pack_linear(_block4(hidden, ffn, gen), bias=torch.randn(hidden, generator=gen))
    return FusedEncoderLayer(
        qkv, out, fuse_ffn(first, second), _norm(hidden, gen), _norm(hidden, gen), heads, (hidden // heads) ** -0.5
    )


class CountedPlan:
    """Stands in for a FusedEncoderStack's C++ plan and counts its calls: tests check that one call really ran."""

    def __init__(self, plan):
        self.plan, self.calls = plan, 0

    def run(self, *args):
        self.calls += 1
        return self.plan.run(*args)
