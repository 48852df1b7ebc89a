"""`FusedEncoderLayer` built from packed weights: its threads and chunks never change a result.

Every step works token by token (per-token activation scales, LayerNorm rows) or sequence by sequence (attention),
so whether the threads take whole sequences (`sequence_threads > 1`) or split each step, and however the batch is
cut into chunks, the output must be bit for bit the one-thread output. That output itself is checked against the
pure-torch reference of each step.
"""

from __future__ import annotations

import pytest
import torch

from hf_sparse import ops
from hf_sparse.nn import FusedEncoderLayer
from hf_sparse.nn.encoder_layer import CHUNK_TOKENS
from tests.nn.encoder_layers import HEADS, HIDDEN, assert_matches_reference, make_encoder_layer


pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="the fast path runs on the C++ kernels")


@pytest.fixture(scope="module")
def layer() -> FusedEncoderLayer:
    return make_encoder_layer(0)


def _run(layer, x, mask, nthreads, split=True, chunk_tokens=CHUNK_TOKENS):
    # First a different input of the same shape on one thread: it leaves other values in the calling thread's
    # scratch, so a split that skipped work could not pass on the intermediates of an earlier call.
    ops.set_num_threads(1)
    layer(torch.randn_like(x), mask)
    ops.set_num_threads(nthreads)
    layer.split_sequences, layer.chunk_tokens = split, chunk_tokens
    try:
        return layer(x, mask), layer.parallelism
    finally:
        layer.split_sequences, layer.chunk_tokens = True, CHUNK_TOKENS


def _expected_split(batch: int, seq: int, nthreads: int) -> set[str]:
    """Whole sequences for the largest multiple of the threads (when each thread gets >= 32 tokens), then one
    sequence at a time in token blocks (>= 32 tokens per thread), else every step split."""
    whole = batch // nthreads * nthreads if batch >= nthreads and batch // nthreads * seq >= 32 else 0
    rest = batch - whole
    return ({"sequences"} if whole else set()) | (
        set() if rest == 0 else {"tokens"} if seq // nthreads >= 32 else {"steps"}
    )


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("nthreads", [2, 3])
@pytest.mark.parametrize("mask_kind", ["keys", "queries"])
def test_every_split_equals_one_thread(layer, threads, batch, nthreads, mask_kind):
    gen = torch.Generator().manual_seed(batch)
    seq = 70  # >= 32 tokens per thread with 2 threads, not with 3
    x = torch.randn(batch, seq, HIDDEN, generator=gen)
    if mask_kind == "keys":
        mask = torch.rand(batch, 1, 1, seq, generator=gen) > 0.2
    else:  # a row per query and head: token blocks must read their own queries' rows
        mask = torch.rand(batch, HEADS, seq, seq, generator=gen) > 0.3
    mask[..., 0] = True
    one, used = _run(layer, x, mask, 1)
    assert used == {"steps"}
    expect = _expected_split(batch, seq, nthreads)
    for chunk_tokens in (40, 80, 256):  # one, two and up to six sequences per chunk; token blocks within it
        got, used = _run(layer, x, mask, nthreads, chunk_tokens=chunk_tokens)
        assert used == expect, (batch, nthreads, used)
        assert torch.equal(got, one), f"batch {batch}, {nthreads} threads, chunks of {chunk_tokens} tokens"
        steps, used = _run(layer, x, mask, nthreads, split=False, chunk_tokens=chunk_tokens)
        assert used == {"steps"} and torch.equal(steps, one)


@pytest.mark.parametrize(("seq", "nthreads"), [(97, 3), (64, 2), (200, 2)])
def test_token_blocks_of_one_sequence(layer, threads, seq, nthreads):
    x = torch.randn(1, seq, HIDDEN, generator=torch.Generator().manual_seed(seq))
    mask = torch.rand(1, 1, seq, seq, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    one, _ = _run(layer, x, mask, 1)
    for chunk_tokens in (256, 40):  # one block per thread; several (blocks capped at 40 tokens)
        got, used = _run(layer, x, mask, nthreads, chunk_tokens=chunk_tokens)
        assert used == {"tokens"} and torch.equal(got, one), (seq, nthreads, chunk_tokens)
    assert_matches_reference(layer, got, x, mask)


def test_short_sequences_split_the_steps_instead(layer, threads):
    x = torch.randn(4, 7, HIDDEN)  # 14 tokens per thread: below the threshold for threads of their own
    one, _ = _run(layer, x, None, 1)
    got, used = _run(layer, x, None, 2)
    assert used == {"steps"} and torch.equal(got, one)


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_reference_of_every_step(layer, threads, seed):
    x = torch.randn(4, 33, HIDDEN, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(4, 1, 33, 33)
    mask[1, ..., 20:] = float("-inf")  # padding in one sequence (float mask added to the scores)
    got, used = _run(layer, x, mask, 2)
    assert used == {"sequences"}
    assert_matches_reference(layer, got, x, mask)


@pytest.mark.parametrize("batch", [1, 4])
def test_profile_counts_every_step_once_per_call(layer, threads, batch):
    x = torch.randn(batch, 80, HIDDEN)
    FusedEncoderLayer.step_times = times = {}
    try:
        _run(layer, x, None, 2)
        first = dict(times)
        _run(layer, x, None, 2, split=False)
    finally:
        FusedEncoderLayer.step_times = None
    assert set(first) == {"qkv", "wait", "attention", "out", "norm1", "ffn", "norm2"}
    # only token blocks (batch 1) wait for each other's K/V; split steps wait inside the steps
    wait = first.pop("wait")
    assert (wait > 0) == (batch == 1) and times["wait"] == wait
    assert all(v > 0 for v in first.values()) and all(times[k] > first[k] for k in first)
