"""Base models around a fused encoder (`FusedModelForward`): every call it takes gives the class's forward's outputs
bit for bit, and every call it does not take goes to the class's forward."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from hf_sparse import ops
from hf_sparse.integrations.head_forward import FusedHeadForward
from hf_sparse.integrations.model_forward import FusedModelForward, _all_set
from hf_sparse.integrations.module_swap import dequantize_model
from tests.integrations.backend_support import WORDS, bert_config, prune, save


pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="the fused encoder runs with the C++ kernels")

IDS = torch.randint(5, len(WORDS), (3, 11), generator=torch.Generator().manual_seed(4))
ONES = torch.ones(3, 11, dtype=torch.long)
PADDED = ONES.clone()
PADDED[1, 7:] = 0
TYPES = torch.randint(0, 2, (3, 11), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def bert(request, tmp_path_factory):
    torch.manual_seed(0)
    config = bert_config(num_attention_heads=3, num_hidden_layers=2, hidden_dropout_prob=0.0)
    model = BertForSequenceClassification(config).eval()
    folder = save(model, tmp_path_factory.mktemp("model"), prune(model, "4-block"), weight_dtype="int8")
    return AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation=request.param).eval()


def _class_forward(model):
    """The same model with BertModel's own forward (embeddings and encoder still fused)."""
    plain = copy.deepcopy(model)
    plain.bert.__dict__.pop("forward")
    return plain


def _same(a, b) -> None:
    if isinstance(a, tuple):
        assert type(b) is tuple and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif hasattr(a, "keys"):
        assert type(a) is type(b) and list(a.keys()) == list(b.keys())
        for key in a:
            _same(a[key], b[key])
    else:
        assert a == b


def _compared(forward, fused_expected: bool, call, reference, args: tuple, kwargs: dict):
    """call(*args, **kwargs), checked equal to reference(*args, **kwargs), and `forward` (the fused forward `call`
    reaches) counting the call exactly when fused_expected."""
    calls = forward.calls
    with torch.no_grad():
        out = call(*args, **kwargs)
        expected = reference(*args, **kwargs)
    assert forward.calls == calls + fused_expected, "the call went the other way"
    _same(out, expected)
    return out


def _run(model, fused_expected: bool, *args, **kwargs):
    """model.bert(*args, **kwargs) with FusedModelForward, checked against the class's forward."""
    forward = model.bert.__dict__["forward"]
    assert isinstance(forward, FusedModelForward)
    assert (forward.why_not(*args, **kwargs) is None) == fused_expected
    return _compared(forward, fused_expected, model.bert, _class_forward(model).bert, args, kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"attention_mask": ONES},
        {"attention_mask": ONES.bool()},
        {"attention_mask": ONES.int(), "token_type_ids": TYPES},
        {"attention_mask": PADDED},  # padding: the mask is the class's own
        {"attention_mask": PADDED.bool(), "token_type_ids": TYPES},
        {"attention_mask": ONES, "position_ids": torch.arange(11).flip(0)[None]},
        {"attention_mask": ONES, "return_dict": False},
        {"attention_mask": ONES, "output_attentions": False, "output_hidden_states": False, "use_cache": True},
    ],
    ids=["no-mask", "ones", "bool", "int32-types", "padded", "padded-bool", "positions", "tuple", "false-flags"],
)
def test_fused_calls_match_the_class_forward(bert, kwargs):
    out = _run(bert, True, input_ids=IDS, **kwargs)
    assert isinstance(out, tuple) == (kwargs.get("return_dict") is False)


def test_positional_arguments_and_the_classifier(bert):
    _run(bert, True, IDS, ONES, TYPES)
    forward = bert.bert.__dict__["forward"]
    calls = forward.calls
    with torch.no_grad():
        logits = bert(input_ids=IDS, attention_mask=PADDED).logits
        expected = _class_forward(bert)(input_ids=IDS, attention_mask=PADDED).logits
    assert forward.calls == calls + 1 and torch.equal(logits, expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"output_hidden_states": True},
        {"output_attentions": True},
        {"inputs_embeds": torch.randn(3, 11, 36), "input_ids": None},
        {"attention_mask": ONES.float()},  # not an integer or bool mask
        {"attention_mask": ONES[:, :5]},  # not the ids' shape: the class's forward raises or does what it does
        {"debug_io": False},  # a keyword the fast path does not know
    ],
    ids=["hidden-states", "attentions", "inputs-embeds", "float-mask", "short-mask", "unknown-keyword"],
)
def test_other_calls_go_to_the_class_forward(bert, kwargs):
    kwargs = {"input_ids": IDS, **kwargs}
    forward = bert.bert.__dict__["forward"]
    assert forward.why_not(**kwargs) is not None
    calls = forward.calls
    with torch.no_grad():
        try:
            expected = _class_forward(bert).bert(**kwargs)
        except Exception as error:  # the same error either way
            with pytest.raises(type(error)):
                bert.bert(**kwargs)
        else:
            _same(bert.bert(**kwargs), expected)
    assert forward.calls == calls


def test_config_flags_and_replaced_mask_functions(bert):
    config = bert.config
    config.output_hidden_states = True
    try:
        out = _run(bert, False, input_ids=IDS)
        assert len(out.hidden_states) == 3
    finally:
        config.output_hidden_states = False
    config.return_dict = False
    try:
        _run(bert, True, input_ids=IDS)
        _run(bert, True, input_ids=IDS, return_dict=True)
    finally:
        config.return_dict = True
    impl = config._attn_implementation
    original = ALL_MASK_ATTENTION_FUNCTIONS[impl]
    ALL_MASK_ATTENTION_FUNCTIONS[impl] = lambda *a, **k: original(*a, **k)  # a user's own mask function
    try:
        assert "mask function" in bert.bert.__dict__["forward"].why_not(input_ids=IDS)
    finally:
        ALL_MASK_ATTENTION_FUNCTIONS[impl] = original


def test_hooks_on_the_parts_still_run(bert):
    seen = []
    handles = [
        getattr(bert.bert, name).register_forward_hook(lambda m, a, o, name=name: seen.append(name))
        for name in ("embeddings", "encoder", "pooler")
    ]
    try:
        _run(bert, True, input_ids=IDS, attention_mask=ONES)
    finally:
        for handle in handles:
            handle.remove()
    assert seen[:3] == ["embeddings", "encoder", "pooler"]


def test_the_encoder_output_object_is_skipped_only_without_hooks(bert):
    model = copy.deepcopy(bert)
    stack = model.bert.encoder.__dict__["forward"]
    built = []
    stack.rule = dataclasses.replace(stack.rule, output=lambda h: built.append(h) or stack_output(h))
    stack_output = bert.bert.encoder.__dict__["forward"].rule.output
    with torch.no_grad():
        expected = bert.bert(input_ids=IDS, attention_mask=ONES)
        _same(model.bert(input_ids=IDS, attention_mask=ONES), expected)
        assert built == []  # the last hidden state straight from the kernels
        model.bert.encoder.register_forward_pre_hook(lambda m, a: None)
        _same(model.bert(input_ids=IDS, attention_mask=ONES), expected)
    assert len(built) == 1  # through the encoder's __call__, its output object built


def test_dequantize_removes_it(bert):
    model = dequantize_model(copy.deepcopy(bert))
    assert "forward" not in model.bert.__dict__


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool])
def test_all_set_matches_torch(dtype):
    gen = torch.Generator().manual_seed(6)
    for size in (0, 1, 7, 128, 1000):
        for zeros in (0, 1, 3):
            mask = torch.randint(1, 3, (size,), generator=gen).to(dtype)
            if size:
                mask[torch.randint(0, size, (zeros,), generator=gen)] = 0
            assert _all_set(mask) == bool(mask.all()), (size, zeros)
            if dtype is not torch.bool and size:
                mask[0] = 256 if dtype not in (torch.uint8,) else 255  # a nonzero with a zero low byte
                assert _all_set(mask) == bool(mask.all())
    strided = torch.ones(4, 6, dtype=dtype)[:, ::2]
    strided[2, 1] = 0
    assert _all_set(strided) is False and _all_set(torch.ones(4, 6, dtype=dtype)[:, ::2]) is True


# The classification head around it (`FusedHeadForward`)


def _head_run(model, fused_expected: bool, *args, **kwargs):
    """model(*args, **kwargs) with FusedHeadForward, checked against the class's forward (BertModel's too)."""
    forward = model.__dict__["forward"]
    assert isinstance(forward, FusedHeadForward)
    plain = _class_forward(model)
    plain.__dict__.pop("forward")
    return _compared(forward, fused_expected, model, plain, args, kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attention_mask": ONES},
        {"attention_mask": PADDED, "token_type_ids": TYPES},
        {"attention_mask": ONES, "return_dict": False},
        {"attention_mask": ONES, "return_dict": None},
        {"output_hidden_states": False, "output_attentions": False},
    ],
    ids=["ones", "padded-types", "tuple", "return-dict-none", "false-flags"],
)
def test_head_matches_the_class_forward(bert, kwargs):
    out = _head_run(bert, True, input_ids=IDS, **kwargs)
    assert isinstance(out, tuple) == (kwargs.get("return_dict") is False)


def test_head_positional_arguments_and_config_return_dict(bert):
    _head_run(bert, True, IDS, ONES, TYPES)
    bert.config.return_dict = False
    try:
        assert isinstance(_head_run(bert, True, input_ids=IDS), tuple)
        assert not isinstance(_head_run(bert, True, input_ids=IDS, return_dict=True), tuple)
    finally:
        bert.config.return_dict = True


@pytest.mark.parametrize("case", ["labels", "hidden-states", "hook-on-bert", "unknown-keyword", "twice"])
def test_head_other_calls_go_to_the_class_forward(bert, case):
    kwargs = {"input_ids": IDS, "attention_mask": ONES}
    model, handle = bert, None
    if case == "labels":
        kwargs["labels"] = torch.tensor([0, 1, 1])
    elif case == "hidden-states":
        kwargs["output_hidden_states"] = True
    elif case == "hook-on-bert":
        handle = bert.bert.register_forward_hook(lambda m, a, o: None)
    elif case == "unknown-keyword":
        kwargs["debug_io"] = False
    args = (IDS,) if case == "twice" else ()  # input_ids by position and by name
    try:
        try:
            _head_run(model, False, *args, **kwargs)
        except TypeError:
            assert case == "twice"
    finally:
        if handle is not None:
            handle.remove()


def test_head_calls_a_dropout_that_is_not_the_identity(bert):
    model = copy.deepcopy(bert)
    seen = []
    model.classifier.register_forward_pre_hook(lambda m, a: seen.append("classifier"))
    model.dropout = nn.Dropout(0.0).train()  # training mode, p = 0: still the identity
    _head_run(model, True, input_ids=IDS)
    model.dropout = nn.Sequential(nn.Identity())  # another module: called
    model.dropout.register_forward_hook(lambda m, a, o: seen.append("dropout"))
    _head_run(model, True, input_ids=IDS)
    # (each run: the fused forward, then the class's on a copy holding the same hooks)
    assert seen == ["classifier", "classifier", "dropout", "classifier", "dropout", "classifier"]


def test_dequantize_removes_the_head_forward(bert):
    model = dequantize_model(copy.deepcopy(bert))
    assert "forward" not in model.__dict__
