"""Embedding modules on the fused kernel (`FusedEmbeddingsForward`), and every case that hands back to the class's
forward. The fused path must give the class's embeddings up to the LayerNorm's last bits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from hf_sparse import ops
from hf_sparse.integrations.embeddings import FusedEmbeddingsForward
from hf_sparse.nn import Int8Embedding
from tests.integrations.backend_support import WORDS, assert_close, bert_config, prune, save


pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="the fused embeddings run with the C++ kernels")

TOL = 2e-6  # float32 LayerNorms summing in different orders
IDS = torch.randint(5, len(WORDS), (3, 11), generator=torch.Generator().manual_seed(2))


def _load(tmp_path, model, **options):
    recipe = prune(model, "4-block")
    return AutoModelForSequenceClassification.from_pretrained(save(model, tmp_path, recipe, **options))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    torch.manual_seed(0)
    return _load(tmp_path_factory.mktemp("emb"), BertForSequenceClassification(bert_config()).eval(),
                 weight_dtype="int8")  # fmt: skip


def _fused(module) -> FusedEmbeddingsForward:
    fused = vars(module).get("forward")
    assert isinstance(fused, FusedEmbeddingsForward), f"{type(module).__name__} has no fused forward: {fused!r}"
    return fused


def _check(module, *args, fused: bool = True, **kwargs) -> torch.Tensor:
    """Calls the module; asserts whether the kernel ran, and that the result is the class's forward's."""
    counter = _fused(module)
    calls = counter.calls
    with torch.no_grad():
        y = module(*args, **kwargs)
        expected = type(module).forward(module, *args, **kwargs)
    assert counter.calls == calls + fused, f"fused path {'did not run' if fused else 'ran'} for {kwargs}"
    if fused:
        assert_close(y, expected, TOL, "embeddings")
    else:
        assert torch.equal(y, expected)
    return y


def test_bert_embeddings_every_argument(bert):
    emb = bert.bert.embeddings
    n = IDS.shape[1]
    _check(emb, input_ids=IDS)  # default token types: the buffer at each position
    _check(emb, input_ids=IDS, token_type_ids=torch.randint(0, 2, IDS.shape))
    _check(emb, input_ids=IDS, token_type_ids=torch.ones(1, n, dtype=torch.long))  # broadcast over the batch
    _check(emb, input_ids=IDS, position_ids=torch.randint(0, 30, IDS.shape))
    _check(emb, input_ids=IDS, past_key_values_length=5)
    _check(emb, IDS, None, torch.arange(n).flip(0).unsqueeze(0))  # positional arguments
    _check(emb, input_ids=IDS[:, ::2])  # strided ids
    emb.token_type_ids.fill_(1)  # a changed buffer is read, as the class does
    try:
        _check(emb, input_ids=IDS)
    finally:
        emb.token_type_ids.fill_(0)


def test_whole_model_logits(bert):
    plain = copy.deepcopy(bert)
    del vars(plain.bert.embeddings)["forward"]
    mask = torch.ones_like(IDS)
    mask[1, 6:] = 0
    with torch.no_grad():
        assert_close(bert(input_ids=IDS, attention_mask=mask).logits,
                     plain(input_ids=IDS, attention_mask=mask).logits, 1e-5)  # fmt: skip
    assert _fused(bert.bert.embeddings).calls > 0


def test_hands_back_to_the_class(bert):
    emb = bert.bert.embeddings
    fused = _fused(emb)
    _check(emb, inputs_embeds=torch.randn(2, 4, emb.word_embeddings.embedding_dim), fused=False)
    _check(emb, input_ids=IDS.int(), fused=False)
    _check(emb, input_ids=IDS, token_type_ids=torch.zeros(IDS.shape, dtype=torch.int32), fused=False)
    assert "int64" in fused.why_not({"input_ids": IDS.int()})
    handle = emb.word_embeddings.register_forward_hook(lambda *a: None)
    try:
        _check(emb, input_ids=IDS, fused=False)
        assert fused.why_not({"input_ids": IDS}) == "forward hooks inside the module"
    finally:
        handle.remove()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
    try:
        _check(emb, input_ids=IDS, fused=False)
    finally:
        handle.remove()
    emb.train()
    try:
        assert fused.why_not({"input_ids": IDS}) == "training mode (dropout)"
    finally:
        emb.eval()
    original = emb.LayerNorm
    emb.LayerNorm = nn.LayerNorm(original.normalized_shape, eps=original.eps)
    try:
        _check(emb, input_ids=IDS, fused=False)
    finally:
        emb.LayerNorm = original
    emb.position_embeddings.weight.requires_grad_(True)
    try:
        with torch.enable_grad():
            assert "autograd" in fused.why_not({"input_ids": IDS})
    finally:
        emb.position_embeddings.weight.requires_grad_(False)
    ops.set_attention_precision("fp32")  # the model's own LayerNorms, bit for bit
    try:
        _check(emb, input_ids=IDS, fused=False)
    finally:
        ops.set_attention_precision(None)
    with pytest.raises(TypeError):  # an argument the class does not take: the class's own error
        emb(input_ids=IDS, bogus=1)
    _check(emb, input_ids=IDS)  # and back on the fused path


def test_bad_ids_raise_index_error(bert):
    bad = IDS.clone()
    bad[2, 4] = bert.config.vocab_size
    with pytest.raises(IndexError, match=r"input_ids\[2, 4\] = \d+ is out of range: the word embeddings"):
        bert.bert.embeddings(input_ids=bad)


def test_copies_and_dequantize(bert):
    clone = copy.deepcopy(bert)
    fused = _fused(clone.bert.embeddings)
    assert (
        fused.module is clone.bert.embeddings
        and fused.parts["word_embeddings"] is clone.bert.embeddings.word_embeddings
    )
    _check(clone.bert.embeddings, input_ids=IDS)
    clone.dequantize()
    assert "forward" not in vars(clone.bert.embeddings)


def test_roberta_positions_from_padding(tmp_path):
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=60, hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=3,
        max_position_embeddings=40, num_labels=2, type_vocab_size=2,
    )  # fmt: skip
    model = _load(tmp_path, RobertaForSequenceClassification(config).eval(), weight_dtype="int8")
    ids = torch.randint(3, 60, (3, 9), generator=torch.Generator().manual_seed(1))
    ids[0, 6:] = config.pad_token_id
    ids[2, :2] = config.pad_token_id
    emb = model.roberta.embeddings
    _check(emb, input_ids=ids)
    _check(emb, input_ids=ids, past_key_values_length=3)
    _check(emb, input_ids=ids, token_type_ids=torch.randint(0, 2, ids.shape))


def test_distilbert_int8_tables(tmp_path):
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=60, dim=36, hidden_dim=52, n_layers=2, n_heads=3, max_position_embeddings=40)
    model = _load(tmp_path, DistilBertForSequenceClassification(config).eval(), weight_dtype="int8",
                  int8_embeddings=True)  # fmt: skip
    emb = model.distilbert.embeddings
    assert isinstance(emb.word_embeddings, Int8Embedding) and isinstance(emb.position_embeddings, Int8Embedding)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    _check(emb, ids)  # DistilBertModel calls it positionally
    _check(emb, ids, None, torch.randint(0, 40, (2, 9)))
