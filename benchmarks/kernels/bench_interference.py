"""Interference between torch's OpenMP threads and the kernel threads when torch ops and hf_sparse ops alternate.

A BERT-base encoder layer at seq 128 (batch 1) with 90% 4-block sparse int8 Linears from hf_sparse.ops (Q/K/V
packed together, the FFN fused into one call) and everything else in torch (LayerNorm, attention matmuls and softmax, residual adds). Each configuration runs in its
own process (OpenMP reads its environment once) and reports, per layer:
    layer     the whole layer, torch ops and hf_sparse ops alternating as in a real forward
    hf only   the 3 hf_sparse calls alone, back to back
    torch only the torch ops alone
    overhead  layer - (hf only + torch only): what alternating costs

    python benchmarks/kernels/bench_interference.py            # ~1 min
    python benchmarks/kernels/bench_interference.py --rounds 5

Configurations: hf_sparse's threads from torch's OpenMP (HF_SPARSE_THREADS=openmp, the default where torch's
libgomp is loaded) or from hf_sparse's pool (HF_SPARSE_THREADS=pool) with the pool spinning 50 us or 0 us before
sleeping, the pool with torch's OpenMP made passive (OMP_WAIT_POLICY=PASSIVE), and everything single-threaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


CONFIGS = {
    "openmp threads (default)": {"HF_SPARSE_THREADS": "openmp"},
    "pool, spin 50 us": {"HF_SPARSE_THREADS": "pool", "HF_SPARSE_SPIN_US": "50"},
    "pool, spin 0 us": {"HF_SPARSE_THREADS": "pool", "HF_SPARSE_SPIN_US": "0"},
    "pool + OMP_WAIT_POLICY=PASSIVE": {"HF_SPARSE_THREADS": "pool", "OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"HF_SPARSE_THREADS": "pool", "BENCH_THREADS": "1"},
}


def child(iters: int) -> dict:
    import torch

    from hf_sparse import ops

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(0)

    def w(n, k):
        keep = (torch.rand(n, k // 4, generator=gen) >= 0.9).repeat_interleave(4, 1)
        return torch.randn(n, k, generator=gen) * 0.05 * keep

    qkv = ops.pack_linears([w(768, 768) for _ in range(3)], biases=[torch.zeros(768)] * 3)
    out = ops.pack_linear(w(768, 768), bias=torch.zeros(768))
    f1 = ops.pack_linear(w(3072, 768), bias=torch.zeros(3072), activation="gelu")
    f2 = ops.pack_linear(w(768, 3072), bias=torch.zeros(768))
    ffn = ops.fuse_ffn(f1, f2)
    ln1, ln2 = torch.nn.LayerNorm(768), torch.nn.LayerNorm(768)
    x = torch.randn(1, 128, 768, generator=gen)

    def attention(q, k, v):
        q, k, v = (t.reshape(1, 128, 12, 64).transpose(1, 2) for t in (q, k, v))
        p = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1)
        return (p @ v).transpose(1, 2).reshape(1, 128, 768)

    def layer(h):
        q, k, v = qkv(h)
        a = ln1(out(attention(q, k, v)) + h)
        return ln2(ffn(a) + a)

    q0, k0, v0 = (t.contiguous() for t in qkv(x))
    att0 = attention(q0, k0, v0)

    def hf_only(h):
        qkv(h)
        out(att0)
        ffn(h)

    def torch_only(h):
        a = ln1(attention(q0, k0, v0) + h)
        return ln2(att0 + a)

    def timeit(fn):
        for _ in range(5):
            fn(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    result = {"threads_backend": ops.threads_backend(), "isa": ops.isa()}
    for name, fn in (("layer", layer), ("hf", hf_only), ("torch", torch_only)):
        result[name] = timeit(fn)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.iters)))
        return
    results = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):  # interleaved: every configuration once per round
        for name, env in CONFIGS.items():
            proc = subprocess.run(
                [sys.executable, __file__, "--child", "--iters", str(args.iters)],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            )
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print("| configuration | threads | layer ms | hf only ms | torch only ms | overhead ms |")
    print("|---|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("layer", "hf", "torch")}
        print(
            f"| {name} | {runs[0]['threads_backend']} | {med['layer'] * 1e3:.3f} | {med['hf'] * 1e3:.3f} | "
            f"{med['torch'] * 1e3:.3f} | {(med['layer'] - med['hf'] - med['torch']) * 1e3:+.3f} |"
        )


if __name__ == "__main__":
    main()
