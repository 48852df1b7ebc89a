"""Which transformers modules let the backend fuse work, keyed by their exact class (never guessed from names).

Nine kinds of rule, each checked against the class's source when it was added (and by the tests):

- `GeluFusion`: the module computes `act(linear(x))` with nothing in between, and `act` is the exact (erf) GELU.
  The Linear is packed with `activation="gelu"` (the kernel's epilogue computes it) and `act` becomes Identity.
- `Siblings`: the module calls these child Linears one after the other on the very same input tensor. They are
  packed side by side (`hf_sparse.nn.SiblingGroup`): one activation quantization, one kernel call.
- `FFNFusion`: the module's `method(x)` is `tail(second(act(first(x))), x)`. When the GELU is fused into `first`
  and both Linears run an int8 sparse kernel (4-block or CSR), that method is replaced, on the instance, by one
  call of the fused FFN kernel (`hf_sparse.ops.fuse_ffn`: the hidden activations never leave the kernel) followed
  by `tail`, which repeats the rest of the original code. The submodules keep working on their own; only this path is fused.
- `EncoderLayerFusion`: the layer's eval forward is a post-LayerNorm encoder layer, `LN2(FFN(a) + a)` with
  `a = LN1(O(self_attention(QKV(x), mask)) + x)`. Its `forward` is replaced on the instance by a
  `hf_sparse.integrations.encoder_layer.FusedEncoderForward`: one call of six kernel steps (`hf_sparse.nn.FusedEncoderLayer`)
  whenever the call is one the fast path computes, the class's forward otherwise (always with
  `HF_SPARSE_ATTENTION=fp32`: the fused layer's attention rounds Q, K, V and the probabilities to bfloat16).
- `EncoderStackFusion`: the module's forward only chains its layers (`h = layer(h, mask, ...)` for each, nothing
  in between) and wraps the last `h` in an output object. When every layer got a `FusedEncoderForward`, its
  `forward` is replaced on the instance by a `hf_sparse.integrations.encoder_stack.FusedEncoderStackForward`: all
  the layers in one kernel call (`hf_sparse.nn.FusedEncoderStack`) when every layer's fast path would run, the
  class's forward (the layers one by one) otherwise.

- `EmbeddingsFusion`: the module's eval forward is `dropout(norm(word(ids) + type(types) + position(positions)))`
  with positions and default token types from its buffers. Its `forward` is replaced on the instance by a
  `hf_sparse.integrations.embeddings.FusedEmbeddingsForward`: one kernel call (`hf_sparse.ops.embed_layernorm`)
  when the call is one it computes (ids given, eval mode, no hooks inside), the class's forward otherwise.

- `ModelFusion`: a base model whose forward is BertModel's: embeddings, the attention mask, the encoder, the
  pooler, an output object, under transformers' config-default and output-capturing decorators. When its encoder
  got a `FusedEncoderStackForward`, its `forward` is replaced on the instance by a
  `hf_sparse.integrations.model_forward.FusedModelForward`: the same module calls without the decorators' and the
  mask's code when the call needs neither (no padding, nothing captured), the class's forward otherwise.

- `PoolerFusion`: the module's forward is `act(dense(hidden_states[:, 0]))` with `act` an `nn.Tanh`. The tanh is
  fused into the Linear's epilogue (as for `GeluFusion`), and the module's `forward` is replaced on the instance by
  a `hf_sparse.integrations.pooler.FusedPoolerForward`: one kernel call reading each sequence's first token in
  place, the class's forward whenever that would not give the same result.

- `HeadFusion`: a sequence-classification model whose forward is BertForSequenceClassification's:
  `classifier(dropout(base(...).pooler_output))`, a loss when labels are given, an output object, under
  transformers' `can_return_tuple`. When its base model got a `FusedModelForward`, its `forward` is replaced on the
  instance by a `hf_sparse.integrations.head_forward.FusedHeadForward`: the same module calls without the base
  model's output object and `__call__` when nothing else would run in them, the class's forward otherwise.

A class is named by `module.qualname` so that no modeling file is imported to build the table, and subclasses (which
may override `forward`) never match. New architectures are one line each.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GeluFusion:
    """`act(linear(x))`: `linear` and `act` are the names of the two child modules."""

    linear: str
    act: str


@dataclass(frozen=True)
class Siblings:
    """Child Linears called in a row on the same input."""

    members: tuple[str, ...]


@dataclass(frozen=True)
class FFNFusion:
    """`module.<method>(x)` = `tail(module, second(act(first(x))), x)`; first / act / second are submodule paths."""

    method: str
    first: str
    act: str
    second: str
    tail: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EncoderLayerFusion:
    """Submodule paths of a post-LayerNorm encoder layer, and what the fast path reads from its self-attention.

    attention / attention_class: the self-attention module and its exact class (never a cross-attention);
    qkv: its Q, K, V Linears; out: the attention-output Linear; norm1: the LayerNorm after the attention;
    first / act / second: the FFN; norm2: the LayerNorm after it; heads / scaling: attribute names on the
    attention module (number of heads, the factor on q . k)."""

    attention: str
    attention_class: str
    qkv: tuple[str, str, str]
    out: str
    norm1: str
    first: str
    act: str
    second: str
    norm2: str
    heads: str = "num_attention_heads"
    scaling: str = "scaling"


class FusedFeedForward:
    """Stands in for an FFN method on one module instance: the fused kernel, then the rule's tail. Not a Module (it
    must not become a child); `dequantize_model` removes it, which brings the class's method back."""

    def __init__(self, module: nn.Module, ffn, tail: Callable):
        self.module, self.ffn, self.tail = module, ffn, tail

    def __deepcopy__(self, memo):  # the copied module, the same (never modified) packed weights
        return FusedFeedForward(copy.deepcopy(self.module, memo), self.ffn, self.tail)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # one argument: transformers' chunking inspects it
        y = self.ffn(x)
        return self.tail(self.module, y if y.dtype is x.dtype else y.to(x.dtype), x)

    def __repr__(self) -> str:
        return f"FusedFeedForward({self.ffn!r})"


def _bert_output_tail(layer: nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # BertOutput.forward after its dense: dropout, then LayerNorm of the residual sum
    return layer.output.LayerNorm(layer.output.dropout(y) + x)


def _distilbert_ffn_tail(ffn: nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # DistilBERT's FFN.ff_chunk after lin2
    return ffn.dropout(y)


def class_key(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


_TF = "transformers.models"
_QKV = Siblings(("query", "key", "value"))
_PROJ_QKV = Siblings(("q_proj", "k_proj", "v_proj"))
_GATE_UP = Siblings(("gate_proj", "up_proj"))
_INTERMEDIATE = GeluFusion("dense", "intermediate_act_fn")
_BERT_FFN = FFNFusion(
    "feed_forward_chunk", "intermediate.dense", "intermediate.intermediate_act_fn", "output.dense", _bert_output_tail
)


@dataclass(frozen=True)
class EncoderStackFusion:
    """An encoder whose forward chains the layers in `layers` (an nn.ModuleList attribute) and returns
    `output(last hidden states)`."""

    layers: str
    output: Callable[[torch.Tensor], object]


@dataclass(frozen=True)
class EmbeddingsFusion:
    """An embedding module: `dropout(norm(word(input_ids) + token_type(token_type_ids) + position(position_ids)))`.

    params: the forward's parameters in order (positional arguments are matched to them); word / position /
    token_type (None: no token types) / norm / dropout: child module names. positions: where position ids come
    from when the call gives none: "buffer" (the `position_ids` buffer from `past_key_values_length` on, BERT) or
    "padding" (RoBERTa's count of non-padding ids from `padding_idx`). Token types the call does not give come
    from the `token_type_ids` buffer at each token's position."""

    params: tuple[str, ...]
    positions: str = "buffer"
    word: str = "word_embeddings"
    position: str = "position_embeddings"
    token_type: str | None = "token_type_embeddings"
    norm: str = "LayerNorm"
    dropout: str = "dropout"


_BERT_EMBEDDINGS_PARAMS = ("input_ids", "token_type_ids", "position_ids", "inputs_embeds", "past_key_values_length")


def _encoder_output(h: torch.Tensor):
    # BertEncoder.forward's return value when no cache is used (past_key_values=None)
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=h, past_key_values=None)


def _distilbert_output(h: torch.Tensor):
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=h)


@dataclass(frozen=True)
class ModelFusion:
    """A base model: `params` its forward's parameters in order; embeddings / encoder / pooler (None: none) child
    module names; `output(last hidden state, pooled, past_key_values)` the forward's return value."""

    params: tuple[str, ...]
    output: Callable[[torch.Tensor, torch.Tensor | None, object], object]
    embeddings: str = "embeddings"
    encoder: str = "encoder"
    pooler: str | None = "pooler"


@dataclass(frozen=True)
class PoolerFusion:
    """`act(dense(hidden_states[:, token]))`, `act` an `nn.Tanh`: dense / act are child module names."""

    dense: str = "dense"
    act: str = "activation"
    token: int = 0


@dataclass(frozen=True)
class HeadFusion:
    """A classification head around a base model: `params` its forward's parameters in order; base / dropout /
    classifier child module names; `output(logits)` the forward's return value without labels."""

    params: tuple[str, ...]
    output: Callable[[torch.Tensor], object]
    base: str = "bert"
    dropout: str = "dropout"
    classifier: str = "classifier"


def _sequence_classifier_output(logits: torch.Tensor):
    # BertForSequenceClassification.forward's return value without labels (nothing captured)
    from transformers.modeling_outputs import SequenceClassifierOutput

    return SequenceClassifierOutput(loss=None, logits=logits, hidden_states=None, attentions=None)


_BERT_HEAD_PARAMS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels")


_BERT_MODEL_PARAMS = (
    "input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "encoder_hidden_states",
    "encoder_attention_mask", "past_key_values", "use_cache",
)  # fmt: skip


def _bert_model_output(hidden: torch.Tensor, pooled: torch.Tensor | None, past):
    # BertModel.forward's return value
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    return BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=hidden, pooler_output=pooled, past_key_values=past
    )


Rule = (
    GeluFusion | Siblings | FFNFusion | EncoderLayerFusion | EncoderStackFusion | EmbeddingsFusion | ModelFusion
    | PoolerFusion | HeadFusion
)  # fmt: skip
#: exact class -> rules
RULES: dict[str, tuple[Rule, ...]] = {}


def register_rules(qualified_class_name: str, *rules: Rule) -> None:
    """Add rules for a class, named `module.qualname` (e.g. "transformers.models.bert.modeling_bert.BertIntermediate").
    Check its forward first: a wrong GeluFusion changes results."""
    RULES[qualified_class_name] = tuple(RULES.get(qualified_class_name, ())) + rules


for _family, _prefix in [
    ("bert", "Bert"),
    ("roberta", "Roberta"),
    ("xlm_roberta", "XLMRoberta"),
    ("camembert", "Camembert"),
    ("electra", "Electra"),
]:
    register_rules(f"{_TF}.{_family}.modeling_{_family}.{_prefix}SelfAttention", _QKV)
    register_rules(f"{_TF}.{_family}.modeling_{_family}.{_prefix}Intermediate", _INTERMEDIATE)
    _module = f"{_TF}.{_family}.modeling_{_family}"
    register_rules(f"{_module}.{_prefix}Encoder", EncoderStackFusion("layer", _encoder_output))
    if _family != "electra":  # (ElectraModel's forward projects the embeddings and has no pooler)
        register_rules(f"{_module}.{_prefix}Model", ModelFusion(_BERT_MODEL_PARAMS, _bert_model_output))
        register_rules(f"{_module}.{_prefix}Pooler", PoolerFusion())
    _positions = "buffer" if _family in ("bert", "electra") else "padding"
    register_rules(f"{_module}.{_prefix}Embeddings", EmbeddingsFusion(_BERT_EMBEDDINGS_PARAMS, _positions))
    register_rules(
        f"{_module}.{_prefix}Layer",
        _BERT_FFN,
        EncoderLayerFusion(
            "attention.self",
            f"{_module}.{_prefix}SelfAttention",
            ("attention.self.query", "attention.self.key", "attention.self.value"),
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "intermediate.intermediate_act_fn",
            "output.dense",
            "output.LayerNorm",
        ),  # fmt: skip
    )
register_rules(
    f"{_TF}.bert.modeling_bert.BertForSequenceClassification",
    HeadFusion(_BERT_HEAD_PARAMS, _sequence_classifier_output),
)
register_rules(f"{_TF}.distilbert.modeling_distilbert.DistilBertSelfAttention", Siblings(("q_lin", "k_lin", "v_lin")))
register_rules(
    f"{_TF}.distilbert.modeling_distilbert.FFN",
    GeluFusion("lin1", "activation"),
    FFNFusion("ff_chunk", "lin1", "activation", "lin2", _distilbert_ffn_tail),
)
register_rules(
    f"{_TF}.distilbert.modeling_distilbert.TransformerBlock",
    EncoderLayerFusion(
        "attention",
        f"{_TF}.distilbert.modeling_distilbert.DistilBertSelfAttention",
        ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
        "attention.out_lin",
        "sa_layer_norm",
        "ffn.lin1",
        "ffn.activation",
        "ffn.lin2",
        "output_layer_norm",
        heads="n_heads",
    ),  # fmt: skip
)
register_rules(f"{_TF}.distilbert.modeling_distilbert.Transformer", EncoderStackFusion("layer", _distilbert_output))
register_rules(
    f"{_TF}.distilbert.modeling_distilbert.Embeddings",
    EmbeddingsFusion(("input_ids", "inputs_embeds", "position_ids"), token_type=None),
)
for _family, _prefix in [("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2")]:
    register_rules(f"{_TF}.{_family}.modeling_{_family}.{_prefix}Attention", _PROJ_QKV)
    register_rules(f"{_TF}.{_family}.modeling_{_family}.{_prefix}MLP", _GATE_UP)


def is_exact_gelu(act: nn.Module) -> bool:
    """The erf GELU the kernels fuse: transformers' `GELUActivation` on `F.gelu`, or `nn.GELU(approximate="none")`.
    The tanh approximations and the Python GELU variants are not fused (their results differ in the last bits)."""
    if type(act) is nn.GELU:
        return act.approximate == "none"
    cls = type(act)
    if f"{cls.__module__}.{cls.__qualname__}" == "transformers.activations.GELUActivation":
        return getattr(act, "act", None) is F.gelu
    return False


def rules_for(module: nn.Module) -> tuple[Rule, ...]:
    return RULES.get(class_key(module), ())
