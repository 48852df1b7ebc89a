"""Base models whose glue around a fused encoder is cut short (`ModelFusion` rules): installing it, and when it runs.

Once the embeddings and the encoder run on the kernels, what is left of a batch-1 BERT-base forward outside them is
transformers' own code around the encoder: the forward's decorators (config defaults, output capturing) and the
attention mask, built through the mask interface even when no token is padded. After the encoder's one kernel call
has streamed the model's weights through the caches, every object that code touches is a cache miss: skipping it
saves ~0.16 ms of an ~8.6 ms BERT-base forward at batch 1 (`benchmarks/RESULTS.md`, "The base model's glue").
`pack_model` replaces the `forward` of a base model instance (BertModel, RobertaModel...) whose encoder got a
`FusedEncoderStackForward` by a `FusedModelForward`, which makes the same module calls in the same order with the
same arguments, and takes the mask transformers would build (None) without building it when no token is padded
(padded batches get the class's mask). It runs only for calls whose result it reproduces exactly; everything else
(caches, cross-attention, captured outputs, other attention implementations, compiling) goes to the class's
forward.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from ..ops import _extension as ext
from .encoder_layer import _collector
from .encoder_stack import FusedEncoderStackForward
from .fusion_rules import ModelFusion


def _mask_functions() -> tuple[dict | None, dict]:
    """(transformers' mask registry, the mask functions of "sdpa" and "eager" it ships), or (None, {})."""
    try:
        from transformers import masking_utils
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
    except ImportError:  # pragma: no cover - another transformers layout: never take the fast path
        return None, {}
    if getattr(masking_utils, "_is_torch_xpu_available", True):  # (XPU builds skip masks by other rules)
        return None, {}
    return ALL_MASK_ATTENTION_FUNCTIONS, {"sdpa": sdpa_mask, "eager": eager_mask}


# The keywords the class's output-capturing decorator reads (the fast path takes them only when false)
_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states")


def bind_call(params: tuple[str, ...], names: frozenset[str], args: tuple, kwargs: dict) -> dict | None:
    """A call's arguments by name (`params` in order for the positional ones), or None for a call with more
    positional arguments than `params`, a keyword outside `names` or an argument given twice (a fused forward does
    not take those; the class's forward then does whatever it does with them)."""
    if not args and names.issuperset(kwargs):
        return kwargs
    if len(args) > len(params):
        return None
    call = dict(zip(params, args))
    for key, value in kwargs.items():
        if key not in names or key in call:
            return None
        call[key] = value
    return call


def plain_call(module: nn.Module) -> bool:
    """Whether `module(...)` calls its `forward` and nothing else: no hook on the module nor global ones, not
    compiled by `Module.compile`, `__call__` not overridden."""
    if (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or module._compiled_call_impl is not None
        or type(module).__call__ is not nn.Module.__call__
    ):
        return False
    hooks = _torch_module
    return not (
        hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


def _all_set(mask: torch.Tensor) -> bool:
    """Whether an integer or bool mask has no zero (no padding)."""
    if not mask.is_contiguous():
        return bool(mask.all())
    return ext._C.all_nonzero_raw(mask.data_ptr(), mask.numel(), mask.element_size())


class BoundForward:
    """What a `forward` standing in on one model instance holds: the model, its rule, the argument names its calls
    may use (the rule's parameters, `return_dict`, the output flags) and `calls`, the calls it ran itself."""

    def __init__(self, model: nn.Module, rule):
        self.model, self.rule = model, rule
        self.names = frozenset((*rule.params, "return_dict", *_OUTPUT_FLAGS))
        self.calls = 0

    def __deepcopy__(self, memo):  # the copied model (it may be half-built here: no lookups in it)
        new = copy.copy(self)
        new.model = copy.deepcopy(self.model, memo)
        return new


class FusedModelForward(BoundForward):
    """Stands in for `forward` on one base model instance. Not a Module; `dequantize_model` removes it. `calls`
    counts the calls it ran itself.

    It runs a call when: not compiling or tracing; the arguments are the forward's own (by position or name) plus
    `return_dict` and false `output_attentions` / `output_hidden_states`; `input_ids` given, no `inputs_embeds`,
    cache or cross-attention input; the config is not a decoder's, not causal and captures no outputs; and the mask
    is one transformers' "sdpa" or "eager" mask function (the registry's own) turns into None: none, or one without
    padding. Then: embeddings, encoder, pooler, each through its module's `__call__` (hooks run) with the class's
    arguments, inside the same empty output collector the class's decorator sets; an encoder whose `__call__` would
    run nothing but its FusedEncoderStackForward gives its last hidden state without the output object."""

    def __init__(self, model: nn.Module, rule: ModelFusion):
        super().__init__(model, rule)
        self.registry, self.mask_functions = _mask_functions()
        self.collector = _collector()

    def __call__(self, *args, **kwargs):
        call = self._bind(args, kwargs)
        if call is None or self._call_problem(call) is not None:
            return type(self.model).forward(self.model, *args, **kwargs)
        hidden, pooled, past = self._run(call)
        out = self.rule.output(hidden, pooled, past)
        # (the decorator's default for return_dict: the config's, read at each call)
        return_dict = call.get("return_dict", getattr(self.model.config, "return_dict", True))
        return out.to_tuple() if return_dict is False else out

    def outputs(self, args: tuple, kwargs: dict) -> tuple | None:
        """(last hidden state, pooled output, past key values) of the call `forward(*args, **kwargs)` without its
        output object (for a head around the model whose own forward reads them), or None for a call it does not
        take."""
        call = self._bind(args, kwargs)
        if call is None or self._call_problem(call) is not None:
            return None
        return self._run(call)

    def _run(self, call: dict) -> tuple:
        self.calls += 1
        model, rule = self.model, self.rule
        ids, position_ids = call["input_ids"], call.get("position_ids")
        flags = {k: call[k] for k in _OUTPUT_FLAGS if k in call}  # (the class passes them on to the encoder)
        token = self.collector.set({})  # what the class's output-capturing decorator sets when nothing is captured
        try:
            embedded = getattr(model, rule.embeddings)(
                input_ids=ids,
                position_ids=position_ids,
                token_type_ids=call.get("token_type_ids"),
                inputs_embeds=None,
                past_key_values_length=0,
            )
            mask = call.get("attention_mask")
            if mask is not None and not _all_set(mask):  # padding: the mask the class builds
                mask = model._create_attention_masks(
                    attention_mask=mask,
                    encoder_attention_mask=None,
                    embedding_output=embedded,
                    encoder_hidden_states=None,
                    past_key_values=None,
                )[0]
            else:
                mask = None  # what transformers' sdpa and eager mask functions return without padding
            encoder = getattr(model, rule.encoder)
            rest = {
                "encoder_hidden_states": None,
                "encoder_attention_mask": None,
                "past_key_values": None,
                "use_cache": False,
                "position_ids": position_ids,
                **flags,
            }
            # The encoder's output object is never seen when nothing but its forward runs in its __call__: then the
            # fused forward's last hidden state alone (its output object costs ~0.1 ms cold at batch 1)
            stack = encoder.__dict__.get("forward")
            hidden = None
            if type(stack) is FusedEncoderStackForward and plain_call(encoder):
                hidden = stack.run(embedded, mask, (), rest)
            past = None  # (the fused encoder's, as FusedEncoderStackForward's output has it)
            if hidden is None:
                encoded = encoder(embedded, attention_mask=mask, **rest)
                hidden, past = encoded.last_hidden_state, encoded.past_key_values
            pooler = getattr(model, rule.pooler) if rule.pooler else None
            pooled = pooler(hidden) if pooler is not None else None
        finally:
            self.collector.reset(token)
        return hidden, pooled, past

    def _bind(self, args: tuple, kwargs: dict) -> dict | None:
        return bind_call(self.rule.params, self.names, args, kwargs)

    def why_not(self, *args, **kwargs) -> str | None:
        """None when the fast path takes a call with these arguments, else the reason it does not."""
        call = self._bind(args, kwargs)
        return "arguments the fast path does not take" if call is None else self._call_problem(call)

    def _call_problem(self, call: dict) -> str | None:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return "compiling or tracing"
        ids = call.get("input_ids")
        if type(ids) is not torch.Tensor or ids.dim() != 2:
            return "input_ids: not a (batch, seq) tensor"
        for key in ("inputs_embeds", "encoder_hidden_states", "encoder_attention_mask", "past_key_values"):
            if call.get(key) is not None:
                return f"{key} given"
        config = self.model.config
        if getattr(config, "is_decoder", False) or getattr(config, "is_causal", None) is not None:
            return "decoder or causal config"
        for key in _OUTPUT_FLAGS:
            if call.get(key, getattr(config, key, False)):
                return f"{key}: outputs are captured"
        impl = getattr(config, "_attn_implementation", None)
        if impl not in self.mask_functions or self.registry.get(impl) is not self.mask_functions[impl]:
            return f"attention implementation {impl!r} (or its mask function replaced)"
        mask = call.get("attention_mask")
        if mask is not None and not (
            type(mask) is torch.Tensor
            and mask.shape == ids.shape
            and mask.device == ids.device
            and (mask.dtype is torch.bool or not (mask.is_floating_point() or mask.is_complex()))
        ):
            return "attention_mask: not an integer or bool (batch, seq) tensor like input_ids"
        return None

    def __repr__(self) -> str:
        return f"FusedModelForward({type(self.model).__name__})"


def fuse_model(model: nn.Module, rule: ModelFusion) -> bool:
    """Install `FusedModelForward` on `model` when its encoder runs as one kernel call (a `FusedEncoderStackForward`).
    Returns whether it was installed."""
    encoder = getattr(model, rule.encoder, None)
    if not isinstance(encoder, nn.Module) or not isinstance(encoder.__dict__.get("forward"), FusedEncoderStackForward):
        return False
    if _collector() is None or _mask_functions()[0] is None:
        return False
    model.__dict__["forward"] = FusedModelForward(model, rule)  # an instance attribute, not a child
    return True


__all__ = ["FusedModelForward", "fuse_model"]
