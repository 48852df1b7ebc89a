"""Tiny BERT models with awkward shapes (hidden 36, intermediate 70: a short last 4-block and 2:4 group), pruned."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BertForSequenceClassification

from hf_sparse.export.bits import pack_uints, unpack_uints
from hf_sparse.export.save import CHECKSUMS_KEY, tensor_sha256
from hf_sparse.quantization import fake_quantize_weight
from tests.tiny_models import bert_config, prune


def pruned_bert(pattern: str = "4-block", sparsity: float | None = None, cls=BertForSequenceClassification, seed=0):
    """(model, recipe): a tiny BERT pruned one-shot to `sparsity` (1 - N/M for N:M) with `pattern`."""
    torch.manual_seed(seed)
    model = cls(bert_config()).eval()
    return model, prune(model, pattern, sparsity)


def int8_reference(model, names):
    """The model with the named modules' weights replaced by their int8 quantize-dequantize (the numerics)."""
    ref = type(model)(model.config).eval()
    ref.load_state_dict(model.state_dict())
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name in names:
            modules[name].weight.copy_(fake_quantize_weight(modules[name].weight))
    return ref


def rewrite_weights(path, edit) -> None:
    """Tamper with a checkpoint's model.safetensors the way a careful attacker would: apply `edit(tensors)`, then
    store fresh checksums so that only the format checks can notice."""
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors)
    metadata[CHECKSUMS_KEY] = json.dumps({k: tensor_sha256(t) for k, t in tensors.items()})
    save_file(tensors, str(path), metadata=metadata)


def flip_byte(path, key: str, offset: int = 0) -> None:
    """Corrupt one byte of tensor `key`'s data in the safetensors file `path`, leaving header and checksums alone."""
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    begin, _ = json.loads(data[8 : 8 + header_size])[key]["data_offsets"]
    data[8 + header_size + begin + offset] ^= 0x01
    path.write_bytes(bytes(data))


def set_nm_index(t, name="bert.encoder.layer.0.attention.self.query", row=0, slot=1, value=6, m=6, n=2):
    """Overwrite one packed 3-bit position of a 2:6 module (6 and 7 are valid codes but no position in a group)."""
    packed = t[f"{name}.nm_indices"]
    cols = int(t[f"{name}.shape"][1])
    k = -(-cols // m) * n
    slots = unpack_uints(packed, k, 3)
    slots[row, slot] = value
    t[f"{name}.nm_indices"] = pack_uints(slots, 3)
