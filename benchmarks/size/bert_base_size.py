"""Checkpoint size of a BERT-base-shaped model at 90% 4-block sparsity: dense save_pretrained vs save_sparse.

Random weights (BertConfig() defaults: 12 layers, hidden 768, vocab 30522), one-shot magnitude pruning. Prints the
file size of each variant, its ratio to the dense fp32 file, and what each part of the model contributes.

    python benchmarks/size/bert_base_size.py [--sparsity 0.9] [--pattern 4-block]
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_sparse import SparseConfig, sparsify_
from hf_sparse.export import SparseCheckpoint, save_sparse


PARTS = (
    "sparse Linears (weights)",
    "word embeddings",
    "position + token-type embeddings",
    "pooler + classifier (weights)",
    "biases + LayerNorm",
    "header (names, metadata, checksums)",
)


def header(path: Path) -> dict:
    """The safetensors header: {tensor name: {dtype, shape, data_offsets}} (read directly, no tensor data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        data = json.loads(f.read(n))
    data.pop("__metadata__", None)
    return data


def part_of(key: str, sparse: set[str]) -> str:
    module, _, suffix = key.rpartition(".")
    if module in sparse and suffix != "bias":
        return PARTS[0]
    if "word_embeddings" in key:
        return PARTS[1]
    if "embeddings" in key and "LayerNorm" not in key:
        return PARTS[2]
    if (key.startswith(("bert.pooler.", "classifier."))) and suffix != "bias":
        return PARTS[3]
    return PARTS[4]


def breakdown(path: Path, sparse: set[str]) -> dict[str, int]:
    out = dict.fromkeys(PARTS, 0)
    for key, info in header(path).items():
        begin, end = info["data_offsets"]
        out[part_of(key, sparse)] += end - begin
    out[PARTS[-1]] = path.stat().st_size - sum(out.values())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--pattern", default="4-block")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig()).eval()
    recipe = SparseConfig(schedule="one-shot", start=0, sparsity=args.sparsity, pattern=args.pattern)
    sparsify_(model, recipe).remove()

    variants = {
        "float32 values (no int8)": {},
        "int8 sparse Linears": {"weight_dtype": "int8"},
        "+ int8 word embeddings": {"weight_dtype": "int8", "int8_embeddings": ["word_embeddings"]},
        "+ int8 all embeddings": {"weight_dtype": "int8", "int8_embeddings": True},
        "+ int8 all embeddings + int8 pooler/classifier": {
            "weight_dtype": "int8",
            "int8_embeddings": True,
            "int8_linears": True,
        },
        "+ int8 all embeddings + int8 pooler/classifier + bfloat16 biases/LayerNorm": {
            "weight_dtype": "int8",
            "int8_embeddings": True,
            "int8_linears": True,
            "float_dtype": "bfloat16",
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp / "dense")
        dense_file = tmp / "dense" / "model.safetensors"
        dense_size = dense_file.stat().st_size
        sparse_names: set[str] = set()
        rows = []
        for name, options in variants.items():
            out = save_sparse(model, tmp / "sparse", recipe, **options)
            checkpoint = SparseCheckpoint(out)
            sparse_names = set(checkpoint.quantization.sparse_modules())
            file = out / "model.safetensors"
            rows.append((name, file.stat().st_size, breakdown(file, sparse_names), checkpoint.quantization.sparsity))
        dense_parts = breakdown(dense_file, sparse_names)

    print(f"BERT-base (BertForSequenceClassification, BertConfig()), {args.pattern} at {args.sparsity:.0%}")
    print(f"measured sparsity of the sparse Linears: {rows[0][3]:.4f}\n")
    print(f"| checkpoint | file MB | ratio vs dense fp32 | {' | '.join(PARTS)} |")
    print("|---|---:|---:|" + "---:|" * len(PARTS))
    print(
        f"| dense fp32 (save_pretrained) | {dense_size / 1e6:.2f} | 1.00x | "
        + " | ".join(f"{dense_parts[p] / 1e6:.2f}" for p in PARTS)
        + " |"
    )
    for name, size, parts, _ in rows:
        print(
            f"| {name} | {size / 1e6:.2f} | {dense_size / size:.2f}x | "
            + " | ".join(f"{parts[p] / 1e6:.2f}" for p in PARTS)
            + " |"
        )
    print("\nexport options of each row: " + "; ".join(f"{n}: {o}" for n, o in variants.items()))
    int8_linears = rows[1][2][PARTS[0]]
    print(
        f"\nsparse Linears alone: {dense_parts[PARTS[0]] / 1e6:.2f} MB fp32 -> {int8_linears / 1e6:.2f} MB "
        f"({dense_parts[PARTS[0]] / int8_linears:.1f}x) with int8 values"
    )


if __name__ == "__main__":
    main()
