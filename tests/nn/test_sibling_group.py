"""SiblingGroup: one kernel call for Q/K/V, a per-thread cache keyed by input identity and version."""

from __future__ import annotations

import threading

import pytest
import torch

from hf_sparse import ops
from hf_sparse.nn import SparseLinear, pack_siblings
from hf_sparse.quantization import int8_linear_reference
from tests.nn.test_sparse_linear import loaded, sparse_weight


def trio(bias: bool = True):
    """Three int8 SparseLinears of different widths reading the same input, and their expected results."""
    members, expect = [], []
    for i, out in enumerate((36, 20, 36)):
        b = torch.randn(out) if bias else None
        m = loaded(sparse_weight(out, 36, seed=i), b)
        codes, scale = m.weight.detach().clone(), m.weight_scale.detach().reshape(-1).clone()
        members.append(m)
        expect.append(lambda x, c=codes, s=scale, b=b: int8_linear_reference(x, c, s, b))
    pack_siblings(members, ["q", "k", "v"])
    return members, expect


def calls() -> int:
    return sum(ops.kernel_calls().values())


def test_siblings_compute_once_and_match_separate_linears():
    (q, k, v), expect = trio()
    assert q.group is k.group is v.group and [m.index for m in (q, k, v)] == [0, 1, 2]
    x = torch.randn(2, 5, 36)
    before = calls()
    with torch.no_grad():
        outs = [q(x), k(x), v(x)]
    for out, f in zip(outs, expect):
        assert torch.equal(out, f(x))
    if ops.extension_available():
        assert calls() - before == 1  # one kernel call for the three
    assert q.group._local.x is None  # all served: the cache lets go of the tensors


def test_a_different_input_is_recomputed():
    (q, k, v), expect = trio()
    x, other = torch.randn(4, 36), torch.randn(4, 36)
    q(x)
    assert torch.equal(k(other), expect[1](other))
    assert torch.equal(v(other), expect[2](other))
    assert torch.equal(q(other), expect[0](other))


def test_an_input_modified_in_place_is_recomputed():
    (q, k, _), expect = trio()
    x = torch.randn(4, 36)
    q(x)
    x.mul_(2)
    assert torch.equal(k(x), expect[1](x))


def test_the_same_sibling_twice_is_recomputed():
    (q, k, _), expect = trio()
    x = torch.randn(4, 36)
    first = q(x)
    first.zero_()  # the caller owns its output
    assert torch.equal(q(x), expect[0](x))
    assert torch.equal(k(x), expect[1](x))


def test_inference_tensors_use_the_cache():
    (q, k, v), expect = trio(bias=False)
    with torch.inference_mode():
        x = torch.randn(3, 36)
        before = calls()
        outs = [q(x), k(x), v(x)]
        if ops.extension_available():
            assert calls() - before == 1
    for out, f in zip(outs, expect):
        assert torch.equal(out, f(x))


def test_each_thread_has_its_own_cache():
    (q, k, v), expect = trio()
    x = torch.randn(6, 36)  # the very same tensor in both threads
    a_filled, b_done = threading.Event(), threading.Event()
    seen, errors = {}, []

    def thread_a():
        try:
            seen["a_q"] = q(x)
            a_filled.set()
            b_done.wait()
            before = calls()
            seen["a_k"] = k(x)  # from A's own cache, untouched by B
            seen["a_calls"] = calls() - before
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def thread_b():
        try:
            a_filled.wait()
            before = calls()
            seen["b_k"] = k(x)  # B has no cache: it computes
            seen["b_calls"] = calls() - before
            b_done.set()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
            b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert torch.equal(seen["a_q"], expect[0](x))
    assert torch.equal(seen["a_k"], expect[1](x)) and torch.equal(seen["b_k"], expect[1](x))
    if ops.extension_available():
        assert (seen["b_calls"], seen["a_calls"]) == (1, 0)


def test_siblings_must_share_scheme_and_inputs():
    a = loaded(sparse_weight(8, 16), None)
    b = loaded(sparse_weight(8, 12), None)
    with pytest.raises(ValueError, match="must share scheme and in_features"):
        pack_siblings([a, b], ["a", "b"])
    c = loaded(sparse_weight(8, 16, density=0.1), None, "float32")
    with pytest.raises(ValueError, match="must share scheme"):
        pack_siblings([a, c], ["a", "c"])
    assert isinstance(a, SparseLinear) and not a.is_packed
