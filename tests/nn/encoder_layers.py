"""Fused encoder layers built from random packed weights, for the tests of FusedEncoderLayer and FusedEncoderStack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from hf_sparse import ops


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


def make_encoder_layer(
    seed: int, hidden: int = HIDDEN, heads: int = HEADS, ffn: int = FFN, qkv_layout: str | None = None
):
    """A FusedEncoderLayer (`hidden` wide, `heads` heads, `ffn` hidden units) of random 4-block int8 weights, its
    Q/K/V packed in `qkv_layout` (None: the packing rule's choice)."""
    from hf_sparse.nn import FusedEncoderLayer
    from hf_sparse.ops import fuse_ffn, pack_linear, pack_linears

    gen = torch.Generator().manual_seed(seed)
    qkv = pack_linears(
        [_block4(hidden, hidden, gen) for _ in range(3)],
        biases=[torch.randn(hidden, generator=gen) for _ in range(3)],
        layout=qkv_layout,
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


def assert_matches_reference(layer, got, x, mask, attention: str = "bf16"):
    """`got` (a fused layer's output for x, mask) against the pure-torch reference of every step."""
    ref = layer.reference(x, mask, attention)
    # Summation orders differ (LayerNorm, attention), so now and then an int8 code on a rounding boundary flips and
    # moves the outputs of that token by about one quantization step (measured over 60 inputs: max 2.5e-3 of the
    # largest output, median 2e-7; at most 2 tokens of 180 at hidden 128): nearly every token must match tightly,
    # and no output may be far off.
    err, scale = (got - ref).abs(), ref.abs().max().item()
    off = (err.flatten(0, -2).amax(-1) > 1e-5 * scale).float().mean().item()
    assert off <= 0.03, f"{off:.2%} of the tokens have outputs beyond 1e-5 of the reference's scale {scale:.3g}"
    assert err.max().item() <= 1e-2 * scale, f"max |fused - reference| = {err.max().item():.3g} (scale {scale:.3g})"


def output_on_isa(layer, x: torch.Tensor, isa: str) -> torch.Tensor:
    """layer(x) on the kernels of `isa` (ops.set_isa; the one before afterwards)."""
    previous = ops.isa()
    ops.set_isa(isa)
    try:
        return layer(x)
    finally:
        ops.set_isa(previous)


def run_with_poisoned_scratch(script: str, *args: str) -> None:
    """Runs `script` (with `args` as sys.argv[1:]) in a fresh interpreter with every scratch buffer filled with NaN
    bytes first (HF_SPARSE_POISON_SCRATCH=1, read once per process); it must print "ok" last and exit 0."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_SPARSE_POISON_SCRATCH": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600, cwd=repo, env=env
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
