"""benchmarks/speed/port_mix.py builds its probe and prints a consistent table: vpdpbusd alone is the unit, and no
pair of instruction kinds runs faster than the slower of the two alone (a probe whose loop the compiler broke, or
whose timing lost an iteration count, would say otherwise)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "speed" / "port_mix.py"
sys.path.insert(0, str(SCRIPT.parent))

import port_mix  # noqa: E402


@pytest.mark.skipif(
    "avx512_vnni" not in port_mix.cpu_flags() or not (shutil.which("cc") or shutil.which("gcc")),
    reason="the probe needs AVX512-VNNI and a C compiler",
)
def test_port_mix_table_is_consistent():
    ops = ["vpdpbusd", "vaddps", "vfmadd231ps", "store"]
    cmd = [sys.executable, str(SCRIPT), "--ops", *ops, "--iters", "200000", "--reps", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^\| (\w+) \| ([\d. |]+) \|$", line)
        if m:
            rows[m.group(1)] = [float(v) for v in m.group(2).split(" | ")]
    assert list(rows) == ops
    assert rows["vpdpbusd"][0] == pytest.approx(8.0)  # the unit
    for i, a in enumerate(ops):
        for j, b in enumerate(ops):
            assert rows[a][j] == rows[b][i]  # one timing per pair
            assert rows[a][j] >= 0.8 * max(rows[a][i], rows[b][j]), f"{a} + {b} faster than one of them alone"
