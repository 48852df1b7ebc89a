"""`FusedEncoderLayer` / `FusedEncoderStack` with the int8 attention (`attention="int8"`).

The same guarantees as with bf16 attention: every split of the work over threads and chunks gives the one-thread
output bit for bit (the int8 attention works sequence by sequence and query by query, with per-token scales), and
that output matches the pure-torch reference of every step with `attention_int8_reference` as the attention.
"""

from __future__ import annotations

import pytest
import torch

from hf_sparse import ops
from hf_sparse.nn import FusedEncoderStack
from tests.nn.encoder_layers import HIDDEN, assert_matches_reference, make_encoder_layer


pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="the fast path runs on the C++ kernels")


def _int8_calls() -> int:
    return sum(n for name, n in ops.kernel_calls("attention").items() if name.endswith("_int8"))


@pytest.fixture(scope="module")
def layer():
    return make_encoder_layer(3)


@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("nthreads", [2, 3])
def test_every_split_equals_one_thread_and_the_reference(layer, threads, batch, nthreads):
    gen = torch.Generator().manual_seed(batch)
    seq = 70  # token blocks with 2 threads, steps split with 3
    x = torch.randn(batch, seq, HIDDEN, generator=gen)
    mask = torch.rand(batch, 1, 1, seq, generator=gen) > 0.2
    ops.set_num_threads(1)
    calls = _int8_calls()
    one = layer(x, mask, "int8")
    assert _int8_calls() > calls, "the int8 attention kernels did not run"
    ops.set_num_threads(nthreads)
    assert torch.equal(layer(x, mask, "int8"), one), f"{layer.parallelism} on {nthreads} threads vs one thread"
    assert_matches_reference(layer, one, x, mask, "int8")
    bf16 = layer(x, mask)
    assert not torch.equal(bf16, one), "the attention precision must change the result"
    assert (bf16 - one).abs().max() <= 0.1 * one.abs().max(), "int8 and bf16 attention far apart"


def test_stack_equals_its_layers_called_one_by_one(threads):
    layers = [make_encoder_layer(seed) for seed in (4, 5)]
    stack = FusedEncoderStack(layers)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 40, HIDDEN, generator=gen)
    mask = torch.rand(3, 1, 1, 40, generator=gen) > 0.2
    expected = layers[1](layers[0](x, mask, "int8"), mask, "int8")
    assert torch.equal(stack(x, mask, "int8"), expected)
    ref = stack.reference(x, mask, "int8")
    assert (ref - expected).abs().max() <= 1e-2 * ref.abs().max()


def test_the_composed_path_takes_the_precision_too(layer):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 9, HIDDEN, generator=gen)
    fused = layer(x, None, "int8")
    composed = layer._composed(x, None, "int8")
    assert_matches_reference(layer, composed, x, None, "int8")
    assert (fused - composed).abs().max() <= 1e-2 * fused.abs().max()


def test_unknown_attention_is_named(layer):
    x = torch.randn(1, 4, HIDDEN)
    with pytest.raises(ValueError, match="FusedEncoderLayer: attention='fp32'; use 'bf16' or 'int8'"):
        layer(x, None, "fp32")
    with pytest.raises(ValueError, match="FusedEncoderStack: attention='int4'"):
        FusedEncoderStack([layer])(x, None, "int4")
