"""benchmarks/speed/bench_model_glue.py runs end to end on a tiny BERT and prints both variants' rows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hf_sparse import ops


REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "speed" / "bench_model_glue.py"


@pytest.mark.skipif(not ops.extension_available(), reason="FusedModelForward needs the fused encoder")
def test_glue_bench_prints_both_variants():
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--batch", "1", "2", "--rounds", "2", "--iters", "2"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    number = r"(-?\d+\.\d+)"
    rows = re.findall(r"^  (class|fused) +" + r" +".join([number] * 5) + r"$", proc.stdout, re.M)
    assert [row[0] for row in rows] == ["class", "fused"] * 2, proc.stdout
    for row in rows:
        forward, parts = float(row[1]), [float(v) for v in row[2:5]]
        assert forward > 0 and all(p > 0 for p in parts) and sum(parts) < forward  # the parts run inside it
    assert len(re.findall(r"forward class / fused: \d+\.\d+", proc.stdout)) == 2
