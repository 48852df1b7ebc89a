"""oBERT under 2 real processes (torch.distributed.run, gloo): one Fisher over both processes' gradients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


WORKER = Path(__file__).with_name("obert_dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_share_one_fisher_and_end_with_identical_masks_and_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(WORKER), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs between the processes"

    # one process drawing all the gradients (each process drew a different half) gives the same result
    ref_dir = tmp_path / "single"
    ref_dir.mkdir()
    single = subprocess.run([sys.executable, str(WORKER), str(ref_dir)], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    ref = load_file(str(ref_dir / "rank0.safetensors"))
    for key in ref:
        torch.testing.assert_close(ranks[0][key], ref[key], rtol=1e-9, atol=1e-12, msg=key)
    assert not torch.equal(ref["weight.0"] != 0, torch.ones_like(ref["weight.0"], dtype=torch.bool))
