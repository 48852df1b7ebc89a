"""The model every engine runs: a BERT classifier with random weights, pruned by hf_sparse, plus its inputs.

Every engine gets the SAME pruned weights: the torch engines copy `BenchModel.model`, the ONNX engines load a file
exported from it (cached under a digest of those weights), and DeepSparse loads that file in its own process.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification

import hf_sparse


INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")

# name -> BertConfig kwargs. "base" is BertConfig() itself (BERT-base: 12 layers, hidden 768, vocab 30522).
MODEL_SIZES: dict[str, dict] = {
    "base": {},
    # 2 small layers: a CI smoke run of the whole harness in seconds
    "tiny": {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 2,
        "intermediate_size": 256,
        "vocab_size": 1024,
    },
}


@dataclass
class BenchModel:
    """One pruned model and what the engines need to run it."""

    size: str
    sparsity: float
    pattern: str
    seq_len: int
    seed: int
    model: BertForSequenceClassification
    measured_sparsity: float
    digest: str  # sha256 of the weights: keys the ONNX cache, so a cached file always holds these weights
    prune_s: float
    layers: int | None = None  # num_hidden_layers when not the size's own
    _inputs: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _reference: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def config_key(self) -> str:
        layers = f"-L{self.layers}" if self.layers is not None else ""
        return f"{self.size}{layers}-s{self.sparsity:g}-{self.pattern}-seq{self.seq_len}-seed{self.seed}"

    def inputs(self, batch: int) -> dict[str, torch.Tensor]:
        """Fixed random token ids for `batch` sequences of `seq_len` tokens, no padding (all engines get these)."""
        if batch not in self._inputs:
            gen = torch.Generator().manual_seed(self.seed * 1000 + batch)
            ids = torch.randint(0, self.model.config.vocab_size, (batch, self.seq_len), generator=gen)
            self._inputs[batch] = {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "token_type_ids": torch.zeros_like(ids),
            }
        return self._inputs[batch]

    def numpy_inputs(self, batch: int) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.inputs(batch).items()}

    @torch.inference_mode()
    def reference(self, batch: int) -> np.ndarray:
        """fp32 logits of the pruned torch model: what every engine's output is checked against."""
        if batch not in self._reference:
            self._reference[batch] = self.model(**self.inputs(batch)).logits.float().numpy()
        return self._reference[batch]


def _weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def build_model(
    size: str, sparsity: float, pattern: str, *, seq_len: int = 128, seed: int = 0, layers: int | None = None
) -> BenchModel:
    """BertForSequenceClassification with seeded random weights, magnitude-pruned one-shot to `sparsity`.

    hf_sparse's defaults prune the 72 encoder Linears of BERT-base (not embeddings, pooler or classifier).
    sparsity 0 leaves the model dense. `layers` replaces the size's number of encoder layers.
    """
    if size not in MODEL_SIZES:
        raise ValueError(f"Unknown model size {size!r}; known: {', '.join(MODEL_SIZES)}")
    if layers is not None and layers < 1:
        raise ValueError(f"layers={layers}: an encoder needs at least one layer")
    torch.manual_seed(seed)
    config = BertConfig(**MODEL_SIZES[size])
    if layers is not None:
        config.num_hidden_layers = layers
    model = BertForSequenceClassification(config).eval()
    start = time.perf_counter()
    measured = 0.0
    if sparsity > 0:
        config = hf_sparse.SparseConfig(schedule="one-shot", start=0, sparsity=sparsity, pattern=pattern)
        sparsifier = hf_sparse.sparsify_(model, config)
        measured = sparsifier.sparsity()["global"]
        sparsifier.remove()
    model.requires_grad_(False)
    return BenchModel(
        size=size,
        sparsity=sparsity,
        pattern=pattern,
        seq_len=seq_len,
        seed=seed,
        model=model,
        measured_sparsity=measured,
        digest=_weights_digest(model),
        prune_s=time.perf_counter() - start,
        layers=layers,
    )
