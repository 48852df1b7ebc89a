"""`FusedEncoderStack`: several layers in one kernel call give exactly the layers called one by one.

Chunks of sequences move from layer to layer without waiting for each other (and a thread may take another's
chunk), so the results are compared with `==` against the per-layer calls on one thread, for every split.
"""

from __future__ import annotations

import pytest
import torch

from hf_sparse import ops
from hf_sparse.nn import FusedEncoderLayer, FusedEncoderStack
from hf_sparse.nn.encoder_layer import CHUNK_TOKENS
from tests.nn.encoder_layers import HEADS, HIDDEN, CountedPlan, make_encoder_layer


pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="the one-call path runs on the C++ kernels")


@pytest.fixture(scope="module")
def layers() -> list[FusedEncoderLayer]:
    return [make_encoder_layer(seed) for seed in (1, 2, 3)]


def _counted(stack: FusedEncoderStack) -> CountedPlan:
    stack._plan = CountedPlan(stack._plan)
    return stack._plan


def _one_by_one(layers, x, mask):
    for layer in layers:
        x = layer(x, mask)
    return x


def _mask(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    mask = torch.rand(batch, 1, 1, seq, generator=gen) > 0.2
    mask[..., 0] = True
    return mask


def _case(layers, threads, seed: int, batch: int, seq: int):
    """Inputs, the layers' one-thread output one by one, and a stack counting its one-call runs."""
    gen = torch.Generator().manual_seed(seed)
    x, mask = torch.randn(batch, seq, HIDDEN, generator=gen), _mask(batch, seq, gen)
    threads(1)
    expected = _one_by_one(layers, x, mask)
    stack = FusedEncoderStack(layers)
    return x, mask, expected, stack, _counted(stack)


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("nthreads", [2, 3])
def test_equals_the_layers_one_by_one(layers, threads, batch, nthreads):
    x, mask, expected, stack, plan = _case(layers, threads, batch, batch, 70)
    threads(nthreads)
    for chunk_tokens in (40, 80, 256):
        for layer in layers:
            layer.chunk_tokens = chunk_tokens
        try:
            got = stack(x, mask)
        finally:
            for layer in layers:
                layer.chunk_tokens = CHUNK_TOKENS
        assert torch.equal(got, expected), f"batch {batch}, {nthreads} threads, chunks of {chunk_tokens} tokens"
        assert layers[0].parallelism  # the call says how it split the work
    assert plan.calls == 3, "the stack ran in one call each time"
    x_before = x.clone()
    stack(x, mask)
    assert torch.equal(x, x_before), "the input must not be written"


@pytest.mark.parametrize("batch", [1, 3])
def test_token_blocks_through_every_layer(layers, threads, batch):
    """Several token blocks per thread (blocks capped at chunk_tokens), and a sequence left over after the whole
    ones: blocks move to the next layer on their own, the Q/K/V alternate between two buffer sets."""
    x, mask, expected, stack, plan = _case(layers, threads, 10 + batch, batch, 100)
    threads(2)
    for chunk_tokens in (16, 24, 256):  # 4, 3 and 1 blocks per thread
        layers[0].chunk_tokens = chunk_tokens
        try:
            for _ in range(3):
                assert torch.equal(stack(x, mask), expected), f"batch {batch}, chunks of {chunk_tokens} tokens"
        finally:
            layers[0].chunk_tokens = CHUNK_TOKENS
        assert "tokens" in layers[0].parallelism
    assert plan.calls == 9


def test_steps_split_and_one_layer(layers, threads):
    x = torch.randn(4, 7, HIDDEN)  # short sequences: every step split over the threads
    threads(2)
    stack = FusedEncoderStack(layers)
    plan = _counted(stack)
    assert torch.equal(stack(x), _one_by_one(layers, x, None))
    assert layers[0].parallelism == {"steps"} and plan.calls == 1
    assert torch.equal(FusedEncoderStack(layers[:1])(x), layers[0](x))


def test_inputs_the_kernels_do_not_take_run_the_layers_one_by_one(layers, threads):
    threads(2)
    x = torch.randn(2, 40, HIDDEN)
    stack = FusedEncoderStack(layers)
    plan = _counted(stack)
    strided = torch.randn(2, 40, 2 * HIDDEN)[..., ::2]  # not contiguous
    assert torch.equal(stack(strided), _one_by_one(layers, strided.contiguous(), None))
    assert torch.allclose(stack(x.double()).double(), _one_by_one(layers, x.double(), None).double())
    assert plan.calls == 0


def test_layernorm_parameters_are_read_at_every_call(threads):
    """The stack and a layer alone (`norm_args`) read the LayerNorms as they are at each call: an in-place update,
    a new eps and a replaced parameter change the output on the kernels; a float64, strided or missing one sends
    both to the layers' composed path."""
    threads(2)
    layers = [make_encoder_layer(seed) for seed in (4, 5)]
    x = torch.randn(2, 40, HIDDEN, generator=torch.Generator().manual_seed(8))
    stack = FusedEncoderStack(layers)
    plan = _counted(stack)
    layer_plan = layers[1]._plan = CountedPlan(layers[1]._plan)
    norm = layers[1].norm1
    before = stack(x)
    changes = [
        lambda: norm.weight.data.mul_(1.5),  # in place: the same address, new values
        lambda: setattr(norm, "eps", 1e-3),
        lambda: setattr(norm, "bias", torch.nn.Parameter(torch.randn(HIDDEN))),  # replaced
    ]
    for i, change in enumerate(changes, start=2):
        change()
        after = stack(x)
        assert not torch.equal(after, before) and torch.equal(after, _one_by_one(layers, x, None))
        assert plan.calls == i and layer_plan.calls == i - 1
        before = after
    for bad in (norm.bias.detach().double(), torch.randn(2 * HIDDEN)[::2], None):
        norm._parameters["bias"] = bad
        assert torch.equal(stack(x), _one_by_one(layers, x, None))
        assert plan.calls == 4 and layer_plan.calls == 3


def test_close_to_the_reference(layers, threads):
    threads(2)
    x = torch.randn(3, 33, HIDDEN, generator=torch.Generator().manual_seed(7))
    got, ref = FusedEncoderStack(layers)(x), FusedEncoderStack(layers).reference(x)
    # as for one layer (test_encoder_layer.py): an int8 code on a rounding boundary may flip, now three times over
    err, scale = (got - ref).abs(), ref.abs().max().item()
    assert (err <= 1e-5 * scale).float().mean().item() >= 0.97
    assert err.max().item() <= 3e-2 * scale


def test_profile_sums_the_steps_of_every_layer(layers, threads):
    threads(2)
    x = torch.randn(4, 80, HIDDEN)
    FusedEncoderLayer.step_times = times = {}
    try:
        FusedEncoderStack(layers)(x)
    finally:
        FusedEncoderLayer.step_times = None
    assert set(times) == {"qkv", "wait", "attention", "out", "norm1", "ffn", "norm2"}
    # whole sequences per thread: no thread waits for another's K/V
    assert times.pop("wait") == 0 and all(v > 0 for v in times.values())


def test_bad_layers_and_masks_are_refused(layers):
    with pytest.raises(ValueError, match="expected FusedEncoderLayers"):
        FusedEncoderStack([])
    with pytest.raises(ValueError, match="expected FusedEncoderLayers"):
        FusedEncoderStack([layers[0], "layer"])
    with pytest.raises(ValueError, match="FusedEncoderStack"):
        FusedEncoderStack(layers)(torch.randn(2, 8, HIDDEN), torch.ones(3, HEADS, 8, 8, dtype=torch.bool))
    wider = make_encoder_layer(4, hidden=2 * HIDDEN)
    with pytest.raises(ValueError, match="different shapes"):
        FusedEncoderStack([layers[0], wider])
    with pytest.raises(ValueError, match="layer 1 is 96 wide, layer 0 48"):  # the C++ plan checks it too
        ops._extension._C.EncoderStack([layers[0]._plan, wider._plan])
