"""Run by test_distributed.py under `accelerate launch --num_processes 2 --cpu`: each rank trains with the
SparseCallback and writes its masks and weights, to be compared across ranks."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from hf_sparse import SparseCallback, SparseConfig  # noqa: E402
from tests.conftest import TinyClassificationData, make_tiny_bert  # noqa: E402


def main(out_dir: str, method: str):
    cfg = SparseConfig(
        method=method,
        sparsity=0.8,
        pattern="4-block",
        schedule="cubic",
        start=0,
        end=6,
        update_every=2,
        distillation={"teacher": make_tiny_bert(seed=5), "hardness": 0.5},
    )
    model = make_tiny_bert()
    cb = SparseCallback(cfg)
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        max_steps=8,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        ddp_backend="gloo",
    )
    trainer = Trainer(model=model, args=args, train_dataset=TinyClassificationData(n=64), callbacks=[cb])
    trainer.train()
    rank = trainer.args.process_index
    assert trainer.args.world_size == 2, trainer.args.world_size
    tensors = {f"{n}.weight": m.weight.detach().contiguous() for n, m in cb.sparsifier.targets.items()}
    tensors.update({f"{n}.mask": m.to(torch.uint8).contiguous() for n, m in cb.sparsifier.masks.items()})
    save_file(tensors, str(Path(out_dir) / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "magnitude")
