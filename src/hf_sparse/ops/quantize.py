"""The kernels' own per-token activation quantization, exposed for tests and for checking QAT against it."""

from __future__ import annotations

import torch

from ..quantization.numerics import quantize_activation_int8
from . import _extension as ext
from .library import as_rows


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) float -> (int8 codes (M, K), float32 scales (M,)) as the active instruction set computes them.

    Bit-identical to `hf_sparse.quantization.numerics.quantize_activation_int8` (the tests hold it to that); a
    token holding inf or NaN gets scale NaN, so its outputs come out NaN.
    """
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise TypeError("quantize_activation: x must be a tensor of shape (..., K)")
    k = x.shape[-1]
    x2 = as_rows(x, k, "quantize_activation")
    if ext._C is None:
        return quantize_activation_int8(x2)
    q = torch.empty(x2.shape, dtype=torch.int8)
    scale = torch.empty(x2.shape[0], dtype=torch.float32)
    ext._C.quantize_raw(x2.data_ptr(), x2.shape[0], k, q.data_ptr(), scale.data_ptr())
    return q, scale
