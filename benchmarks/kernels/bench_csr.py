"""INT8_CSR against INT8_BLOCK4 and INT8_DENSE on the BERT-base shapes, every layout forced, side by side.

    taskset -c 0 python benchmarks/kernels/bench_csr.py               # encoder sizes, M = 128 and 2048
    taskset -c 0 python benchmarks/kernels/bench_csr.py --few         # M = 1 .. 32 (decoding), us per call
    taskset -c 0 python benchmarks/kernels/bench_csr.py --few --cold 12   # the same, 12 weights cycled

Random weights with unstructured or 4-block zeros; best of N calls on one thread (kernels and torch), ms or us.
With --cold C every call runs C different weights of the shape one after the other (as a model's forward does, so
that they come from memory rather than L2) and the time per weight is printed.
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_sparse.ops import pack_linear, set_num_threads


LAYOUTS = ("int8_block4", "int8_csr", "int8_dense")
SHAPES = ((768, 768), (3072, 768), (768, 3072))


def best(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def weight(n: int, k: int, sparsity: float, pattern: str) -> torch.Tensor:
    if pattern == "unstructured":
        return torch.randn(n, k) * (torch.rand(n, k) >= sparsity)
    return torch.randn(n, k) * (torch.rand(n, k // 4) >= sparsity).repeat_interleave(4, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--few", action="store_true", help="few tokens (M = 1 .. 32), unstructured only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cold", type=int, default=1, help="weights cycled per call (1: one weight, hot in cache)")
    args = parser.parse_args()
    torch.manual_seed(0)
    set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    for n, k in SHAPES:
        for pattern in ("unstructured",) if args.few else ("unstructured", "4-block"):
            for sparsity in (0.7, 0.9, 0.97) if args.few else (0.7, 0.8, 0.9, 0.97):
                ws = [weight(n, k, sparsity, pattern) for _ in range(args.cold)]
                packed = {layout: [pack_linear(w, layout=layout) for w in ws] for layout in LAYOUTS}
                ratio = packed["int8_block4"][0].tensors["values"].numel() / max(
                    1, packed["int8_csr"][0].tensors["values"].numel()
                )
                for m in (1, 2, 4, 8, 16, 32) if args.few else (128, 2048):
                    x = torch.randn(m, k)
                    calls = 200 if args.few else (10 if m >= 2048 else 30)
                    t = {
                        layout: best(lambda ps=ps, x=x: [p(x) for p in ps], max(3, calls // args.cold)) / args.cold
                        for layout, ps in packed.items()
                    }
                    scale, unit = (1e6, "us") if args.few else (1e3, "ms")
                    cells = " ".join(f"{layout} {t[layout] * scale:.3f}" for layout in LAYOUTS)
                    print(
                        f"{n}x{k} M={m} {pattern} {sparsity}: {cells} {unit} | 4-blocks per CSR entry {ratio:.2f}, "
                        f"CSR / 4-block {t['int8_csr'] / t['int8_block4']:.2f}, CSR / dense "
                        f"{t['int8_csr'] / t['int8_dense']:.2f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
