"""Q/K/V written straight into the attention's packed layout (`FusedEncoderLayer.pack_qkv`, csrc: QkvPackedOut), for
the bf16 and the int8 attention.

Both ways round Q, K and V the same way (bf16: to bfloat16; int8: per token and head codes and scales) and sum in
the same order, so the packed path must give the unpacked path's output bit for bit, whatever the sequence length
(odd, token tiles that span sequences, int8's 4-key V words split between tiles and threads), threads, split and
chunking, also when the kernels' scratch starts out as NaN (HF_SPARSE_POISON_SCRATCH=1: nothing may read padding it
did not write); and it must be taken exactly where it can be (AVX512-BF16 / AVX512-VNNI attention, sparse int8
Q/K/V, head_dim a multiple of 16, sequences of PACKED_QKV_MIN_SEQ tokens or more).
"""

from __future__ import annotations

import pytest
import torch

from hf_sparse import ops
from hf_sparse.nn import FusedEncoderStack
from hf_sparse.nn.encoder_layer import CHUNK_TOKENS
from hf_sparse.ops import _extension as ext
from tests.nn.encoder_layers import (
    assert_matches_reference,
    make_encoder_layer,
    run_with_poisoned_scratch,
)


pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="the fast path runs on the C++ kernels")

BF16_ATTENTION = ops.extension_available() and ops.attention_isa() == "avx512_bf16"
INT8_ATTENTION = ops.extension_available() and ops.attention_isa("int8") == "avx512_vnni_int8"
MIN_SEQ = ext._C.PACKED_QKV_MIN_SEQ if ops.extension_available() else 32


def packs(attention: str, seq: int) -> bool:
    """Whether the packed path runs for sequences of `seq` tokens (head_dim a multiple of 16)."""
    return (BF16_ATTENTION if attention == "bf16" else INT8_ATTENTION) and seq >= MIN_SEQ


@pytest.fixture(params=["bf16", "int8"])
def attention(request):
    return request.param


SHAPES = {"d16": (64, 4, 96), "d32": (64, 2, 96), "d64": (128, 2, 160)}  # hidden, heads, ffn


@pytest.fixture(scope="module", params=sorted(SHAPES))
def shape(request):
    return SHAPES[request.param]


def _mask(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """Key padding of a different length per sequence (additive float mask), as a tokenizer's batch gives."""
    keep = torch.ones(batch, seq, dtype=torch.bool)
    for b in range(batch):
        keep[b, max(1, seq - 3 * b - int(torch.randint(0, 3, (1,), generator=gen))) :] = False
    return torch.zeros(batch, 1, 1, seq).masked_fill(~keep[:, None, None, :], float("-inf"))


def _both(layer, x, mask, nthreads, attention, **settings):
    """(unpacked output, packed output), each after a different input of the same shape (so that neither can pass
    on the other's intermediates); checks that the packed call packed where it can."""
    ops.set_num_threads(nthreads)
    for name, value in settings.items():
        setattr(layer, name, value)
    outs = []
    try:
        for pack in (False, True):
            layer.pack_qkv = pack
            layer(torch.randn_like(x), mask, attention)
            outs.append(layer(x, mask, attention))
            assert layer.qkv_packed is (pack and packs(attention, x.shape[1]))
    finally:
        layer.pack_qkv, layer.split_sequences, layer.chunk_tokens = True, True, CHUNK_TOKENS
    return outs


@pytest.mark.parametrize("qkv_layout", ["int8_block4", "int8_csr"])
@pytest.mark.parametrize("seq", [7, 32, 33, 47, 48, 70, 128, 130])
def test_packed_equals_unpacked(shape, threads, attention, qkv_layout, seq):
    hidden, heads, ffn = shape
    layer = make_encoder_layer(seq, hidden, heads, ffn, qkv_layout=qkv_layout)
    gen = torch.Generator().manual_seed(seq)
    for batch in (1, 3):
        x = torch.randn(batch, seq, hidden, generator=gen)
        for mask in (None, _mask(batch, seq, gen)):
            # whole sequences per thread, token blocks of one sequence, every step split (rows split over threads)
            for nthreads, split, chunk in ((1, True, 256), (2, True, 256), (2, True, 40), (2, False, 256)):
                plain, packed = _both(layer, x, mask, nthreads, attention, split_sequences=split, chunk_tokens=chunk)
                assert torch.equal(plain, packed), (batch, seq, nthreads, split, chunk, mask is not None)


@pytest.mark.parametrize("seed", range(3))
def test_packed_matches_the_reference(shape, threads, attention, seed):
    hidden, heads, ffn = shape
    layer = make_encoder_layer(seed, hidden, heads, ffn)
    gen = torch.Generator().manual_seed(seed)
    seq = 45
    x = torch.randn(4, seq, hidden, generator=gen)
    mask = _mask(4, seq, gen)
    ops.set_num_threads(2)
    got = layer(x, mask, attention)
    assert layer.qkv_packed is packs(attention, seq)
    assert_matches_reference(layer, got, x, mask, attention)


def test_stack_packed_equals_unpacked(threads, attention):
    hidden, heads, ffn = SHAPES["d32"]
    layers = [make_encoder_layer(seed, hidden, heads, ffn) for seed in range(3)]
    stack = FusedEncoderStack(layers)
    gen = torch.Generator().manual_seed(0)
    ops.set_num_threads(2)
    # sequences per thread, token blocks, steps split
    shapes = ((4, 70), (1, 100), (3, 33), (1, 96), (2, 64))
    for batch, seq in shapes:
        x = torch.randn(batch, seq, hidden, generator=gen)
        mask = _mask(batch, seq, gen)
        outs = []
        for pack in (False, True):
            layers[0].pack_qkv = pack  # the stack takes its first layer's setting
            outs.append(stack(x, mask, attention))
            assert all(layer.qkv_packed is (pack and packs(attention, seq)) for layer in layers)
        layers[0].pack_qkv = True
        assert torch.equal(outs[0], outs[1]), (batch, seq)
        # the stack is its layers one by one, each within its reference's tolerance on its own input (against the
        # stack's reference an int8 code flipped in one layer reaches every token of the next through attention)
        h = x
        for layer in layers:
            out = layer(h, mask, attention)
            assert_matches_reference(layer, out, h, mask, attention)
            h = out
        assert torch.equal(outs[1], h), (batch, seq)


def test_a_nan_token_spoils_only_its_sequence(threads, attention):
    """A token holding NaN (its Q/K/V scales NaN in the int8 layout) makes its own sequence NaN, packed or not,
    and leaves the others' outputs as they are."""
    layer = make_encoder_layer(1, 64, 2, 96)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 48, 64, generator=gen)
    x[1, 5, 7] = float("nan")
    ops.set_num_threads(2)
    plain, packed = _both(layer, x, None, 2, attention)
    assert packed[1].isnan().all() and not packed[[0, 2]].isnan().any()
    assert torch.equal(plain[[0, 2]], packed[[0, 2]])
    assert torch.equal(layer(x[[0, 2]], None, attention), packed[[0, 2]])


def test_only_where_it_can(threads, attention):
    x = torch.randn(2, 48, 64)
    ops.set_num_threads(1)
    odd = make_encoder_layer(0, 48, 4, 96)  # head_dim 12: the packed layout needs a multiple of 16
    odd(torch.randn(2, 48, 48), None, attention)
    assert not odd.qkv_packed
    dense = make_encoder_layer(0, 64, 2, 96, qkv_layout="int8_dense")  # only the sparse kernels write it
    dense(x, None, attention)
    assert not dense.qkv_packed
    layer = make_encoder_layer(0, 64, 2, 96)
    expected = layer(x, None, attention)
    assert layer.qkv_packed is packs(attention, 48)
    short = torch.randn(3, MIN_SEQ - 1, 64)  # below the length where packing pays
    layer(short, None, attention)
    assert not layer.qkv_packed
    layer.pack_qkv = False
    assert torch.equal(layer(x, None, attention), expected) and not layer.qkv_packed


@pytest.mark.skipif(not BF16_ATTENTION, reason="the packed path needs the AVX-512 attention kernels")
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_lower_instruction_sets_do_not_pack(threads, attention, isa):
    layer = make_encoder_layer(0, 64, 2, 96)
    x = torch.randn(2, 48, 64)
    ops.set_num_threads(1)
    previous = ops.isa()
    ops.set_isa(isa)
    try:
        got = layer(x, None, attention)
    finally:
        ops.set_isa(previous)
    assert not layer.qkv_packed
    assert_matches_reference(layer, got, x, None, attention)


_POISONED = """
import sys
import torch
from hf_sparse import ops
from tests.nn.encoder_layers import make_encoder_layer
attention = sys.argv[1]
ops.set_num_threads(2)
for seq in (33, 35, 47, 48, 63, 65, 97):
    for qkv_layout in ("int8_block4", "int8_csr"):
        layer = make_encoder_layer(seq, 64, 2, 96, qkv_layout=qkv_layout)
        for batch in (1, 3):
            x = torch.randn(batch, seq, 64, generator=torch.Generator().manual_seed(seq))
            for split in (True, False):
                layer.split_sequences = split
                layer.pack_qkv = False
                plain = layer(x, None, attention)
                layer.pack_qkv = True
                packed = layer(x, None, attention)
                assert layer.qkv_packed, "the packed path did not run"
                assert not packed.isnan().any(), f"NaN out of scratch: seq {seq} batch {batch} split {split}"
                assert torch.equal(plain, packed), (seq, batch, split, qkv_layout)
print("ok")
"""


def test_packed_reads_no_scratch_it_did_not_write(attention):
    """With every scratch buffer filled with NaN bytes first, odd sequences (whose bf16 V pads the last pair with a
    0 token) and every split still give the unpacked output: the attention reads no padding the writer left as is,
    and the int8 writer's staging of a head holds only what its groups wrote."""
    if not packs(attention, 32):
        pytest.skip(f"no packed path for the {attention} attention here")
    run_with_poisoned_scratch(_POISONED, attention)
