"""Dev accuracy of a pruned model after export: `save_sparse` with int8 options, then `from_pretrained` on the
kernels, as a user would deploy it. Called by sst2.py for every pruned run; also a script:

    python benchmarks/accuracy/export_eval.py --model-dir runs/magnitude-4block-80/model --data-dir DIR

Each variant's row: the checkpoint's size on disk (all files but the card and tokenizer), its ratio to the fp32
`save_pretrained` of the same model, and the dev accuracy of the loaded model (next to the fp32 model's).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


#: variant -> save_sparse options (docs/format.md); from the plain int8 Linears to everything compressed
VARIANTS = {
    "int8 sparse Linears": {"weight_dtype": "int8"},
    "+ int8 embeddings and head": {"weight_dtype": "int8", "int8_embeddings": True, "int8_linears": True},
    "+ bfloat16 biases and norms": {
        "weight_dtype": "int8", "int8_embeddings": True, "int8_linears": True, "float_dtype": "bfloat16",
    },
}  # fmt: skip


def weights_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6


def accuracy(model, dataset, collator, batch_size: int = 64) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    correct = total = 0
    with torch.inference_mode():
        for batch in loader:
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
            total += len(labels)
    return correct / total


def evaluate_exports(model, recipe, tokenizer, dataset) -> list[dict]:
    """Rows {"checkpoint", "mb", "ratio", "accuracy"}: the fp32 `save_pretrained` of `model` (pruned), then each of
    VARIANTS, on `dataset` (tokenized, with labels)."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    import hf_sparse

    collator = DataCollatorWithPadding(tokenizer)
    model = model.eval()
    with tempfile.TemporaryDirectory(prefix="hf_sparse_export_eval_") as tmp:
        dense_dir = Path(tmp) / "fp32"
        model.save_pretrained(dense_dir)
        dense_mb = weights_mb(dense_dir)
        fp32 = {"checkpoint": "fp32", "mb": round(dense_mb, 2), "ratio": 1.0}
        out = [{**fp32, "accuracy": accuracy(model, dataset, collator)}]
        for name, options in VARIANTS.items():
            folder = Path(tmp) / f"v{len(out)}"
            hf_sparse.save_sparse(model, folder, recipe, **options)
            loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
            mb = weights_mb(folder)
            out.append({
                "checkpoint": name,
                "mb": round(mb, 2),
                "ratio": round(dense_mb / mb, 2),
                "accuracy": accuracy(loaded, dataset, collator),
                "options": options,
            })  # fmt: skip
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, type=Path, help="a pruned model saved with save_pretrained")
    p.add_argument("--data-dir", required=True, type=Path, help="folder with SST-2 dev.tsv")
    p.add_argument("--recipe", type=Path, help="its sparse_config.json (default: <model-dir>/sparse_config.json)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_sparse import SparseConfig

    from sst2 import load_sst2

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = SparseConfig.from_pretrained(args.recipe or args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    dev = load_sst2(args.data_dir)["validation"].map(
        lambda b: tokenizer(b["sentence"], truncation=True, max_length=64), batched=True, remove_columns=["sentence"]
    )
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir)
    rows = evaluate_exports(model, recipe, tokenizer, dev)
    print("| checkpoint | MB | vs fp32 | dev accuracy |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['mb']:.2f} | {r['ratio']:.2f}x | {r['accuracy'] * 100:.2f} |")
    return rows


if __name__ == "__main__":
    main()
