"""benchmarks/speed/bench_roofline.py runs end to end on a tiny BERT: the VNNI probe builds and runs, and no step
runs faster than its multiplies allow (a probe that under-measured the machine would say otherwise)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_sparse import ops


REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "speed" / "bench_roofline.py"


@pytest.mark.skipif(
    not ops.extension_available() or ops.isa() != "avx512_vnni" or not (shutil.which("cc") or shutil.which("gcc")),
    reason="the roofline needs the AVX-512 VNNI kernels and a C compiler for its probe",
)
def test_roofline_prints_every_batch_within_the_ceiling():
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--batch", "1", "3", "--rounds", "1", "--iters", "2"]
    cmd += ["--peak-reps", "2"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = re.search(r"one core: (\d+\.\d+) G vpdpbusd/s with a broadcast weight, (\d+\.\d+) G/s", proc.stdout)
    assert peak and all(float(v) > 0.1 for v in peak.groups())
    number = r"(\d+\.\d+)"
    cells = [number] * 3 + [r"(\d+)%"] + [number] * 3 + [r"(\d+)%"] + [number] * 3 + [r"(\d+)%"]
    rows = re.findall(r"^\| (\d+) \| " + " \\| ".join(cells) + r" \|$", proc.stdout, re.M)
    assert [row[0] for row in rows] == ["1", "3"]
    for row in rows:
        lin_m, lin_floor, lin_t, lin_at, att_m, att_floor, att_t, att_at, _, floor, forward, at = map(float, row[1:])
        assert lin_m > 0 and att_m > 0 and lin_t > 0 and att_t > 0
        # the linear steps, the attention step and the whole forward: never faster than their multiplies alone
        assert lin_floor <= lin_t and att_floor <= att_t and floor <= forward
        assert all(0 < share <= 100 for share in (lin_at, att_at, at))
