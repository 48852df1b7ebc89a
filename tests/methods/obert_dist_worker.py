"""One process of the 2-process oBERT test (launched by torch.distributed.run); also runs alone as the reference.

Usage: python obert_dist_worker.py OUT_DIR. Writes OUT_DIR/rank<rank>.safetensors with the masks and weights.
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file
from torch import nn

from hf_sparse import SparseConfig, sparsify_


NUM_GRADS, GRAD_BATCH = 16, 4


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_GRADS * GRAD_BATCH, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (len(x),), generator=g)
    return model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def run(out_dir: str) -> None:
    model, data = build()
    config = SparseConfig(
        method="obert",
        sparsity=0.6,
        schedule="one-shot",
        start=0,
        targets=["0", "2"],
        method_args={
            "num_grads": NUM_GRADS, "grad_batch_size": GRAD_BATCH, "block_size": 8, "damping": 1e-4,
            "dtype": "float64", "fisher_chunk": 3,
        },
    )  # fmt: skip
    sp = sparsify_(model, config, dataloader=data, loss_fn=loss_fn)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    tensors = {f"mask.{n}": m.to(torch.uint8) for n, m in sp.masks.items()}
    tensors.update({f"weight.{n}": m.weight.detach().clone() for n, m in sp.targets.items()})
    save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))


if __name__ == "__main__":
    if "RANK" in os.environ:
        torch.distributed.init_process_group("gloo")
    try:
        run(sys.argv[1])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
