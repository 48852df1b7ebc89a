"""Shared fixtures: tiny models built from configs and synthetic data. Nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_tiny_bert(num_labels: int = 2, seed: int = 0, hidden: int = 32, layers: int = 2, intermediate: int = 64):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=99,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


class TinyClassificationData(torch.utils.data.Dataset):
    """Token sequences whose label is whether token 7 occurs: learnable by a tiny BERT in a few steps."""

    def __init__(self, n: int = 64, seq_len: int = 12, vocab: int = 99, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(8, vocab, (n, seq_len), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        pos = torch.randint(1, seq_len, (n,), generator=g)
        self.input_ids[flip, pos[flip]] = 7
        self.input_ids[:, 0] = 2
        self.labels = flip.long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": torch.ones_like(self.input_ids[i]),
            "labels": self.labels[i],
        }


@pytest.fixture
def tiny_bert():
    return make_tiny_bert()


@pytest.fixture
def tiny_data():
    return TinyClassificationData()
