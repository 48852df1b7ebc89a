import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


SCRIPT = Path(__file__).with_name("distributed_train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, method="magnitude", mode="trainer"):
    # accelerate's "--multi_gpu" launcher is torchrun; without CUDA the ranks run on CPU with gloo
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(SCRIPT),
        str(tmp_path),
        method,
        mode,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("method, mode", [("magnitude", "trainer"), ("magnitude", "accelerate"), ("obert", "trainer")])
def test_two_process_training_ends_with_identical_masks_and_weights(tmp_path, method, mode):
    # rank 1 scores the weights differently (distributed_train.skew_scores_on_rank_1): the masks must still agree
    rank0, rank1 = launch(tmp_path, method=method, mode=mode)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    masks = [v for k, v in rank0.items() if k.endswith(".mask")]
    kept = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert kept == pytest.approx(0.2, abs=1e-3)
