"""How close a sparse int8 forward runs to the machine's VNNI ceiling: the products' multiplies counted, timed against
the measured vpdpbusd throughput, in one run.

    python benchmarks/speed/bench_roofline.py                    # BERT-base 90% 4-block int8, batch 1 and 16
    python benchmarks/speed/bench_roofline.py --batch 1 --rounds 9

Every int8 product on the AVX-512 VNNI kernels is a stream of `vpdpbusd` (16 tokens x one 4-block of weights, 64
multiply-adds): a 4-block weight needs (nonzero 4-blocks) x ceil(rows / 16) of them per call, a dense int8 one
out_features x ceil(in_features / 4) blocks; the int8 attention (Q K^T, then P V) seq x seq x head_dim / 64 per
head and sequence, twice. `vnni_peak.c` (compiled here with the VNNI flags; the package itself never is) measures
what one core sustains: "bcst", the generated code's form (one broadcast weight per multiply), and "reg" (register
operands only); on this project's Zen 4 machines both are one per cycle. The floor of a step is its count over
(peak x threads); "at" is floor / measured time, so 100% would be the multiplies alone at full speed on every
thread (nothing else, no memory stalls). Steps are `FusedEncoderLayer.step_times` (each step's
mean over the threads), the forward the whole model call, cells interleaved over `--rounds`, medians.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_steps import time_cell  # noqa: E402
from engine_from_pretrained import load_bench_model  # noqa: E402
from models import build_model  # noqa: E402

import hf_sparse.ops  # noqa: E402
from hf_sparse.nn import SparseLinear  # noqa: E402
from hf_sparse.ops import set_attention_precision  # noqa: E402
from hf_sparse.ops.layouts import Layout  # noqa: E402


PEAK_SOURCE = Path(__file__).resolve().parent / "vnni_peak.c"
VNNI_FLAGS = ["-O2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
LINEAR_STEPS = ("qkv", "out", "ffn")


def vnni_peak(reps: int) -> dict[str, float]:
    """{"reg", "bcst": vpdpbusd per second on one core, "ghz"}; SystemExit naming what is missing."""
    if hf_sparse.ops.isa() != "avx512_vnni":
        raise SystemExit(f"bench_roofline: needs the AVX-512 VNNI kernels, these run {hf_sparse.ops.isa()}")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("bench_roofline: no C compiler (cc or gcc) to build vnni_peak.c")
    with tempfile.TemporaryDirectory(prefix="hf_sparse_roofline_") as folder:
        exe = Path(folder) / "vnni_peak"
        subprocess.run([compiler, *VNNI_FLAGS, str(PEAK_SOURCE), "-o", str(exe)], check=True)
        words = subprocess.run([str(exe), str(reps)], check=True, capture_output=True, text=True).stdout.split()
    values = dict(zip(words[::2], map(float, words[1::2])))
    return {"reg": values["reg"] * 1e9, "bcst": values["bcst"] * 1e9, "ghz": values["ghz"]}


def linear_multiplies(model: torch.nn.Module, batch: int, seq: int) -> tuple[float, float]:
    """vpdpbusd per forward of (the encoder's products, every token a row; the others (pooler, classifier: one row
    per sequence)), from the packed weights (int8 CSR: its entries of 4 nonzeros, counted as blocks)."""
    encoder = other = 0.0
    encoder_modules = {id(m) for m in model.base_model.encoder.modules()}
    seen = set()
    for name, module in model.named_modules():
        if not isinstance(module, SparseLinear):
            continue
        packed = module.group.packed if module.group is not None else module.packed
        if packed is None or id(packed) in seen:
            continue
        seen.add(id(packed))
        if packed.layout in (Layout.INT8_BLOCK4, Layout.INT8_CSR):
            blocks = packed.tensors["values"].numel()
        elif packed.layout is Layout.INT8_DENSE:
            blocks = packed.out_features * math.ceil(packed.in_features / 4)
        else:
            raise SystemExit(f"bench_roofline: {name} is {packed.layout.value}, not an int8 layout")
        in_encoder = id(module) in encoder_modules
        count = blocks * math.ceil((batch * seq if in_encoder else batch) / 16)
        encoder, other = (encoder + count, other) if in_encoder else (encoder, other + count)
    return encoder, other


def attention_multiplies(config, batch: int, seq: int) -> float:
    head_dim = config.hidden_size // config.num_attention_heads
    per_head = 2 * seq * seq * head_dim / 64  # Q K^T and P V
    return config.num_hidden_layers * batch * config.num_attention_heads * per_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", help="models.py size (base; tiny for a smoke test)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--pattern", default="4-block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=0, help="forwards per cell and round (0: ~0.3 s of them)")
    parser.add_argument("--peak-reps", type=int, default=5, help="runs of the peak probe (the best one counts)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = vnni_peak(args.peak_reps)
    bench = build_model(args.size, args.sparsity, args.pattern)
    model = load_bench_model(bench)
    before = set_attention_precision("int8")
    results: dict[int, list] = {b: [] for b in args.batch}
    iters = {}
    try:
        with torch.inference_mode():
            for batch in args.batch:
                iters[batch] = args.iters or max(2, int(0.3 / time_cell(model, bench.inputs(batch), 3)[1]))
            for _ in range(args.rounds):
                for batch in args.batch:
                    results[batch].append(time_cell(model, bench.inputs(batch), iters[batch]))
    finally:
        set_attention_precision(before)
    peak_after = vnni_peak(args.peak_reps)  # the machine may have changed while the model ran
    bcst, reg = max(peak["bcst"], peak_after["bcst"]), max(peak["reg"], peak_after["reg"])
    nt, seq, config = args.threads, bench.seq_len, bench.model.config
    print(
        f"\n{args.size}, {args.sparsity:g} {args.pattern} int8 (int8 attention), seq {seq}, {nt} threads, "
        f"{args.rounds} rounds; one core: {bcst / 1e9:.3f} G vpdpbusd/s with a broadcast weight, {reg / 1e9:.3f} "
        f"G/s register only, {max(peak['ghz'], peak_after['ghz']):.2f} GHz"
    )
    print("multiplies in M vpdpbusd per forward; times in ms per forward; at = floor / time\n")
    print("| batch | linear M | linear floor | linear steps | at | attention M | attention floor | attention step | at "
          "| head M | all floor | forward | at |")  # fmt: skip
    print("|---:|" + "---:|" * 12)
    for batch, runs in results.items():
        enc, head = linear_multiplies(model, batch, seq)
        attn = attention_multiplies(config, batch, seq)
        linear_s = statistics.median(sum(r[0].get(s, 0.0) for s in LINEAR_STEPS) for r in runs)
        attention_s = statistics.median(r[0].get("attention", 0.0) for r in runs)
        forward_s = statistics.median(r[1] for r in runs)
        lin_floor, attn_floor = enc / (bcst * nt), attn / (reg * nt)
        all_floor = lin_floor + attn_floor + head / (bcst * nt)
        row = [
            str(batch), f"{enc / 1e6:.2f}", f"{lin_floor * 1e3:.3f}", f"{linear_s * 1e3:.3f}",
            f"{lin_floor / linear_s:.0%}", f"{attn / 1e6:.2f}", f"{attn_floor * 1e3:.3f}", f"{attention_s * 1e3:.3f}",
            f"{attn_floor / attention_s:.0%}", f"{head / 1e6:.3f}", f"{all_floor * 1e3:.3f}", f"{forward_s * 1e3:.3f}",
            f"{all_floor / forward_s:.0%}",
        ]  # fmt: skip
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
