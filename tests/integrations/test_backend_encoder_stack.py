"""Whole encoders on the kernels in one call (`FusedEncoderStackForward`), and every case that hands back to the
layers one by one. The one-call path must give the per-layer path's logits bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertForSequenceClassification, DistilBertConfig, DistilBertForSequenceClassification

from hf_sparse import ops
from hf_sparse.integrations.encoder_layer import FusedEncoderForward
from hf_sparse.integrations.encoder_stack import FusedEncoderStackForward
from tests.integrations.backend_support import WORDS, bert_config, prune, save
from tests.nn.encoder_layers import CountedPlan


pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="the fused encoder runs with the C++ kernels")

IDS = torch.randint(5, len(WORDS), (3, 11), generator=torch.Generator().manual_seed(2))
MASK = torch.ones(3, 11, dtype=torch.long)
MASK[2, 5:] = 0


def _load(tmp_path, model, pattern="4-block"):
    from transformers import AutoModelForSequenceClassification

    recipe = prune(model, pattern)
    return AutoModelForSequenceClassification.from_pretrained(save(model, tmp_path / "m", recipe, weight_dtype="int8"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    torch.manual_seed(0)
    config = bert_config(num_attention_heads=3, num_hidden_layers=3, hidden_dropout_prob=0.0)
    return _load(tmp_path_factory.mktemp("stack"), BertForSequenceClassification(config).eval())


def _stack_calls() -> int:
    """Attention kernel calls so far (one per layer, whichever path ran them)."""
    return sum(ops.kernel_calls("attention").values())


def logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK, **kwargs).logits


def _per_layer(model):
    """The same model with the encoder's own forward: its layers one by one (each still fused)."""
    plain = copy.deepcopy(model)
    plain.bert.encoder.__dict__.pop("forward")
    return plain


@pytest.fixture
def counted(bert):
    """The loaded model's one-call plan, counting (the kernels it runs are the same either way)."""
    stack = vars(bert.bert.encoder)["forward"].stack
    plan, stack._plan = stack._plan, CountedPlan(stack._plan)
    yield stack._plan
    stack._plan = plan


def test_the_encoder_runs_in_one_call(bert, counted):
    forward = vars(bert.bert.encoder)["forward"]
    assert isinstance(forward, FusedEncoderStackForward) and len(forward.stack.layers) == 3
    assert forward.why_not(torch.randn(3, 11, 36), None) is None
    calls = _stack_calls()
    out = logits(bert)
    assert counted.calls == 1, "the three layers ran in one kernel call"
    assert _stack_calls() == calls + 3
    assert torch.equal(out, logits(_per_layer(bert)))


def test_padded_batches_and_thread_counts(bert):
    expected = logits(_per_layer(bert))
    for n in (1, 2, 3):
        ops.set_num_threads(n)
        try:
            assert torch.equal(logits(bert), expected), f"{n} threads"
        finally:
            ops.set_num_threads(None)


def _reason(model, *args, **kwargs):
    return vars(model.bert.encoder)["forward"].why_not(torch.randn(3, 11, 36), None, args, kwargs)


def test_hooks_training_and_arguments_hand_back_to_the_layers(bert, counted):
    seen = []
    layer = bert.bert.encoder.layer[1]
    for module in (layer, layer.attention.self):  # on a layer itself, and inside one (that layer then runs unfused)
        handle = module.register_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
        try:
            assert _reason(bert) == "hooks on a layer or inside one"
            expected = logits(_per_layer(bert))  # (the copy has the hook too)
            seen.clear()
            assert torch.equal(logits(bert), expected)
            assert seen == [type(module).__name__], "the hook fired: the layers ran one by one"
        finally:
            handle.remove()
    assert counted.calls == 0
    layer.attention.train()
    try:
        assert _reason(bert) == "training mode"
    finally:
        layer.attention.eval()
    assert _reason(bert, torch.randn(3, 4, 36)).startswith("extra positional arguments")
    assert _reason(bert, use_cache=True) == "argument use_cache=bool"
    layer.__dict__["forward"] = lambda *a, **k: None  # someone replaced a layer's forward
    try:
        assert _reason(bert) == "a layer's forward was replaced"
    finally:
        layer.__dict__["forward"] = vars(bert.bert.encoder)["forward"].forwards[1]
    assert _reason(bert) is None


def test_changed_layer_lists_run_the_class_forward(bert, counted):
    encoder = bert.bert.encoder
    layers = encoder.layer
    try:
        encoder.layer = layers[:2]  # as distillation drops layers
        assert _reason(bert) == "the encoder's layers changed"
        with torch.no_grad():
            h = torch.randn(3, 11, 36)
            assert torch.equal(encoder(h).last_hidden_state, layers[1](layers[0](h)))
    finally:
        encoder.layer = layers
    assert counted.calls == 0 and _reason(bert) is None


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # transformers casts shapes to bool
def test_jit_trace_records_the_torch_ops(bert):
    other = torch.randint(5, len(WORDS), (3, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        traced = torch.jit.trace(lambda ids: bert(input_ids=ids).logits, (IDS,), check_trace=False)
        ops.set_attention_precision("fp32")  # what tracing records: the layers' own forwards on the kernels' ops
        try:
            expected = bert(input_ids=other).logits
        finally:
            ops.set_attention_precision(None)
        assert torch.equal(traced(other), expected)


def test_fp32_attention_runs_the_model_path(bert, monkeypatch):
    monkeypatch.setenv("HF_SPARSE_ATTENTION", "fp32")
    calls = _stack_calls()
    logits(bert)
    assert _stack_calls() == calls and _reason(bert).startswith("attention precision fp32")


def test_hidden_states_are_captured_then_the_stack_comes_back(bert):
    with torch.no_grad():
        hidden = bert(input_ids=IDS, output_hidden_states=True).hidden_states
    assert len(hidden) == 4
    layers = [layer.forward.fused for layer in bert.bert.encoder.layer]
    assert all(torch.equal(hidden[i + 1], layer(hidden[i])) for i, layer in enumerate(layers))
    # transformers keeps its capturing hooks installed from now on; idle, they do not stop the one-call path
    assert any(m._forward_hooks for m in bert.bert.encoder.layer.modules())
    assert _reason(bert) is None
    assert torch.equal(logits(bert), logits(_per_layer(bert)))


def test_deep_copies_and_dequantize(bert):
    twin = copy.deepcopy(bert)
    forward = vars(twin.bert.encoder)["forward"]
    assert forward.encoder is twin.bert.encoder and forward.layers[0] is twin.bert.encoder.layer[0]
    assert forward.stack.layers[0] is twin.bert.encoder.layer[0].forward.fused
    assert torch.equal(logits(twin), logits(bert))
    twin.dequantize()
    assert "forward" not in vars(twin.bert.encoder) and "forward" not in vars(twin.bert.encoder.layer[0])


def test_distilbert(tmp_path):
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=60, dim=36, hidden_dim=52, n_layers=3, n_heads=3, max_position_embeddings=40)
    model = _load(tmp_path, DistilBertForSequenceClassification(config).eval(), pattern="unstructured")
    forward = vars(model.distilbert.transformer).get("forward")
    assert isinstance(forward, FusedEncoderStackForward)
    assert all(isinstance(vars(layer)["forward"], FusedEncoderForward) for layer in model.distilbert.transformer.layer)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids).logits
        plain = copy.deepcopy(model)
        plain.distilbert.transformer.__dict__.pop("forward")
        assert torch.equal(out, plain(input_ids=ids).logits)
