"""Helpers for the backend tests: tiny pruned models from configs, their checkpoints, and the references.

The reference of an int8 model is the numerics of `hf_sparse.quantization`: the dense model holding the dequantized
weights (`SparseCheckpoint.load_into`) whose int8 Linears fake-quantize their input per token.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, BertConfig, BertForSequenceClassification, BertTokenizer

from hf_sparse import SparseCheckpoint, SparseConfig, save_sparse, sparsify_
from hf_sparse.quantization import fake_quantize_activation
from tests.tiny_models import bert_config as tiny_bert_config
from tests.tiny_models import prune


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "movie", "film", "was", "is", "very", "not"]
WORDS += ["good", "bad", "great", "awful", "boring", "fun", "plot", "actors", "story", "loved", "hated", "it", "and"]
WORDS += ["but"]


def bert_config(**overrides) -> BertConfig:
    """The tiny awkward-sized BERT config of tests.tiny_models, with a vocabulary of WORDS."""
    return tiny_bert_config(**{"vocab_size": len(WORDS) + 3, **overrides})


def pruned_bert(pattern: str = "4-block", seed: int = 0, **config) -> tuple[nn.Module, SparseConfig]:
    torch.manual_seed(seed)
    model = BertForSequenceClassification(bert_config(**config)).eval()
    return model, prune(model, pattern)


def tokenizer() -> BertTokenizer:
    return BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


POSITIVE, NEGATIVE = ["good", "great", "fun", "loved"], ["bad", "awful", "boring", "hated"]
NEUTRAL = ["the", "a", "movie", "film", "was", "is", "very", "plot", "actors", "story", "it", "and", "but"]


def sentiment_bert(steps: int = 30) -> tuple[nn.Module, SparseConfig]:
    """A tiny BERT trained (with 80% 4-block pruning from step 0) to tell sentences holding a positive word from
    those holding a negative one: random models give every input nearly the same logits, so their labels would
    test nothing."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    tok = tokenizer()
    config = bert_config(num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    recipe = SparseConfig(schedule="one-shot", start=0, sparsity=0.8, pattern="4-block")
    sparsifier = sparsify_(model, recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        labels = torch.randint(0, 2, (32,), generator=g)
        texts = []
        for label in labels.tolist():
            words = [NEUTRAL[i] for i in torch.randint(0, len(NEUTRAL), (5,), generator=g).tolist()]
            polar = (POSITIVE if label else NEGATIVE)[int(torch.randint(0, 4, (1,), generator=g))]
            words.insert(int(torch.randint(0, 6, (1,), generator=g)), polar)
            texts.append(" ".join(words))
        model(**tok(texts, return_tensors="pt", padding=True), labels=labels).loss.backward()
        sparsifier.before_optimizer_step()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()
    sparsifier.remove()
    return model.eval(), recipe


def int8_reference(folder, model_cls) -> nn.Module:
    """The dense model of `folder` (dequantized weights) whose int8 Linears, and Linears tied to int8 embeddings,
    fake-quantize their inputs per token: what the kernels compute, in pure torch."""
    model = dense_reference(folder, model_cls)
    int8 = {name for name, e in SparseCheckpoint(folder).quantization.modules.items() if e.dtype == "int8"}
    modules = dict(model.named_modules())
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    int8 |= {t.removesuffix(".weight") for t, s in tied.items() if s.removesuffix(".weight") in int8}
    for name in int8:
        if isinstance(modules.get(name), nn.Linear):
            modules[name].register_forward_pre_hook(lambda m, args: (fake_quantize_activation(args[0]),))
    return model


def dense_reference(folder, model_cls) -> nn.Module:
    """The dense model holding the checkpoint's decompressed (for int8: dequantized) weights."""
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config  # a plain model of the same architecture
    return SparseCheckpoint(folder).load_into(model_cls(config)).eval()


def save(model: nn.Module, folder, recipe: SparseConfig, **options):
    return save_sparse(model, folder, recipe, **options)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "logits") -> None:
    """max |actual - expected| <= tol * max |expected|, reporting the deviation."""
    scale = float(expected.abs().max())
    diff = float((actual - expected).abs().max())
    assert diff <= tol * scale, f"{what}: max abs diff {diff:.3g} > {tol:g} x max |expected| {scale:.3g}"
