"""The fused FFN: bit-identical to the two Linear calls it replaces, on every instruction set and thread count."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from hf_sparse import ops
from hf_sparse.ops import FusedFFN, Layout, fuse_ffn, pack_linear
from tests.ops.conftest import ISAS, RUN_ISA, assert_close, assert_same, make_weight


needs_extension = pytest.mark.skipif(not ops.extension_available(), reason="needs the C++ extension")


def _ffn(k, hidden, n, sparsity, seed, act1="gelu", act2="none", bias=True, pattern="4-block", layouts=None):
    gen = torch.Generator().manual_seed(seed)
    w1 = make_weight(hidden, k, sparsity, pattern, gen)
    w2 = make_weight(n, hidden, sparsity, pattern, gen)
    b1, b2 = (torch.randn(hidden, generator=gen), torch.randn(n, generator=gen)) if bias else (None, None)
    l1, l2 = layouts or (Layout.INT8_BLOCK4, Layout.INT8_BLOCK4)
    first = pack_linear(w1, bias=b1, layout=l1, activation=act1)
    second = pack_linear(w2, bias=b2, layout=l2, activation=act2)
    return fuse_ffn(first, second), gen


def _cases(count, seed):
    rng = random.Random(seed)
    for i in range(count):
        k = rng.choice([1, 5, 16, 63, 130, 300, 768])
        hidden = rng.choice([1, 4, 7, 33, 130, 257, 600])
        n = rng.choice([1, 3, 16, 17, 50, 129])
        m = rng.choice([1, 2, 3, 15, 16, 17, 40, 64, 65, 100, 129, 200])
        sparsity = rng.choice([0.0, 0.5, 0.9, 0.99, 1.0])
        acts = rng.choice([("gelu", "none"), ("none", "none"), ("gelu", "gelu")])
        yield pytest.param(
            i, m, k, hidden, n, sparsity, acts, id=f"{i}-m{m}-k{k}-h{hidden}-n{n}-s{sparsity}-{acts[0]}"
        )


# int8 CSR (quads) in either layer, cycling: CSR+CSR, CSR+4-block, 4-block+CSR, 4-block+4-block
_LAYOUT_PAIRS = [
    (Layout.INT8_CSR, Layout.INT8_CSR),
    (Layout.INT8_CSR, Layout.INT8_BLOCK4),
    (Layout.INT8_BLOCK4, Layout.INT8_CSR),
    (Layout.INT8_BLOCK4, Layout.INT8_BLOCK4),
]


@needs_extension
@pytest.mark.parametrize("i, m, k, hidden, n, sparsity, acts", list(_cases(40, seed=1)))
def test_fused_equals_the_two_calls(i, m, k, hidden, n, sparsity, acts):
    ffn, gen = _ffn(
        k, hidden, n, sparsity, seed=i, act1=acts[0], act2=acts[1], bias=i % 3 != 0,
        pattern="unstructured" if i % 2 else "4-block", layouts=_LAYOUT_PAIRS[i % 4],
    )  # fmt: skip
    assert ffn.fused
    x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4
    if i % 4 == 0:
        x[0] = 0.0  # an all-zero token
    for isa in ISAS:
        ops.set_isa(isa)
        try:
            for threads in (1, 2):
                ops.set_num_threads(threads)
                calls = ops.kernel_calls()[isa]
                y = ffn(x)
                fused_calls = ops.kernel_calls()[isa] - calls
                expected = ffn.second(ffn.first(x))
                assert_same(y, expected, f"fused FFN on {isa}, {threads} thread(s)")
                assert fused_calls in (1, 2), f"{isa}: {fused_calls} kernel calls"
        finally:
            ops.set_num_threads(None)
            ops.set_isa(RUN_ISA)


@needs_extension
def test_one_kernel_call_for_a_bert_ffn_and_close_to_the_torch_reference():
    ffn, gen = _ffn(768, 3072, 768, 0.9, seed=0)
    x = torch.randn(2, 64, 768, generator=gen)
    calls = sum(ops.kernel_calls().values())
    ops.set_num_threads(1)
    try:
        y = ffn(x)
    finally:
        ops.set_num_threads(None)
    assert sum(ops.kernel_calls().values()) == calls + 1, "the fused kernel did not run as one call"
    assert y.shape == (2, 64, 768)
    assert_same(y, ffn.second(ffn.first(x)), "fused vs two calls")
    # The kernels' GELU differs from torch's by ~1e-7 relative: a hidden code may round the other way.
    ref = ffn.reference(x)
    scale = float(ref.abs().max())
    assert_close(y, ref, "fused vs pure-torch reference", rtol=0, atol=2e-2 * scale)


@needs_extension
def test_nonfinite_and_subnormal_tokens_match_the_two_calls():
    ffn, gen = _ffn(40, 36, 20, 0.5, seed=3, act1="none", bias=False)
    x = torch.randn(24, 40, generator=gen)
    x[3, 5] = float("inf")
    x[7, 0] = float("nan")
    x[9] *= 1e-40  # subnormal token and hidden activations: 1 / amax overflows, codes saturate as in torch
    for isa in ISAS:
        ops.set_isa(isa)
        try:
            y, expected = ffn(x), ffn.second(ffn.first(x))
        finally:
            ops.set_isa(RUN_ISA)
        assert torch.isnan(y[[3, 7]]).all(), f"{isa}: a token with inf/NaN must give NaN"
        assert_same(y, expected, f"non-finite and tiny tokens on {isa}")


@needs_extension
def test_op_path_fake_tensors_and_compile():
    ffn, gen = _ffn(70, 44, 30, 0.7, seed=4)
    x = torch.randn(3, 5, 70, generator=gen)
    assert_same(
        torch.ops.hf_sparse.int8_block4_ffn(x, *ffn._op_args, 70, 44, 30, "gelu", "none"), ffn(x), "op vs fast path"
    )
    torch.library.opcheck(
        torch.ops.hf_sparse.int8_block4_ffn.default,
        (torch.randn(6, 70), *ffn._op_args, 70, 44, 30, "gelu", "none"),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )
    calls = []

    def backend(gm, example_inputs):
        calls.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
        return gm

    compiled = torch.compile(lambda t: ffn(t) + 1, backend=backend, fullgraph=True)
    assert_same(compiled(x), ffn(x) + 1, "compiled")
    assert any("int8_block4_ffn" in t for t in calls[0]), f"the graph holds no fused op: {calls[0]}"


def test_other_layouts_run_as_two_calls():
    gen = torch.Generator().manual_seed(5)
    first = pack_linear(torch.randn(32, 24, generator=gen), layout=Layout.INT8_DENSE, activation="gelu")
    second = pack_linear(torch.randn(8, 32, generator=gen), scheme="fp32")
    ffn = fuse_ffn(first, second)
    assert not ffn.fused
    x = torch.randn(5, 24, generator=gen)
    assert_same(ffn(x), second(first(x)), "unfused FFN")


def test_bad_pairs_are_refused():
    gen = torch.Generator().manual_seed(6)
    a = pack_linear(make_weight(32, 24, 0.5, "4-block", gen))
    with pytest.raises(ValueError, match="out_features=32 but second has in_features=24"):
        fuse_ffn(a, a)
    qkv = ops.pack_linears([make_weight(8, 24, 0.5, "4-block", gen)] * 2)
    with pytest.raises(ValueError, match="pack it alone"):
        FusedFFN(qkv, pack_linear(make_weight(4, 16, 0.5, "4-block", gen)))
    with pytest.raises(TypeError, match="must be a PackedLinear"):
        fuse_ffn(a, torch.nn.Linear(32, 4))


def test_op_without_the_extension_runs_the_references():
    code = (
        "import torch\n"
        "from hf_sparse import ops\n"
        "from hf_sparse.ops.library import _BLOCK4_NAMES\n"
        "g = torch.Generator().manual_seed(0)\n"
        "a = ops.pack_linear(torch.randn(24, 20, generator=g), layout='int8_block4', activation='gelu')\n"
        "b = ops.pack_linear(torch.randn(8, 24, generator=g), layout='int8_block4')\n"
        "x = torch.randn(5, 20, generator=g)\n"
        "args = [p.tensors.get(n) for p in (a, b) for n in _BLOCK4_NAMES]\n"
        "y = torch.ops.hf_sparse.int8_block4_ffn(x, *args, 20, 24, 8, 'gelu', 'none')\n"
        "ffn = ops.fuse_ffn(a, b)\n"
        "print(ffn.fused, torch.equal(y, b.reference(a.reference(x))), torch.equal(ffn(x), y))\n"
    )
    env = {**os.environ, "HF_SPARSE_DISABLE_EXTENSION": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "True"], proc.stdout
