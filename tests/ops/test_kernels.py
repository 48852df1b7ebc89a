"""Every kernel under every instruction set this machine runs, against the pure-torch references.

int8: outputs must be bit-identical to numerics.int8_linear_reference (no fused activation) and the int32 sums
exact; fp32 and the fused GELU within tight tolerances. Shapes are odd on purpose (tails of every vector, tile,
panel and pass), sparsity runs 0 .. 100%, patterns unstructured / 4-block / dense: 300 random cases for int8, 150
for fp32, 100 each for the fused GELU and tanh (~18 s on a busy 2-core machine, every instruction set).
"""

from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_sparse import ops
from hf_sparse.ops import Layout, _extension
from hf_sparse.quantization.numerics import int8_linear_reference, quantize_activation_int8
from tests.ops.conftest import ISAS, PATTERNS, assert_close, assert_same, make_weight, using_isa


def _cases(count: int, seed: int):
    rng = random.Random(seed)
    rows = [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 100, 127, 129, 200]
    ks = [1, 2, 3, 4, 5, 7, 8, 13, 16, 31, 63, 64, 65, 127, 130, 255, 257, 300, 513, 600, 1030]
    for i in range(count):
        m, k = rng.choice(rows), rng.choice(ks)
        n = rng.choice([1, 2, 15, 16, 17, 33, 48, rng.randint(1, 150)])
        sparsity = rng.choice([0.0, 0.1, 0.3, 0.5, 0.6, 0.8, 0.9, 0.95, 0.97, 0.99, 1.0])
        yield pytest.param(
            i, m, n, k, sparsity, PATTERNS[i % 3], id=f"{i}-m{m}-n{n}-k{k}-s{sparsity}-{PATTERNS[i % 3]}"
        )


CASES = list(_cases(300, seed=0))


def _inputs(i, m, n, k, sparsity, pattern):
    gen = torch.Generator().manual_seed(1000 + i)
    w = make_weight(n, k, sparsity, pattern, gen)
    x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4
    if i % 5 == 0:
        x[0] = 0.0  # an all-zero token: scale 0
    bias = torch.randn(n, generator=gen) if i % 4 else None
    return w, x, bias


@pytest.mark.parametrize("i, m, n, k, sparsity, pattern", CASES)
def test_int8_kernels_are_exact(i, m, n, k, sparsity, pattern):
    w, x, bias = _inputs(i, m, n, k, sparsity, pattern)
    for layout in (Layout.INT8_BLOCK4, Layout.INT8_CSR, Layout.INT8_DENSE):
        packed = ops.pack_linear(w, bias=bias, layout=layout)
        codes = ops.get_handler(layout).dense_codes(packed.tensors, n, k)
        expected = int8_linear_reference(x, codes, packed.tensors["weight_scale"], bias)
        q_x, _ = quantize_activation_int8(x)
        expected_acc = (q_x.to(torch.int64) @ codes.to(torch.int64).t()).to(torch.int32)
        for isa in ISAS:
            with using_isa(isa):
                calls = ops.kernel_calls().get(isa, 0)
                y, acc = packed(x), packed.accumulators(x)
                if isa != "reference":
                    assert ops.kernel_calls()[isa] == calls + 2, f"the {isa} kernel did not run"
            assert_same(acc, expected_acc, f"int32 sums, {layout.value} on {isa}")
            assert_same(y, expected, f"output, {layout.value} on {isa}")


@pytest.mark.parametrize("i, m, n, k, sparsity, pattern", CASES[::2])
def test_fp32_csr_kernel(i, m, n, k, sparsity, pattern):
    w, x, bias = _inputs(i, m, n, k, sparsity, pattern)
    packed = ops.pack_linear(w, bias=bias, scheme="fp32", layout=Layout.FP32_CSR)
    expected = F.linear(x.double(), w.double(), bias.double() if bias is not None else None)
    scale = float(x.abs().sum(1).max()) * float(w.abs().max()) + 1.0  # bound on |partial sums|
    for isa in ISAS:
        with using_isa(isa):
            y = packed(x)
        assert_close(y, expected.float(), f"fp32 CSR on {isa}", rtol=1e-5, atol=1e-6 * scale)


# activation -> (float64 reference, rtol, atol)
FUSED = {"gelu": (lambda v: F.gelu(v, approximate="none"), 2e-6, 2e-6), "tanh": (torch.tanh, 1e-6, 1e-7)}


@pytest.mark.parametrize("activation", sorted(FUSED))
@pytest.mark.parametrize("i, m, n, k, sparsity, pattern", CASES[1::3])
def test_fused_activation(i, m, n, k, sparsity, pattern, activation):
    w, x, bias = _inputs(i, m, n, k, sparsity, pattern)
    fn, rtol, atol = FUSED[activation]
    layouts = [(Layout.INT8_BLOCK4, "int8"), (Layout.INT8_CSR, "int8"), (Layout.INT8_DENSE, "int8")]
    for layout, scheme in [*layouts, (Layout.FP32_CSR, "fp32")]:
        plain = ops.pack_linear(w, bias=bias, scheme=scheme, layout=layout)
        fused = ops.pack_linear(w, bias=bias, scheme=scheme, layout=layout, activation=activation)
        for isa in ISAS:
            with using_isa(isa):
                pre = plain(x)
                y = fused(x)
            expected = fn(pre.double()).float()
            assert_close(y, expected, f"{activation} {layout.value} on {isa}", rtol=rtol, atol=atol)


def _activation_grid(activation, grid, edges, reference, rtol, atol, atol_scale=False):
    """`activation` alone (an identity fp32 weight: each output is its input, exactly) over grid, edges and inf,
    -inf, NaN, on every instruction set: the finite values against float64 `reference` (with atol_scale, atol
    times max(|v|, 1) for input v); yields (isa, the outputs of inf, -inf, NaN)."""
    n = 64
    special = torch.tensor([float("inf"), float("-inf"), float("nan")])
    v = torch.cat([grid, edges, special, torch.zeros(n - (len(edges) + len(special)) % n)])
    identity = ops.pack_linear(torch.eye(n), scheme="fp32", layout=Layout.FP32_CSR, activation=activation)
    expected = reference(v.double())
    finite = torch.isfinite(v)
    for isa in ISAS:
        with using_isa(isa):
            y = identity(v.reshape(-1, n)).reshape(-1)
        what = f"{activation} grid on {isa}"
        if atol_scale:
            err = (y[finite].double() - expected[finite]).abs() / v[finite].double().abs().clamp(min=1.0)
            worst = int(err.argmax())
            assert err[worst] <= atol, f"{what}: error {err[worst]:.3g} max(|v|, 1) at v = {v[finite][worst]}"
        else:
            assert_close(y[finite], expected[finite].float(), what, rtol=rtol, atol=atol)
        yield isa, y[len(grid) + len(edges) : len(grid) + len(edges) + 3]


def test_tanh_over_both_formulas_and_special_values():
    """tanh on a grid through the polynomial (|v| < 0.625), the exp quotient and saturation, against float64 torch;
    inf, -inf and NaN give 1, -1 and NaN."""
    grid = torch.linspace(-12.0, 12.0, 4096 * 64)
    edges = torch.tensor([0.625, -0.625, 0.62499997, 0.6250001, 0.0, -0.0, 1e-30, -1e-30, 1e-40, 44.0, 90.0, -1e30])
    for isa, tail in _activation_grid("tanh", grid, edges, torch.tanh, rtol=5e-7, atol=1e-30):
        assert tail[0].item() == 1.0 and tail[1].item() == -1.0 and tail[2].isnan(), (
            f"tanh of inf, -inf, NaN on {isa}: {tail}"
        )


def test_gelu_over_every_table_segment_and_special_values():
    """The GELU on a grid through every segment of the kernels' tables and past their ends, against float64 torch,
    within the tables' documented error (docs/kernels.md: below 2.5e-7 max(|v|, 1) on every instruction set; a
    coarser table, e.g. degree 3 over AVX-512's old [-6, 6], is ~4e-6); inf, -inf and NaN as float64 torch gives
    them (inf, NaN, NaN)."""
    grid = torch.linspace(-8.0, 8.0, 4096 * 64)
    # the ends of the tables (AVX-512: x = |v| / 2 clamped at 2.8, the last segment from ~5.43; AVX2: 6)
    edges = torch.tensor([6.0, -6.0, 5.6, -5.6, 5.43, -5.43, 5.42, -5.42, 0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30])
    reference = functools.partial(F.gelu, approximate="none")
    for isa, tail in _activation_grid("gelu", grid, edges, reference, rtol=0.0, atol=2.5e-7, atol_scale=True):
        assert tail[0].item() == float("inf") and tail[1:].isnan().all(), f"GELU of inf, -inf, NaN on {isa}: {tail}"


def test_sparsity_sweep_on_a_bert_shape():
    """One realistic shape (K = 768 spans two column panels) over sparsities 0 .. 99%."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(70, 768, generator=gen)
    for sparsity in (0.0, 0.5, 0.8, 0.9, 0.97, 0.99):
        w = make_weight(96, 768, sparsity, "4-block", gen)
        packed = ops.pack_linear(w, layout=Layout.INT8_BLOCK4)
        expected = packed.reference(x)
        for isa in ISAS:
            with using_isa(isa):
                assert_same(packed(x), expected, f"sparsity {sparsity} on {isa}")


# Decoding shapes for the few-token kernels (csrc/kernels_*.cpp i8_sparse_few; quads_few_avx512.h for INT8_CSR): K
# off every vector, panel and interleave-buffer size (9000 leaves no room for 4 tokens per pass), N off the 8 / 16
# output groups, empty rows.
FEW_CASES = [
    (1, 1, 0.0),
    (3, 5, 0.99),  # fewer than 8 blocks in all: the padded copy
    (7, 13, 1.0),  # no blocks at all
    (17, 130, 0.9),
    (33, 257, 0.5),
    (150, 513, 0.97),
    (40, 1030, 0.8),
    (24, 9000, 0.9),
    (300, 768, 0.0),  # CSR: more than 16 entries per row and panel, vectors spanning many rows
]
FEW_ISAS = [isa for isa in ISAS if isa not in ("scalar", "reference")]
FEW_LAYOUTS = (Layout.INT8_BLOCK4, Layout.INT8_CSR)


def _few_token_calls(isa: str) -> int:
    return ops.kernel_calls("few_tokens")[isa]


def _csr_few_rows(isa: str) -> int:
    """Tokens up to which int8 CSR runs its few-token kernel under `isa`: 6 with the VBMI gather, 2 with the
    vpermt2d one (CPUs without VBMI), none on the other instruction sets (the portable loop takes every M)."""
    with using_isa(isa):
        variant = _extension.quads_few_variant()
    return {"avx512_vbmi": 6, "avx512_vnni": 2}.get(variant, 0)


def _check_few_rows(isa: str, layout: Layout, few: list[int]) -> None:
    """The few-token kernel runs for M = 1 .. its limit: 4-blocks from M = 2 on every x86 ISA; int8 CSR as above."""
    assert few == list(range(1, len(few) + 1)), f"{isa}, {layout.value}: few-token kernel ran for M={few}"
    if layout is Layout.INT8_BLOCK4:
        assert len(few) >= 2, f"{isa}: 4-block few-token kernel ran for M={few}"
    else:
        assert len(few) == _csr_few_rows(isa), f"{isa}: CSR few-token kernel ran for M={few}"


@pytest.mark.skipif(not FEW_ISAS, reason="no x86 kernels on this machine")
@pytest.mark.parametrize("layout", FEW_LAYOUTS, ids=[layout.value for layout in FEW_LAYOUTS])
@pytest.mark.parametrize("n, k, sparsity", FEW_CASES, ids=[f"n{n}-k{k}-s{s}" for n, k, s in FEW_CASES])
def test_few_token_kernel_is_exact(n, k, sparsity, layout):
    """M = 1..8 against the reference on every x86 instruction set, and which M ran the few-token kernel."""
    gen = torch.Generator().manual_seed(n * 7919 + k)
    w = make_weight(n, k, sparsity, "unstructured", gen)
    w[n // 2] = 0.0  # an empty row
    x = torch.randn(8, k, generator=gen) * 3
    x[2] = 0.0  # an all-zero token: scale 0
    for bias in (None, torch.randn(n, generator=gen)):
        plain = ops.pack_linear(w, bias=bias, layout=layout)
        fused = ops.pack_linear(w, bias=bias, layout=layout, activation="gelu")
        codes = ops.get_handler(layout).dense_codes(plain.tensors, n, k)
        q_x, _ = quantize_activation_int8(x)  # per token: row m of any prefix of x is row m here
        expected_acc = (q_x.to(torch.int64) @ codes.to(torch.int64).t()).to(torch.int32)
        expected = plain.reference(x)
        for isa in FEW_ISAS:
            few = []
            for m in range(1, 9):
                xm = x[:m]
                with using_isa(isa):
                    calls = _few_token_calls(isa)
                    y, acc, y_gelu = plain(xm), plain.accumulators(xm), fused(xm)
                    if _few_token_calls(isa) == calls + 3:
                        few.append(m)
                what = f"M={m}, bias={bias is not None}, {layout.value} on {isa}"
                assert_same(acc, expected_acc[:m], f"int32 sums, {what}")
                assert_same(y, expected[:m], f"output, {what}")
                expected_gelu = F.gelu(y.double(), approximate="none").float()
                assert_close(y_gelu, expected_gelu, f"GELU, {what}", rtol=2e-6, atol=2e-6)
            _check_few_rows(isa, layout, few)


@pytest.mark.skipif(not FEW_ISAS, reason="no x86 kernels on this machine")
@pytest.mark.parametrize("layout", FEW_LAYOUTS, ids=[layout.value for layout in FEW_LAYOUTS])
def test_few_token_kernel_split_over_threads_is_exact(layout):
    """Two threads: each runs the kernel on a block of output rows (n0 > 0), the last block ending the arrays."""
    gen = torch.Generator().manual_seed(5)
    w = make_weight(1030, 768, 0.5, "unstructured", gen)
    packed = ops.pack_linear(w, bias=torch.randn(1030, generator=gen), layout=layout)
    x = torch.randn(4, 768, generator=gen)
    ops.set_num_threads(2)
    try:
        for isa in FEW_ISAS:
            for m in (1, 2, 4):
                with using_isa(isa):
                    calls = _few_token_calls(isa)
                    y = packed(x[:m])
                    ran = _few_token_calls(isa) > calls
                expect = m <= (2 if layout is Layout.INT8_BLOCK4 else _csr_few_rows(isa))
                assert ran or not expect, f"{isa}: M={m} did not run the few-token kernel"
                assert_same(y, packed.reference(x[:m]), f"M={m}, 2 threads, {layout.value} on {isa}")
    finally:
        ops.set_num_threads(None)


@pytest.mark.skipif(not FEW_ISAS, reason="no x86 kernels on this machine")
@pytest.mark.parametrize("layout", FEW_LAYOUTS, ids=[layout.value for layout in FEW_LAYOUTS])
def test_few_token_kernel_with_garbage_columns_stays_in_bounds(layout):
    """Out-of-range column indices (clamped, or wrapped into the column panel) give wrong numbers, never a bad
    read."""
    gen = torch.Generator().manual_seed(9)
    packed = ops.pack_linear(make_weight(70, 1030, 0.5, "unstructured", gen), layout=layout)  # 3 CSR panels
    packed.tensors["cols"].copy_(torch.randint(0, 65536, packed.tensors["cols"].shape, generator=gen).to(torch.uint16))
    x = torch.randn(4, 1030, generator=gen)
    for isa in FEW_ISAS:
        with using_isa(isa):
            for m in (1, 2, 3, 4):
                assert torch.isfinite(packed(x[:m])).all(), f"M={m}, {layout.value} on {isa}"


def test_csr_few_token_kernel_variant_follows_the_cpu():
    """The int8 CSR few-token kernel gathers bytes with VBMI's vpermt2b where the CPU has it, else with vpermt2d
    trees; HF_SPARSE_DISABLE_CPU_FEATURES=avx512_vbmi makes this machine run (and these tests check) the other."""
    ext = _extension._C
    if ext is None or "avx512_vnni" not in FEW_ISAS:
        pytest.skip("no AVX-512 kernels on this machine")
    with using_isa("avx512_vnni"):
        vbmi = ext.cpu_features()["avx512_vbmi"]
        assert ext.quads_few_variant() == ("avx512_vbmi" if vbmi else "avx512_vnni")
    for isa in FEW_ISAS:
        if isa != "avx512_vnni":
            with using_isa(isa):
                assert ext.quads_few_variant() == "none", isa
    if not vbmi or os.environ.get("HF_SPARSE_DISABLE_CPU_FEATURES"):
        return
    code = "from hf_sparse.ops import _extension as e; e.set_isa('avx512_vnni'); print(e.quads_few_variant())"
    for value, expected in ((" AVX512_VBMI ", "avx512_vnni"), ("avx512_bf16", "avx512_vbmi")):
        env = {**os.environ, "HF_SPARSE_DISABLE_CPU_FEATURES": value}
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert run.stdout.strip() == expected, (value, run.stdout, run.stderr[-2000:])
    env = {**os.environ, "HF_SPARSE_DISABLE_CPU_FEATURES": "avx512_vbmi,sse9"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode != 0 and "HF_SPARSE_DISABLE_CPU_FEATURES='avx512_vbmi,sse9'" in run.stderr
    assert "unknown feature(s) ['sse9']" in run.stderr
    env = {**os.environ, "HF_SPARSE_DISABLE_CPU_FEATURES": "avx512_vbmi"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "few_token and csr"],
        capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


def test_nonfinite_token_gives_nan_row_and_leaves_others_exact():
    gen = torch.Generator().manual_seed(3)
    w = make_weight(40, 70, 0.5, "4-block", gen)
    x = torch.randn(20, 70, generator=gen)
    x[3, 5] = float("inf")
    x[11, 0] = float("nan")
    finite = [r for r in range(20) if r not in (3, 11)]
    for layout in (Layout.INT8_BLOCK4, Layout.INT8_CSR, Layout.INT8_DENSE):
        packed = ops.pack_linear(w, layout=layout)
        expected = packed.reference(x[finite])
        for isa in ISAS:
            if isa == "reference":
                continue
            with using_isa(isa):
                y = packed(x)
            assert torch.isnan(y[[3, 11]]).all(), f"{layout.value} on {isa}: a token with inf/NaN must give NaN"
            assert_same(y[finite], expected, f"finite tokens, {layout.value} on {isa}")


def test_outputs_of_16_mib_and_more_are_exact():
    """Outputs this large are written with non-temporal stores (csrc/linear.cpp, kStreamBytes)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1030, 40, generator=gen)  # 1030 x 4096 float32 = 16.1 MiB, with a partial last tile
    w = make_weight(4096, 40, 0.9, "4-block", gen)
    for layout, scheme in ((Layout.INT8_BLOCK4, "int8"), (Layout.INT8_CSR, "int8"), (Layout.FP32_CSR, "fp32")):
        packed = ops.pack_linear(w, bias=torch.randn(4096, generator=gen), scheme=scheme, layout=layout)
        expected = packed.reference(x)
        for isa in ISAS:
            with using_isa(isa):
                y = packed(x)
            if scheme == "int8":
                assert_same(y, expected, f"16 MiB output, {layout.value} on {isa}")
            else:
                assert_close(y, expected, f"16 MiB output, {layout.value} on {isa}", rtol=1e-5, atol=1e-4)
