"""Malformed or edited checkpoints fail through from_pretrained with the export module's own errors; so do wrong
devices, on-the-fly quantization, and a missing registration."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from hf_sparse.export import CheckpointError
from hf_sparse.integrations.quantizer import HfSparseConfig, require_registered
from hf_sparse.nn import SparseLinear
from tests.export.conftest import flip_byte, rewrite_weights, set_nm_index
from tests.export.conftest import pruned_bert as pruned_bert_with_sparsity
from tests.integrations.backend_support import pruned_bert, save


OUT = "bert.encoder.layer.0.output.dense"  # in_features 70: 18 4-blocks, so its block bitmask has padding bits


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    model, recipe = pruned_bert("4-block")
    return save(model, tmp_path_factory.mktemp("errors") / "ckpt", recipe, weight_dtype="int8", int8_linears=True)


@pytest.fixture
def folder(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "ckpt")


def load(folder, **kwargs):
    return AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)


def test_the_pristine_checkpoint_loads(folder):
    assert isinstance(load(folder).bert.encoder.layer[0].output.dense, SparseLinear)


def _set_padding_bit(t):
    t[f"{OUT}.block_bitmask"][0, -1] |= 0x80


def _code_minus_128(t):
    t[f"{OUT}.compressed"][0] = -128


def _zero_scale(t):
    t["classifier.weight_scale"][1, 0] = 0.0


def _drop_bitmask(t):
    del t[f"{OUT}.block_bitmask"]


def _stray_tensor(t):
    t["bert.encoder.layer.0.output.LayerNorm.bitmask"] = torch.zeros(36, 5, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set_padding_bit, f"tensor '{OUT}.block_bitmask' sets bits past block 18; they must be 0"),
        (_code_minus_128, f"tensor '{OUT}.compressed' holds the int8 code -128"),
        (_zero_scale, "tensor 'classifier.weight_scale' holds a value that is not finite and > 0"),
        (_drop_bitmask, f"tensor '{OUT}.block_bitmask' is missing from the weight files"),
        (_stray_tensor, "tensor 'bert.encoder.layer.0.output.LayerNorm.bitmask' is unexpected"),
    ],
)
def test_malformed_tensors_raise_the_export_modules_errors(folder, edit, message):
    rewrite_weights(folder / "model.safetensors", edit)  # fresh checksums: only the format checks can tell
    with pytest.raises(CheckpointError) as info:
        load(folder)
    assert message in str(info.value)


def test_corrupted_values_fail_their_checksum(folder):
    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors[f"{OUT}.compressed"][3] += 1  # a valid code, a wrong value
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=f"tensor '{OUT}.compressed' does not match its checksum"):
        load(folder)


def test_a_tampered_bias_of_a_converted_module_fails_its_checksum(folder):
    flip_byte(folder / "model.safetensors", f"{OUT}.bias", offset=5)  # a value changes; no format check sees it
    with pytest.raises(CheckpointError, match=rf"tensor '{OUT}\.bias' in 'model\.safetensors' does not match its"):
        load(folder)


def test_an_nm_index_out_of_range_is_refused(tmp_path):
    model, recipe = pruned_bert_with_sparsity("2:6", sparsity=1 - 2 / 6)  # 3-bit positions: 6 and 7 are no position
    folder = save(model, tmp_path / "nm6", recipe)
    query = "bert.encoder.layer.0.attention.self.query"
    rewrite_weights(folder / "model.safetensors", lambda t: set_nm_index(t, query))
    with pytest.raises(CheckpointError, match=rf"tensor '{query}\.nm_indices' holds a position >= M=6: index out"):
        load(folder)


INPUT = torch.tensor([[2, 17, 5, 9, 3, 0], [2, 5, 6, 7, 8, 3]])


def test_a_sharded_save_pretrained_loads_again(pristine, tmp_path):
    """save_pretrained writes the same metadata (the whole checksum list) into every shard; the reader accepts it,
    and still catches a tampered shard."""
    model = load(pristine)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    reloaded = load(tmp_path / "sharded")
    assert isinstance(reloaded.bert.encoder.layer[0].output.dense, SparseLinear)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=INPUT).logits, model(input_ids=INPUT).logits)

    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    key = f"{OUT}.compressed"
    flip_byte(tmp_path / "sharded" / index[key], key, offset=3)
    with pytest.raises(CheckpointError, match=rf"tensor '{OUT}\.compressed' does not match its checksum"):
        load(tmp_path / "sharded")


def test_an_edited_config_is_refused(folder):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["modules"][OUT]["sparsity"] = 0.5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match="quantization_config differs from the one stored in 'model.safetensors'"
    ):
        load(folder)


def test_a_newer_format_version_asks_for_an_upgrade(folder):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"format_version is 99.*pip install -U hf-sparse"):
        load(folder)


def test_the_kernels_run_on_the_cpu_only(folder):
    with pytest.raises(ValueError, match="hf_sparse's kernels run on the CPU"):
        load(folder, device_map={"": "cuda:0"})


def test_no_quantization_on_the_fly(folder, tmp_path):
    model, _ = pruned_bert("4-block")
    model.save_pretrained(tmp_path / "dense")
    block = json.loads((folder / "config.json").read_text())["quantization_config"]
    with pytest.raises(ValueError, match="does not quantize a dense model on the fly"):
        load(tmp_path / "dense", quantization_config=HfSparseConfig(**block))


def test_without_the_registration_transformers_loads_random_weights(folder, monkeypatch):
    """What `import hf_sparse` prevents, and what `require_registered` reports."""
    monkeypatch.delitem(AUTO_QUANTIZER_MAPPING, "hf_sparse")
    monkeypatch.delitem(AUTO_QUANTIZATION_CONFIG_MAPPING, "hf_sparse")
    with pytest.raises(RuntimeError, match=r"registered to nothing.*`import hf_sparse` before from_pretrained"):
        require_registered()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model = load(folder)
    finally:
        logger.removeHandler(handler)
    messages = "\n".join(r.getMessage() for r in records)
    assert "Unknown quantization type, got hf_sparse" in messages
    query = model.bert.encoder.layer[0].attention.self.query
    assert type(query) is torch.nn.Linear  # a dense Linear whose weight was never loaded
    assert "attention.self.query.weight" in messages and "MISSING" in messages  # initialised at random
