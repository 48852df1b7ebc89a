"""The registered backend: `import hf_sparse`, then `from_pretrained` runs an hf_sparse checkpoint on the kernels."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, BertForSequenceClassification, pipeline
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import hf_sparse
from hf_sparse import SparseCheckpoint, ops
from hf_sparse.integrations.fusion_rules import FusedFeedForward
from hf_sparse.integrations.module_swap import FusedActivation
from hf_sparse.integrations.quantizer import HfSparseConfig, HfSparseQuantizer, register, require_registered
from hf_sparse.nn import Int8Embedding, SparseLinear
from tests.integrations.backend_support import (
    WORDS,
    assert_close,
    dense_reference,
    pruned_bert,
    save,
    sentiment_bert,
    tokenizer,
)
from tests.integrations.test_backend_encoder_layer import reference_for


IDS = torch.randint(5, len(WORDS), (3, 11), generator=torch.Generator().manual_seed(1))
TOL = 1e-5  # of max |logit|: the kernels reproduce the int8 (and attention) numerics, up to float summation order


def load(folder) -> nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(folder)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory):
    """Tiny BERT, 4-block 90%, int8 weights, int8 embeddings and int8 pooler/classifier."""
    model, recipe = pruned_bert("4-block")
    folder = tmp_path_factory.mktemp("backend") / "bert-int8"
    save(model, folder, recipe, weight_dtype="int8", int8_embeddings=True, int8_linears=True, tokenizer=tokenizer())
    return folder


def test_import_registers_the_backend():
    assert AUTO_QUANTIZER_MAPPING["hf_sparse"] is HfSparseQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["hf_sparse"] is HfSparseConfig
    register()  # again (as after a reload): no error, same classes
    require_registered()
    assert AUTO_QUANTIZER_MAPPING["hf_sparse"] is HfSparseQuantizer


def test_from_pretrained_runs_the_kernels(int8_folder):
    model = load(int8_folder)
    layer = model.bert.encoder.layer[0]
    attention = layer.attention.self
    assert all(isinstance(m, SparseLinear) and m.is_packed for m in (attention.query, attention.key, attention.value))
    assert attention.query.group is attention.key.group is attention.value.group  # one kernel call for Q, K, V
    assert layer.intermediate.dense.activation == "gelu"  # GELU fused into the kernel
    assert isinstance(layer.intermediate.intermediate_act_fn, FusedActivation)
    # and, with the C++ kernels, the FFN's two Linears into one call
    assert isinstance(layer.feed_forward_chunk, FusedFeedForward) == ops.extension_available()
    assert isinstance(model.bert.embeddings.word_embeddings, Int8Embedding)
    assert isinstance(model.classifier, SparseLinear) and model.classifier.packed.layout.value == "int8_dense"
    assert model.bert.encoder.layer[1].output.dense.packed.layout.value == "int8_block4"
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_quantized and model.config.quantization_config.quant_method == "hf_sparse"
    before = sum(ops.kernel_calls().values())
    out = logits(model)
    if ops.extension_available():  # 2 layers x (QKV, attention output, FFN) + pooler + classifier
        assert sum(ops.kernel_calls().values()) - before == 2 * 3 + 2
    assert_close(out, logits(reference_for(model, int8_folder, BertForSequenceClassification)), TOL)
    for layer in model.bert.encoder.layer:  # the module path: each layer's own forward
        vars(layer).pop("forward", None)
    unfused = logits(model)
    for layer in model.bert.encoder.layer:  # the fused FFN is bit for bit the two Linears
        vars(layer).pop("feed_forward_chunk", None)
    assert torch.equal(logits(model), unfused)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_pattern_matches_the_int8_numerics(tmp_path, pattern):
    model, recipe = pruned_bert(pattern, seed=3)
    folder = save(model, tmp_path / "m", recipe, weight_dtype="int8")
    loaded = load(folder)
    assert isinstance(loaded.bert.embeddings.word_embeddings, nn.Embedding)  # not converted: stays dense
    assert type(loaded.classifier) is nn.Linear
    assert_close(logits(loaded), logits(reference_for(loaded, folder, BertForSequenceClassification)), TOL)


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16", "float16"])
def test_float_checkpoints_run_on_the_fp32_sparse_kernel(tmp_path, weight_dtype):
    model, recipe = pruned_bert("unstructured", seed=4)
    folder = save(model, tmp_path / "m", recipe, weight_dtype=weight_dtype)
    loaded = load(folder)
    query = loaded.bert.encoder.layer[0].attention.self.query
    assert query.scheme == "fp32" and query.storage_dtype == weight_dtype
    assert query.group.packed.layout.value == "fp32_csr"
    assert loaded.bert.encoder.layer[0].intermediate.dense.packed.layout.value == "fp32_csr"
    assert_close(logits(loaded), logits(reference_for(loaded, folder, BertForSequenceClassification, dense=True)), TOL)


def test_save_pretrained_writes_the_same_format(int8_folder, tmp_path):
    model = load(int8_folder)
    model.save_pretrained(tmp_path / "again")
    original, again = SparseCheckpoint(int8_folder), SparseCheckpoint(tmp_path / "again")
    again.validate()  # metadata, checksums, every module's format checks
    saved = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert saved == json.loads((int8_folder / "config.json").read_text())["quantization_config"]
    assert set(again.keys) == set(original.keys)
    first, second = original.state_dict(), again.state_dict()  # decompressed, dequantized
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert torch.equal(logits(load(tmp_path / "again")), logits(model))


def test_a_deep_copy_shares_the_packed_weights(int8_folder):
    model = load(int8_folder)
    twin = copy.deepcopy(model)
    query, twin_query = (
        model.bert.encoder.layer[0].attention.self.query,
        twin.bert.encoder.layer[0].attention.self.query,
    )
    assert twin_query is not query and twin_query.group is not query.group
    assert twin_query.group.packed is query.group.packed  # read-only after packing: shared, not copied
    assert twin.bert.encoder.layer[0].attention.self.key.group is twin_query.group
    if ops.extension_available():
        assert twin.bert.encoder.layer[0].feed_forward_chunk.module is twin.bert.encoder.layer[0]
    assert torch.equal(logits(twin), logits(model))
    twin.dequantize()
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, SparseLinear)  # the original is untouched
    assert torch.equal(logits(model), logits(load(int8_folder)))


def test_dequantize_returns_the_dense_model(int8_folder):
    model = load(int8_folder)
    dense = model.dequantize()
    assert not any(isinstance(m, (SparseLinear, Int8Embedding, FusedActivation)) for m in dense.modules())
    assert "feed_forward_chunk" not in vars(dense.bert.encoder.layer[0])
    assert "forward" not in vars(dense.bert.encoder.layer[0])
    assert getattr(dense.config, "quantization_config", None) is None and not dense.is_quantized
    reference = dense_reference(int8_folder, BertForSequenceClassification)
    expected = reference.state_dict()
    assert dense.state_dict().keys() == expected.keys()
    for key, value in dense.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert torch.equal(logits(dense), logits(reference))


def test_a_checkpoint_loads_into_another_head(int8_folder, tmp_path):
    base = AutoModel.from_pretrained(int8_folder)  # BertModel from a BertForSequenceClassification checkpoint
    assert isinstance(base.encoder.layer[0].attention.self.query, SparseLinear)
    full = load(int8_folder)
    with torch.no_grad():
        assert torch.equal(base(input_ids=IDS).last_hidden_state, full.bert(input_ids=IDS).last_hidden_state)
    base.save_pretrained(tmp_path / "base")
    saved = SparseCheckpoint(tmp_path / "base")
    saved.validate()
    assert "encoder.layer.0.attention.self.query" in saved.quantization.modules  # the saved model's own names
    assert "classifier" not in saved.quantization.modules


def test_a_bfloat16_model_runs_in_bfloat16(int8_folder):
    model = AutoModelForSequenceClassification.from_pretrained(int8_folder, dtype=torch.bfloat16)
    assert model.bert.encoder.layer[0].output.LayerNorm.weight.dtype == torch.bfloat16
    out = logits(model)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), logits(load(int8_folder)), 0.05)  # bfloat16 rounding of everything around the kernels


def test_pipeline_gives_the_dense_models_labels(tmp_path):
    model, recipe = sentiment_bert()
    tok = tokenizer()
    folder = save(model, tmp_path / "m", recipe, weight_dtype="int8", int8_embeddings=True, tokenizer=tok)
    texts = ["the movie was good", "a very boring plot", "i hated it", "great actors and a fun story", "it was bad"]
    sparse = pipeline("text-classification", model=str(folder))
    dense = pipeline("text-classification", model=model, tokenizer=tok)
    assert isinstance(sparse.model.bert.encoder.layer[0].output.dense, SparseLinear)
    sparse_out, dense_out = sparse(texts), dense(texts)
    labels = [o["label"] for o in dense_out]
    assert labels == ["LABEL_1", "LABEL_0", "LABEL_0", "LABEL_1", "LABEL_0"]  # the dense model learnt the task
    assert [o["label"] for o in sparse_out] == labels
    for s, d in zip(sparse_out, dense_out):
        assert abs(s["score"] - d["score"]) < 0.01


def test_hf_sparse_public_api_still_imports_lazily():
    assert hf_sparse.SparseCallback.__name__ == "SparseCallback"
