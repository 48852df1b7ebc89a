"""The int8 attention kernels (`attention(..., precision="int8")`) under every instruction set, against
`attention_int8_reference`.

Both dot products are exact integers in the kernels and the reference, and every float32 step is the same
expression, so kernel and reference differ only where their exponentials differ (a few ulp) and in the order of
the row sum of p: that moves outputs by ~1e-7 of max|v|, except where a probability code lands on a rounding
boundary and flips by one, which moves an output by at most max|v| / 255 / (row sum of p). The check is two-level:
every output within that flip bound, and all but a handful within 1e-5 max|v|. A wrong key, head, mask, scale or
layout moves outputs by far more. The cases (odd shapes, every mask kind, causal, packed or separate inputs) are the
bf16 kernels' (tests/ops/test_attention.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_sparse import ops
from hf_sparse.ops import attention, attention_int8_reference
from hf_sparse.ops.attention import INT8_MAX_KEYS
from tests.ops.conftest import ISAS, assert_same, using_isa
from tests.ops.test_attention import CASES, _inputs


needs_extension = pytest.mark.skipif(not ops.extension_available(), reason="needs the C++ extension")

# The int8 attention kernels each instruction set level runs.
INT8_KERNEL = {
    "avx512_vnni": "avx512_vnni_int8",
    "avx2_vnni": "avx2_int8",
    "avx2": "avx2_int8",
    "scalar": "scalar_int8",
    "reference": "reference",
}


def assert_int8_close(actual, expected, v, batch, heads, what):
    """Every output within one probability code's flip of the reference; all but a few (sequence, head, query)
    rows within 1e-5: 2 + 1e-4 of the probability codes computed (measured: ~2e-5 flip)."""
    m, width = v.shape
    d = width // heads
    vmax = v.reshape(batch, m // batch, heads, d).abs().amax((1, 3), keepdim=True)  # per sequence and head
    vmax = vmax.expand(batch, m // batch, heads, d).reshape(m, width)
    nan_ok = torch.isnan(actual) == torch.isnan(expected)
    err = (actual - expected).abs().nan_to_num(0.0)
    loose = err > vmax / 255 + 1e-5 * vmax
    if bool(loose.any()) or not bool(nan_ok.all()):
        bad = loose | ~nan_ok
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} outputs off; first at {idx}: got {actual[idx].item()!r}, "
            f"expected {expected[idx].item()!r}"
        )
    seq = m // batch
    rows = (err > 1e-5 * vmax + 1e-30).reshape(m, heads, d).any(-1)
    allowed = 2 + 1e-4 * m * heads * seq
    assert int(rows.sum()) <= allowed, f"{what}: {int(rows.sum())} rows beyond 1e-5 max|v| (allowed {allowed:.0f})"


@pytest.mark.parametrize("i, batch, seq, heads, d, mask_kind, causal, layout", CASES)
def test_kernels_match_the_reference(i, batch, seq, heads, d, mask_kind, causal, layout):
    q, k, v, mask = _inputs(i, batch, seq, heads, d, mask_kind, layout)
    scale = None if i % 3 else 0.37
    expected = attention_int8_reference(q, k, v, batch, heads, mask, causal, scale)
    for isa in ISAS:
        with using_isa(isa):
            name = INT8_KERNEL[isa]
            assert ops.attention_isa("int8") == name
            calls = ops.kernel_calls("attention").get(name, 0)
            if layout == "3d":
                qkv = torch.cat([q, k, v], -1).reshape(batch, seq, -1)
                out = attention(qkv, heads=heads, mask=mask, causal=causal, scale=scale, precision="int8")
                out = out.reshape(batch * seq, -1)
            else:
                out = attention(
                    (q, k, v), heads=heads, batch=batch, mask=mask, causal=causal, scale=scale, precision="int8"
                )
            if isa != "reference":
                assert ops.kernel_calls("attention")[name] == calls + 1, f"{isa}: the int8 kernel did not run"
        assert_int8_close(out, expected, v, batch, heads, f"int8 attention on {isa}")


def test_the_reference_is_attention_within_int8_error():
    """Against a second implementation, torch's float64 SDPA on the unquantized inputs: int8 Q, K, V and
    probability codes keep the context within 3% of max|v| on these shapes (measured ~1-2%; bf16 ~0.5%), and the
    reference is not the bf16 one (its error is larger than bf16's rounding alone would give)."""
    gen = torch.Generator().manual_seed(1)
    batch, seq, heads, d = 2, 37, 3, 20
    q, k, v = (torch.randn(batch * seq, heads * d, generator=gen) for _ in range(3))
    keep = torch.ones(batch, seq, dtype=torch.bool)
    keep[1, 30:] = False
    vmax = float(v.abs().max())
    for mask, causal in ((None, False), (keep, False), (None, True)):
        ours = attention_int8_reference(q, k, v, batch, heads, mask, causal)

        def split(t):
            return t.reshape(batch, seq, heads, d).transpose(1, 2).double()

        attn_mask = None if mask is None else mask[:, None, None, :]
        sdpa = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask, is_causal=causal)
        sdpa = sdpa.transpose(1, 2).reshape(batch * seq, heads * d).float()
        err = float((ours - sdpa).abs().max())
        assert 2.0**-9 * vmax < err <= 0.03 * vmax, f"mask={mask is not None}, causal={causal}: {err / vmax:.2e}"


@needs_extension
def test_masked_rows_zero_v_and_nan():
    gen = torch.Generator().manual_seed(2)
    batch, seq, heads, d = 2, 20, 3, 16
    q, k, v = (torch.randn(batch * seq, heads * d, generator=gen) for _ in range(3))
    keep = torch.ones(batch, seq, dtype=torch.bool)
    keep[1] = False  # a sequence of padding only
    v = v.clone()
    v[:seq, 2 * d :] = 0  # sequence 0, head 2: V all zero
    k = k.clone()
    k[4, d : 2 * d] = float("nan")  # sequence 0, head 1, key 4
    q = q.clone()
    q[3, :d] = float("inf")  # sequence 0, token 3, head 0: scale NaN
    for isa in ISAS:
        with using_isa(isa):
            out = attention((q, k, v), heads=heads, batch=batch, mask=keep, precision="int8")
        rows = out.reshape(batch, seq, heads, d)
        assert torch.equal(rows[0, :, 2], torch.zeros(seq, d)), f"{isa}: V of zeros gives 0"
        nan = torch.isnan(rows)
        assert nan[0, 3, 0].all(), f"{isa}: a query holding inf gets a NaN row"
        assert nan[0, :, 1].all(), f"{isa}: every query of the head with the NaN key"
        nan[0, 3, 0] = nan[0, :, 1] = False
        assert not nan.any(), f"{isa}: a NaN leaked"
        assert torch.equal(rows[1], torch.zeros_like(rows[1])), f"{isa}: rows without any key give 0"


@needs_extension
@pytest.mark.parametrize("seq", [20, 32])
def test_nan_rows_without_a_mask(seq):
    """Without a mask the AVX-512 kernel finds each row's max as it writes the scores and takes NaN rows from the
    scales (a NaN Q scale: that query's row; a NaN K scale: the head's rows), not from the scores: the same NaN rows
    and values as the reference, keys past the sequence (seq 20: a partial vector) never counted."""
    gen = torch.Generator().manual_seed(9)
    batch, heads, d = 2, 3, 16
    q, k, v = (torch.randn(batch * seq, heads * d, generator=gen) for _ in range(3))
    k[4, d : 2 * d] = float("nan")  # sequence 0, head 1, key 4
    q[seq + 3, :d] = float("inf")  # sequence 1, token 3, head 0: scale NaN
    expected = attention_int8_reference(q, k, v, batch, heads)
    rows = expected.reshape(batch, seq, heads, d)
    assert torch.isnan(rows[0, :, 1]).all() and torch.isnan(rows[1, 3, 0]).all()
    for isa in ISAS:
        with using_isa(isa):
            out = attention((q, k, v), heads=heads, batch=batch, precision="int8")
        assert_int8_close(out, expected, v, batch, heads, f"NaN rows without a mask, {isa}")


@needs_extension
@pytest.mark.parametrize("masked", [True, False])
def test_huge_finite_scores_stay_finite(masked):
    """Scores near float32's limit (q = k = 7e18: each ~2e38) are finite, so are the outputs: the kernels' NaN
    check (the AVX-512 one: an integer max of |score| bits with a mask, the scales without) must not see a false
    NaN."""
    gen = torch.Generator().manual_seed(8)
    batch, seq, heads, d = 1, 32, 1, 16
    q = torch.full((seq, d), 7e18)
    k = torch.full((seq, d), 7e18) * torch.tensor([1.0, -1.0]).repeat(seq // 2)[:, None]  # + and - scores
    v = torch.randn(seq, d, generator=gen)
    keep = torch.ones(batch, seq, dtype=torch.bool)
    keep[0, -3:] = False  # masked keys (-inf) beside the huge ones
    keep = keep if masked else None
    expected = attention_int8_reference(q, k, v, batch, heads, mask=keep)
    assert torch.isfinite(expected).all()
    for isa in ISAS:
        with using_isa(isa):
            out = attention((q, k, v), heads=heads, batch=batch, mask=keep, precision="int8")
        assert_int8_close(out, expected, v, batch, heads, f"huge scores, {isa}")


@needs_extension
def test_subnormal_rows_get_full_codes():
    """A row whose largest |value| is subnormal gets inv = inf, so codes sign(x) * 127 (as torch's quantization):
    the kernels patch those rows after their vector pass."""
    gen = torch.Generator().manual_seed(6)
    batch, seq, heads, d = 1, 18, 1, 24
    q, k, v = (torch.randn(batch * seq, heads * d, generator=gen) for _ in range(3))
    k = k.clone()
    v = v.clone()
    k[5] = k[5].sign() * 1e-39
    v[7] = (v[7].sign() + (v[7] == 0)) * 2e-39
    expected = attention_int8_reference(q, k, v, batch, heads)
    for isa in ISAS:
        with using_isa(isa):
            out = attention((q, k, v), heads=heads, batch=batch, precision="int8")
        assert_int8_close(out, expected, v, batch, heads, f"subnormal rows, {isa}")


@needs_extension
def test_op_path_and_fake_tensors():
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 11, 3 * 4 * 8, generator=gen)
    mask = torch.rand(2, 11, generator=gen) > 0.3
    q, k, v = qkv.reshape(22, -1).chunk(3, -1)
    op = torch.ops.hf_sparse.attention_int8.default(q, k, v, 2, 4, mask, False, 0.25)
    fast = attention(qkv, heads=4, mask=mask, scale=0.25, precision="int8")
    assert_same(op.reshape(2, 11, -1), fast, "op vs fast path")
    torch.library.opcheck(
        torch.ops.hf_sparse.attention_int8.default,
        (q, k, v, 2, 4, mask, True, 0.25),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


def test_bad_precision_and_too_many_keys_are_named():
    qkv = torch.randn(10, 3 * 12)
    with pytest.raises(ValueError, match="precision='fp16'; use 'bf16' or 'int8'"):
        attention(qkv, heads=2, precision="fp16")
    with pytest.raises(ValueError, match="attention_isa: precision='fp32'"):
        ops.attention_isa("fp32")
    if ops.extension_available():
        seq = INT8_MAX_KEYS + 1
        q = torch.zeros(seq, 1)
        with pytest.raises(ValueError, match=f"seq \\({seq}\\) and head_dim \\(1\\) must be at most {INT8_MAX_KEYS}"):
            attention((q, q, q), heads=1, precision="int8")
