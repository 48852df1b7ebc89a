"""A movement pruning run of sst2.py with probes: what each step and each pruning step does to the model.

    python benchmarks/accuracy/movement_probe.py --data-dir DIR --model-path MINILM --dense-dir runs/dense \
        --output-dir /tmp/probe --method movement --sparsity 0.9 --max-steps 1000 --batch-size 16 \
        --eval-every 50 --eval-n 128 --full-eval

The model, data, recipe and Trainer are sst2.py's (all its arguments apply); there is no export evaluation.
Prints JSON lines: `PROBE` every --eval-every steps and at each pruning step (accuracy and the spread of the logit
margin over the first --eval-n dev sentences, in eval mode: a spread of 0 is a constant-output model; masked
weights found non-zero in a training forward; the scores' largest magnitude; the clip factor the scores used),
`PRUNE` at each pruning step (accuracy and spread just before and just after it; weights regrown, newly pruned and
kept), and `RESULT` (with --full-eval, the dev accuracy sst2.py reports). Writes `<output-dir>/steplog.json`:
[step, clip factor, L1 norm of the scores' change] for every optimizer step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import sst2  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval-every", type=int, default=50, help="probe every N optimizer steps")
    p.add_argument("--eval-n", type=int, default=128, help="dev sentences the probes evaluate")
    p.add_argument("--stop-at", type=int, default=0, help="stop training after this step (0: run to the end)")
    p.add_argument("--full-eval", action="store_true", help="report the dev accuracy on the whole dev set")
    probe, rest = p.parse_known_args(argv)
    return probe, sst2.parse_args(rest)


def main(argv=None):
    probe_args, args = parse_args(argv)
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from hf_sparse import SparseCallback

    if args.method != "movement" or args.dense_dir is None:
        raise ValueError("movement_probe.py probes movement pruning: pass --method movement and --dense-dir")
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = sst2.load_sst2(args.data_dir, args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    ds = ds.map(
        lambda b: tokenizer(b["sentence"], truncation=True, max_length=args.max_seq_length),
        batched=True,
        remove_columns=["sentence"],
    )
    model = AutoModelForSequenceClassification.from_pretrained(args.dense_dir / "model", num_labels=2)
    sparse = SparseCallback(sst2.build_config(args, args.max_steps), log_per_module=False)
    collator = DataCollatorWithPadding(tokenizer)
    dev = ds["validation"].select(range(min(probe_args.eval_n, len(ds["validation"]))))
    dev_batch = collator([dev[i] for i in range(len(dev))])
    dev_labels = dev_batch.pop("labels")

    def evaluate() -> tuple[float, float]:
        was = model.training
        model.eval()
        with torch.no_grad():
            logits = model(**dev_batch).logits
        model.train(was)
        margin = logits[:, 1] - logits[:, 0]
        return float((logits.argmax(-1) == dev_labels).float().mean()), float(margin.std())

    class Probe(TrainerCallback):
        def __init__(self):
            self.violations, self.prev, self.steplog = 0, None, []

        def on_train_begin(self, args, state, control, **kwargs):
            sp = sparse.sparsifier
            for name, module in sp.targets.items():
                module.register_forward_pre_hook(lambda m, i, name=name: self._count_violations(m, name))
            prune = sp._prune

            def probed_prune(step: int) -> None:  # wraps the engine's pruning step, to see its effect alone
                before = {n: m.clone() for n, m in sp.masks.items()}
                acc0, spread0 = evaluate()
                prune(step)
                acc1, spread1 = evaluate()
                info = {
                    "step": step, "acc_before": acc0, "spread_before": round(spread0, 4), "acc_after": acc1,
                    "spread_after": round(spread1, 4),
                    "regrown": sum(int((~before[n] & sp.masks[n]).sum()) for n in before),
                    "newly_pruned": sum(int((before[n] & ~sp.masks[n]).sum()) for n in before),
                    "kept": sum(int(sp.masks[n].sum()) for n in before),
                }  # fmt: skip
                print("PRUNE", json.dumps(info), flush=True)

            sp._prune = probed_prune

        def _count_violations(self, module, name):
            if module.training and name in sparse.sparsifier._pruned:
                self.violations += int((module.weight[sparse.sparsifier._pruned[name]] != 0).sum())

        def on_step_end(self, args, state, control, **kwargs):
            sp, step = sparse.sparsifier, state.global_step
            scores = sp.method.scores_
            scale = getattr(sp.method, "last_gradient_scale", None)
            if self.prev is not None:
                change = sum(float((scores[n] - self.prev[n]).abs().sum()) for n in scores)
                self.steplog.append([step, scale, change])
            self.prev = {n: s.clone() for n, s in scores.items()}
            if step % probe_args.eval_every == 0 or sp.last_prune_step == step or step == 1:
                acc, spread = evaluate()
                row = {
                    "step": step, "acc": round(acc, 4), "margin_spread": round(spread, 4),
                    "sparsity": round(sp.sparsity()["global"], 4), "masked_nonzero_in_forward": self.violations,
                    "score_absmax": float(max(s.abs().max() for s in scores.values())), "clip_factor": scale,
                }  # fmt: skip
                print("PROBE", json.dumps(row), flush=True)
            if probe_args.stop_at and step >= probe_args.stop_at:
                control.should_training_stop = True

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    training_args = TrainingArguments(  # sst2.py's
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=128,
        learning_rate=args.lr, max_steps=args.max_steps, lr_scheduler_type="linear",
        warmup_steps=int(args.warmup_ratio * args.max_steps), weight_decay=0.0,
        logging_steps=max(1, args.max_steps // 20), save_strategy="no", eval_strategy="no", report_to=[],
        seed=args.seed, use_cpu=True, dataloader_num_workers=0, train_sampling_strategy="group_by_length",
        disable_tqdm=True,
    )  # fmt: skip
    probe = Probe()
    trainer = Trainer(
        model=model, args=training_args, train_dataset=ds["train"], data_collator=collator, callbacks=[sparse, probe]
    )
    t0 = time.time()
    trainer.train()
    result = {"train_seconds": round(time.time() - t0, 1)}
    if probe_args.full_eval:
        pred = trainer.predict(ds["validation"])
        result["dev_accuracy"] = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
    (out / "steplog.json").write_text(json.dumps(probe.steplog))
    print("RESULT", json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
