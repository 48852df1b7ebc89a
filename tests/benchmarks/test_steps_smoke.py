"""benchmarks/speed/bench_steps.py runs end to end on tiny BERTs of two depths and prints its table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hf_sparse import ops


REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "speed" / "bench_steps.py"


@pytest.mark.skipif(not ops.extension_available(), reason="the step timers are the C++ fused layers'")
def test_steps_bench_prints_every_cell():
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--layers", "1", "2", "--batch", "1", "3"]
    cmd += ["--attention", "bf16", "int8", "--rounds", "2", "--iters", "2"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    number = r"(\d+\.\d+)"
    rows = re.findall(
        r"^\| (\d+) \| (\d+) \| (bf16|int8) \| " + r" \| ".join([number] * 10) + r" \|$", proc.stdout, re.M
    )
    assert {row[:3] for row in rows} == {(n, b, a) for n in "12" for b in "13" for a in ("bf16", "int8")}
    for row in rows:
        steps, total, forward, outside = [float(v) for v in row[3:10]], float(row[10]), float(row[11]), float(row[12])
        wait = steps.pop(1)  # (token blocks only)
        assert wait >= 0 and all(v > 0 for v in steps) and total == pytest.approx(sum(steps) + wait, abs=0.4)
        # the steps run inside the forward: their time per sequence cannot exceed it
        assert 0 < total * int(row[0]) / 1e3 < forward and outside < forward
