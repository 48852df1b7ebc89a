"""Every fusion rule names a class of the installed transformers whose code does what the rule assumes."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest
import torch

from hf_sparse.integrations.fusion_rules import (
    RULES,
    EmbeddingsFusion,
    EncoderLayerFusion,
    EncoderStackFusion,
    FFNFusion,
    GeluFusion,
    HeadFusion,
    ModelFusion,
    PoolerFusion,
    Siblings,
)


def _class(key: str) -> type:
    module, _, name = key.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _lines(fn) -> list[str]:
    """The statements of a function's body, stripped, without the def line, docstring or comments."""
    body = inspect.getsource(fn).split(":\n", 1)[1]
    lines = [line.strip() for line in body.splitlines()]
    return [line for line in lines if line and not line.startswith(("#", '"""'))]


CASES = [(key, rule) for key, rules in RULES.items() for rule in rules]


@pytest.mark.parametrize(("key", "rule"), CASES, ids=[f"{k.rpartition('.')[2]}-{type(r).__name__}" for k, r in CASES])
def test_rule_matches_the_class(key, rule):
    cls = _class(key)  # raises if transformers renamed or moved it
    if isinstance(rule, Siblings):
        source = inspect.getsource(cls.forward)
        args = {re.search(rf"self\.{m}\((\w+)\)", source).group(1) for m in rule.members}
        assert len(args) == 1, f"{key}: siblings {rule.members} are called on different inputs {args}"
    elif isinstance(rule, GeluFusion):
        lines = _lines(cls.ff_chunk if hasattr(cls, "ff_chunk") else cls.forward)
        i = next(i for i, line in enumerate(lines) if f"self.{rule.linear}(" in line)
        out = lines[i].split(" = ")[0]
        assert lines[i + 1] == f"{out} = self.{rule.act}({out})", f"{key}: {rule.act} does not directly follow"
    elif isinstance(rule, EncoderLayerFusion):
        _check_encoder_layer(key, rule)
    elif isinstance(rule, EncoderStackFusion):
        _check_encoder_stack(key, rule)
    elif isinstance(rule, EmbeddingsFusion):
        _check_embeddings(key, rule)
    elif isinstance(rule, ModelFusion):
        _check_model(key, rule)
    elif isinstance(rule, HeadFusion):
        _check_head(key, rule)
    elif isinstance(rule, PoolerFusion):
        assert _lines(cls.forward) == [
            f"first_token_tensor = hidden_states[:, {rule.token}]",
            f"pooled_output = self.{rule.dense}(first_token_tensor)",
            f"pooled_output = self.{rule.act}(pooled_output)",
            "return pooled_output",
        ]
        module = cls(_class(key.removesuffix("Pooler") + "Config")(hidden_size=8))
        assert type(getattr(module, rule.act)) is torch.nn.Tanh
    else:
        assert isinstance(rule, FFNFusion)
        lines = _lines(getattr(cls, rule.method))
        if rule.method == "feed_forward_chunk":  # BertLayer and its copies
            assert lines == [
                "intermediate_output = self.intermediate(attention_output)",
                "layer_output = self.output(intermediate_output, attention_output)",
                "return layer_output",
            ]
            output_cls = _class(key.removesuffix("Layer") + "Output")
            assert _lines(output_cls.forward) == [  # what _bert_output_tail repeats after the dense
                "hidden_states = self.dense(hidden_states)",
                "hidden_states = self.dropout(hidden_states)",
                "hidden_states = self.LayerNorm(hidden_states + input_tensor)",
                "return hidden_states",
            ]
        else:  # DistilBERT's FFN.ff_chunk
            assert lines == [
                "x = self.lin1(input)",
                "x = self.activation(x)",
                "x = self.lin2(x)",
                "x = self.dropout(x)",
                "return x",
            ]


# What FusedEncoderForward computes in place of these forwards (dropout aside, eval mode):
#   a = LN1(O(attention(Q x, K x, V x, mask)) + x);  y = LN2(FFN(a) + a)
_BERT_LAYER = [
    "self_attention_output, _ = self.attention(", "hidden_states,", "attention_mask,",
    "past_key_values=past_key_values,", "**kwargs,", ")", "attention_output = self_attention_output",
    "if self.is_decoder and encoder_hidden_states is not None:", 'if not hasattr(self, "crossattention"):',
    "raise ValueError(",
    'f"If `encoder_hidden_states` are passed, {self} has to be instantiated with cross-attention layers"',
    '" by setting `config.add_cross_attention=True`"', ")", "cross_attention_output, _ = self.crossattention(",
    "self_attention_output,", "None,  # attention_mask", "encoder_hidden_states,", "encoder_attention_mask,",
    "past_key_values=past_key_values,", "**kwargs,", ")", "attention_output = cross_attention_output",
    "layer_output = apply_chunking_to_forward(",
    "self.feed_forward_chunk, self.chunk_size_feed_forward, self.seq_len_dim, attention_output", ")",
    "return layer_output",
]  # fmt: skip
_BERT_ATTENTION = [
    "attention_mask = attention_mask if not self.is_cross_attention else encoder_attention_mask",
    "attention_output, attn_weights = self.self(", "hidden_states,", "encoder_hidden_states=encoder_hidden_states,",
    "attention_mask=attention_mask,", "past_key_values=past_key_values,", "**kwargs,", ")",
    "attention_output = self.output(attention_output, hidden_states)", "return attention_output, attn_weights",
]  # fmt: skip
_PROJECTIONS = [
    "input_shape = hidden_states.shape[:-1]", "hidden_shape = (*input_shape, -1, self.attention_head_size)",
    "query_layer = self.{q}(hidden_states).view(*hidden_shape).transpose(1, 2)",
    "key_layer = self.{k}(hidden_states).view(*hidden_shape).transpose(1, 2)",
    "value_layer = self.{v}(hidden_states).view(*hidden_shape).transpose(1, 2)",
]  # fmt: skip
_CACHE = [
    "if past_key_values is not None:", "current_past_key_values = past_key_values",
    "if isinstance(past_key_values, EncoderDecoderCache):",
    "current_past_key_values = past_key_values.self_attention_cache",
    "key_layer, value_layer = current_past_key_values.update(key_layer, value_layer, self.layer_idx)",
]  # fmt: skip
_INTERFACE = [
    "attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(",
    "self.config._attn_implementation, eager_attention_forward", ")", "attn_output, attn_weights = attention_interface(",
    "self,", "query_layer,", "key_layer,", "value_layer,", "attention_mask,",
    "dropout=0.0 if not self.training else self.dropout.p,", "scaling=self.scaling,", "**kwargs,", ")",
    "attn_output = attn_output.reshape(*input_shape, -1).contiguous()",
]  # fmt: skip
_EAGER = [
    "if scaling is None:", "scaling = query.size(-1) ** -0.5",
    "attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling", "if attention_mask is not None:",
    "attn_weights = attn_weights + attention_mask", "attn_weights = nn.functional.softmax(attn_weights, dim=-1)",
    "attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)",
    "attn_output = torch.matmul(attn_weights, value)", "attn_output = attn_output.transpose(1, 2).contiguous()",
    "return attn_output, attn_weights",
]  # fmt: skip
_RESIDUAL_NORM = [
    "hidden_states = self.dense(hidden_states)", "hidden_states = self.dropout(hidden_states)",
    "hidden_states = self.LayerNorm(hidden_states + input_tensor)", "return hidden_states",
]  # fmt: skip
_DISTILBERT_BLOCK = [
    "attention_output, _ = self.attention(", "hidden_states,", "attention_mask=attention_mask,", "**kwargs,", ")",
    "attention_output = self.sa_layer_norm(attention_output + hidden_states)",
    "ffn_output = self.ffn(attention_output)", "ffn_output = self.output_layer_norm(ffn_output + attention_output)",
    "return ffn_output",
]  # fmt: skip


def _check_encoder_layer(key: str, rule: EncoderLayerFusion) -> None:
    layer, attention = _class(key), _class(rule.attention_class)
    q, k, v = (path.rpartition(".")[2] for path in rule.qkv)
    projections = [line.format(q=q, k=k, v=v) for line in _PROJECTIONS]
    eager = importlib.import_module(attention.__module__).eager_attention_forward
    assert _lines(eager) == _EAGER, f"{key}: the eager attention is not softmax(q k^T * scaling + mask) v"
    if key.endswith("TransformerBlock"):  # DistilBERT: the output projection is inside the attention module
        assert _lines(layer.forward) == _DISTILBERT_BLOCK
        assert _lines(attention.forward) == [*projections, *_INTERFACE, "attn_output = self.out_lin(attn_output)",
                                             "return attn_output, attn_weights"]  # fmt: skip
        assert _lines(_class(key.rpartition(".")[0] + ".FFN").forward) == [
            "return apply_chunking_to_forward(self.ff_chunk, self.chunk_size_feed_forward, self.seq_len_dim, input)"
        ]
        return
    prefix = key.removesuffix("Layer")
    assert _lines(layer.forward) == _BERT_LAYER
    assert _lines(layer.feed_forward_chunk) == [
        "intermediate_output = self.intermediate(attention_output)",
        "layer_output = self.output(intermediate_output, attention_output)",
        "return layer_output",
    ]
    assert _lines(_class(prefix + "Attention").forward) == _BERT_ATTENTION
    assert _lines(attention.forward) == [*projections, *_CACHE, *_INTERFACE, "return attn_output, attn_weights"]
    assert _lines(_class(prefix + "SelfOutput").forward) == _RESIDUAL_NORM
    assert _lines(_class(prefix + "Output").forward) == _RESIDUAL_NORM


# What FusedEncoderStackForward computes in place of these forwards: the layers chained, then rule.output(h)
_BERT_ENCODER = [
    "for i, layer_module in enumerate(self.layer):", "hidden_states = layer_module(", "hidden_states,",
    "attention_mask,", "encoder_hidden_states,  # as a positional argument for gradient checkpointing",
    "encoder_attention_mask=encoder_attention_mask,", "past_key_values=past_key_values,", "**kwargs,", ")",
    "return BaseModelOutputWithPastAndCrossAttentions(", "last_hidden_state=hidden_states,",
    "past_key_values=past_key_values if use_cache else None,", ")",
]  # fmt: skip
_DISTILBERT_TRANSFORMER = [
    "for layer_module in self.layer:", "hidden_states = layer_module(", "hidden_states,", "attention_mask,",
    "**kwargs,", ")", "return BaseModelOutput(last_hidden_state=hidden_states)",
]  # fmt: skip


def _check_encoder_stack(key: str, rule: EncoderStackFusion) -> None:
    distilbert = key.endswith(".Transformer")
    expected = _DISTILBERT_TRANSFORMER if distilbert else _BERT_ENCODER
    assert rule.layers == "layer" and _lines(_class(key).forward) == expected, f"{key}: not a plain chain of layers"
    h = torch.ones(1)
    out = rule.output(h)  # the class's return value without a cache
    assert type(out).__name__ == ("BaseModelOutput" if distilbert else "BaseModelOutputWithPastAndCrossAttentions")
    assert out.last_hidden_state is h and getattr(out, "past_key_values", None) is None


# What FusedEmbeddingsForward computes for these forwards (eval mode, ids given):
#   LN(word(ids) + type(types) + position(positions)), positions and default types as below
_TYPES = [
    "if token_type_ids is None:", 'if hasattr(self, "token_type_ids"):', "{buffer}",
    "buffered_token_type_ids = torch.gather(buffered_token_type_ids, dim=1, index=position_ids)",
    "token_type_ids = buffered_token_type_ids.expand(batch_size, seq_length)", "else:",
    "token_type_ids = torch.zeros(input_shape, dtype=torch.long, device=self.position_ids.device)",
    "if inputs_embeds is None:", "inputs_embeds = self.word_embeddings(input_ids)",
    "token_type_embeddings = self.token_type_embeddings(token_type_ids)",
    "embeddings = inputs_embeds + token_type_embeddings",
    "position_embeddings = self.position_embeddings(position_ids)", "embeddings = embeddings + position_embeddings",
    "embeddings = self.LayerNorm(embeddings)", "embeddings = self.dropout(embeddings)", "return embeddings",
]  # fmt: skip
_SHAPE = [
    "if input_ids is not None:", "input_shape = input_ids.size()", "else:", "input_shape = inputs_embeds.size()[:-1]",
    "batch_size, seq_length = input_shape",
]  # fmt: skip
_BERT_EMBEDDINGS = [
    *_SHAPE, "if position_ids is None:",
    "position_ids = self.position_ids[:, past_key_values_length : seq_length + past_key_values_length]",
    *(line.format(buffer="buffered_token_type_ids = self.token_type_ids.expand(position_ids.shape[0], -1)")
      for line in _TYPES),
]  # fmt: skip
_ROBERTA_EMBEDDINGS = [
    "if position_ids is None:", "if input_ids is not None:", "position_ids = self.create_position_ids_from_input_ids(",
    "input_ids, self.padding_idx, past_key_values_length", ")", "else:",
    "position_ids = self.create_position_ids_from_inputs_embeds(inputs_embeds, self.padding_idx)", *_SHAPE,
    *(line.format(buffer="buffered_token_type_ids = "
                  "self.token_type_ids.to(position_ids.device).expand(position_ids.shape[0], -1)") for line in _TYPES),
]  # fmt: skip
_ROBERTA_POSITIONS = [  # what the kernel computes from the ids (hf_sparse.ops.embeddings.roberta_positions)
    "mask = input_ids.ne(padding_idx).int()",
    "incremental_indices = (torch.cumsum(mask, dim=1).type_as(mask) + past_key_values_length) * mask",
    "return incremental_indices.long() + padding_idx",
]
_DISTILBERT_EMBEDDINGS = [
    "if input_ids is not None:", "inputs_embeds = self.word_embeddings(input_ids)  # (bs, max_seq_length, dim)",
    "seq_length = inputs_embeds.size(1)", "if position_ids is None:", 'if hasattr(self, "position_ids"):',
    "position_ids = self.position_ids[:, :seq_length]", "else:",
    "position_ids = torch.arange(seq_length, dtype=torch.long, device=input_ids.device)  # (max_seq_length)",
    "position_ids = position_ids.unsqueeze(0).expand_as(input_ids)  # (bs, max_seq_length)",
    "position_embeddings = self.position_embeddings(position_ids)  # (bs, max_seq_length, dim)",
    "embeddings = inputs_embeds + position_embeddings  # (bs, max_seq_length, dim)",
    "embeddings = self.LayerNorm(embeddings)  # (bs, max_seq_length, dim)",
    "embeddings = self.dropout(embeddings)  # (bs, max_seq_length, dim)", "return embeddings",
]  # fmt: skip


def _check_embeddings(key: str, rule: EmbeddingsFusion) -> None:
    cls = _class(key)
    assert tuple(inspect.signature(cls.forward).parameters)[1:] == rule.params, f"{key}: parameters changed"
    if rule.token_type is None:
        expected = _DISTILBERT_EMBEDDINGS
    elif rule.positions == "padding":
        expected = _ROBERTA_EMBEDDINGS
        body = _lines(cls.create_position_ids_from_input_ids)  # (after a docstring _lines keeps)
        assert body[-3:] == _ROBERTA_POSITIONS and "return" not in "".join(body[:-3]), f"{key}: positions changed"
    else:
        expected = _BERT_EMBEDDINGS
    assert _lines(cls.forward) == expected, f"{key}: not the embeddings the fused kernel computes"


# What FusedModelForward repeats (for calls without cache, cross-attention or inputs_embeds) and skips (the
# decorators' work and, without padding, the mask, which transformers' sdpa and eager mask functions make None)
_BERT_MODEL = [
    "if (input_ids is None) ^ (inputs_embeds is not None):",
    'raise ValueError("You must specify exactly one of input_ids or inputs_embeds")', "if self.config.is_decoder:",
    "use_cache = use_cache if use_cache is not None else self.config.use_cache", "else:", "use_cache = False",
    "if use_cache and past_key_values is None:", "past_key_values = (",
    "EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))",
    "if encoder_hidden_states is not None or self.config.is_encoder_decoder", "else DynamicCache(config=self.config)",
    ")", "past_key_values_length = past_key_values.get_seq_length() if past_key_values is not None else 0",
    "embedding_output = self.embeddings(", "input_ids=input_ids,", "position_ids=position_ids,",
    "token_type_ids=token_type_ids,", "inputs_embeds=inputs_embeds,",
    "past_key_values_length=past_key_values_length,", ")",
    "attention_mask, encoder_attention_mask = self._create_attention_masks(", "attention_mask=attention_mask,",
    "encoder_attention_mask=encoder_attention_mask,", "embedding_output=embedding_output,",
    "encoder_hidden_states=encoder_hidden_states,", "past_key_values=past_key_values,", ")",
    "encoder_outputs = self.encoder(", "embedding_output,", "attention_mask=attention_mask,",
    "encoder_hidden_states=encoder_hidden_states,", "encoder_attention_mask=encoder_attention_mask,",
    "past_key_values=past_key_values,", "use_cache=use_cache,", "position_ids=position_ids,", "**kwargs,", ")",
    "sequence_output = encoder_outputs.last_hidden_state",
    "pooled_output = self.pooler(sequence_output) if self.pooler is not None else None",
    "return BaseModelOutputWithPoolingAndCrossAttentions(", "last_hidden_state=sequence_output,",
    "pooler_output=pooled_output,", "past_key_values=encoder_outputs.past_key_values,", ")",
]  # fmt: skip
_BERT_MODEL_MASKS = [
    "if self.config.is_decoder:", "attention_mask = create_causal_mask(", "config=self.config,",
    "inputs_embeds=embedding_output,", "attention_mask=attention_mask,", "past_key_values=past_key_values,", ")",
    "else:", "attention_mask = create_bidirectional_mask(", "config=self.config,", "inputs_embeds=embedding_output,",
    "attention_mask=attention_mask,", ")", "if encoder_attention_mask is not None:",
    "encoder_attention_mask = create_bidirectional_mask(", "config=self.config,", "inputs_embeds=embedding_output,",
    "attention_mask=encoder_attention_mask,", "encoder_hidden_states=encoder_hidden_states,", ")",
    "return attention_mask, encoder_attention_mask",
]  # fmt: skip


def _check_model(key: str, rule: ModelFusion) -> None:
    cls = _class(key)
    assert tuple(inspect.signature(cls.forward).parameters)[1:] == (*rule.params, "kwargs"), f"{key}: parameters"
    decorators = [line.strip() for line in inspect.getsource(cls.forward).splitlines() if line.strip()[:1] == "@"]
    assert decorators == ["@merge_with_config_defaults", "@capture_outputs", "@auto_docstring"], key
    assert _lines(cls.forward) == _BERT_MODEL, f"{key}: not the forward FusedModelForward repeats"
    assert _lines(cls._create_attention_masks) == _BERT_MODEL_MASKS, f"{key}: masks made another way"
    assert (rule.embeddings, rule.encoder, rule.pooler) == ("embeddings", "encoder", "pooler")
    h, pooled = torch.ones(1), torch.zeros(1)
    out = rule.output(h, pooled, None)
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert out.last_hidden_state is h and out.pooler_output is pooled and out.past_key_values is None


def _check_head(key: str, rule: HeadFusion) -> None:
    """BertForSequenceClassification.forward: what FusedHeadForward repeats without labels, under
    `can_return_tuple` (its wrapper's code checked too: FusedHeadForward resolves return_dict the same way)."""
    cls = _class(key)
    forward = cls.forward
    assert forward.__code__.co_qualname.startswith("can_return_tuple"), forward.__code__.co_qualname
    assert _lines(forward.__code__) == [
        'return_dict = self.config.return_dict if hasattr(self, "config") else True',
        'return_dict_passed = kwargs.pop("return_dict", return_dict)',
        "if return_dict_passed is not None:",
        "return_dict = return_dict_passed",
        "output = func(self, *args, **kwargs)",
        "if not return_dict and not isinstance(output, tuple):",
        "output = output.to_tuple()",
        "return output",
    ]
    params = list(inspect.signature(inspect.unwrap(forward)).parameters)
    assert tuple(params[1 : len(rule.params) + 1]) == rule.params and params[-1] == "kwargs"
    body = _lines(inspect.unwrap(forward))
    assert body[:16] == [
        f"outputs = self.{rule.base}(", "input_ids,", "attention_mask=attention_mask,",
        "token_type_ids=token_type_ids,", "position_ids=position_ids,", "inputs_embeds=inputs_embeds,",
        "return_dict=True,", "**kwargs,", ")", "pooled_output = outputs[1]",
        f"pooled_output = self.{rule.dropout}(pooled_output)", f"logits = self.{rule.classifier}(pooled_output)",
        "loss = None", "if labels is not None:", "if self.config.problem_type is None:", "if self.num_labels == 1:",
    ]  # fmt: skip
    assert body[-6:] == [
        "return SequenceClassifierOutput(", "loss=loss,", "logits=logits,", "hidden_states=outputs.hidden_states,",
        "attentions=outputs.attentions,", ")",
    ]  # fmt: skip
