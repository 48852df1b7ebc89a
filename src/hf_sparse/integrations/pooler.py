"""Poolers in one kernel call (`PoolerFusion` rules): installing them, and when they run.

BERT's pooler is `tanh(dense(hidden_states[:, 0]))`. With the tanh in the dense's epilogue (`activation="tanh"`)
it is still three steps in Python (the strided slice, the Linear, the fused activation's identity), and after the
encoder's kernel call has streamed the model's weights through the caches each one is a cache miss: ~0.19 ms of a
batch-1 BERT-base forward, of which the kernel's own work is the dense 768 x 768 int8 product (its weights come
from memory). `pack_model` replaces the pooler instance's `forward` by a `FusedPoolerForward`: one call of the
Linear's kernel that reads each sequence's first token in place (`PackedLinear.token_rows`), the same values as
the class's forward, bit for bit.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..nn import SparseLinear
from .fusion_rules import PoolerFusion
from .model_forward import plain_call


class FusedPoolerForward:
    """Stands in for `forward` on one pooler instance. Not a Module; `dequantize_model` removes it. `calls` counts
    the calls it ran itself.

    It runs a call when the dense and the activation are still the ones it was installed for (the dense packed with
    the tanh, the activation its `FusedActivation`), their `__call__` would run their class's forward and nothing
    else (no hooks, not compiled), and the dense's kernel takes the input in place (a contiguous float32 CPU
    tensor (batch, seq, hidden), no autograd, not tracing); otherwise the class's forward runs."""

    def __init__(self, module: nn.Module, rule: PoolerFusion, dense: SparseLinear, act: nn.Module):
        self.module, self.rule, self.dense, self.act = module, rule, dense, act
        self.packed = dense.packed
        self.calls = 0

    def __deepcopy__(self, memo):  # the copied module (it may be half-built here: no lookups in it)
        return FusedPoolerForward(
            copy.deepcopy(self.module, memo), self.rule, copy.deepcopy(self.dense, memo), copy.deepcopy(self.act, memo)
        )

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        y = self.run(hidden_states)
        if y is None:
            return type(self.module).forward(self.module, hidden_states)
        self.calls += 1
        return y

    def run(self, x: torch.Tensor) -> torch.Tensor | None:
        """The pooled output from one kernel call, or None when the call is not one it computes exactly."""
        modules = self.module._modules
        dense, act = self.dense, self.act
        if modules.get(self.rule.dense) is not dense or modules.get(self.rule.act) is not act:
            return None
        if not (plain_call(dense) and plain_call(act)) or "forward" in dense.__dict__ or "forward" in act.__dict__:
            return None
        if dense.packed is not self.packed or dense.group is not None:
            return None
        return self.packed.token_rows(x, self.rule.token)

    def __repr__(self) -> str:
        return f"FusedPoolerForward({type(self.module).__name__})"


def fuse_pooler(module: nn.Module, rule: PoolerFusion) -> bool:
    """Install `FusedPoolerForward` on `module` when its dense was packed with the tanh fused (module_swap does that
    for a `PoolerFusion`). Returns whether it was installed."""
    from .module_swap import FusedActivation  # (module_swap imports this module)

    dense, act = getattr(module, rule.dense, None), getattr(module, rule.act, None)
    if not (
        isinstance(dense, SparseLinear)
        and dense.packed is not None
        and dense.group is None
        and dense.activation == "tanh"
        and isinstance(act, FusedActivation)
    ):
        return False
    module.__dict__["forward"] = FusedPoolerForward(module, rule, dense, act)  # an instance attribute, not a child
    return True


__all__ = ["FusedPoolerForward", "fuse_pooler"]
