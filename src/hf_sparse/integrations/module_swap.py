"""Put hf_sparse's runtime modules into a transformers model, pack them, take them out again, and save them.

- `replace_modules`: on the meta device, before loading, every module the checkpoint converted becomes a
  `SparseLinear` / `Int8Embedding` (a head tied to an int8 embedding too); everything else stays as it is.
- `pack_model`: after loading, fuses GELUs and packs sibling Linears together (`fusion_rules`), packs the rest,
  drops the dense copies, runs whole FFNs as one kernel call where the layouts allow, and whole encoder layers as
  six (`encoder_layer`).
- `dequantize_model`: back to `nn.Linear` / `nn.Embedding` holding the dequantized weights.
- `compressed_state_dict`: the tensors `save_pretrained` writes, in the checkpoint format (docs/format.md).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from ..export import CheckpointError, SparseQuantizationConfig
from ..export.formats import FORMATS, WeightFormat
from ..nn import Int8Embedding, SparseLinear, pack_siblings
from ..ops import WORKLOADS, fuse_ffn
from ..sparsity.patterns import get_pattern
from .embeddings import FusedEmbeddingsForward, fuse_embeddings
from .encoder_layer import FusedEncoderForward, fuse_encoder_layer
from .encoder_stack import FusedEncoderStackForward, fuse_encoder_stack
from .fusion_rules import (
    EmbeddingsFusion,
    EncoderLayerFusion,
    EncoderStackFusion,
    FFNFusion,
    FusedFeedForward,
    GeluFusion,
    HeadFusion,
    ModelFusion,
    PoolerFusion,
    Siblings,
    is_exact_gelu,
    rules_for,
)
from .head_forward import FusedHeadForward, fuse_head
from .model_forward import FusedModelForward, fuse_model
from .pooler import FusedPoolerForward, fuse_pooler


logger = logging.getLogger(__name__)
# What pack_model installs as instance attributes (dequantize_model removes them)
_FUSED_FORWARDS = (
    FusedFeedForward, FusedEncoderForward, FusedEncoderStackForward, FusedEmbeddingsForward, FusedModelForward,
    FusedPoolerForward, FusedHeadForward,
)  # fmt: skip


class FusedActivation(nn.Module):
    """Stands where an activation was fused into the preceding Linear's kernel: returns its input unchanged, and
    remembers the original module so that `dequantize_model` can put it back."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self._original = [original]  # a list, so that it is not registered as a submodule

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"fused into the Linear: {type(self.original).__name__}"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def resolve_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """{checkpoint module name: model module name} for the names the model has, allowing for the base model
    prefix (a `BertForSequenceClassification` checkpoint loaded as `BertModel`, and the reverse), as transformers
    does for tensor names. Names the model does not have are left out."""
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    resolved = {}
    for name in names:
        candidates = [name]
        if prefix:
            candidates += [name.removeprefix(f"{prefix}."), f"{prefix}.{name}"]
        found = next((c for c in candidates if c in modules and c != ""), None)
        if found is not None:
            resolved[name] = found
    return resolved


def replace_modules(model: nn.Module, qconfig: SparseQuantizationConfig) -> dict[str, str]:
    """Swap every converted module of `model` (on the meta device) for its runtime module, in place.

    Returns {model module name: checkpoint module name}. Raises CheckpointError for a converted module that is
    not an `nn.Linear` / `nn.Embedding` in this model, or an embedding stored in a format other than dense int8.
    """
    resolved = resolve_names(model, list(qconfig.modules))
    skipped = sorted(set(qconfig.modules) - set(resolved))
    if skipped:
        names = ", ".join(repr(n) for n in skipped[:4]) + (f" and {len(skipped) - 4} more" if len(skipped) > 4 else "")
        logger.warning(
            "hf_sparse: %s has no module %s, converted in the checkpoint; not loaded", type(model).__name__, names
        )
    modules = dict(model.named_modules())
    for ckpt_name, model_name in resolved.items():
        entry = qconfig.modules[ckpt_name]
        module = modules[model_name]
        device = module.weight.device if getattr(module, "weight", None) is not None else None
        if isinstance(module, nn.Linear):
            new = SparseLinear(
                module.in_features,
                module.out_features,
                module.bias is not None,
                storage_dtype=entry.dtype,
                dtype=module.weight.dtype,
                device=device,
                checkpoint_format=entry.format,
            )
        elif isinstance(module, nn.Embedding):
            if entry.format != WeightFormat.DENSE.value or entry.dtype != "int8":
                raise CheckpointError(
                    f"quantization_config.modules[{ckpt_name!r}] stores an embedding as {entry.format} / "
                    f"{entry.dtype}; hf_sparse runs embeddings stored as dense / int8 only"
                )
            new = Int8Embedding(
                module.num_embeddings,
                module.embedding_dim,
                module.padding_idx,
                dtype=module.weight.dtype,
                device=device,
            )
        else:
            raise CheckpointError(
                f"quantization_config.modules converts {ckpt_name!r}, but in {type(model).__name__} that module is a "
                f"{type(module).__name__}; hf_sparse converts nn.Linear and nn.Embedding modules only"
            )
        _set_module(model, model_name, new)
    _replace_tied_heads(model)
    return {model_name: ckpt_name for ckpt_name, model_name in resolved.items()}


def _tied_weights(model: nn.Module) -> dict[str, str]:
    """{tied parameter name: the parameter it is tied to}, as transformers ties them after loading."""
    if hasattr(model, "get_expanded_tied_weights_keys"):
        return dict(model.get_expanded_tied_weights_keys(all_submodels=True))
    return {}


def _replace_tied_heads(model: nn.Module) -> None:
    """A Linear tied to an embedding that is now int8 (a tied LM head) would receive the int8 codes: it becomes an
    int8 SparseLinear that takes the embedding's codes when transformers ties them, and its scales at packing."""
    modules = dict(model.named_modules())
    for target, source in _tied_weights(model).items():
        head_name, source_name = target.removesuffix(".weight"), source.removesuffix(".weight")
        head, embedding = modules.get(head_name), modules.get(source_name)
        if isinstance(embedding, Int8Embedding) and type(head) is nn.Linear:
            new = SparseLinear(
                head.in_features,
                head.out_features,
                head.bias is not None,
                storage_dtype="int8",
                dtype=head.weight.dtype,
                device=head.weight.device,
                scale_from=source_name,
            )
            _set_module(model, head_name, new)


WORKLOAD_ENV = "HF_SPARSE_WORKLOAD"


def model_workload(model: nn.Module) -> str:
    """What the automatic int8 layouts of a loaded model are chosen for (`pack_linear(workload=...)`):
    $HF_SPARSE_WORKLOAD ("batch" or "decode") when set, else "decode" for models that generate token by token
    (`model.can_generate()`: each step multiplies one token per sequence) and "batch" for the rest. The decode
    choice also applies to such a model's prompt (prefill), where the batch rule would sometimes pick a faster sparse
    layout: generation time is usually spent token by token."""
    env = os.environ.get(WORKLOAD_ENV, "").strip().lower() or "auto"
    if env in WORKLOADS:
        return env
    if env != "auto":
        raise ValueError(f"{WORKLOAD_ENV}={env!r} is not supported; use auto, {', '.join(WORKLOADS)}")
    can_generate = getattr(model, "can_generate", None)
    return "decode" if callable(can_generate) and can_generate() else "batch"


def pack_model(model: nn.Module, workload: str | None = None) -> dict[str, int]:
    """Pack every loaded `SparseLinear` of `model` for the kernels, in place: exact GELUs after a converted Linear
    are fused into its kernel, sibling Linears are packed side by side, the rest alone, then whole FFNs become one
    kernel call where the layouts allow, whole encoder layers as one call of six kernel steps (the attention
    kernel included), encoders whose layers are all fused as one call for all the layers, embedding modules
    as one call (lookups, sums and LayerNorm), and base models around a fused encoder without transformers' mask
    and decorator code where a call needs none of it. Automatic layouts
    are chosen for `workload` (None: `model_workload(model)`). The dense loading copies are dropped, and parameters
    stop requiring gradients (the kernels have no backward). Returns counts of what was done."""
    workload = model_workload(model) if workload is None else workload
    modules = dict(model.named_modules())
    counts = {
        "linears": 0,
        "groups": 0,
        "fused_gelu": 0,
        "fused_ffn": 0,
        "fused_layers": 0,
        "fused_stacks": 0,
        "fused_embeddings": 0,
        "fused_models": 0,
        "fused_poolers": 0,
        "fused_heads": 0,
    }
    for module in modules.values():  # before packing: the activation is part of the packed kernel
        for rule in rules_for(module):
            if isinstance(rule, GeluFusion):
                linear, act = getattr(module, rule.linear, None), getattr(module, rule.act, None)
                if isinstance(linear, SparseLinear) and not linear.is_packed and is_exact_gelu(act):
                    linear.activation = "gelu"
                    setattr(module, rule.act, FusedActivation(act).train(act.training))
                    counts["fused_gelu"] += 1
            elif isinstance(rule, PoolerFusion):
                linear, act = getattr(module, rule.dense, None), getattr(module, rule.act, None)
                if isinstance(linear, SparseLinear) and not linear.is_packed and type(act) is nn.Tanh:
                    linear.activation = "tanh"
                    setattr(module, rule.act, FusedActivation(act).train(act.training))
    for name, module in modules.items():
        for rule in rules_for(module):
            if isinstance(rule, Siblings):
                members = [getattr(module, m, None) for m in rule.members]
                if (
                    all(isinstance(m, SparseLinear) and not m.is_packed and m.scale_from is None for m in members)
                    and len({(m.scheme, m.in_features, m.activation) for m in members}) == 1
                ):
                    names = [f"{name}.{m}" for m in rule.members]
                    pack_siblings(members, names, members[0].activation, workload=workload)
                    counts["groups"] += 1
    for name, module in modules.items():
        if isinstance(module, SparseLinear):
            if not module.is_packed:
                module.pack(module.activation, weight_scale=_tied_scale(modules, name, module), workload=workload)
            counts["linears"] += 1
    for kind, fuse, key in _FUSION_PASSES:
        for module in modules.values():
            for rule in rules_for(module):
                if isinstance(rule, kind) and fuse(module, rule):
                    counts[key] += 1
    model.requires_grad_(False)
    return counts


def _tied_scale(modules: dict[str, nn.Module], name: str, module: SparseLinear) -> torch.Tensor | None:
    """The scales of the int8 embedding a tied head shares its codes with (None for other Linears)."""
    if module.scale_from is None:
        return None
    source = modules.get(module.scale_from)
    if not isinstance(source, Int8Embedding):
        raise RuntimeError(f"{name!r} takes its scales from {module.scale_from!r}, which is not an Int8Embedding")
    return source.weight_scale


def _fuse_ffn(module: nn.Module, rule: FFNFusion) -> bool:
    """Replace `module.<rule.method>` by the fused FFN kernel when the GELU was fused into the first Linear and both
    Linears run the 4-block int8 kernel (FusedFFN.fused); otherwise leave the module as it is."""
    first, second = module.get_submodule(rule.first), module.get_submodule(rule.second)
    if not (
        isinstance(first, SparseLinear)
        and isinstance(second, SparseLinear)
        and first.packed is not None
        and second.packed is not None
        and first.activation == "gelu"
        and isinstance(module.get_submodule(rule.act), FusedActivation)
    ):
        return False
    ffn = fuse_ffn(first.packed, second.packed)
    if not ffn.fused:
        return False
    module.__dict__[rule.method] = FusedFeedForward(module, ffn, rule.tail)  # an instance attribute, not a child
    return True


# The fusions after packing, one pass each over the model, in this order: each may need the ones before it (a
# stack its fused layers, a base model its fused encoder, a head its fused base model). (rule type, the function
# that installs it on a module, the count it adds to)
_FUSION_PASSES = (
    (FFNFusion, _fuse_ffn, "fused_ffn"),
    (EncoderLayerFusion, fuse_encoder_layer, "fused_layers"),
    (EncoderStackFusion, fuse_encoder_stack, "fused_stacks"),
    (EmbeddingsFusion, fuse_embeddings, "fused_embeddings"),
    (ModelFusion, fuse_model, "fused_models"),
    (PoolerFusion, fuse_pooler, "fused_poolers"),
    (HeadFusion, fuse_head, "fused_heads"),
)


def dequantize_model(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace every runtime module by a dense `nn.Linear` / `nn.Embedding` holding the weights the kernels
    multiply by (dequantized), and put fused activations back. Tied heads are re-tied."""
    if isinstance(dtype, str):  # a config's dtype ("float32")
        dtype = getattr(torch, dtype)
    for module in model.modules():
        for key in [k for k, v in vars(module).items() if isinstance(v, _FUSED_FORWARDS)]:
            del module.__dict__[key]  # the class's own method again
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedActivation):
            _set_module(model, name, module.original)
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):
            dense = nn.Linear(module.in_features, module.out_features, module.has_bias, dtype=dtype)
            with torch.no_grad():
                dense.weight.copy_(module.dequantized_weight())
                if module.has_bias:
                    dense.bias.copy_(module.stored_bias())
            _set_module(model, name, dense)
        elif isinstance(module, Int8Embedding):
            _set_module(model, name, module.to_dense(dtype))
    if _tied_weights(model) and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def compressed_state_dict(model: nn.Module, qconfig: SparseQuantizationConfig) -> dict[str, torch.Tensor]:
    """The model's tensors in the checkpoint format: every packed module re-encoded in its on-disk format from the
    codes (or values) its kernel holds, int8 embeddings as they are, everything else as `state_dict()` has it.
    `qconfig.modules` must name the model's modules (the quantizer renames them after loading)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    pattern = get_pattern(qconfig.pattern) if qconfig.pattern else None
    for name, module in model.named_modules():
        if not isinstance(module, SparseLinear) or module.scale_from is not None:
            continue  # a tied head is stored once, as the embedding
        entry = qconfig.modules.get(name)
        if entry is None:
            raise RuntimeError(f"{name!r} runs sparse but is not in the quantization_config; cannot save it")
        stored, scale = module.stored_weight()
        fmt = WeightFormat(entry.format)
        tensors = FORMATS.get(fmt.value).encode(
            stored, stored != 0, pattern if fmt is not WeightFormat.DENSE else None
        )
        if scale is not None:
            tensors["weight_scale"] = scale.reshape(-1, 1)
        if module.has_bias:
            tensors["bias"] = module.stored_bias()
        state.update({f"{name}.{suffix}": t.contiguous() for suffix, t in tensors.items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}
