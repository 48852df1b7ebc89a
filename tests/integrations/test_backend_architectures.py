"""Any architecture whose projections are nn.Linear: RoBERTa, DistilBERT and a decoder (Llama, tied and untied)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from hf_sparse import ops
from hf_sparse.integrations.fusion_rules import FusedFeedForward
from hf_sparse.integrations.module_swap import FusedActivation, model_workload
from hf_sparse.nn import Int8Embedding, SparseLinear
from tests.integrations.backend_support import assert_close, int8_reference, prune, save
from tests.integrations.test_backend_encoder_layer import reference_for


TOL = 1e-5


def run(model, folder, auto, ids, **options):
    recipe = prune(model, options.pop("pattern", "4-block"), 0.8)
    folder = save(model, folder, recipe, **options)
    loaded = auto.from_pretrained(folder)
    with torch.no_grad():
        assert_close(
            loaded(input_ids=ids).logits, reference_for(loaded, folder, type(model))(input_ids=ids).logits, TOL
        )
    return loaded, folder


def test_roberta(tmp_path):
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=60, hidden_size=36, intermediate_size=52, num_hidden_layers=2, num_attention_heads=3,
        max_position_embeddings=40, num_labels=2,
    )  # fmt: skip
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    model, _ = run(RobertaForSequenceClassification(config).eval(), tmp_path / "m", AutoModelForSequenceClassification,
                   ids, weight_dtype="int8", pattern="unstructured")  # fmt: skip
    layer = model.roberta.encoder.layer[1]
    assert layer.attention.self.query.group is layer.attention.self.value.group
    assert layer.intermediate.dense.activation == "gelu"
    ffn = (layer.intermediate.dense, layer.output.dense)
    both_sparse = all(m.packed.layout.value in ("int8_block4", "int8_csr") for m in ffn)
    fusable = both_sparse and ops.extension_available()
    assert ("feed_forward_chunk" in vars(layer)) == fusable  # the fused FFN kernel takes int8 sparse weights
    assert type(model.classifier.dense) is torch.nn.Linear  # the head is not converted


def test_distilbert(tmp_path):
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=60, dim=36, hidden_dim=52, n_layers=2, n_heads=3, max_position_embeddings=40)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    model, _ = run(DistilBertForSequenceClassification(config).eval(), tmp_path / "m",
                   AutoModelForSequenceClassification, ids, weight_dtype="int8", int8_embeddings=True)  # fmt: skip
    block = model.distilbert.transformer.layer[0]
    assert block.attention.q_lin.group is block.attention.k_lin.group is block.attention.v_lin.group
    assert block.attention.out_lin.packed is not None
    assert block.ffn.lin1.activation == "gelu" and isinstance(block.ffn.activation, FusedActivation)
    assert isinstance(block.ffn.ff_chunk, FusedFeedForward) == ops.extension_available()
    assert isinstance(model.distilbert.embeddings.word_embeddings, Int8Embedding)
    assert ("forward" in vars(block)) == ops.extension_available()  # the whole block as six kernel calls
    with torch.no_grad():
        for block in model.distilbert.transformer.layer:
            vars(block).pop("forward", None)  # the block's own forward
        fused = model(input_ids=ids).logits
        for block in model.distilbert.transformer.layer:
            vars(block.ffn).pop("ff_chunk", None)  # back to the class's method: two kernel calls
        assert torch.equal(model(input_ids=ids).logits, fused)


@pytest.mark.parametrize("tied", [True, False])
def test_llama_decoder(tmp_path, tied):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )  # fmt: skip
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    model, folder = run(LlamaForCausalLM(config).eval(), tmp_path / "m", AutoModelForCausalLM, ids,
                        weight_dtype="int8", int8_embeddings=True)  # fmt: skip
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attention.q_proj.group is attention.k_proj.group is attention.v_proj.group  # GQA: widths 32, 16, 16
    assert attention.q_proj.group.packed.splits == (32, 16, 16)
    assert mlp.gate_proj.group is mlp.up_proj.group and mlp.down_proj.packed is not None
    assert mlp.gate_proj.activation == "none"  # SiLU is not fused
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    # a head tied to the int8 embeddings runs the int8 kernel on the same codes; an untied one stays dense
    assert isinstance(model.lm_head, SparseLinear) if tied else type(model.lm_head) is torch.nn.Linear
    reference = int8_reference(folder, LlamaForCausalLM)
    prompt = torch.tensor([[5, 6, 7]])
    generated = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, reference.generate(prompt, max_new_tokens=5, do_sample=False))
    if tied:
        model.save_pretrained(tmp_path / "again")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
        with torch.no_grad():
            assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def _layouts(model) -> set[str]:
    return {
        (m.group.packed if m.group is not None else m.packed).layout.value
        for m in model.modules()
        if isinstance(m, SparseLinear)
    }


def test_decoders_choose_layouts_for_token_by_token_decoding(tmp_path, monkeypatch):
    """A model that generates packs its automatic layouts for 1-4 tokens per step (`model_workload`): at 70%
    unstructured dense int8, where an encoder batch runs int8 CSR (on AVX-512 VNNI; generated 4-block code where
    packing writes it, a tie with CSR there); HF_SPARSE_WORKLOAD overrides
    the choice, and a bad value names the variable."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    folder = save(model, tmp_path / "m", prune(model, "unstructured", 0.7), weight_dtype="int8")
    fast = ops.isa() == "avx512_vnni"
    monkeypatch.delenv("HF_SPARSE_WORKLOAD", raising=False)
    assert model_workload(model) == "decode"
    assert _layouts(AutoModelForCausalLM.from_pretrained(folder)) == {"int8_dense"}
    monkeypatch.setenv("HF_SPARSE_WORKLOAD", " Batch ")
    assert model_workload(model) == "batch"
    batch = {"int8_block4"} if fast and ops.jit_available() else {"int8_csr"} if fast else {"int8_dense"}
    assert _layouts(AutoModelForCausalLM.from_pretrained(folder)) == batch
    monkeypatch.setenv("HF_SPARSE_WORKLOAD", "prefill")
    with pytest.raises(ValueError, match=r"HF_SPARSE_WORKLOAD='prefill' is not supported; use auto, batch, decode"):
        model_workload(model)
    monkeypatch.delenv("HF_SPARSE_WORKLOAD")
    classifier = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=60, hidden_size=36, intermediate_size=52, num_hidden_layers=1, num_attention_heads=3,
        max_position_embeddings=40, num_labels=2,
    ))  # fmt: skip
    assert model_workload(classifier) == "batch"
