"""Kernel-level speed of hf_sparse.ops against torch, side by side in one run.

BERT-base Linear shapes (768x768, 3072x768, 768x3072) at M tokens, 4-block sparsity s, against torch dense fp32
(F.linear), torch dynamic int8 (torch.ao.nn.quantized.dynamic.Linear) and hf_sparse's own dense int8 path.
Engines are timed in interleaved rounds (every engine once per round, so drift from other load hits all alike);
each figure is the median over rounds of the mean time per call in that round.

    python benchmarks/kernels/bench_linear.py                      # the full grid (~5 min on 2 busy cores)
    python benchmarks/kernels/bench_linear.py --quick              # M=128 and 2048, sparsity 0.9 only
    python benchmarks/kernels/bench_linear.py --bert-only          # the 12-layer BERT-base linear stack only
    python benchmarks/kernels/bench_linear.py --threads 1 --cpu-time   # one thread, CPU time: robust to other load

Small M (1 and 8) also runs "cold": the calls cycle through 12 copies of the weight, as a model's forward does,
so dense weights stream from L3/DRAM instead of sitting in L2.

The last section times every Linear of a 12-layer BERT-base forward at M=128 and 2048 (Q/K/V packed together,
GELU fused into the intermediate Linear): 48 hf_sparse calls against the 72 torch calls they replace, and 36 with
each FFN fused into one call (`ops.fuse_ffn`).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_sparse import ops
from hf_sparse.ops import Layout


SHAPES = [(768, 768), (3072, 768), (768, 3072)]  # (out_features, in_features)


def block_sparse(n: int, k: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen) * 0.05
    if sparsity <= 0:
        return w
    keep = (torch.rand(n, (k + 3) // 4, generator=gen) >= sparsity).repeat_interleave(4, 1)[:, :k]
    return w * keep


def dynamic_int8(w: torch.Tensor, b: torch.Tensor):
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)


def engines_for(w_list, b_list, sparsity, with_fp32_sparse=True):
    """name -> list of callables (one per weight copy)."""
    engines = {
        "torch fp32": [lambda x, w=w, b=b: F.linear(x, w, b) for w, b in zip(w_list, b_list)],
        "torch int8 dyn": [dynamic_int8(w, b) for w, b in zip(w_list, b_list)],
        "hf int8 dense": [ops.pack_linear(w, bias=b, layout=Layout.INT8_DENSE) for w, b in zip(w_list, b_list)],
    }
    if sparsity > 0:
        engines["hf int8 4-block"] = [
            ops.pack_linear(w, bias=b, layout=Layout.INT8_BLOCK4) for w, b in zip(w_list, b_list)
        ]
        if with_fp32_sparse:
            engines["hf fp32 csr"] = [
                ops.pack_linear(w, bias=b, scheme="fp32", layout=Layout.FP32_CSR) for w, b in zip(w_list, b_list)
            ]
    return engines


CLOCK = time.perf_counter  # --cpu-time: time.thread_time (1 thread only)


def time_round(fns, x, budget_s: float) -> float:
    """Mean seconds per call over about `budget_s`, cycling through `fns`."""
    calls, start = 0, CLOCK()
    while True:
        for fn in fns:
            fn(x)
        calls += len(fns)
        elapsed = CLOCK() - start
        if elapsed >= budget_s:
            return elapsed / calls


def interleaved(engines: dict, x, rounds: int, budget_s: float) -> dict[str, float]:
    for fns in engines.values():  # warm up (packing caches, thread pools)
        for fn in fns:
            fn(x)
    times = {name: [] for name in engines}
    for _ in range(rounds):
        for name, fns in engines.items():
            times[name].append(time_round(fns, x, budget_s))
    return {name: statistics.median(ts) for name, ts in times.items()}


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.3f}" if s < 0.1 else f"{s * 1e3:.1f}"


def grid(args) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    lines = [
        "| shape (out x in) | M | sparsity | weights | torch fp32 ms | torch int8 dyn ms | hf int8 dense ms | "
        "hf int8 4-block ms | hf fp32 csr ms | 4-block vs fp32 | vs int8 dyn | vs hf dense |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for n, k in SHAPES:
        for m in args.ms:
            for sparsity in args.sparsities:
                copies = args.cold_copies if (m <= 8 and args.cold_copies > 1) else 1
                for cold in sorted({1, copies}):
                    ws = [block_sparse(n, k, sparsity, gen) for _ in range(cold)]
                    bs = [torch.randn(n, generator=gen) * 0.01 for _ in range(cold)]
                    x = torch.randn(m, k, generator=gen)
                    engines = engines_for(ws, bs, sparsity, with_fp32_sparse=not args.no_fp32_sparse)
                    t = interleaved(engines, x, args.rounds, args.budget)
                    sp = t.get("hf int8 4-block")
                    ratios = (
                        [
                            f"{t['torch fp32'] / sp:.1f}x",
                            f"{t['torch int8 dyn'] / sp:.1f}x",
                            f"{t['hf int8 dense'] / sp:.2f}x",
                        ]
                        if sp
                        else ["", "", ""]
                    )
                    row = [
                        f"{n}x{k}",
                        str(m),
                        f"{sparsity:.2f}",
                        f"cold x{cold}" if cold > 1 else "hot",
                        fmt_ms(t["torch fp32"]),
                        fmt_ms(t["torch int8 dyn"]),
                        fmt_ms(t["hf int8 dense"]),
                        fmt_ms(sp) if sp else "",
                        fmt_ms(t["hf fp32 csr"]) if "hf fp32 csr" in t else "",
                        *ratios,
                    ]
                    line = "| " + " | ".join(row) + " |"
                    print(line, flush=True)
                    lines.append(line)
    return lines


def bert_stack(args) -> list[str]:
    """All Linears of a 12-layer BERT-base forward; hf_sparse packs Q/K/V together and fuses the GELU."""
    gen = torch.Generator().manual_seed(1)
    sparsity = args.bert_sparsity
    layers = []
    for _ in range(12):
        q, k_, v, o = (block_sparse(768, 768, sparsity, gen) for _ in range(4))
        f1, f2 = block_sparse(3072, 768, sparsity, gen), block_sparse(768, 3072, sparsity, gen)
        bq, bk, bv, bo, b1, b2 = (torch.randn(n, generator=gen) * 0.01 for n in (768, 768, 768, 768, 3072, 768))
        layers.append(((q, bq), (k_, bk), (v, bv), (o, bo), (f1, b1), (f2, b2)))

    def torch_forward(lins):
        def run(x):
            h = x
            for q, k_, v, o, f1, f2 in lins:  # K and V are computed and dropped: attention is not timed
                a = q(h)
                k_(h)
                v(h)
                h = f2(F.gelu(f1(o(a))))
            return h

        return run

    fp32 = [[(lambda x, w=w, b=b: F.linear(x, w, b)) for w, b in layer] for layer in layers]
    dyn = [[dynamic_int8(w, b) for w, b in layer] for layer in layers]
    packed = []
    for (q, bq), (k_, bk), (v, bv), (o, bo), (f1, b1), (f2, b2) in layers:
        ffn_in, ffn_out = ops.pack_linear(f1, bias=b1, activation="gelu"), ops.pack_linear(f2, bias=b2)
        packed.append(
            (
                ops.pack_linears([q, k_, v], biases=[bq, bk, bv]),
                ops.pack_linear(o, bias=bo),
                ffn_in,
                ffn_out,
                ops.fuse_ffn(ffn_in, ffn_out),
            )
        )

    def hf_forward(fused: bool):
        def run(x):
            h = x
            for qkv, o, f1, f2, ffn in packed:
                q, _, _ = qkv(h)
                a = o(q)
                h = ffn(a) if fused else f2(f1(a))
            return h

        return run

    lines = [
        f"| M | torch fp32 ms | torch int8 dyn ms | hf_sparse int8 ({sparsity:.0%} 4-block) ms | hf_sparse, fused FFN ms "
        "| fused vs fp32 | fused vs int8 dyn | fused vs unfused |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for m in args.bert_ms:
        x = torch.randn(m, 768, generator=gen)
        engines = {
            "fp32": [torch_forward(fp32)],
            "dyn": [torch_forward(dyn)],
            "hf": [hf_forward(False)],
            "fused": [hf_forward(True)],
        }
        t = interleaved(engines, x, args.rounds, args.budget * 3)
        line = (
            f"| {m} | {fmt_ms(t['fp32'])} | {fmt_ms(t['dyn'])} | {fmt_ms(t['hf'])} | {fmt_ms(t['fused'])} | "
            f"{t['fp32'] / t['fused']:.1f}x | {t['dyn'] / t['fused']:.1f}x | {t['hf'] / t['fused']:.2f}x |"
        )
        print(line, flush=True)
        lines.append(line)
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=0.02, help="seconds per engine per round")
    p.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 128, 2048])
    p.add_argument("--sparsities", type=lambda s: [float(v) for v in s.split(",")], default=[0.0, 0.8, 0.9, 0.97])
    p.add_argument("--cold-copies", type=int, default=12, help="weight copies cycled at M <= 8 (1: hot only)")
    p.add_argument("--no-fp32-sparse", action="store_true")
    p.add_argument("--bert-ms", type=lambda s: [int(v) for v in s.split(",")], default=[128, 2048])
    p.add_argument("--bert-sparsity", type=float, default=0.9)
    p.add_argument("--bert-only", action="store_true")
    p.add_argument("--no-bert", action="store_true")
    p.add_argument("--quick", action="store_true", help="M=128,2048 at sparsity 0.9, fewer rounds")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time this thread's CPU time instead of the wall clock: with --threads 1, figures that other processes "
        "on the machine do not inflate",
    )
    args = p.parse_args()
    if args.cpu_time:
        if args.threads != 1:
            p.error("--cpu-time measures one thread: use it with --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    if args.quick:
        args.ms, args.sparsities, args.rounds, args.cold_copies = [128, 2048], [0.9], 3, 1
    torch.set_num_threads(args.threads)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = "?"
    print(
        f"hf_sparse.ops isa={ops.isa()} (available: {', '.join(ops.available_isas())}), threads={args.threads}, "
        f"torch {torch.__version__}, commit {commit}, clock {'thread CPU time' if args.cpu_time else 'wall'}"
    )
    torch.set_grad_enabled(False)
    if not args.bert_only:
        grid(args)
    if not args.no_bert:
        print()
        bert_stack(args)


if __name__ == "__main__":
    main()
