"""The attention kernels under every instruction set this machine runs, against the pure-torch reference.

The reference (`attention_reference`) computes the kernels' numerics (bf16 Q, K, V and probabilities, exact
products) with exact sums; the kernels sum in float32. The tolerance per output is therefore
    1e-5 max|v|  (float32 sums)  +  2^-7 p2 max|v|
where p2 is the row's largest probability below the maximum, divided by the row's sum: a score that float32 rounds
the other way can move one probability across a bfloat16 rounding boundary (one bf16 ulp, <= 2^-7 of it); the
largest one is exp(0), which rounds to bf16 1 in every kernel, and never moves. The exp itself is checked through
the softmax's divisor (`test_the_softmax_divisor_is_accurate_to_float32`). A wrong key, head, mask or scale moves
outputs by far more.
Shapes are odd on purpose (sequence lengths off the 16-key vectors, head dims off the 16-lane vectors and odd).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hf_sparse import ops
from hf_sparse.ops import _extension, attention, attention_reference
from tests.ops.conftest import ISAS, assert_same, using_isa


needs_extension = pytest.mark.skipif(not ops.extension_available(), reason="needs the C++ extension")

# The attention kernels each instruction set level runs on this machine.
ATTENTION_KERNEL = {
    "avx512_vnni": "avx512_bf16" if _extension._C and _extension._C.cpu_features()["avx512_bf16"] else "avx2",
    "avx2_vnni": "avx2",
    "avx2": "avx2",
    "scalar": "scalar",
    "reference": "reference",
}


def tolerance(q, k, v, batch, heads, mask=None, causal=False, scale=None) -> torch.Tensor:
    """The per-output bound described in the module docstring, (M, heads * d)."""
    m, width = q.shape
    seq, d = m // batch, width // heads
    scale = d**-0.5 if scale is None else scale

    def split(t):
        return t.reshape(batch, seq, heads, d).transpose(1, 2).to(torch.bfloat16).double()

    s = (split(q) @ split(k).transpose(-1, -2)) * scale
    if mask is not None:
        full = mask if mask.dim() == 4 else mask[:, None, None, :]
        s = s.masked_fill(~full, float("-inf")) if full.dtype == torch.bool else s + full.double()
    if causal:
        s = s.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    p2 = p.masked_fill(p == p.amax(-1, keepdim=True), 0.0).amax(-1, keepdim=True)
    vmax = split(v).abs().amax((-1, -2), keepdim=True)
    bound = (1e-5 + 2.0**-7 * p2) * vmax
    return bound.expand(batch, heads, seq, d).transpose(1, 2).reshape(m, width).float()


def assert_attention_close(actual, expected, bound, what):
    err = (actual - expected).abs()
    bad = (err > bound) | (torch.isnan(actual) != torch.isnan(expected))
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} outputs off; first at {idx}: got {actual[idx].item()!r}, "
            f"expected {expected[idx].item()!r} (bound {bound[idx].item():.3g})"
        )


def _cases(count, seed):
    rng = random.Random(seed)
    for i in range(count):
        batch = rng.choice([1, 1, 2, 3])
        seq = rng.choice([1, 2, 5, 15, 16, 17, 31, 33, 64, 77, 128, 130])
        heads = rng.choice([1, 2, 3, 4, 12, 16])
        d = rng.choice([1, 7, 16, 18, 32, 33, 64, 80, 96])
        mask = rng.choice(["none", "none", "key-bool", "key-float", "4d-bool", "4d-float-heads", "finfo-min"])
        causal = rng.random() < 0.25
        layout = rng.choice(["packed", "packed", "separate", "3d"])
        yield pytest.param(
            i, batch, seq, heads, d, mask, causal, layout,
            id=f"{i}-b{batch}-s{seq}-h{heads}-d{d}-{mask}{'-causal' if causal else ''}-{layout}",
        )  # fmt: skip


CASES = list(_cases(48, seed=0))


def _inputs(i, batch, seq, heads, d, mask_kind, layout):
    """(q, k, v) (M, heads * d) views of one packed buffer (or separate tensors), and the mask."""
    gen = torch.Generator().manual_seed(100 + i)
    width = heads * d
    qkv = torch.randn(batch * seq, 3 * width, generator=gen) * (0.5 + 3 * torch.rand(1, generator=gen))
    if layout == "separate":
        q, k, v = (t.contiguous() for t in qkv.chunk(3, -1))
    else:
        q, k, v = qkv.chunk(3, -1)
    lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
    keep = torch.arange(seq)[None, :] < lengths[:, None]  # (batch, seq): padding at the end
    mask = None
    if mask_kind == "key-bool":
        mask = keep
    elif mask_kind == "key-float":
        mask = torch.randn(batch, seq, generator=gen) * 2
    elif mask_kind == "4d-bool":  # per query too: a random pattern with every row keeping its first key
        mask = torch.rand(batch, 1, seq, seq, generator=gen) > 0.4
        mask[..., 0] = True
    elif mask_kind == "4d-float-heads":
        mask = torch.randn(batch, heads, seq, seq, generator=gen)
    elif mask_kind == "finfo-min":  # transformers' eager masks
        mask = torch.zeros(batch, 1, seq, seq).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    return q, k, v, mask


@pytest.mark.parametrize("i, batch, seq, heads, d, mask_kind, causal, layout", CASES)
def test_kernels_match_the_reference(i, batch, seq, heads, d, mask_kind, causal, layout):
    q, k, v, mask = _inputs(i, batch, seq, heads, d, mask_kind, layout)
    scale = None if i % 3 else 0.37
    expected = attention_reference(q, k, v, batch, heads, mask, causal, scale)
    bound = tolerance(q, k, v, batch, heads, mask, causal, scale)
    for isa in ISAS:
        with using_isa(isa):
            assert ops.attention_isa() == ATTENTION_KERNEL[isa]
            calls = ops.kernel_calls("attention").get(ATTENTION_KERNEL[isa], 0)
            if layout == "3d":
                qkv = torch.cat([q, k, v], -1).reshape(batch, seq, -1)
                out = attention(qkv, heads=heads, mask=mask, causal=causal, scale=scale).reshape(batch * seq, -1)
            else:
                out = attention((q, k, v), heads=heads, batch=batch, mask=mask, causal=causal, scale=scale)
            if isa != "reference":
                assert ops.kernel_calls("attention")[ATTENTION_KERNEL[isa]] == calls + 1, f"{isa}: kernel did not run"
        assert_attention_close(out, expected, bound, f"attention on {isa}")


def test_the_reference_is_attention():
    """Against a second implementation: torch's SDPA in float64 on the same bf16-rounded inputs (the reference
    only adds the bf16 rounding of the probabilities: 2^-8 relative at most)."""
    gen = torch.Generator().manual_seed(1)
    batch, seq, heads, d = 2, 37, 3, 20
    q, k, v = (torch.randn(batch * seq, heads * d, generator=gen) for _ in range(3))
    keep = torch.ones(batch, seq, dtype=torch.bool)
    keep[1, 30:] = False
    for mask, causal in ((None, False), (keep, False), (None, True)):
        ours = attention_reference(q, k, v, batch, heads, mask, causal)

        def split(t):
            return t.reshape(batch, seq, heads, d).transpose(1, 2).to(torch.bfloat16).double()

        attn_mask = None if mask is None else mask[:, None, None, :]
        sdpa = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask, is_causal=causal)
        sdpa = sdpa.transpose(1, 2).reshape(batch * seq, heads * d).float()
        vmax = float(v.abs().max())
        assert float((ours - sdpa).abs().max()) <= 2.0**-8 * vmax, f"mask={mask is not None}, causal={causal}"


@needs_extension
def test_fully_masked_rows_give_zero_and_finfo_min_rows_the_mean():
    gen = torch.Generator().manual_seed(2)
    batch, seq, heads, d = 2, 20, 2, 16
    q, k, v = (torch.randn(batch * seq, heads * d, generator=gen) for _ in range(3))
    keep = torch.ones(batch, seq, dtype=torch.bool)
    keep[1] = False  # a sequence of padding only
    minimum = torch.zeros(batch, seq).masked_fill(~keep, torch.finfo(torch.float32).min)
    for isa in ISAS:
        with using_isa(isa):
            out = attention((q, k, v), heads=heads, batch=batch, mask=keep)
            eager = attention((q, k, v), heads=heads, batch=batch, mask=minimum)
        assert torch.equal(out[seq:], torch.zeros(seq, heads * d)), f"{isa}: masked rows must be 0 (as SDPA)"
        expected = attention_reference(q, k, v, batch, heads, keep)
        assert_attention_close(out, expected, tolerance(q, k, v, batch, heads, keep), f"masked, {isa}")
        # transformers' eager masks (finfo.min): every score equal, so the plain mean of V (bf16), as eager gives
        mean = v[seq:].to(torch.bfloat16).float().reshape(seq, heads, d).mean(0).reshape(1, -1)
        assert torch.allclose(eager[seq:], mean.expand(seq, -1), atol=1e-5), isa


@needs_extension
def test_the_softmax_divisor_is_accurate_to_float32():
    """The kernels' exp, seen through the divisor: V is 1 for the first key (the highest score) and 0 for the others,
    so every output is bf16(p_0) / sum_j p_j = 1 / (1 + sum_{j>0} exp(s_j - s_0)). The scores are exact (keys of
    bf16 values times a query of one 1, scale 1), spread over [-20, 0]; against the float64 value only the exp's
    errors and float32 summation remain (measured: 8e-8 on the vector kernels, 7e-7 on the scalar one, which sums
    one score at a time). An exp biased by 4e-6 fails; errors that change sign along the range partly cancel in
    the sum, so the exp's own bound (2.3e-7 for AVX-512) was checked over every float (csrc comment)."""
    seq = 200
    scores = torch.cat([torch.zeros(1), -torch.linspace(0.01, 20.0, seq - 1)]).to(torch.bfloat16).float()
    q = torch.zeros(seq, 2)
    q[:, 0] = 1
    k = torch.stack([scores, torch.zeros(seq)], 1)
    v = torch.zeros(seq, 2)
    v[0, 0] = 1
    expected = 1 / torch.exp(scores.double()).sum()
    for isa in ISAS:
        with using_isa(isa):
            out = attention((q, k, v), heads=1, batch=1, scale=1.0)
        err = float(((out[:, 0].double() - expected) / expected).abs().max())
        assert err <= 2e-6, f"{isa}: divisor off by {err:.2e} (relative)"
        assert torch.equal(out[:, 1], torch.zeros(seq))


@needs_extension
def test_a_nan_stays_in_its_own_head_and_sequence():
    gen = torch.Generator().manual_seed(3)
    batch, seq, heads, d = 2, 9, 3, 8
    q, k, v = (torch.randn(batch * seq, heads * d, generator=gen) for _ in range(3))
    k = k.clone()
    k[seq + 4, d : 2 * d] = float("nan")  # sequence 1, head 1, key 4
    for isa in ISAS:
        with using_isa(isa):
            out = attention((q, k, v), heads=heads, batch=batch)
        nan = torch.isnan(out).reshape(batch, seq, heads, d)
        assert nan[1, :, 1].all(), f"{isa}: every query of that head sees the NaN key"
        nan[1, :, 1] = False
        assert not nan.any(), f"{isa}: a NaN leaked into another head or sequence"


@needs_extension
@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("threads", [2, 3])
def test_results_do_not_depend_on_the_thread_count(threads, precision):
    gen = torch.Generator().manual_seed(4)
    batch, seq, heads, d = 2, 70, 3, 24  # 6 heads: cut into query chunks for 2 and 3 threads
    qkv = torch.randn(batch * seq, 3 * heads * d, generator=gen)
    mask = torch.rand(batch, seq, generator=gen) > 0.2
    for isa in ISAS:
        with using_isa(isa):
            outs = []
            for n in (1, threads):
                ops.set_num_threads(n)
                try:
                    causal = isa == "scalar" and precision == "bf16"
                    outs.append(
                        attention(qkv, heads=heads, batch=batch, mask=mask, causal=causal, precision=precision)
                    )
                finally:
                    ops.set_num_threads(None)
        assert_same(outs[1], outs[0], f"{precision} on {isa}: {threads} threads vs 1")


@needs_extension
def test_op_path_fake_tensors_and_compile():
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 11, 3 * 4 * 8, generator=gen)
    mask = torch.rand(2, 11, generator=gen) > 0.3
    q, k, v = qkv.reshape(22, -1).chunk(3, -1)
    op = torch.ops.hf_sparse.attention.default(q, k, v, 2, 4, mask, False, 0.25)
    assert_same(op.reshape(2, 11, -1), attention(qkv, heads=4, mask=mask, scale=0.25), "op vs fast path")
    torch.library.opcheck(
        torch.ops.hf_sparse.attention.default,
        (q, k, v, 2, 4, mask, True, 0.25),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
        return gm

    compiled = torch.compile(lambda t: attention(t, heads=4, mask=mask) * 2, backend=backend, fullgraph=True)
    assert_same(compiled(qkv), attention(qkv, heads=4, mask=mask) * 2, "compiled")
    assert any("attention" in t for t in graphs[0]), f"the graph holds no attention op: {graphs[0]}"


def test_bad_arguments_are_named():
    qkv = torch.randn(10, 3 * 12)
    with pytest.raises(ValueError, match="heads=5 must divide the feature width 12"):
        attention(qkv, heads=5)
    with pytest.raises(ValueError, match="batch=3 must divide the number of tokens 10"):
        attention(qkv, heads=2, batch=3)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\); expected a key mask \(batch=2, seq=5\)"):
        attention(qkv, heads=2, batch=2, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be bool .* or float"):
        attention(qkv, heads=2, batch=2, mask=torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="last dimension must be 3 \\* heads \\* d"):
        attention(torch.randn(10, 13), heads=1)
    q = torch.randn(10, 12)
    with pytest.raises(ValueError, match="same shape"):
        attention((q, q, torch.randn(10, 8)), heads=2)
    with pytest.raises(ValueError, match="rows of contiguous features"):
        attention((q, q, torch.randn(12, 10).t()), heads=2)


@pytest.mark.parametrize(
    "precision, reference", [("bf16", "attention_reference"), ("int8", "attention_int8_reference")]
)
def test_without_the_extension_the_op_is_the_reference(precision, reference):
    code = (
        "import torch\n"
        "from hf_sparse import ops\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = torch.randn(3, 14, 12, generator=g).unbind(0)\n"
        "m = torch.rand(2, 7, generator=g) > 0.3\n"
        f"y = ops.attention((q, k, v), heads=3, batch=2, mask=m, precision={precision!r})\n"
        f"print(ops.attention_isa({precision!r}), torch.equal(y, ops.{reference}(q, k, v, 2, 3, m)))\n"
    )
    env = {**os.environ, "HF_SPARSE_DISABLE_EXTENSION": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["reference", "True"], proc.stdout
