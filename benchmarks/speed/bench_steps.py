"""Where a fused encoder's forward goes, step by step, by batch size, model depth and attention precision.

    python benchmarks/speed/bench_steps.py                                  # BERT-base 90% 4-block int8, batch 1 and 16
    python benchmarks/speed/bench_steps.py --batch 1 --layers 2 12 24       # does streaming the weights cost at batch 1?
    python benchmarks/speed/bench_steps.py --attention bf16 int8 --batch 16

Models: the speed benchmark's (random weights, magnitude-pruned, `save_sparse` + `from_pretrained`), one per
`--layers` value (BERT-base has 12). Each round runs every (model, batch, attention) cell once, `--iters` forwards
back to back, cells interleaved so that all see the same machine state; the table gives medians over the rounds.
Steps are `FusedEncoderLayer.step_times` (each step's mean over the threads that ran it; "wait" is the token
blocks' wait for each other's K/V at batch 1), in microseconds per sequence and layer so that depths and batch sizes
compare; "forward" is the whole model call in ms per sequence, "outside" the forward minus the steps, also per
sequence (Python, embeddings, pooler, classifier, and thread hand-offs outside any step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_from_pretrained import load_bench_model  # noqa: E402
from models import build_model  # noqa: E402

from hf_sparse.nn import FusedEncoderLayer  # noqa: E402
from hf_sparse.ops import _extension as ext  # noqa: E402
from hf_sparse.ops import attention_precision, set_attention_precision  # noqa: E402


def time_cell(model, inputs, iters: int) -> tuple[dict[str, float], float]:
    """(seconds per forward of each step, seconds per forward) over `iters` forwards."""
    FusedEncoderLayer.step_times = {}
    try:
        start = time.perf_counter()
        for _ in range(iters):
            model(**inputs)
        total = (time.perf_counter() - start) / iters
        steps = {k: v / iters for k, v in FusedEncoderLayer.step_times.items()}
    finally:
        FusedEncoderLayer.step_times = None
    return steps, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", help="models.py size (base; tiny for a smoke test)")
    parser.add_argument("--layers", type=int, nargs="+", default=[None], help="encoder layers (default: the size's)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--attention", nargs="+", default=["int8"], choices=["bf16", "int8"])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--pattern", default="4-block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=0, help="forwards per cell and round (0: ~0.3 s of them)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {}
    for layers in args.layers:
        bench = build_model(args.size, args.sparsity, args.pattern, layers=layers)
        models[bench.model.config.num_hidden_layers] = (bench, load_bench_model(bench))
    cells = [(n, b, a) for n in models for b in args.batch for a in args.attention]
    iters, results = {}, {cell: [] for cell in cells}
    before = attention_precision()
    try:
        with torch.inference_mode():
            for cell in cells:  # warm-up, and the iteration count
                n, batch, attention = cell
                bench, model = models[n]
                set_attention_precision(attention)
                _, once = time_cell(model, bench.inputs(batch), 3)
                iters[cell] = args.iters or max(2, int(0.3 / once))
            for _ in range(args.rounds):
                for cell in cells:
                    n, batch, attention = cell
                    bench, model = models[n]
                    set_attention_precision(attention)
                    results[cell].append(time_cell(model, bench.inputs(batch), iters[cell]))
    finally:
        set_attention_precision(before)
    steps_named = ext._C.LAYER_STEPS  # the kernels' own step names, in order
    print(f"\n{args.size}, {args.sparsity:g} {args.pattern} int8, {args.threads} threads, {args.rounds} rounds")
    print("steps in us per sequence and layer; forward and outside in ms per sequence\n")
    print("| layers | batch | attention | " + " | ".join(steps_named) + " | steps | forward | outside |")
    print("|---|---:|---|" + "---:|" * (len(steps_named) + 3))
    for cell, runs in results.items():
        n, batch, attention = cell
        per_layer = 1e6 / (batch * n)
        steps = {s: statistics.median(r[0].get(s, 0.0) for r in runs) * per_layer for s in steps_named}
        forward = statistics.median(r[1] for r in runs) * 1e3 / batch
        inside = statistics.median(sum(r[0].values()) for r in runs) * 1e3 / batch
        row = [str(n), str(batch), attention, *(f"{steps[s]:.1f}" for s in steps_named)]
        row += [f"{sum(steps.values()):.1f}", f"{forward:.3f}", f"{forward - inside:.3f}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
