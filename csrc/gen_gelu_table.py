"""Writes csrc/gelu_table.h: the piecewise polynomials the vector kernels evaluate for the exact (erf) GELU.

AVX-512: gelu(v) = h + x G(x) with h = v / 2, x = |h| and G(x) = erf(sqrt 2 x) tabulated on [0, 2.8] in 32 segments
of degree 3. The epilogues produce h itself (scale and bias halved: exact), x is clamped to 2.8 (one vminps), the
segment k = floor(x * G_SCALE) (an FMA rounding down around 1.5 * 2^23) and the polynomial's variable
t = x * G_SCALE - k in [0, 1]; one vpermt2ps (two 16-entry halves) per coefficient picks each lane's segment. The
last segment is exactly 1 (|G - 1| < 7e-8 there), so gelu(v) = v above ~5.43, 0 below ~-5.43, inf at inf and NaN
at -inf (as torch's float64 GELU). 13 operations, 10 of them on the FMA pipes, where v Phi(v) over [-6, 6] (degree 4)
took 14 and 12 at about the same accuracy.
AVX2: gelu(v) = v / 2 + |v| g(|v|) with g(a) = erf(a / sqrt 2) / 2 on [0, 6] in 8 segments of degree 5, u = a / width
- 0.5 (`vpermps ymm`); beyond 6, g(6) rounds to 0.5f.
AVX2's are fitted on Chebyshev nodes in double precision, AVX-512's by Lawson's iteration towards the least largest
error of x G(x) relative to max(|v|, 1); all rounded to float32. Run: python csrc/gen_gelu_table.py
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


RANGE = 6.0
G_RANGE, G_SEGMENTS, G_DEGREE = 2.8, 32, 3
# x * G_SCALE < 32 for x <= G_RANGE, so floor(x * G_SCALE) is a segment 0 .. 31
G_SCALE = np.float32(G_SEGMENTS / G_RANGE * (1 - 2.0**-12))
G_TABLES = {"kGelu8": (8, 5)}  # name: (segments, degree)


def g_avx2(a: float) -> float:
    return 0.5 * math.erf(a / math.sqrt(2.0))


NODES = 0.5 * np.cos(np.pi * (np.arange(64) + 0.5) / 64)  # t in [-0.5, 0.5]


def cheb_poly(f, degree: int) -> np.ndarray:
    """Float32 coefficients (t^0 first) of f(t) on [-0.5, 0.5]."""
    cheb = np.polynomial.chebyshev.chebfit(2 * NODES, [f(t) for t in NODES], degree)
    return (np.polynomial.chebyshev.cheb2poly(cheb) * 2.0 ** np.arange(degree + 1)).astype(np.float32)


def fit_g(segments: int, degree: int) -> tuple[np.ndarray, float]:
    width = RANGE / segments
    coefs, worst = [], 0.0
    check = np.linspace(-0.5, 0.5, 2001)
    for s in range(segments):
        a0 = (s + 0.5) * width  # segment centre
        poly = cheb_poly(lambda t, a0=a0: g_avx2(a0 + t * width), degree)
        approx = np.polyval(poly[::-1].astype(np.float64), check)
        exact = np.array([g_avx2(a0 + t * width) for t in check])
        worst = max(worst, float(np.max(np.abs(approx - exact) * (a0 + check * width))))  # error of |v| g
        coefs.append(poly)
    return np.array(coefs), worst


def gelu(v: float) -> float:
    return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))


def lawson(f, weight, degree: int, iters: int = 300) -> np.ndarray:
    """Coefficients (t^0 first) of the polynomial on t in [0, 1] with the least largest weight x |p - f|."""
    t = np.linspace(0.0, 1.0, 801)
    values, w = np.array([f(x) for x in t]), np.array([weight(x) for x in t])
    powers = np.vander(t, degree + 1, increasing=True)
    lam = np.full(t.size, 1.0 / t.size)
    for _ in range(iters):
        root = np.sqrt(lam) * w
        coef = np.linalg.lstsq(powers * root[:, None], values * root, rcond=None)[0]
        lam *= np.abs(powers @ coef - values) * w + 1e-30
        lam /= lam.sum()
    return coef


def fit_gelu_g() -> tuple[np.ndarray, float]:
    """Segment k covers x in [k, k + 1) / G_SCALE; the last one is the constant 1."""
    scale = float(G_SCALE)
    coefs = np.zeros((G_SEGMENTS, G_DEGREE + 1), np.float32)
    for k in range(G_SEGMENTS - 1):

        def g(t: float, k: int = k) -> float:
            return math.erf(math.sqrt(2.0) * (k + t) / scale)

        def weight(t: float, k: int = k) -> float:  # gelu's error is x |p - G|, relative to max(|v|, 1) = max(2x, 1)
            x = (k + t) / scale
            return max(x, 0.02) / max(2 * x, 1.0)  # (not 0 at x = 0: G(0) = 0 holds closely too)

        coefs[k] = lawson(g, weight, G_DEGREE)
    coefs[-1, 0] = 1.0
    # the kernel's arithmetic in float32 over a fine grid (and past the clamp), against double precision
    v = np.linspace(-7.0, 7.0, 1_400_001, dtype=np.float32)
    h = v * np.float32(0.5)
    x = np.abs(h)
    u = np.minimum(x, np.float32(G_RANGE)).astype(np.float64) * scale  # exact, as inside the FMAs
    k = np.floor(u)  # the first FMA's rounding down at 1.5 * 2^23 (float32 spacing 1)
    t, idx = (u - k).astype(np.float32), k.astype(np.int64)
    p = coefs[idx, G_DEGREE]
    for j in range(G_DEGREE - 1, -1, -1):
        p = (p.astype(np.float64) * t + coefs[idx, j]).astype(np.float32)
    out = (x.astype(np.float64) * p + h).astype(np.float32)
    exact = np.array([gelu(a) for a in v.astype(np.float64)])
    worst = float(np.max(np.abs(out.astype(np.float64) - exact) / np.maximum(np.abs(v), 1.0)))
    return coefs, worst


def emit(name: str, coefs: np.ndarray, comment: str) -> list[str]:
    segments, degree = coefs.shape[0], coefs.shape[1] - 1
    lines = [
        comment,
        f"// {name}[j][s]: coefficient of t^j in segment s.",
        f"constexpr int {name}Degree = {degree};",
        f"alignas(64) static const float {name}[{degree + 1}][{segments}] = {{",
    ]
    for j in range(degree + 1):
        values = [f"{float(coefs[s][j]):.9e}f" for s in range(segments)]
        rows = [", ".join(values[i : i + 4]) for i in range(0, segments, 4)]
        lines.append("    {" + (",\n     ".join(rows)) + "},")
    return [*lines, "};", ""]


def main() -> None:
    lines = [
        "// Generated by csrc/gen_gelu_table.py; do not edit.",
        "#pragma once",
        "",
        "namespace hf_sparse {",
        "",
        f"constexpr float kGeluRange = {RANGE:.1f}f;",
        "",
    ]
    coefs, worst = fit_gelu_g()
    lines += [
        "// G(x) = erf(sqrt 2 x) on [0, kGeluGRange] (gelu(v) = h + |h| G(|h|), h = v / 2): segment",
        "// k = floor(min(x, kGeluGRange) * kGeluGScale) (0 .. 31), t = min(x, kGeluGRange) * kGeluGScale - k.",
        f"constexpr float kGeluGRange = {G_RANGE:.1f}f;",
        f"constexpr float kGeluGScale = {float(G_SCALE):.9e}f;",
    ]
    comment = (
        f"// {G_SEGMENTS} segments, degree {G_DEGREE}; largest error of gelu(v) in float32 (kernel arithmetic): "
        f"{worst:.2e} max(|v|, 1)."
    )
    lines += emit("kGeluG32", coefs, comment)
    lines += ["// g(a) = erf(a / sqrt 2) / 2 on [0, kGeluRange]: u = a / width - 0.5, t = u - round(u).", ""]
    for name, (segments, degree) in G_TABLES.items():
        coefs, worst = fit_g(segments, degree)
        comment = (
            f"// {segments} segments of width {RANGE / segments:g}, degree {degree}; "
            f"largest error of |v| g(|v|): {worst:.2e}."
        )
        lines += emit(name, coefs, comment)
    lines += ["}  // namespace hf_sparse", ""]
    Path(__file__).with_name("gelu_table.h").write_text("\n".join(lines))
    print("wrote gelu_table.h")


if __name__ == "__main__":
    main()
