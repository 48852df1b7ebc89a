"""Classification heads around a fused base model (`HeadFusion` rules): installing them, and when they run.

BertForSequenceClassification's forward calls its base model, which builds an output object the head reads one
tensor from, then the dropout (the identity in eval mode) and the classifier, under transformers' `can_return_tuple`.
After the encoder's kernel call every object that code touches is a cache miss. `pack_model` replaces the forward
of a head instance whose base model got a `FusedModelForward` by a `FusedHeadForward`: the base model's pooled output
without its output object or `__call__` (when nothing but its forward would run in it), the dropout skipped when it
is a plain `nn.Dropout` in eval mode, the classifier through its `__call__`, the class's output object. Logits equal
the class's bit for bit; calls with labels (the loss) and everything the base model's fast path does not take run
the class's forward.
"""

from __future__ import annotations

import torch
from torch import nn

from .fusion_rules import HeadFusion
from .model_forward import _OUTPUT_FLAGS, BoundForward, FusedModelForward, bind_call, plain_call


def _identity(dropout: nn.Module) -> bool:
    """Whether calling the module returns its input unchanged: a plain `nn.Dropout` in eval mode (or p = 0)."""
    return (
        type(dropout) is nn.Dropout
        and (not dropout.training or dropout.p == 0)
        and "forward" not in dropout.__dict__
        and plain_call(dropout)
    )


class FusedHeadForward(BoundForward):
    """Stands in for `forward` on one classification model instance. Not a Module; `dequantize_model` removes it.
    `calls` counts the calls it ran itself.

    It runs a call when: the arguments are the forward's own (by position or name) plus `return_dict` and the
    output flags, no labels; the base model still has its `FusedModelForward`, takes the call, and its `__call__`
    would run nothing else (no hooks, not compiled). Then: the base model's pooled output, the dropout (skipped
    when it is the identity), the classifier through its `__call__`, and the class's output object (a tuple when
    `return_dict` is false in the call, or unset there and false in the config, as `can_return_tuple` does)."""

    def __call__(self, *args, **kwargs):
        logits = self._logits(args, kwargs)
        if logits is None:
            return type(self.model).forward(self.model, *args, **kwargs)
        self.calls += 1
        out = self.rule.output(logits)
        return_dict = kwargs.get("return_dict")
        if return_dict is None:
            return_dict = getattr(self.model.config, "return_dict", True)
        return out if return_dict else out.to_tuple()

    def _logits(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        params, model, rule = self.rule.params, self.model, self.rule
        call = bind_call(params, self.names, args, kwargs)
        if call is None or call.get("labels") is not None:
            return None
        modules = model._modules
        base = modules.get(rule.base)
        forward = base.__dict__.get("forward") if base is not None else None
        if type(forward) is not FusedModelForward or not plain_call(base):
            return None
        # the class's call: base(input_ids, attention_mask=..., ..., return_dict=True, **output flags)
        base_kwargs = {key: call.get(key) for key in params[1:] if key != "labels"}
        base_kwargs["return_dict"] = True
        base_kwargs.update((key, call[key]) for key in _OUTPUT_FLAGS if key in call)
        outputs = forward.outputs((call.get(params[0]),), base_kwargs)
        if outputs is None:
            return None
        pooled = outputs[1]
        dropout, classifier = modules.get(rule.dropout), modules.get(rule.classifier)
        if pooled is None or dropout is None or classifier is None:  # (the class's forward raises its own error)
            return None
        if not _identity(dropout):
            pooled = dropout(pooled)
        return classifier(pooled)

    def __repr__(self) -> str:
        return f"FusedHeadForward({type(self.model).__name__})"


def fuse_head(model: nn.Module, rule: HeadFusion) -> bool:
    """Install `FusedHeadForward` on `model` when its base model got a `FusedModelForward`. Returns whether it was
    installed."""
    base = getattr(model, rule.base, None)
    if not isinstance(base, nn.Module) or not isinstance(base.__dict__.get("forward"), FusedModelForward):
        return False
    model.__dict__["forward"] = FusedHeadForward(model, rule)  # an instance attribute, not a child
    return True


__all__ = ["FusedHeadForward", "fuse_head"]
