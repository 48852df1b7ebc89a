"""Run by test_distributed.py under `accelerate launch --num_processes 2`: each rank trains (with the Trainer and
SparseCallback, or a plain accelerate loop with sparsify_) and writes its masks and weights for comparison."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from hf_sparse import SparseCallback, SparseConfig  # noqa: E402
from tests.conftest import TinyClassificationData, make_tiny_bert  # noqa: E402


def skew_scores_on_rank_1() -> None:
    """Make rank 1 rank the weights differently, as rounding or data-dependent scores could: only the masks'
    broadcast from rank 0 keeps the ranks identical then (without it this test fails)."""
    import torch.distributed as dist

    from hf_sparse.methods.magnitude import MagnitudePruning

    plain = MagnitudePruning.scores

    def skewed(self):
        scores = plain(self)
        if dist.is_initialized() and dist.get_rank() == 1:
            g = torch.Generator().manual_seed(1)
            scores = {n: s * torch.rand(s.shape, generator=g).to(s) for n, s in scores.items()}
        return scores

    MagnitudePruning.scores = skewed


def recipe(method: str) -> SparseConfig:
    method_args = {"num_grads": 8, "grad_batch_size": 2} if method == "obert" else {}
    return SparseConfig(
        method=method,
        method_args=method_args,
        sparsity=0.8,
        pattern="4-block",
        schedule="cubic",
        start=0,
        end=6,
        update_every=2,
        distillation={"teacher": make_tiny_bert(seed=5), "hardness": 0.5},
    )


def accelerate_loop(out_dir: str, method: str):
    """The same engine in a plain accelerate loop: sparsify_ on the unwrapped model, step after each update."""
    from accelerate import Accelerator

    import hf_sparse

    accelerator = Accelerator(cpu=True)
    model = make_tiny_bert()
    cfg = recipe(method)
    loader = torch.utils.data.DataLoader(TinyClassificationData(n=64), batch_size=4, shuffle=True)
    sparsifier = hf_sparse.sparsify_(model, cfg, total_steps=8, dataloader=loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    batches = iter(loader)
    for _ in range(8):
        loss = model(**next(batches)).loss
        accelerator.backward(loss)
        sparsifier.before_optimizer_step()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()
    sparsifier.remove()
    assert accelerator.num_processes == 2, accelerator.num_processes
    return accelerator.process_index, sparsifier


def main(out_dir: str, method: str, mode: str):
    skew_scores_on_rank_1()
    if mode == "accelerate":
        rank, sparsifier = accelerate_loop(out_dir, method)
        save(out_dir, rank, sparsifier)
        return
    cfg = recipe(method)
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
    assert trainer.args.world_size == 2, trainer.args.world_size
    save(out_dir, trainer.args.process_index, cb.sparsifier)


def save(out_dir, rank, sparsifier):
    tensors = {f"{n}.weight": m.weight.detach().contiguous() for n, m in sparsifier.targets.items()}
    tensors.update({f"{n}.mask": m.to(torch.uint8).contiguous() for n, m in sparsifier.masks.items()})
    save_file(tensors, str(Path(out_dir) / f"rank{rank}.safetensors"))


def shutdown() -> None:
    """Leave the process group before exiting: gloo's threads torn down at interpreter exit while a peer is still
    talking can abort the process ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
    shutdown()  # not after a failure: the barrier would wait for the rank that failed
