"""Generated 4-block code (csrc/jit_block4.cpp, AVX-512 VNNI): exact int32 sums against an int64 product and the
same outputs as the loops it replaces, over group, tile, thread-split and displacement edges."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hf_sparse import ops
from hf_sparse.ops import Layout
from hf_sparse.quantization.numerics import quantize_activation_int8
from tests.ops.conftest import RUN_ISA, assert_same, make_weight


HAS_JIT = "avx512_vnni" in ops.available_isas()
pytestmark = pytest.mark.skipif(not HAS_JIT, reason="generated code needs AVX512-VNNI")

GROUP = 28  # kJitRows in csrc/common.h

# n around the group size (short last groups, ranges split inside groups), k from one 4-block to past 1024
# columns (displacements beyond disp8, > 128 blocks per row and group), sparsity from dense to empty.
CASES = [
    (64, 1, 4, 0.0),
    (64, 27, 5, 0.5),
    (65, 28, 127, 0.9),
    (128, 29, 128, 0.0),
    (100, 56, 129, 0.5),
    (200, 57, 512, 0.9),
    (128, 100, 1030, 0.0),
    (300, 113, 768, 0.9),
    (64, 300, 3072, 0.9),
    (128, 30, 4100, 0.5),
    (64, 45, 600, 0.99),
    (64, 33, 300, 1.0),
]


def _jit_calls() -> int:
    return ops.kernel_calls("jit").get("avx512_vnni", 0)


@pytest.mark.parametrize("m, n, k, sparsity", CASES, ids=[f"m{m}-n{n}-k{k}-s{s}" for m, n, k, s in CASES])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_generated_code_is_exact(m, n, k, sparsity, threads):
    gen = torch.Generator().manual_seed(n * 7919 + k)
    w = make_weight(n, k, sparsity, "4-block", gen)
    x = torch.randn(m, k, generator=gen) * 3
    bias = torch.randn(n, generator=gen)
    packed = ops.pack_linear(w, bias=bias, layout=Layout.INT8_BLOCK4)
    assert packed.jit_bytes > 0
    codes = ops.get_handler(Layout.INT8_BLOCK4).dense_codes(packed.tensors, n, k)
    q_x, _ = quantize_activation_int8(x)
    expected_acc = (q_x.to(torch.int64) @ codes.to(torch.int64).t()).to(torch.int32)
    before = ops.get_num_threads()
    ops.set_num_threads(threads)
    try:
        ops.set_isa("avx512_vnni")
        calls = _jit_calls()
        acc, y = packed.accumulators(x), packed(x)
        assert _jit_calls() > calls, "the generated code did not run"
        ops.set_jit(False)
        calls = _jit_calls()
        y_loops = packed(x)
        assert _jit_calls() == calls, "set_jit(False) still ran the generated code"
    finally:
        ops.set_jit(True)
        ops.set_isa(RUN_ISA)
        ops.set_num_threads(before)
    assert_same(acc, expected_acc, f"int32 sums of generated code, {n}x{k}")
    assert_same(y, y_loops, f"output of generated code vs the loops, {n}x{k}")
    assert_same(y, packed.reference(x), f"output of generated code vs the reference, {n}x{k}")


def test_fused_ffn_through_generated_code_matches_the_loops():
    gen = torch.Generator().manual_seed(3)
    w1 = make_weight(3 * GROUP + 5, 96, 0.8, "4-block", gen)
    w2 = make_weight(40, 3 * GROUP + 5, 0.8, "4-block", gen)
    first = ops.pack_linear(w1, bias=torch.randn(w1.shape[0], generator=gen), activation="gelu")
    second = ops.pack_linear(w2, bias=torch.randn(40, generator=gen))
    ffn = ops.fuse_ffn(first, second)
    assert ffn.fused
    x = torch.randn(192, 96, generator=gen)
    ops.set_isa("avx512_vnni")  # (the run's own may be a lower one: HF_SPARSE_ISA)
    try:
        calls = _jit_calls()
        y = ffn(x)
        assert _jit_calls() > calls
        ops.set_jit(False)
        y_loops = ffn(x)
    finally:
        ops.set_jit(True)
        ops.set_isa(RUN_ISA)
    assert_same(y, y_loops, "fused FFN, generated code vs loops")
    assert_same(y, second(first(x)), "fused FFN vs its two calls")


def test_only_4block_weights_get_code_and_lower_isas_do_not_run_it():
    gen = torch.Generator().manual_seed(5)
    w = make_weight(64, 256, 0.9, "unstructured", gen)
    assert ops.pack_linear(w, layout=Layout.INT8_CSR).jit_bytes == 0
    assert ops.pack_linear(w, layout=Layout.INT8_DENSE).jit_bytes == 0
    assert ops.pack_linear(w, scheme="fp32", layout=Layout.FP32_CSR).jit_bytes == 0
    block = ops.pack_linear(make_weight(64, 256, 0.9, "4-block", gen), layout=Layout.INT8_BLOCK4)
    x = torch.randn(128, 256, generator=gen)
    lower = [isa for isa in ops.available_isas() if isa != "avx512_vnni"]
    for isa in lower:
        ops.set_isa(isa)
        try:
            calls = _jit_calls()
            block(x)
            assert _jit_calls() == calls, f"generated code ran under {isa}"
        finally:
            ops.set_isa(RUN_ISA)


def test_env_switch_packs_without_code():
    code = (
        "import torch; from hf_sparse import ops; from tests.ops.conftest import make_weight\n"
        "w = make_weight(64, 256, 0.9, '4-block', torch.Generator().manual_seed(0))\n"
        "p = ops.pack_linear(w, layout=ops.Layout.INT8_BLOCK4)\n"
        "x = torch.randn(128, 256)\n"
        "assert p.jit_bytes == 0, p.jit_bytes\n"
        "c = ops.kernel_calls('jit')['avx512_vnni']; y = p(x)\n"
        "assert ops.kernel_calls('jit')['avx512_vnni'] == c\n"
        "assert torch.equal(y, p.reference(x))\n"
    )
    env = dict(os.environ, HF_SPARSE_JIT="0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root, timeout=300)


def test_env_switch_rejects_other_values():
    env = dict(os.environ, HF_SPARSE_JIT="false")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-c", "import hf_sparse.ops"], env=env, cwd=root, timeout=300, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "HF_SPARSE_JIT='false': use 0" in proc.stderr


def test_set_jit_rejects_non_bools():
    with pytest.raises(ValueError, match="enabled must be a bool"):
        ops.set_jit(1)
