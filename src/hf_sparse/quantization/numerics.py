"""The int8 numerics shared by export, the CPU kernels and quantization-aware training. docs/kernels.md has them.

Weights: symmetric int8 per output channel (row n of a Linear weight (N, K)):
    scale_w[n] = max_k |w[n, k]| / 127        (1.0 for an all-zero row, whose codes are then all 0)
    q_w[n, k]  = clamp(round(w[n, k] / scale_w[n]), -127, 127)
Activations: symmetric int8 per token (row m of the input (M, K)), computed inside the op at run time:
    inv[m]     = 127 / max_k |x[m, k]|        (0 for an all-zero row), in fp32
    q_x[m, k]  = clamp(round(x[m, k] * inv[m]), -127, 127)
    scale_x[m] = max_k |x[m, k]| / 127
Output:  y[m, n] = (sum_k q_x[m, k] q_w[n, k]) * scale_x[m] * scale_w[n] + bias[n]
The sum is exact in int32. round() is round-half-to-even (torch.round, and C's nearbyint in the default mode).
"""

from __future__ import annotations

import torch


QMAX = 127


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 codes (N, K), fp32 scales (N,)), symmetric per output channel."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_weight_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def quantize_activation_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (int8 codes (M, K), fp32 scales (M,)), symmetric per token, as the kernels do it."""
    x = x.detach().float()
    amax = x.abs().amax(dim=-1)
    inv = torch.where(amax > 0, QMAX / amax, torch.zeros_like(amax))
    q = torch.round(x * inv[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, amax / QMAX


def int8_linear_reference(
    x: torch.Tensor, q_weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = dequant(quant(x) @ q_weight^T) + bias, the exact result every int8 kernel must reproduce.

    The int32 accumulation is done in int64 here (exact), then converted like the kernels do: acc (int32 -> fp32)
    * scale_x * scale_w, then + bias, in fp32.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    q_x, scale_x = quantize_activation_int8(x2)
    acc = q_x.to(torch.int64) @ q_weight.to(torch.int64).t()
    y = acc.to(torch.float32) * scale_x[:, None] * weight_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*shape[:-1], q_weight.shape[0])


def fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """quant-dequant of activations per token, with a straight-through gradient (for QAT and references)."""
    q, scale = quantize_activation_int8(x.reshape(-1, x.shape[-1]))
    dq = (q.float() * scale[:, None]).reshape(x.shape).to(x.dtype)
    return x + (dq - x).detach()


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """quant-dequant of a weight per output channel, with a straight-through gradient."""
    q, scale = quantize_weight_int8(weight)
    dq = dequantize_weight_int8(q, scale).to(weight.dtype)
    return weight + (dq - weight).detach()
