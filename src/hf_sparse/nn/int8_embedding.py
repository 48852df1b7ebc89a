"""`Int8Embedding`: an embedding table stored as int8 codes with one scale per row, dequantized row by row on lookup.

The word embeddings are ~20% of a BERT-base checkpoint; kept as int8 they also stay int8 in memory. A lookup
returns exactly the rows of the dequantized table (`codes * scale`, `hf_sparse.quantization.numerics`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Int8Embedding(nn.Module):
    """`nn.Embedding` stand-in for an int8 table: `weight` int8 `(num, dim)`, `weight_scale` float32 `(num, 1)`.

    Args:
        num_embeddings / embedding_dim / padding_idx: as `nn.Embedding` (padding_idx only matters for `to_dense`).
        dtype: dtype of the returned vectors (the model's dtype).
        device: where the parameters are created (transformers builds models on "meta").
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.output_dtype = dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device), False)
        self.weight_scale = nn.Parameter(torch.empty(num_embeddings, 1, dtype=torch.float32, device=device), False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).float() * F.embedding(ids, self.weight_scale)
        return rows if self.output_dtype is torch.float32 else rows.to(self.output_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The whole float32 table, `codes * scale`."""
        return self.weight.float() * self.weight_scale.float()

    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Embedding:
        """An `nn.Embedding` holding the dequantized table."""
        dtype = dtype or self.output_dtype
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(self.dequantized_weight())
        return dense

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, int8"
