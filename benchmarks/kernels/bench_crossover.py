"""Where sparse stops paying: the densities behind the layout rule of hf_sparse.ops.pack_linear.

int8: INT8_BLOCK4 (through its generated code where the CPU has AVX512-VNNI, and through the loops, `set_jit(False)`)
against INT8_DENSE as the fraction of nonzero 4-blocks grows; fp32: FP32_CSR against torch's
F.linear as the fraction of nonzero weights grows. One thread, timed in thread CPU time (robust to other load on
the machine), interleaved rounds, medians; BERT-base shapes at M = 128.

    python benchmarks/kernels/bench_crossover.py          # ~1 min
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hf_sparse import ops
from hf_sparse.ops import Layout


def cpu_time(fn, x, budget: float) -> float:
    calls, start = 0, time.thread_time()
    while True:
        fn(x)
        calls += 1
        elapsed = time.thread_time() - start
        if elapsed >= budget:
            return elapsed / calls


def _without_jit(packed, x):
    ops.set_jit(False)
    try:
        return packed(x)
    finally:
        ops.set_jit(True)


def compare(pairs: dict, x, rounds: int, budget: float) -> dict:
    for fn in pairs.values():
        fn(x)
    times = {name: [] for name in pairs}
    for _ in range(rounds):
        for name, fn in pairs.items():
            times[name].append(cpu_time(fn, x, budget))
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=0.03)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(0)
    print(f"isa={ops.isa()}, 1 thread, M={args.m}")
    print(
        "| shape | density | int8 4-block ms | 4-block loops ms | int8 dense ms | 4-block / dense | loops / dense "
        "| fp32 csr ms | F.linear ms | csr / dense |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, k in [(768, 768), (3072, 768), (768, 3072)]:
        x = torch.randn(args.m, k, generator=gen)
        for density in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
            blocks = (torch.rand(n, k // 4, generator=gen) < density).repeat_interleave(4, 1)
            w4 = torch.randn(n, k, generator=gen) * blocks
            wu = torch.randn(n, k, generator=gen) * (torch.rand(n, k, generator=gen) < density)
            block4 = ops.pack_linear(w4, layout=Layout.INT8_BLOCK4)
            engines = {
                "block4": block4,
                "loops": lambda t, p=block4: _without_jit(p, t),
                "dense8": ops.pack_linear(w4, layout=Layout.INT8_DENSE),
                "csr": ops.pack_linear(wu, scheme="fp32", layout=Layout.FP32_CSR),
                "linear": lambda t, w=wu: F.linear(t, w),
            }
            t = compare(engines, x, args.rounds, args.budget)
            print(
                f"| {n}x{k} | {density:.2f} | {t['block4'] * 1e3:.3f} | {t['loops'] * 1e3:.3f} | "
                f"{t['dense8'] * 1e3:.3f} | {t['block4'] / t['dense8']:.2f} | {t['loops'] / t['dense8']:.2f} | "
                f"{t['csr'] * 1e3:.3f} | {t['linear'] * 1e3:.3f} | "
                f"{t['csr'] / t['linear']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
