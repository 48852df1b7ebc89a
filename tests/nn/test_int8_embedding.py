"""Int8Embedding: lookups return exactly the rows of the dequantized table."""

from __future__ import annotations

import torch

from hf_sparse.nn import Int8Embedding
from hf_sparse.quantization import dequantize_weight_int8, quantize_weight_int8


def test_lookup_is_the_dequantized_row_and_to_dense_keeps_it():
    table = torch.randn(37, 10)
    codes, scale = quantize_weight_int8(table)
    emb = Int8Embedding(37, 10, padding_idx=0)
    with torch.no_grad():
        emb.weight.copy_(codes)
        emb.weight_scale.copy_(scale[:, None])
    dequantized = dequantize_weight_int8(codes, scale)
    ids = torch.tensor([[0, 5, 36], [7, 7, 1]])
    assert torch.equal(emb(ids), dequantized[ids])
    dense = emb.to_dense()
    assert dense.padding_idx == 0 and torch.equal(dense.weight.detach(), dequantized)
    assert emb.weight.dtype == torch.int8 and emb.state_dict()["weight_scale"].shape == (37, 1)


def test_output_dtype_is_the_models():
    emb = Int8Embedding(4, 3, dtype=torch.bfloat16)
    with torch.no_grad():
        emb.weight.fill_(2)
        emb.weight_scale.fill_(0.5)
    out = emb(torch.tensor([1, 2]))
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.ones(2, 3, dtype=torch.bfloat16))
