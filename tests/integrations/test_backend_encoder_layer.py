"""Whole encoder layers on the kernels: where they are installed, what they compute, and every fallback.

A fused layer computes what the layer's own forward on the kernels computes (the backend before this fusion),
except the attention's bfloat16 rounding (docs/kernels.md, "Attention") and the LayerNorms' summation order:
logits agree within ATTENTION_TOL of the largest logit with the module path, and within 1e-5 with the int8 reference
whose attention computes the kernel's numerics (`kernel_reference`). Whenever an assumption of the fast path fails,
the layer's own forward runs, and the output is then bit for bit the module path's; HF_SPARSE_ATTENTION=fp32 (or
`ops.set_attention_precision("fp32")`) is one such case, and its logits match the int8 reference with torch's
float32 attention within 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from hf_sparse import ops
from hf_sparse.integrations.embeddings import FusedEmbeddingsForward
from hf_sparse.integrations.encoder_layer import FusedEncoderForward
from hf_sparse.nn import FusedEncoderLayer
from hf_sparse.ops import attention_int8_reference, attention_reference
from tests.integrations.backend_support import (
    WORDS,
    assert_close,
    bert_config,
    dense_reference,
    int8_reference,
    prune,
    save,
)


pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="the fused layer runs with the C++ kernels")

# Of the largest logit: bf16 attention against the module path's fp32 SDPA (measured ~1e-3 on these models).
ATTENTION_TOL = 1e-2
IDS = torch.randint(5, len(WORDS), (3, 11), generator=torch.Generator().manual_seed(1))
MASK = torch.ones(3, 11, dtype=torch.long)
MASK[1, 7:] = 0  # padding in one sequence


def _load(tmp_path, model, pattern="4-block", **options):
    recipe = prune(model, pattern)
    folder = save(model, tmp_path / "m", recipe, weight_dtype="int8", **options)
    return AutoModelForSequenceClassification.from_pretrained(folder), folder


def _unfused(model, embeddings: bool = False):
    """The same loaded model with every layer's own forward (the module path): a deep copy without the layer and
    encoder fusions; the fused embeddings stay (they are not what these tests are about) unless `embeddings`."""
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if embeddings or not isinstance(vars(m).get("forward"), FusedEmbeddingsForward):
            m.__dict__.pop("forward", None)
    return plain


def _layers(model):
    return [m for m in model.modules() if isinstance(vars(m).get("forward"), FusedEncoderForward)]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    torch.manual_seed(0)
    config = bert_config(num_attention_heads=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model, folder = _load(tmp_path_factory.mktemp("layer"), BertForSequenceClassification(config).eval())
    return model, folder


def logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK, **kwargs).logits


def test_every_layer_runs_as_six_kernel_calls(bert):
    model, folder = bert
    layers = _layers(model)
    assert len(layers) == 2 and all(isinstance(layer.forward.fused, FusedEncoderLayer) for layer in layers)
    calls = {kind: sum(ops.kernel_calls(kind).values()) for kind in ("linear", "attention", "layernorm")}
    out = logits(model)
    done = {kind: sum(ops.kernel_calls(kind).values()) - n for kind, n in calls.items()}
    # per layer: QKV, attention output, FFN (pooler and classifier are not converted); one attention; two LayerNorms
    assert done == {"linear": 2 * 3, "attention": 2, "layernorm": 4}, done
    assert_close(out, logits(_unfused(model)), ATTENTION_TOL, "fused vs module path")
    assert_close(out, logits(kernel_reference(folder, BertForSequenceClassification)), 1e-5, "vs kernel reference")
    # the runtime layer alone against its pure-torch reference (int8 numerics, bf16 attention numerics)
    layer = layers[0]
    x = torch.randn(2, 9, 36)
    assert_close(layer.forward.fused(x), layer.forward.fused.reference(x), 1e-4, "FusedEncoderLayer vs reference")


def test_long_batches_run_in_chunks_of_sequences(bert):
    model, _ = bert
    fused = _layers(model)[0].forward.fused
    x = torch.randn(5, 13, 36)
    whole = fused(x)
    fused.chunk_tokens = 26  # two sequences per chunk, the last chunk holding one
    try:
        assert torch.equal(fused(x), whole)
        mask = torch.rand(5, 1, 13, 13) > 0.3
        chunked = fused(x, mask)
    finally:
        fused.chunk_tokens = 1 << 20
    assert torch.equal(chunked, fused(x, mask)), "a chunk must read its own sequences' mask rows"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_both_transformers_attention_paths_and_masks(bert, attn):
    model, _ = bert
    model.set_attn_implementation(attn)
    try:
        layer = _layers(model)[0]
        x = torch.randn(3, 11, 36)
        assert layer.forward.why_not(x, None) is None
        with torch.no_grad():
            out = logits(model)
        assert_close(out, logits(_unfused(model)), ATTENTION_TOL, f"{attn} masks")
    finally:
        model.set_attn_implementation("sdpa")


def _reason(layer, x, mask=None, *args, **kwargs):
    return layer.forward.why_not(x, mask, args, kwargs)


def test_fallbacks_name_their_reason(bert, monkeypatch):
    model, _ = bert
    layer = _layers(model)[0]
    x = torch.randn(2, 5, 36)
    assert _reason(layer, x, None, None, position_ids=None, output_hidden_states=True) is None
    assert _reason(layer, x.bfloat16()).startswith("input")
    assert _reason(layer, torch.randn(10, 36)).startswith("input")
    assert _reason(layer, x.requires_grad_()).startswith("autograd")
    x = x.detach()
    assert _reason(layer, x, None, torch.randn(2, 4, 36)).startswith("extra positional")
    assert _reason(layer, x, None, output_attentions=True) == "argument output_attentions=bool"
    assert _reason(layer, x, None, head_mask=torch.ones(3)) == "argument head_mask=Tensor"
    assert _reason(layer, x, None, past_key_values=object()) == "argument past_key_values=object"
    assert _reason(layer, x, torch.ones(2, 1, 5, 5, dtype=torch.int64)).startswith("attention mask")
    assert _reason(layer, x, torch.ones(2, 1, 5, 4, dtype=torch.bool)).startswith("attention mask")
    layer.attention.self.is_causal = True
    try:
        assert _reason(layer, x) == "causal attention"
    finally:
        layer.attention.self.is_causal = False
    layer.intermediate.train()
    try:
        assert _reason(layer, x) == "training mode"
    finally:
        layer.intermediate.eval()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _reason(layer, x).startswith("compiling")


def _attention_calls() -> int:
    return sum(ops.kernel_calls("attention").values())


def test_fp32_attention_switch_runs_the_module_path(bert, monkeypatch):
    model, folder = bert
    layer, x = _layers(model)[0], torch.randn(2, 5, 36)
    expected = logits(_unfused(model, embeddings=True))  # fp32 also keeps the embeddings on the model's code
    reference = logits(int8_reference(folder, BertForSequenceClassification))  # torch's fp32 SDPA
    ops.set_attention_precision(None)
    try:
        for how in ("environment", "function"):
            if how == "environment":
                monkeypatch.setenv("HF_SPARSE_ATTENTION", "fp32")
            else:
                monkeypatch.setenv("HF_SPARSE_ATTENTION", "bf16")
                ops.set_attention_precision("fp32")  # wins over the variable
            assert ops.attention_precision() == "fp32"
            assert _reason(layer, x).startswith("attention precision fp32"), how
            calls = _attention_calls()
            out = logits(model)
            assert _attention_calls() == calls, f"{how}: the fused layer ran with fp32 attention"
            assert torch.equal(out, expected), how  # the layers' own forward: the module path exactly
            assert_close(out, reference, 1e-5, f"fp32 attention ({how}) vs the int8 reference")
        ops.set_attention_precision(None)  # back to the variable, read at the next call
        for value in ("bf16", " ", None):
            if value is None:
                monkeypatch.delenv("HF_SPARSE_ATTENTION")
            else:
                monkeypatch.setenv("HF_SPARSE_ATTENTION", value)
            calls = _attention_calls()
            assert_close(logits(model), expected, ATTENTION_TOL, f"HF_SPARSE_ATTENTION={value!r}")
            assert _attention_calls() == calls + 2, f"HF_SPARSE_ATTENTION={value!r} must run the fused layers"
    finally:
        ops.set_attention_precision(None)


def test_int8_attention_switch_runs_the_int8_kernels(bert, monkeypatch):
    """HF_SPARSE_ATTENTION=int8 keeps the fused layers (and embeddings), with the int8 attention: logits match the
    int8 reference whose attention computes the int8 kernels' numerics, and stay near the bf16 ones."""
    model, folder = bert
    reference = int8_reference(folder, BertForSequenceClassification)
    reference.set_attn_implementation("hf_sparse_int8_reference")
    expected = logits(reference)
    bf16 = logits(model)
    ops.set_attention_precision(None)
    monkeypatch.setenv("HF_SPARSE_ATTENTION", "int8")
    assert ops.attention_precision() == "int8"
    int8 = {name: n for name, n in ops.kernel_calls("attention").items() if name.endswith("_int8")}
    out = logits(model)
    after = {name: n for name, n in ops.kernel_calls("attention").items() if name.endswith("_int8")}
    assert sum(after.values()) == sum(int8.values()) + 2, "both layers must run the int8 attention"
    assert_close(out, expected, 1e-5, "int8 attention vs its reference")
    assert not torch.equal(out, bf16)
    assert_close(out, bf16, 3 * ATTENTION_TOL, "int8 attention vs bf16")


def test_invalid_attention_precision_names_the_variable(bert, monkeypatch):
    model, _ = bert
    monkeypatch.setenv("HF_SPARSE_ATTENTION", "fp16")
    with pytest.raises(ValueError, match=r"HF_SPARSE_ATTENTION='fp16' is not an attention precision: use 'bf16'"):
        logits(model)
    with pytest.raises(ValueError, match=r"set_attention_precision\(precision\)='float32'.*'fp32'"):
        ops.set_attention_precision("float32")
    monkeypatch.delenv("HF_SPARSE_ATTENTION")
    assert ops.attention_precision() == "bf16"


def test_training_mode_runs_the_module_path(bert):
    model, _ = bert
    expected = logits(_unfused(model).train())
    model.train()
    try:
        assert torch.equal(logits(model), expected)  # dropout 0: training mode is deterministic here
    finally:
        model.eval()


def test_hooks_inside_a_layer_fall_back_and_fire(bert):
    model, _ = bert
    seen = []
    handle = model.bert.encoder.layer[1].attention.self.register_forward_hook(lambda m, a, o: seen.append(o[0].shape))
    try:
        out = logits(model)
    finally:
        handle.remove()
    assert seen == [(3, 11, 36)], "the hook inside the layer must fire (its layer ran its own forward)"
    assert_close(out, logits(_unfused(model)), ATTENTION_TOL)  # layer 0 still ran fused
    # a hook on the layer itself does not stop the fast path, and sees its output
    outputs = []
    handle = model.bert.encoder.layer[0].register_forward_hook(lambda m, a, o: outputs.append(o))
    calls = sum(ops.kernel_calls("attention").values())
    try:
        logits(model)
    finally:
        handle.remove()
    assert sum(ops.kernel_calls("attention").values()) == calls + 2 and outputs[0].shape == (3, 11, 36)


def test_global_hooks_fall_back(bert):
    model, _ = bert
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    try:
        out = logits(model)
    finally:
        handle.remove()
    assert "BertSelfAttention" in seen and "Embedding" in seen  # the embeddings' parts ran too
    assert torch.equal(out, logits(_unfused(model, embeddings=True)))


def test_output_attentions_and_hidden_states(bert):
    model, _ = bert
    model.set_attn_implementation("eager")  # sdpa returns no attention weights
    try:
        with torch.no_grad():
            full = model(input_ids=IDS, attention_mask=MASK, output_attentions=True, output_hidden_states=True)
            plain = _unfused(model)(input_ids=IDS, attention_mask=MASK, output_attentions=True)
        assert len(full.attentions) == 2 and full.attentions[0].shape == (3, 3, 11, 11)
        assert torch.equal(full.logits, plain.logits)  # the module path ran
        # transformers keeps its capturing hooks installed from now on; they must not stop the fast path
        calls = sum(ops.kernel_calls("attention").values())
        with torch.no_grad():
            hidden = model(input_ids=IDS, output_hidden_states=True)
            layer0 = model.bert.encoder.layer[0].forward.fused
            assert sum(ops.kernel_calls("attention").values()) == calls + 2
            assert len(hidden.hidden_states) == 3
            assert torch.equal(hidden.hidden_states[1], layer0(hidden.hidden_states[0]))
    finally:
        model.set_attn_implementation("sdpa")


def test_an_unknown_attention_implementation_falls_back(bert):
    model, _ = bert
    calls = []

    def custom(module, query, key, value, attention_mask, **kwargs):
        calls.append(1)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("hf_sparse_test_attention", custom)
    AttentionMaskInterface.register("hf_sparse_test_attention", sdpa_mask)
    model.set_attn_implementation("hf_sparse_test_attention")
    try:
        assert _layers(model)[0].forward.why_not(torch.randn(1, 3, 36), None).startswith("attention implementation")
        out = logits(model)
        assert len(calls) == 2
        assert torch.equal(out, logits(_unfused(model)))
    finally:
        model.set_attn_implementation("sdpa")


def test_deep_copies_and_dequantize(bert):
    model, folder = bert
    twin = copy.deepcopy(model)
    layer, twin_layer = model.bert.encoder.layer[0], twin.bert.encoder.layer[0]
    assert twin_layer.forward.layer is twin_layer and twin_layer.forward.fused.qkv is layer.forward.fused.qkv
    assert twin_layer.forward.fused.norm1 is twin_layer.attention.output.LayerNorm
    assert torch.equal(logits(twin), logits(model))
    twin.dequantize()
    assert "forward" not in vars(twin.bert.encoder.layer[0])
    assert torch.equal(logits(model), logits(model))


def test_decoders_and_cross_attention_are_not_fused(tmp_path):
    torch.manual_seed(0)
    config = bert_config(is_decoder=True, add_cross_attention=True)
    model, _ = _load(tmp_path, BertForSequenceClassification(config).eval())
    assert not _layers(model)


def test_roberta_and_distilbert(tmp_path):
    torch.manual_seed(0)
    roberta = RobertaConfig(
        vocab_size=60, hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=3,
        max_position_embeddings=40, num_labels=2,
    )  # fmt: skip
    distil = DistilBertConfig(vocab_size=60, dim=36, hidden_dim=52, n_layers=2, n_heads=3, max_position_embeddings=40)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    for i, model in enumerate(
        (RobertaForSequenceClassification(roberta), DistilBertForSequenceClassification(distil))
    ):
        loaded, folder = _load(tmp_path / str(i), model.eval(), pattern="unstructured")
        assert len(_layers(loaded)) == 2, type(model).__name__
        with torch.no_grad():
            out = loaded(input_ids=ids, attention_mask=mask).logits
            assert_close(out, _unfused(loaded)(input_ids=ids, attention_mask=mask).logits, ATTENTION_TOL)
            reference = kernel_reference(folder, type(model))(input_ids=ids, attention_mask=mask).logits
        assert_close(out, reference, 1e-5, type(model).__name__)


def _attention_with(reference):
    """A transformers attention implementation computing `reference`'s numerics (the kernels', in pure torch)."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        batch, heads, seq, d = query.shape

        def rows(t):
            return t.transpose(1, 2).reshape(batch * seq, heads * d).float()

        out = reference(rows(query), rows(key), rows(value), batch, heads, attention_mask, False, scaling)
        return out.reshape(batch, seq, heads, d).to(query.dtype), None

    return attend


AttentionInterface.register("hf_sparse_reference", _attention_with(attention_reference))
AttentionMaskInterface.register("hf_sparse_reference", sdpa_mask)  # else transformers passes no mask at all
AttentionInterface.register("hf_sparse_int8_reference", _attention_with(attention_int8_reference))
AttentionMaskInterface.register("hf_sparse_int8_reference", sdpa_mask)


def kernel_reference(folder, model_cls):
    """The int8 reference (dequantized weights, fake-quantized Linear inputs) with the attention kernel's
    numerics: what a model with fused encoder layers computes, in pure torch."""
    model = int8_reference(folder, model_cls)
    model.set_attn_implementation("hf_sparse_reference")
    return model


def reference_for(loaded, folder, model_cls, dense: bool = False):
    """The pure-torch model `loaded` must match within 1e-5 of its largest logit: the int8 reference (or, for
    float checkpoints, the dense one), with the attention kernel's numerics when `loaded` runs fused layers."""
    model = dense_reference(folder, model_cls) if dense else int8_reference(folder, model_cls)
    if _layers(loaded):
        model.set_attn_implementation("hf_sparse_reference")
    return model
