"""Whole encoders in one kernel call (`EncoderStackFusion` rules): installing them, and when they may run.

`pack_model` replaces the `forward` of an encoder instance (BertEncoder, DistilBERT's Transformer...) whose layers all
got a `FusedEncoderForward` by a `FusedEncoderStackForward`: one `hf_sparse.nn.FusedEncoderStack` call for all the
layers, which saves a Python call per layer (~25 us each) and lets chunks of sequences go from layer to layer
without the threads waiting for each other. It runs only when every layer's own fast path would run, with no hook
on any layer or inside one (transformers' output-capturing hooks excepted while they capture nothing), and otherwise
hands over to the class's forward (the layers one by one, each deciding for itself as before).
"""

from __future__ import annotations

import copy
from operator import attrgetter

import torch
from torch import nn

from ..nn import FusedEncoderStack, SparseLinear
from ..ops import attention_precision
from .encoder_layer import _CAPTURE_MODULE, FusedEncoderForward
from .fusion_rules import EncoderStackFusion


_training = attrgetter("training")
# Module classes (exactly these, not subclasses) whose forward never reads `training` (and module_swap's
# FusedActivation)
_TRAINING_FREE = (nn.Linear, nn.LayerNorm, nn.Identity, nn.ModuleList, SparseLinear)


class FusedEncoderStackForward:
    """Stands in for `forward` on one encoder instance. Not a Module; `dequantize_model` removes it."""

    def __init__(self, encoder: nn.Module, layers: list[nn.Module], rule: EncoderStackFusion):
        self.encoder, self.layers, self.rule = encoder, layers, rule
        self.forwards = [layer.__dict__["forward"] for layer in layers]
        self.modules = [m for layer in layers for m in layer.modules()]  # the layers and everything in them
        # (the hook dicts are filled in place by register_*_hook, never replaced)
        self.hook_dicts = [d for m in self.modules for d in (m._forward_hooks, m._forward_pre_hooks)]
        # the modules whose forward may read `training` (checked at every call: each costs a cache miss or two)
        from .module_swap import FusedActivation  # (module_swap imports this module)

        free = {*_TRAINING_FREE, FusedActivation}
        self.train_sensitive = [m for m in self.modules if type(m) not in free]
        self.stack = FusedEncoderStack([f.fused for f in self.forwards])

    def __deepcopy__(self, memo):
        # The copied encoder (it may be half-built here: no lookups in it) and layers (complete), the same packed
        # weights (never modified).
        layers = [copy.deepcopy(layer, memo) for layer in self.layers]
        return FusedEncoderStackForward(copy.deepcopy(self.encoder, memo), layers, self.rule)

    def __call__(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        y = self.run(hidden_states, attention_mask, args, kwargs)
        if y is not None:
            return self.rule.output(y)
        return type(self.encoder).forward(self.encoder, hidden_states, attention_mask, *args, **kwargs)

    def run(self, x: torch.Tensor, mask: torch.Tensor | None, args: tuple = (), kwargs: dict | None = None):
        """The last hidden state of the call `forward(x, mask, *args, **kwargs)` from one kernel call, without the
        output object around it; None when the call is not one for the kernels (`why_not`)."""
        if self.why_not(x, mask, args, kwargs) is None:
            return self.stack(x, mask, attention_precision())
        return None

    def why_not(self, x, mask, args: tuple = (), kwargs: dict | None = None) -> str | None:
        """None when one call may run every layer, else the reason it may not."""
        current = getattr(self.encoder, self.rule.layers, None)
        if (
            current is None
            or len(current) != len(self.layers)
            or any(a is not b for a, b in zip(current, self.layers))
        ):
            return "the encoder's layers changed"
        for layer, forward in zip(self.layers, self.forwards):
            if layer.__dict__.get("forward") is not forward:
                return "a layer's forward was replaced"
        # the first layer checks the call (precision, input, arguments, mask, global hooks); the modules of all
        # the layers are checked here
        first = self.forwards[0]
        reason = first.call_problem(x, mask, args, kwargs)
        if reason is not None:
            return reason
        # the layers' own __call__ is skipped, so no hook at all but transformers' capturing ones while they capture
        # nothing
        if any(self.hook_dicts) and not self._idle_capture_hooks():
            return "hooks on a layer or inside one"
        if any(map(_training, self.train_sensitive)):
            return "training mode"
        reason = first._implementation_problem()
        if reason is not None:
            return reason
        config = getattr(first.attention, "config", None)
        for forward in self.forwards[1:]:
            if getattr(forward.attention, "is_causal", False):
                return "causal attention"
            if getattr(forward.attention, "config", None) is not config:  # (the first layer checked its own)
                reason = forward._implementation_problem()
                if reason is not None:
                    return reason
        return None

    def _idle_capture_hooks(self) -> bool:
        """transformers' output-capturing hooks stay installed after one `output_hidden_states=True` call; skipping
        them is exact while the current call captures nothing."""
        collector = self.forwards[0].collector
        if collector is None or collector.get():
            return False
        hooks = (hook for d in self.hook_dicts for hook in d.values())
        return all(getattr(hook, "__module__", None) == _CAPTURE_MODULE for hook in hooks)

    def __repr__(self) -> str:
        return f"FusedEncoderStackForward({self.stack!r})"


def fuse_encoder_stack(encoder: nn.Module, rule: EncoderStackFusion) -> bool:
    """Install `FusedEncoderStackForward` on `encoder` when it has two or more layers and every one got a
    `FusedEncoderForward`. Returns whether it was installed."""
    layers = getattr(encoder, rule.layers, None)
    if not isinstance(layers, nn.ModuleList) or len(layers) < 2:
        return False
    if not all(isinstance(layer.__dict__.get("forward"), FusedEncoderForward) for layer in layers):
        return False
    forwards = [layer.__dict__["forward"] for layer in layers]
    if len({(f.fused.hidden, f.fused.heads, f.fused.head_dim) for f in forwards}) != 1:
        return False
    encoder.__dict__["forward"] = FusedEncoderStackForward(encoder, list(layers), rule)  # not a child module
    return True


__all__ = ["FusedEncoderStackForward", "fuse_encoder_stack"]
