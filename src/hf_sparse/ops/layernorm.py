"""Residual add + LayerNorm in one pass of the CPU kernels, as a torch op: `hf_sparse::add_layernorm`.

    y = add_layernorm(x, residual, weight=ln.weight, bias=ln.bias, eps=ln.eps)   # == ln(x + residual)

Each row is read once into L1 and normalized there (sum, sum of squared deviations, then the affine map), in
float32: y = (v - mean) / sqrt(var + eps) * weight + bias with v = x + residual and the biased variance, as
`torch.nn.LayerNorm`; results differ from torch's in the last bits (summation order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _extension as ext
from .library import _lib, as_rows
from .packed_linear import can_call_directly


_lib.define("add_layernorm(Tensor x, Tensor? residual, Tensor weight, Tensor bias, float eps) -> Tensor")


def _params(weight, bias, n: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    for name, t, fill in (("weight", weight, 1.0), ("bias", bias, 0.0)):
        if t is None:
            t = torch.full((n,), fill)
        if not isinstance(t, torch.Tensor) or t.shape != (n,):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{where}: {name} must be a tensor of shape ({n},), got {shape}")
        if t.device.type != "cpu":
            raise ValueError(f"{where}: {name} must be on the CPU, got {t.device}")
        out.append(t.detach().float().contiguous())
    return out[0], out[1]


def _run(x, residual, weight, bias, eps: float, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise TypeError(f"{where}: x must be a tensor of shape (..., N)")
    n = x.shape[-1]
    x2 = as_rows(x, n, where)
    r2 = None
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
            shape = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
            raise ValueError(f"{where}: residual must have x's shape {tuple(x.shape)}, got {shape}")
        r2 = as_rows(residual, n, where)
    w, b = _params(weight, bias, n, where)
    if ext._C is None:
        v = x2 if r2 is None else x2 + r2
        return F.layer_norm(v, (n,), w, b, eps).reshape(x.shape)
    y = torch.empty(x2.shape, dtype=torch.float32)
    ext._C.add_layernorm_raw(
        x2.data_ptr(), n, r2.data_ptr() if r2 is not None else 0, n, x2.shape[0], n, w.data_ptr(), b.data_ptr(),
        float(eps), y.data_ptr(), n, ext.get_num_threads(),
    )  # fmt: skip
    return y.reshape(x.shape)


@torch.library.impl(_lib, "add_layernorm", "CPU")
def _add_layernorm_op(x, residual, weight, bias, eps):
    return _run(x, residual, weight, bias, eps, "hf_sparse::add_layernorm")


@torch.library.register_fake("hf_sparse::add_layernorm")
def _add_layernorm_fake(x, residual, weight, bias, eps):
    return x.new_empty(x.shape, dtype=torch.float32)


def add_layernorm(x, residual=None, *, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """`F.layer_norm(x + residual, (N,), weight, bias, eps)` in one pass: float32 (..., N), x's shape. Inference
    only (no backward); weight / bias None mean 1 / 0."""
    where = "hf_sparse.ops.add_layernorm"
    if ext._C is not None and can_call_directly(x) and (residual is None or can_call_directly(residual)):
        return _run(x, residual, weight, bias, eps, where)
    if weight is None or bias is None:
        n = x.shape[-1]
        weight = torch.ones(n) if weight is None else weight
        bias = torch.zeros(n) if bias is None else bias
    return torch.ops.hf_sparse.add_layernorm.default(x, residual, weight, bias, float(eps))


def add_layernorm_reference(x, residual=None, *, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """The pure-torch result (torch's LayerNorm of the float32 sum)."""
    v = x.float() if residual is None else x.float() + residual.float()
    return F.layer_norm(v, (v.shape[-1],), weight, bias, eps)


__all__ = ["add_layernorm", "add_layernorm_reference"]
