"""hf_sparse's own CPU kernels (`hf_sparse.ops`) in the pruned BERT, swapped in by hand, as benchmark engines.

These engines put the kernels in the model themselves: every pruned encoder Linear is packed once with
`hf_sparse.ops.pack_linear` (layout chosen from its zeros) and called through a small module; the FFN's first Linear
gets BERT's exact GELU fused into its epilogue. Attention, LayerNorms, pooler and classifier stay PyTorch. They
measure the Linear kernels alone; what a user gets (`save_sparse` + `from_pretrained`: Q/K/V siblings, the fused
FFN and whole encoder layers on the kernels) is engine_from_pretrained.py's `hf_sparse_int8`.
"""

from __future__ import annotations

import copy

import torch
from engines import EngineContext, EngineUnavailable, Runner, TorchRunner, register_engine
from profile_torch import register_linear_type
from torch import nn


@register_linear_type
class PackedLinearModule(nn.Module):
    """An nn.Linear stand-in that calls a `hf_sparse.ops.PackedLinear`."""

    def __init__(self, packed):
        super().__init__()
        self.packed = packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed(x)

    def extra_repr(self) -> str:
        return repr(self.packed)


def _ops():
    try:
        import hf_sparse.ops as ops
    except ImportError as e:
        raise EngineUnavailable(f"hf_sparse.ops cannot be imported ({e}); this checkout has no kernels yet") from e
    if not ops.extension_available():
        raise EngineUnavailable(
            "the hf_sparse C++ extension is not loaded (its pure-torch reference is not worth timing); "
            "rebuild with `pip install -e . --no-build-isolation`"
        )
    return ops


def convert(model: nn.Module, scheme: str) -> nn.Module:
    """Swap the encoder's Linears for packed hf_sparse kernels, in place; returns the model."""
    ops = _ops()
    # BERT's "gelu" is the exact erf GELU, which is what the kernels' fused epilogue computes
    fuse_gelu = model.config.hidden_act == "gelu"
    for layer in model.bert.encoder.layer:
        targets = {
            "attention.self.query": "none",
            "attention.self.key": "none",
            "attention.self.value": "none",
            "attention.output.dense": "none",
            "intermediate.dense": "gelu" if fuse_gelu else "none",
            "output.dense": "none",
        }
        for path, activation in targets.items():
            parent_path, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            linear = getattr(parent, name)
            packed = ops.pack_linear(linear.weight, bias=linear.bias, scheme=scheme, activation=activation)
            setattr(parent, name, PackedLinearModule(packed))
        if fuse_gelu:
            layer.intermediate.intermediate_act_fn = nn.Identity()
    return model


def _setup(ctx: EngineContext, batch: int, scheme: str) -> Runner:
    ops = _ops()
    model = ctx.memo(f"hf_sparse_ops_{scheme}", lambda: convert(copy.deepcopy(ctx.bench.model), scheme))
    return TorchRunner(model, ctx.bench.inputs(batch), isa=ops.isa())


@register_engine(
    "hf_sparse_ops_int8",
    precision="int8",
    help="hf_sparse.ops kernels on the encoder Linears, int8 (4-block sparse or dense, per-token activations)",
)
def _hf_sparse_ops_int8(ctx: EngineContext, batch: int) -> Runner:
    return _setup(ctx, batch, "int8")


@register_engine("hf_sparse_ops_fp32", precision="fp32", help="hf_sparse.ops kernels on the encoder Linears, fp32")
def _hf_sparse_ops_fp32(ctx: EngineContext, batch: int) -> Runner:
    return _setup(ctx, batch, "fp32")
