"""Whole encoder layers on the kernels (`EncoderLayerFusion` rules): installing them, and when they may run.

`pack_model` replaces the `forward` of each eligible layer instance by a `FusedEncoderForward`, which runs
`hf_sparse.nn.FusedEncoderLayer` (one call, six kernel steps) when the fast path computes exactly what the layer's own forward
would (up to the attention's bfloat16 rounding), and the class's forward otherwise. `why_not(...)` says which
assumption failed; the tests go through every one of them. `HF_SPARSE_ATTENTION=fp32` (or
`hf_sparse.ops.set_attention_precision("fp32")`) keeps every layer on its own forward: float32 attention.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from ..nn import FusedEncoderLayer, SparseLinear
from ..ops import attention_precision, extension_available, fuse_ffn
from .fusion_rules import EncoderLayerFusion, class_key


# Keyword arguments the fast path may ignore: BERT-family self-attention does not read them (position ids are
# used by the embeddings; hidden states are captured by hooks on the layer itself, which still run).
_IGNORED = frozenset({"position_ids", "output_hidden_states", "return_dict"})
_CAPTURE_MODULE = "transformers.utils.output_capturing"
_HIDDEN_KEYS = frozenset({"hidden_states", "_hidden_states_layers"})


def _attention_functions():
    """(transformers' attention registry, its SDPA function), or (None, None) if transformers moved them."""
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # pragma: no cover - another transformers layout: never take the fast path
        return None, None
    return ALL_ATTENTION_FUNCTIONS, sdpa_attention_forward


def _collector():
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover
        return None
    return _active_collector


class FusedEncoderForward:
    """Stands in for `forward` on one encoder layer instance. Not a Module (it must not become a child);
    `dequantize_model` removes it, which brings the class's forward back.

    The fast path runs when: the attention precision is "bf16" or "int8" (`hf_sparse.ops.attention_precision()`,
    read at each call: `HF_SPARSE_ATTENTION` or `set_attention_precision`; the fast path's attention then has those
    numerics); not compiling; the input is a plain float32 CPU tensor (batch, seq, hidden) not
    requiring gradients; no cross-attention, cache or other extra argument is given (only `_IGNORED` keywords, or
    None / False values); the mask is None or a bool / float32 mask the kernel reads; the layer and everything in
    it are in eval mode; no forward hook is registered on anything inside the layer (transformers' own output
    capturing hooks excepted while they capture nothing but hidden states), nor globally; the attention is not
    causal and the attention implementation is transformers' "sdpa" or the model's own "eager".
    """

    def __init__(self, layer: nn.Module, fused: FusedEncoderLayer, rule: EncoderLayerFusion):
        self.layer, self.fused, self.rule = layer, fused, rule
        self.attention = layer.get_submodule(rule.attention)
        self.inner = [m for m in layer.modules() if m is not layer]  # what the fast path does not call
        self.eager = getattr(sys.modules.get(type(self.attention).__module__), "eager_attention_forward", None)
        self.registry, self.sdpa = _attention_functions()
        self.collector = _collector()

    def __deepcopy__(self, memo):
        # The copied layer and submodules (the layer may be half-built here: no lookups in it), the same packed weights
        new = copy.copy(self)
        new.layer, new.fused = copy.deepcopy(self.layer, memo), copy.deepcopy(self.fused, memo)
        new.attention = copy.deepcopy(self.attention, memo)
        new.inner = [copy.deepcopy(m, memo) for m in self.inner]
        return new

    def __call__(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if self.why_not(hidden_states, attention_mask, args, kwargs) is None:
            return self.fused(hidden_states, attention_mask, attention_precision())
        return type(self.layer).forward(self.layer, hidden_states, attention_mask, *args, **kwargs)

    def why_not(self, x, mask, args: tuple = (), kwargs: dict | None = None) -> str | None:
        """None when the fast path may run for this call, else the reason it may not."""
        reason = self.call_problem(x, mask, args, kwargs)
        if reason is not None:
            return reason
        if self.layer.training or any(m.training for m in self.inner):
            return "training mode"
        if any(m._forward_hooks or m._forward_pre_hooks for m in self.inner) and not self._only_idle_capture_hooks():
            return "forward hooks inside the layer"
        return self._implementation_problem()

    def call_problem(self, x, mask, args: tuple = (), kwargs: dict | None = None) -> str | None:
        """What in the call itself (precision, tracing, input, arguments, mask, global hooks, causal attention)
        keeps it off the fast path; None if nothing. The layer's modules are not looked at."""
        if attention_precision() == "fp32":
            return "attention precision fp32 (HF_SPARSE_ATTENTION / set_attention_precision): the model's attention"
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return "compiling or tracing (the layer's own forward runs the kernels' torch ops)"
        if not (type(x) is torch.Tensor and x.dtype is torch.float32 and x.is_cpu and x.dim() == 3):
            return "input: not a float32 CPU tensor (batch, seq, hidden)"
        if x.requires_grad and torch.is_grad_enabled():
            return "autograd: the kernels have no backward"
        if any(a is not None for a in args):
            return "extra positional arguments (cross-attention inputs)"
        for key, value in (kwargs or {}).items():
            if value is not None and value is not False and key not in _IGNORED:
                return f"argument {key}={type(value).__name__}"
        if mask is not None and not self._mask_ok(mask, x):
            return f"attention mask: {mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}"
        if _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
            return "global forward hooks"
        if getattr(self.attention, "is_causal", False):
            return "causal attention"
        return None

    def _mask_ok(self, mask, x) -> bool:
        if type(mask) is not torch.Tensor or mask.dtype not in (torch.bool, torch.float32) or mask.dim() != 4:
            return False
        b, h, q, k = mask.shape
        return k == x.shape[1] and b in (1, x.shape[0]) and h in (1, self.fused.heads) and q in (1, x.shape[1])

    def _only_idle_capture_hooks(self) -> bool:
        """transformers' output-capturing hooks stay installed after one `output_attentions=True` call; skipping them
        is exact while the current collector wants nothing but hidden states (captured on the layer itself)."""
        for m in self.inner:
            for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()):
                if getattr(hook, "__module__", None) != _CAPTURE_MODULE:
                    return False
        collected = self.collector.get() if self.collector is not None else None
        return collected is None or set(collected) <= _HIDDEN_KEYS

    def _implementation_problem(self) -> str | None:
        config = getattr(self.attention, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if self.registry is None:
            return "transformers' attention registry was not found"
        if impl == "sdpa" and self.registry.get("sdpa") is self.sdpa:
            return None
        if impl == "eager" and self.eager is not None and self.registry.get("eager", self.eager) is self.eager:
            return None
        return f"attention implementation {impl!r}"

    def __repr__(self) -> str:
        return f"FusedEncoderForward({self.fused!r})"


def fuse_encoder_layer(layer: nn.Module, rule: EncoderLayerFusion) -> bool:
    """Install `FusedEncoderForward` on `layer` when its parts are packed the way the fast path needs (Q/K/V one
    sibling group, attention output packed alone, FFN with the GELU fused, exact LayerNorms) and the C++ kernels
    are loaded; otherwise leave the layer as it is. Returns whether it was installed."""
    if not extension_available():
        return False
    get = layer.get_submodule
    try:
        attn = get(rule.attention)
        members = [get(name) for name in rule.qkv]
        out, first, act, second = get(rule.out), get(rule.first), get(rule.act), get(rule.second)
        norm1, norm2 = get(rule.norm1), get(rule.norm2)
    except AttributeError:
        return False
    if class_key(attn) != rule.attention_class or getattr(layer, "is_decoder", False):
        return False
    if hasattr(layer, "crossattention") or getattr(layer, "add_cross_attention", False):
        return False
    group = members[0].group if isinstance(members[0], SparseLinear) else None
    if group is None or [getattr(m, "group", None) for m in members] != [group] * 3 or len(group.names) != 3:
        return False
    if [m.index for m in members] != [0, 1, 2] or group.packed.activation != "none" or not group.packed.runs_extension:
        return False
    if not all(isinstance(m, SparseLinear) and m.packed is not None for m in (out, first, second)):
        return False
    from .module_swap import FusedActivation  # (module_swap imports this module)

    if out.activation != "none" or first.activation != "gelu" or not isinstance(act, FusedActivation):
        return False
    if not all(type(n) is nn.LayerNorm and n.elementwise_affine and n.bias is not None for n in (norm1, norm2)):
        return False
    heads, scaling = getattr(attn, rule.heads, None), getattr(attn, rule.scaling, None)
    if not isinstance(heads, int) or not isinstance(scaling, float):
        return False
    try:
        fused = FusedEncoderLayer(group.packed, out.packed, fuse_ffn(first.packed, second.packed), norm1, norm2,
                                  heads, scaling)  # fmt: skip
    except ValueError:
        return False
    layer.__dict__["forward"] = FusedEncoderForward(layer, fused, rule)  # an instance attribute, not a child
    return True


__all__ = ["FusedEncoderForward", "fuse_encoder_layer"]
