"""The kernels' per-token activation quantization is bit-identical to numerics.quantize_activation_int8."""

from __future__ import annotations

import pytest
import torch

from hf_sparse import ops
from hf_sparse.quantization.numerics import quantize_activation_int8
from tests.ops.conftest import ISAS, assert_same, using_isa


def _hard_rows() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    k = 77
    rows = [
        torch.zeros(k),  # amax 0: codes 0, scale 0
        torch.full((k,), -3.5),
        torch.randn(k, generator=gen) * 1e-30,  # tiny and subnormal-adjacent values
        torch.randn(k, generator=gen) * 1e30,
        torch.randn(k, generator=gen).clamp(-1, 1) * 2.0**-130,  # subnormals
    ]
    # Ties: x * (127 / amax) lands on .5 exactly for amax = 127.
    ties = torch.arange(k, dtype=torch.float32) - 38.5
    ties[0] = 127.0
    rows.append(ties)
    one_hot = torch.zeros(k)
    one_hot[40] = -0.25
    rows.append(one_hot)
    neg_zero = torch.full((k,), -0.0)
    rows.append(neg_zero)
    return torch.stack(rows)


@pytest.mark.parametrize("k", [1, 3, 4, 17, 64, 65, 300, 1030])
def test_quantization_is_bit_exact(k):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(37, k, generator=gen) * torch.logspace(-3, 3, 37)[:, None]
    expected_q, expected_s = quantize_activation_int8(x)
    for isa in ISAS:
        with using_isa(isa):
            q, s = ops.quantize_activation(x)
        assert_same(q, expected_q, f"codes on {isa} (k={k})")
        assert_same(s, expected_s, f"scales on {isa} (k={k})")


def test_quantization_edge_cases_are_bit_exact():
    x = _hard_rows()
    expected_q, expected_s = quantize_activation_int8(x)
    for isa in ISAS:
        with using_isa(isa):
            q, s = ops.quantize_activation(x)
        assert_same(q, expected_q, f"codes on {isa}")
        assert_same(s, expected_s, f"scales on {isa}")


def test_nonfinite_token_gets_nan_scale():
    x = torch.randn(4, 33)
    x[1, 7] = float("inf")
    x[2, 0] = float("nan")
    for isa in ISAS:
        if isa == "reference":
            continue
        with using_isa(isa):
            q, s = ops.quantize_activation(x)
        assert torch.isnan(s[[1, 2]]).all(), isa
        expected_q, expected_s = quantize_activation_int8(x[[0, 3]])
        assert_same(q[[0, 3]], expected_q, f"finite rows on {isa}")
        assert_same(s[[0, 3]], expected_s, f"finite rows on {isa}")
