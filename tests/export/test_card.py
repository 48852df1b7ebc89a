"""The model card renders, parses back with huggingface_hub, carries the measured figures and invents nothing."""

from __future__ import annotations

import re

import pytest
from huggingface_hub import ModelCard

from hf_sparse.export import CardInfo, SparseCheckpoint, save_sparse
from hf_sparse.export.card import layer_type
from tests.export.conftest import pruned_bert


def test_card_carries_the_real_figures(tmp_path):
    model, recipe = pruned_bert("4-block")
    info = CardInfo(
        base_model="google-bert/bert-base-uncased",
        license="apache-2.0",
        datasets=["nyu-mll/glue"],
        language="en",
        pipeline_tag="text-classification",
        tags=["glue"],
        metrics={"accuracy": 0.8379, "f1": 0.85},
        dense_metrics={"accuracy": 0.8454},
        eval_dataset="nyu-mll/glue",
        eval_dataset_config="mnli",
        eval_split="validation_matched",
    )
    out = save_sparse(model, tmp_path / "tiny-bert-sparse", recipe, weight_dtype="int8", card=info, int8_linears=True)
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.base_model == "google-bert/bert-base-uncased"
    assert data.base_model_relation == "quantized"
    assert data.library_name == "transformers" and data.license == "apache-2.0" and data.language == "en"
    assert data.pipeline_tag == "text-classification" and data.datasets == ["nyu-mll/glue"]
    assert data.tags == ["hf-sparse", "sparse", "pruned", "int8", "glue"]
    results = {r.metric_type: r for r in data.eval_results}
    assert results["accuracy"].metric_value == 0.8379 and results["f1"].metric_value == 0.85
    assert results["accuracy"].dataset_config == "mnli" and results["accuracy"].dataset_split == "validation_matched"
    assert data.model_name == "tiny-bert-sparse"

    text = card.text
    checkpoint = SparseCheckpoint(out)
    q = checkpoint.quantization
    size = (out / "model.safetensors").stat().st_size
    assert f"| this checkpoint (safetensors files) | {size / 1e6:.2f} MB |" in text
    dense = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert f"| dense (float32, tensor data) | {dense / 1e6:.2f} MB |" in text
    assert f"| ratio | {dense / size:.2f}x smaller |" in text
    assert f"- Sparsity of those modules: {q.sparsity:.2%}" in text
    assert "- Pattern: `4-block` on 12 Linear modules, stored as `block4-bitmask`" in text
    assert "| `attention.self.query` | 2 | block4-bitmask | int8 |" in text
    assert "| `bert.pooler.dense` | 1 | dense | int8 |" in text
    assert "| accuracy | 0.8454 | 0.8379 | -0.0075 |" in text
    assert "| f1 | | 0.85 | |" in text
    assert "Measured on nyu-mll/glue (mnli), split validation_matched." in text
    assert "import hf_sparse" in text and f'BertForSequenceClassification.from_pretrained("{out}")' in text
    assert '"pattern": "4-block"' in text and '"schedule": "one-shot"' in text
    # the per-layer-type sparsity is the measured one
    query = [m for n, m in model.named_modules() if n.endswith("attention.self.query")]
    zeros = sum(int((m.weight == 0).sum()) for m in query) / sum(m.weight.numel() for m in query)
    row = re.search(r"\| `attention\.self\.query` \| 2 \| block4-bitmask \| int8 \| ([\d.]+)% \|", text)
    assert float(row.group(1)) == pytest.approx(100 * zeros, abs=0.005)


def test_unknown_fields_are_left_out(tmp_path):
    model, _ = pruned_bert("2:4")
    out = save_sparse(model, tmp_path / "ckpt", modules=["query"], pattern="2:4")
    card = ModelCard.load(out / "README.md")
    yaml = card.content.split("---")[1]
    for key in ("base_model", "license", "datasets", "pipeline_tag", "language", "model-index", "eval_results"):
        assert key not in yaml
    assert card.data.tags == ["hf-sparse", "sparse", "pruned"]
    assert "## Accuracy" not in card.text and "## Recipe" not in card.text and "Pruning method" not in card.text
    assert "A sparse version of a dense model" in card.text


def test_base_model_comes_from_a_hub_name_or_path(tmp_path):
    model, recipe = pruned_bert("4-block")
    model.config._name_or_path = "org/dense-model"
    out = save_sparse(model, tmp_path / "ckpt", recipe)
    data = ModelCard.load(out / "README.md").data
    assert data.base_model == "org/dense-model" and data.base_model_relation == "finetune"
    model.config._name_or_path = str(tmp_path)  # a local folder is not a base model
    out = save_sparse(model, tmp_path / "ckpt2", recipe)
    assert ModelCard.load(out / "README.md").data.base_model is None


def test_card_info_validation():
    with pytest.raises(ValueError, match="card.metrics needs card.eval_dataset"):
        CardInfo(metrics={"accuracy": 0.9}, pipeline_tag="text-classification")
    with pytest.raises(ValueError, match="card.metrics needs card.pipeline_tag"):
        CardInfo(metrics={"accuracy": 0.9}, eval_dataset="nyu-mll/glue")
    with pytest.raises(ValueError, match="card.dense_metrics has 'f1', which card.metrics lacks"):
        CardInfo(dense_metrics={"f1": 0.9})
    with pytest.raises(TypeError, match=r"card.metrics\['accuracy'\] must be a number"):
        CardInfo(metrics={"accuracy": "high"})
    with pytest.raises(ValueError, match="card.base_model_relation='pruned'"):
        CardInfo(base_model_relation="pruned")
    with pytest.raises(TypeError, match=r"card got unknown field\(s\) \['licence'\]"):
        CardInfo.from_any({"licence": "mit"})


def test_layer_type():
    assert layer_type("bert.encoder.layer.11.attention.self.query") == "attention.self.query"
    assert layer_type("model.layers.0.mlp.experts.3.up_proj") == "mlp.experts.up_proj"
    assert layer_type("bert.pooler.dense") == "bert.pooler.dense"


def test_card_says_first_to_import_hf_sparse(tmp_path):
    model, recipe = pruned_bert("4-block")
    out = save_sparse(model, tmp_path / "ckpt", recipe, weight_dtype="int8")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    body = card.text.lstrip().splitlines()
    assert body[0] == "# ckpt"
    first = next(line for line in body[1:] if line.strip())  # the first thing under the title
    assert first.startswith("> **Load this model after `import hf_sparse`**")
    assert "leaves every compressed Linear layer randomly initialised" in first
