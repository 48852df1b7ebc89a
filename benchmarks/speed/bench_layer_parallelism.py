"""Sequence/token vs step parallelism of the fused encoder layers, interleaved call by call in one process.

    python benchmarks/speed/bench_layer_parallelism.py                 # BERT-base 90% 4-block int8, batch 16
    python benchmarks/speed/bench_layer_parallelism.py --pairs 300 --batch 8

The model is the speed benchmark's (random BERT-base weights, magnitude-pruned, `save_sparse` + `from_pretrained`).
Each pair times one forward with whole sequences or token blocks per thread (`split_sequences = True`, the
default) and one with every step split over the threads (`False`), back to back (which one first alternates), so
both see the same machine state. Prints every pair
(ms) and the medians; runs of slow pairs show the machine's slow state (docs/kernels.md, "Threads").
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=120)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--pattern", default="4-block")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = build_model("base", args.sparsity, args.pattern)
    model = load_bench_model(bench)
    layers = [
        m.forward.fused for m in model.modules() if isinstance(getattr(m.forward, "fused", None), FusedEncoderLayer)
    ]
    inputs = bench.inputs(args.batch)
    pairs, used = [], set()
    with torch.inference_mode():
        for _ in range(3):
            model(**inputs)
        for _ in range(args.pairs):
            pair = [0.0, 0.0]
            for split in (True, False) if len(pairs) % 2 == 0 else (False, True):  # alternate which runs first
                for layer in layers:
                    layer.split_sequences = split
                start = time.perf_counter()
                model(**inputs)
                pair[0 if split else 1] = (time.perf_counter() - start) * 1e3
                if split:
                    used.add("+".join(sorted(layers[0].parallelism)))
            pairs.append(pair)
    print("pairs (split / steps, ms):", " ".join(f"{a:.0f}/{b:.0f}" for a, b in pairs))
    seqs, steps = [p[0] for p in pairs], [p[1] for p in pairs]
    print(
        f"batch {args.batch}, {args.threads} threads, {len(layers)} fused layers: split median "
        f"{statistics.median(seqs):.1f} ms (p90 {sorted(seqs)[int(0.9 * len(seqs))]:.1f}), steps median "
        f"{statistics.median(steps):.1f} ms (p90 {sorted(steps)[int(0.9 * len(steps))]:.1f}); per-pair speed-up "
        f"median {statistics.median(b / a for a, b in pairs):.2f}x; pairs with steps > 1.3x split: "
        f"{sum(b > 1.3 * a for a, b in pairs)}/{len(pairs)} (split: {sorted(used)})"
    )


if __name__ == "__main__":
    main()
