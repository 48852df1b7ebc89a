"""benchmarks/speed/bench_encoder_stack.py runs end to end on a tiny BERT and prints its table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hf_sparse import ops


REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "speed" / "bench_encoder_stack.py"


@pytest.mark.skipif(not ops.extension_available(), reason="the fused encoder runs with the C++ kernels")
@pytest.mark.parametrize("what", ["stack", "pack_qkv", "feature_major", "embeddings", "attention"])
def test_encoder_stack_bench_prints_both_ways(what):
    if what == "pack_qkv" and ops.attention_isa() != "avx512_bf16":
        pytest.skip("Q/K/V are packed for the AVX512-BF16 attention only")
    if what == "feature_major" and ops.isa() != "avx512_vnni":
        pytest.skip("feature-major tiles are in the AVX-512 kernels only")
    patterns = ("4-block",) if what == "feature_major" else ("4-block", "unstructured")  # (fm: 4-block weights only)
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--batch", "1", "3", "--rounds", "2", "--iters", "2"]
    cmd += ["--compare", what, "--pattern", *patterns]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| ([\w-]+) \| (\d+) \| (\d+\.\d+) \| (\d+\.\d+) \| (\d+\.\d+)x \|$", proc.stdout, flags=re.M)
    assert {(p, b) for p, b, *_ in rows} == {(p, b) for p in patterns for b in ("1", "3")}
    assert all(float(v) > 0 for *_, a, b, c in rows for v in (a, b, c))
