"""Which AVX-512 instructions share execution resources with the int8 multiply, on this CPU.

    python benchmarks/speed/port_mix.py                     # every op, alone and in pairs
    python benchmarks/speed/port_mix.py --ops vpdpbusd vfmadd231ps vpermt2ps store

A kernel's epilogue (dequantization, GELU, softmax, quantization) costs what it takes from the resources the
products need, not its instruction count. This script times, on one core, a loop of 8 independent instructions of
kind A followed by 8 of kind B (separate destination registers, so no dependency chains), for every pair, and
divides by the time of 8 `vpdpbusd` alone (one per cycle where the multiply runs at full rate). A pair that costs
max(A alone, B alone) runs side by side; one that costs A + B competes for the same pipes. The C source is
generated and compiled here (inline assembly: no vector flags needed); the package never runs it.
See benchmarks/RESULTS.md, "Execution resources" (session 22).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path


# name -> (instruction with {d} for the destination register number, CPU flag it needs). Sources are zmm20/21, the
# memory operand is a 64-byte aligned buffer (%0).
OPS = {
    "vpdpbusd": ("vpdpbusd %%zmm20, %%zmm21, %%zmm{d}", "avx512_vnni"),
    "vfmadd231ps": ("vfmadd231ps %%zmm20, %%zmm21, %%zmm{d}", "avx512f"),
    "vmulps": ("vmulps %%zmm20, %%zmm21, %%zmm{d}", "avx512f"),
    "vaddps": ("vaddps %%zmm20, %%zmm21, %%zmm{d}", "avx512f"),
    "vcvtdq2ps": ("vcvtdq2ps %%zmm20, %%zmm{d}", "avx512f"),
    "vminps": ("vminps %%zmm20, %%zmm21, %%zmm{d}", "avx512f"),
    "vrangeps": ("vrangeps $2, %%zmm20, %%zmm21, %%zmm{d}", "avx512dq"),
    "vrndscaleps": ("vrndscaleps $0, %%zmm20, %%zmm{d}", "avx512f"),
    "vpermps": ("vpermps %%zmm20, %%zmm21, %%zmm{d}", "avx512f"),
    "vpermt2ps": ("vpermt2ps %%zmm20, %%zmm21, %%zmm{d}", "avx512f"),
    "vpshufb": ("vpshufb %%zmm20, %%zmm21, %%zmm{d}", "avx512bw"),
    "vpackssdw": ("vpackssdw %%zmm20, %%zmm21, %%zmm{d}", "avx512bw"),
    "vpandd": ("vpandd %%zmm20, %%zmm21, %%zmm{d}", "avx512f"),
    "vpmaxud": ("vpmaxud %%zmm20, %%zmm21, %%zmm{d}", "avx512f"),
    "vpternlogd": ("vpternlogd $0x96, %%zmm20, %%zmm21, %%zmm{d}", "avx512f"),
    "vcmpps": ("vcmpps $1, %%zmm20, %%zmm21, %%k2", "avx512f"),
    "vscalefps": ("vscalefps %%zmm20, %%zmm21, %%zmm{d}", "avx512f"),
    "load": ("vmovaps 64*{d}(%0), %%zmm{d}", "avx512f"),
    "store": ("vmovaps %%zmm20, 64*{d}(%0)", "avx512f"),
}
GROUP = 8  # instructions of each kind per loop iteration (zmm0-7 for A, zmm10-17 for B)
# What the loop writes that the compiler knows of (built without vector flags, it never allocates zmm16+ or k2).
CLOBBERS = ", ".join(f'"xmm{i}"' for i in (*range(8), *range(10, 16))) + ', "memory"'


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def block(op: str, first: int) -> str:
    return "".join(OPS[op][0].format(d=first + i) + "\\n" for i in range(GROUP))


def c_source(ops: list[str], iters: int, reps: int) -> str:
    """One timed loop per single op and per pair; prints `name seconds_per_iteration` lines (best of reps)."""
    lines = [
        "#include <stdio.h>",
        "#include <time.h>",
        "static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);"
        " return t.tv_sec + t.tv_nsec * 1e-9; }",
        "static float buf[32 * 16] __attribute__((aligned(64)));",
        "int main(void) {",
        "  float* p = buf;",
        '  __asm__ volatile("vpxord %%zmm20, %%zmm20, %%zmm20\\n vpxord %%zmm21, %%zmm21, %%zmm21" ::: "memory");',
    ]
    cases = [(a, a, block(a, 0)) for a in ops]
    cases += [(a, b, block(a, 0) + block(b, 10)) for i, a in enumerate(ops) for b in ops[i + 1 :]]
    for a, b, body in cases:
        lines.append(
            f"  {{ double best = 1e9; for (int r = 0; r < {reps}; ++r) {{ double t = now();"
            f' for (long i = 0; i < {iters}L; ++i) __asm__ volatile("{body}" :: "r"(p) : {CLOBBERS});'
            f" t = now() - t; if (t < best) best = t; }}"
            f' printf("{a} {b} %.6e\\n", best / {iters}); }}'
        )
    lines += ["  return 0;", "}"]
    return "\n".join(lines)


def measure(ops: list[str], iters: int, reps: int) -> dict[tuple[str, str], float]:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("port_mix: no C compiler (cc or gcc) to build the probe")
    with tempfile.TemporaryDirectory(prefix="hf_sparse_port_mix_") as folder:
        src, exe = Path(folder) / "port_mix.c", Path(folder) / "port_mix"
        src.write_text(c_source(ops, iters, reps))
        subprocess.run([compiler, "-O1", str(src), "-o", str(exe)], check=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    times = {}
    for line in out.splitlines():
        a, b, t = line.split()
        times[a, b] = times[b, a] = float(t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=list(OPS), help="instructions to pair")
    parser.add_argument("--iters", type=int, default=2_000_000, help="loop iterations per timing")
    parser.add_argument("--reps", type=int, default=3, help="timings per case (best kept)")
    args = parser.parse_args()
    flags = cpu_flags()
    missing = [op for op in args.ops if OPS[op][1] not in flags]
    if "vpdpbusd" in missing:
        raise SystemExit("port_mix: this CPU has no AVX512-VNNI (the unit of the table is one vpdpbusd)")
    ops = ["vpdpbusd"] + [op for op in args.ops if op != "vpdpbusd" and op not in missing]
    times = measure(ops, args.iters, args.reps)
    unit = times["vpdpbusd", "vpdpbusd"] / GROUP  # one vpdpbusd
    print(f"{GROUP} of the row's instruction + {GROUP} of the column's, in vpdpbusd times (diagonal: {GROUP} alone);")
    print(f"one vpdpbusd = {unit * 1e9:.3f} ns here; skipped (CPU lacks them): {', '.join(missing) or 'none'}")
    print("| | " + " | ".join(ops) + " |")
    print("|---|" + "---:|" * len(ops))
    for a in ops:
        print(f"| {a} | " + " | ".join(f"{times[a, b] / unit:.1f}" for b in ops) + " |")
    print("\nbeside the multiply (8 vpdpbusd + 8 of each: 8 = side by side, 16 = the same pipes):")
    for op in ops[1:]:
        alone, pair = times[op, op] / unit, times["vpdpbusd", op] / unit
        extra = pair - max(alone, GROUP)
        print(
            f"  {op:12s} alone {alone:5.1f}  with vpdpbusd {pair:5.1f}  costs the multiply {extra / GROUP:4.2f} each"
        )


if __name__ == "__main__":
    main()
