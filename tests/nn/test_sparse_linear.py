"""SparseLinear: loading parameters -> packed kernel; results against the numerics, read-back, dtypes, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_sparse import ops
from hf_sparse.nn import SparseLinear
from hf_sparse.quantization import int8_linear_reference, quantize_weight_int8


def sparse_weight(out: int, k: int, density: float = 0.2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g)
    return w * (torch.rand(out, k, generator=g) < density)


def loaded(weight: torch.Tensor, bias: torch.Tensor | None, storage_dtype: str = "int8") -> SparseLinear:
    """A SparseLinear whose loading parameters hold `weight` as the checkpoint loader would fill them."""
    out, k = weight.shape
    m = SparseLinear(k, out, bias is not None, storage_dtype=storage_dtype)
    with torch.no_grad():
        if storage_dtype == "int8":
            codes, scale = quantize_weight_int8(weight)
            m.weight.copy_(codes)
            m.weight_scale.copy_(scale[:, None])
        else:
            m.weight.copy_(weight)
        if bias is not None:
            m.bias.copy_(bias)
    return m


@pytest.mark.parametrize("shape", [(70, 36), (33, 129), (5, 3)])
def test_int8_forward_is_the_numerics_exactly(shape):
    weight, bias = sparse_weight(*shape), torch.randn(shape[0])
    m = loaded(weight, bias)
    codes, scale = m.weight.detach().clone(), m.weight_scale.detach().reshape(-1).clone()
    m.pack()
    assert m.is_packed and m.weight is None and m.weight_scale is None and m.bias is None
    assert list(m.parameters()) == [] and m.state_dict() == {}
    x = torch.randn(2, 7, shape[1])
    before = dict(ops.kernel_calls())
    with torch.no_grad():
        y = m(x)
    assert torch.equal(y, int8_linear_reference(x, codes, scale, bias))
    if ops.extension_available():
        assert sum(ops.kernel_calls().values()) > sum(before.values())


def test_fused_gelu_matches_torch():
    weight, bias = sparse_weight(70, 36), torch.randn(70)
    m = loaded(weight, bias)
    codes, scale = m.weight.detach().clone(), m.weight_scale.detach().reshape(-1).clone()
    m.pack(activation="gelu")
    x = torch.randn(9, 36)
    expected = F.gelu(int8_linear_reference(x, codes, scale, bias))
    assert torch.allclose(m(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("storage_dtype", ["float32", "bfloat16", "float16"])
def test_float_storage_runs_the_fp32_kernel(storage_dtype):
    weight = sparse_weight(40, 64, density=0.1).to(getattr(torch, storage_dtype))
    m = loaded(weight, None, storage_dtype)
    m.pack()
    assert m.scheme == "fp32" and m.packed.layout.value == "fp32_csr"
    x = torch.randn(3, 64)
    assert torch.allclose(m(x), F.linear(x, weight.float()), atol=1e-5, rtol=1e-5)
    stored, scale = m.stored_weight()
    assert scale is None and stored.dtype == weight.dtype and torch.equal(stored, weight)


def test_read_back_is_what_was_loaded():
    weight, bias = sparse_weight(70, 36), torch.randn(70)
    m = loaded(weight, bias)
    codes, scale = m.weight.detach().clone(), m.weight_scale.detach().reshape(-1).clone()
    m.pack()
    stored, stored_scale = m.stored_weight()
    assert stored.dtype == torch.int8 and torch.equal(stored, codes) and torch.equal(stored_scale, scale)
    assert torch.equal(m.stored_bias(), bias)
    assert torch.equal(m.dequantized_weight(), codes.float() * scale[:, None])


def test_output_follows_the_input_dtype():
    m = loaded(sparse_weight(16, 32), torch.randn(16))
    m.pack()
    x = torch.randn(4, 32)
    y16 = m(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert torch.equal(y16, m(x.to(torch.bfloat16).float()).to(torch.bfloat16))


def test_unpacked_or_unloaded_modules_refuse_to_run():
    m = SparseLinear(8, 4, storage_dtype="int8")
    with pytest.raises(RuntimeError, match="not packed yet"):
        m(torch.randn(1, 8))
    meta = SparseLinear(8, 4, storage_dtype="int8", device="meta")
    with pytest.raises(RuntimeError, match="SparseLinear.weight was never loaded"):
        meta.pack()
    with pytest.raises(ValueError, match="storage_dtype='int4'"):
        SparseLinear(8, 4, storage_dtype="int4")
    m = loaded(sparse_weight(4, 8), None)
    m.pack()
    with pytest.raises(RuntimeError, match="already packed"):
        m.pack()


def test_a_tied_head_takes_the_scales_it_is_given():
    weight = sparse_weight(12, 8, density=1.0)
    codes, scale = quantize_weight_int8(weight)
    m = SparseLinear(8, 12, False, storage_dtype="int8", scale_from="embed")
    assert m.weight_scale is None
    with torch.no_grad():
        m.weight.copy_(codes)
    with pytest.raises(RuntimeError, match="shares its scales with 'embed'"):
        m.pack()
    m.pack(weight_scale=scale[:, None])
    x = torch.randn(3, 8)
    assert torch.equal(m(x), int8_linear_reference(x, codes, scale))
