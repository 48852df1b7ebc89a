"""The encoder's steps on feature-major tiles (`FusedEncoderLayer.feature_major`, csrc/encoder_layer.cpp).

The fm path quantizes with the same codes and scales, runs the same epilogue and sums each LayerNorm in the same
order as the token-row path, so it must give that path's output bit for bit, whatever the split over threads, the
chunking, the mask and the stack depth (intermediate outputs held as fm tiles), also when every scratch buffer
starts out as NaN; and it must be taken exactly where it can be (AVX-512 kernels, int8 4-block weights with a fused
FFN, hidden and sequence length multiples of 16, chunks or token blocks run by one thread).
"""

from __future__ import annotations

import pytest
import torch

from hf_sparse import ops
from hf_sparse.nn import FusedEncoderStack
from hf_sparse.nn.encoder_layer import CHUNK_TOKENS
from tests.nn.encoder_layers import (
    assert_matches_reference,
    make_encoder_layer,
    output_on_isa,
    run_with_poisoned_scratch,
)


pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="the fast path runs on the C++ kernels")

FM_KERNELS = ops.extension_available() and ops.isa() == "avx512_vnni" and ops.attention_isa() == "avx512_bf16"
SHAPES = {"h64": (64, 4, 96), "h128": (128, 2, 160), "h48": (48, 4, 96), "h80": (80, 5, 112)}  # hidden, heads, ffn
# (threads, split_sequences, chunk_tokens): whole sequences per thread, token blocks of one sequence, steps on one
# thread, steps split over two threads (never fm)
SPLITS = ((2, True, 256), (2, True, 40), (1, True, 256), (2, False, 256))


def _mask(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    keep = torch.ones(batch, seq, dtype=torch.bool)
    for b in range(batch):
        keep[b, max(1, seq - 5 * b - int(torch.randint(0, 3, (1,), generator=gen))) :] = False
    return torch.zeros(batch, 1, 1, seq).masked_fill(~keep[:, None, None, :], float("-inf"))


def _expect_fm(seq: int, nthreads: int, split: bool, batch: int) -> bool:
    """Where the fm path must run: on the AVX-512 kernels, multiples of 16 tokens, work units of one thread (whole
    sequences or token blocks; steps only on one thread)."""
    if not FM_KERNELS or seq % 16:
        return False
    if nthreads == 1:
        return True
    sequences = split and batch >= nthreads and (batch // nthreads) * seq >= 32
    leftover = batch % nthreads if sequences else batch
    tokens = split and leftover > 0 and seq // nthreads >= 32
    return bool(sequences or tokens)


def _both(target, layers, x, mask):
    """(token-row output, fm output) of `target` (a layer or a stack over `layers`), each after a call on another
    input of the same shape (so that neither can pass on the other's intermediates)."""
    outs, ran = [], []
    try:
        for fm in (False, True):
            for layer in layers:
                layer.feature_major = fm
            target(torch.randn_like(x), mask)
            outs.append(target(x, mask))
            ran.append(layers[0].ran_feature_major)
    finally:
        for layer in layers:
            layer.feature_major = True
    assert not ran[0], "feature_major = False must keep token rows"
    return outs[0], outs[1], ran[1]


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("seq", [16, 17, 48, 64, 80, 128, 144])
def test_fm_layer_equals_token_rows(threads, shape, seq):
    hidden, heads, ffn = SHAPES[shape]
    layer = make_encoder_layer(seq, hidden, heads, ffn)
    gen = torch.Generator().manual_seed(seq)
    for batch in (1, 3):
        x = torch.randn(batch, seq, hidden, generator=gen)
        for mask in (None, _mask(batch, seq, gen)):
            for nthreads, split, chunk in SPLITS:
                threads(nthreads)
                layer.split_sequences, layer.chunk_tokens = split, chunk
                try:
                    rows, fm, ran = _both(layer, [layer], x, mask)
                finally:
                    layer.split_sequences, layer.chunk_tokens = True, CHUNK_TOKENS
                where = (shape, seq, batch, nthreads, split, chunk, mask is not None)
                assert ran is _expect_fm(seq, nthreads, split, batch), where
                assert torch.equal(rows, fm), where


@pytest.mark.skipif(not FM_KERNELS or not ops.jit_available(), reason="tile pairs run the generated code")
@pytest.mark.parametrize("attention, products", [("bf16", 3), ("int8", 4)])
def test_two_full_tiles_share_each_products_code(threads, attention, products):
    """A work unit of 128 tokens or more runs its products on two 64-token tiles at once (IsaKernels::
    i8_sparse_pair, i8_ffn_hidden_pair), 144 tokens as a pair and a tile of 16, bit for bit the token-row output:
    all four with the int8 attention, whose packed Q/K/V writer stages each tile's heads apart; three with bf16
    (its writer takes 16-channel groups into one staging per thread: Q/K/V one tile at a time)."""
    hidden, heads, ffn = SHAPES["h64"]
    gen = torch.Generator().manual_seed(12)
    threads(1)
    for seq, mask in ((128, None), (144, _mask(1, 144, gen))):
        layer = make_encoder_layer(seq, hidden, heads, ffn)
        x = torch.randn(1, seq, hidden, generator=gen)
        try:
            layer.feature_major = False
            rows = layer(x, mask, attention=attention)
            layer.feature_major = True
            layer(torch.randn_like(x), mask, attention=attention)
            pairs = ops.kernel_calls("jit_pairs")["avx512_vnni"]
            fm = layer(x, mask, attention=attention)
        finally:
            layer.feature_major = True
        assert layer.ran_feature_major and torch.equal(rows, fm), seq
        assert ops.kernel_calls("jit_pairs")["avx512_vnni"] == pairs + products, seq


def test_kernel_calls_names_its_kinds():
    with pytest.raises(ValueError, match=r"kernel_calls\(kind='jit_pair'\): kind must be one of .*'jit_pairs'"):
        ops.kernel_calls("jit_pair")


@pytest.mark.parametrize("depth", [2, 3])
def test_fm_stack_equals_token_rows(threads, depth):
    """A stack keeps its intermediate outputs as fm tiles: deeper stacks read them back."""
    hidden, heads, ffn = SHAPES["h64"]
    layers = [make_encoder_layer(seed, hidden, heads, ffn) for seed in range(depth)]
    stack = FusedEncoderStack(layers)
    gen = torch.Generator().manual_seed(depth)
    for batch, seq in ((4, 64), (5, 48), (1, 128), (1, 96), (3, 32), (2, 16)):
        x = torch.randn(batch, seq, hidden, generator=gen)
        mask = _mask(batch, seq, gen)
        for nthreads, split, chunk in SPLITS:
            threads(nthreads)
            layers[0].split_sequences, layers[0].chunk_tokens = split, chunk  # the stack takes its first layer's
            try:
                rows, fm, ran = _both(stack, layers, x, mask)
            finally:
                layers[0].split_sequences, layers[0].chunk_tokens = True, CHUNK_TOKENS
            where = (batch, seq, nthreads, split, chunk)
            assert ran is _expect_fm(seq, nthreads, split, batch), where
            assert torch.equal(rows, fm), where


def test_fm_only_where_it_can(threads):
    threads(2)
    x = torch.randn(2, 64, 64)
    csr = make_encoder_layer(0, 64, 2, 96, qkv_layout="int8_csr")  # fm tiles: int8 4-block weights only
    csr(x)
    assert not csr.ran_feature_major
    layer = make_encoder_layer(0, 64, 2, 96)
    expected = layer(x)
    assert layer.ran_feature_major is FM_KERNELS
    assert_matches_reference(layer, expected, x, None)
    layer(torch.randn(2, 63, 64))  # not a multiple of 16 tokens
    assert not layer.ran_feature_major
    for isa in ("avx2", "scalar") if FM_KERNELS else ():  # (fm tiles: the AVX-512 kernels only)
        got = output_on_isa(layer, x, isa)
        assert not layer.ran_feature_major, isa
        assert_matches_reference(layer, got, x, None)
    layer.feature_major = False
    assert torch.equal(layer(x), expected) and not layer.ran_feature_major


_POISONED = """
import torch
from hf_sparse import ops
from hf_sparse.nn import FusedEncoderStack
from tests.nn.encoder_layers import make_encoder_layer
ops.set_num_threads(2)
layers = [make_encoder_layer(seed, 80, 5, 112) for seed in range(2)]
stack = FusedEncoderStack(layers)
for batch, seq in ((1, 64), (3, 80), (4, 16), (2, 128)):
    x = torch.randn(batch, seq, 80, generator=torch.Generator().manual_seed(seq))
    for target in (layers[0], stack):
        outs = []
        for fm in (False, True):
            for layer in layers:
                layer.feature_major = fm
            outs.append(target(x))
        assert layers[0].ran_feature_major, "the fm path did not run"
        assert not outs[1].isnan().any(), f"NaN out of scratch: batch {batch} seq {seq}"
        assert torch.equal(outs[0], outs[1]), (batch, seq)
print("ok")
"""


@pytest.mark.skipif(not FM_KERNELS, reason="feature-major tiles are in the AVX-512 kernels only")
def test_fm_reads_no_scratch_it_did_not_write():
    """With every scratch buffer filled with NaN bytes first, the fm path still gives the token-row output."""
    run_with_poisoned_scratch(_POISONED)
