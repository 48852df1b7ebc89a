"""Tiny BERT configs with awkward sizes, and one-shot pruning, shared by the export and backend tests."""

from __future__ import annotations

from torch import nn
from transformers import BertConfig

from hf_sparse import SparseConfig, sparsify_


def bert_config(**overrides) -> BertConfig:
    """Awkward sizes on purpose: intermediate 70 (the FFN output Linear reads 70 inputs: a short last 4-block and
    2:4 group), hidden 36 with 2 heads of 18."""
    kwargs = {
        "hidden_size": 36,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 70,
        "vocab_size": 97,
        "max_position_embeddings": 40,
        "num_labels": 3,
    }
    return BertConfig(**{**kwargs, **overrides})


def prune(model: nn.Module, pattern: str = "4-block", sparsity: float | None = None) -> SparseConfig:
    """Prune `model` one-shot in place (0.9, or 1 - N/M for N:M) with `pattern`; returns the recipe."""
    if sparsity is None:
        sparsity = 0.5 if ":" in pattern else 0.9
    recipe = SparseConfig(schedule="one-shot", start=0, sparsity=sparsity, pattern=pattern)
    sparsify_(model, recipe).remove()
    return recipe
