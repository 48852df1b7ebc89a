"""The base model's own code around the fused encoder: transformers' BertModel.forward against FusedModelForward.

    python benchmarks/speed/bench_model_glue.py                   # BERT-base 90% 4-block int8, batch 1, 40 rounds
    python benchmarks/speed/bench_model_glue.py --batch 1 16 --rounds 20

One model (the speed benchmark's: random weights, magnitude-pruned, `save_sparse` + `from_pretrained`, int8
attention), two forwards of its `bert` module switched in place between rounds: "class" (BertModel's own, with its
decorators and mask code; embeddings and encoder still fused) and "fused" (the instance's FusedModelForward). Each
round runs both, `--iters` forwards each, in alternating order. Per forward: the whole model call, the embeddings,
encoder and pooler modules' forwards, and "glue", the model call minus those three (BertModel's and
BertForSequenceClassification's own code, the mask, output objects). Medians over the rounds, in ms; the whole
forward's ratio is the median of the rounds' class / fused ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_from_pretrained import load_bench_model  # noqa: E402
from models import build_model  # noqa: E402

from hf_sparse.integrations.model_forward import FusedModelForward  # noqa: E402
from hf_sparse.ops import set_attention_precision  # noqa: E402


PARTS = ("embeddings", "encoder", "pooler")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", help="models.py size (base; tiny for a smoke test)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--pattern", default="4-block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--iters", type=int, default=20, help="forwards per cell and round (divided by the batch)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_attention_precision("int8")
    bench = build_model(args.size, args.sparsity, args.pattern)
    model = load_bench_model(bench)
    bert = model.bert
    fused = bert.__dict__.get("forward")
    if not isinstance(fused, FusedModelForward):
        raise SystemExit(f"the loaded model's base model has no FusedModelForward ({fused!r})")
    spent = defaultdict(float)
    for name in PARTS:  # time each part's forward (instance attributes, like the fused ones they may wrap)
        module = getattr(bert, name)
        inner = module.forward

        def timed(*a, _inner=inner, _name=name, **k):
            start = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                spent[_name] += time.perf_counter() - start

        module.forward = timed
    variants = {"class": None, "fused": fused}
    with torch.inference_mode():
        for batch in args.batch:
            inputs = bench.inputs(batch)
            iters = max(2, args.iters // batch)
            results = {v: defaultdict(list) for v in variants}
            for r in range(args.rounds):
                for v in list(variants) if r % 2 == 0 else list(variants)[::-1]:
                    if variants[v] is None:
                        bert.__dict__.pop("forward", None)
                    else:
                        bert.forward = variants[v]
                    model(**inputs)  # (its first forward after the switch is not timed)
                    spent.clear()
                    start = time.perf_counter()
                    for _ in range(iters):
                        model(**inputs)
                    total = (time.perf_counter() - start) / iters
                    for name in PARTS:
                        results[v][name].append(spent[name] / iters)
                    results[v]["glue"].append(total - sum(spent.values()) / iters)
                    results[v]["forward"].append(total)
            bert.forward = fused
            print(f"batch {batch}, {args.rounds} rounds x {iters} forwards (ms, medians over the rounds)")
            print(f"  {'':6} {'forward':>8} " + " ".join(f"{k:>10}" for k in (*PARTS, "glue")))
            for v in variants:
                cells = [statistics.median(results[v][k]) * 1e3 for k in ("forward", *PARTS, "glue")]
                print(f"  {v:6} {cells[0]:8.3f} " + " ".join(f"{x:10.3f}" for x in cells[1:]))
            ratios = [a / b for a, b in zip(results["class"]["forward"], results["fused"]["forward"])]
            glue = statistics.median(results["class"]["glue"]) - statistics.median(results["fused"]["glue"])
            print(
                f"  forward class / fused: {statistics.median(ratios):.4f} (quartiles "
                + " - ".join(f"{q:.4f}" for q in statistics.quantiles(ratios, n=4)[::2])
                + f"); glue saved {glue * 1e3:.3f} ms"
            )


if __name__ == "__main__":
    main()
