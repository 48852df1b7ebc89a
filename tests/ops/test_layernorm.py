"""The residual add + LayerNorm kernels under every instruction set, against torch's LayerNorm in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_sparse import ops
from hf_sparse.ops import add_layernorm
from tests.ops.conftest import ISAS, assert_close, using_isa
from tests.ops.test_attention import ATTENTION_KERNEL


@pytest.mark.parametrize("n", [1, 2, 7, 15, 16, 17, 31, 33, 64, 100, 768, 1030])
@pytest.mark.parametrize("residual", [True, False])
def test_kernels_match_torch(n, residual):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(37, n, generator=gen) * 3 + torch.randn(37, 1, generator=gen)
    res = torch.randn(37, n, generator=gen) if residual else None
    weight, bias = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    v = x.double() + (res.double() if residual else 0)
    expected = F.layer_norm(v, (n,), weight.double(), bias.double(), 1e-12).float()
    for isa in ISAS:
        with using_isa(isa):
            calls = ops.kernel_calls("layernorm").get(ATTENTION_KERNEL[isa], 0)
            y = add_layernorm(x, res, weight=weight, bias=bias, eps=1e-12)
            if isa != "reference":
                assert ops.kernel_calls("layernorm")[ATTENTION_KERNEL[isa]] == calls + 1
        # float32 rounding of the sum, the mean and the variance: a few ulps of the normalized values
        assert_close(y, expected, f"add_layernorm n={n} on {isa}", rtol=1e-5, atol=1e-5 * float(weight.abs().max()))


def test_shapes_threads_and_the_op():
    gen = torch.Generator().manual_seed(0)
    x, res = torch.randn(2, 300, 96, generator=gen), torch.randn(2, 300, 96, generator=gen)
    ln = torch.nn.LayerNorm(96, eps=1e-6)
    torch.nn.init.normal_(ln.weight, generator=gen)
    torch.nn.init.normal_(ln.bias, generator=gen)
    with torch.no_grad():
        expected = ln(x + res)
    outs = []
    for n in (1, 2, 3):
        ops.set_num_threads(n)
        try:
            outs.append(add_layernorm(x, res, weight=ln.weight, bias=ln.bias, eps=ln.eps))
        finally:
            ops.set_num_threads(None)
    for y in outs:
        assert y.shape == (2, 300, 96)
        assert torch.equal(y, outs[0]), "rows are independent: the thread count cannot change them"
        assert_close(y, expected, "vs nn.LayerNorm", rtol=1e-5, atol=1e-5)
    op = torch.ops.hf_sparse.add_layernorm.default(x, res, ln.weight.detach(), ln.bias.detach(), 1e-6)
    assert torch.equal(op, outs[0])
    torch.library.opcheck(
        torch.ops.hf_sparse.add_layernorm.default,
        (x, None, ln.weight.detach(), ln.bias.detach(), 1e-6),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )
    plain = add_layernorm(x)  # no residual, weight 1, bias 0
    assert_close(plain, F.layer_norm(x, (96,)), "no residual, no affine", rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_named():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"residual must have x's shape \(4, 10\), got \(4, 9\)"):
        add_layernorm(x, torch.randn(4, 9))
    with pytest.raises(ValueError, match=r"weight must be a tensor of shape \(10,\), got \(9,\)"):
        add_layernorm(x, weight=torch.randn(9))
