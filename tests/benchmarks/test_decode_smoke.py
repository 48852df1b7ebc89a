"""benchmarks/speed/bench_decode.py runs end to end on a tiny Llama and prints its table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "speed" / "bench_decode.py"


@pytest.mark.slow
def test_decode_bench_times_every_engine():
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--new-tokens", "3", "--rounds", "1", "--threads", "1"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = dict(re.findall(r"^\| (\w+) \| (\d+\.\d+) \|", proc.stdout, flags=re.M))
    engines = {"torch_fp32", "torch_dynamic_int8", "hf_sparse_decode", "hf_sparse_batch", "hf_sparse_dense"}
    assert set(rows) == engines and all(float(v) > 0 for v in rows.values())
    assert "torch_fp32 | " in proc.stdout and "3/3 |" in proc.stdout  # torch_fp32 against itself
    layouts = dict(re.findall(r"^  (hf_sparse_\w+): (.*)$", proc.stdout, flags=re.M))
    assert "int8_csr" not in layouts["hf_sparse_dense"] and "int8_dense" in layouts["hf_sparse_dense"]
