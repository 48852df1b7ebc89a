from __future__ import annotations

import logging
import time

import torch

from ...sparsity.patterns import BlockPattern, get_pattern
from ..base import PruningMethod, register_method
from .config import OBertArgs
from .fisher import BlockFisherInverse, BlockLayout, inverse_bytes
from .obs import group_solve, obs_update
from .sampler import BatchSampler, _dist_info, move_to, per_process_count


logger = logging.getLogger(__name__)

#: the paper's Fisher block size per pattern group size (unstructured: 1 weight, 4-block: 4 weights)
DEFAULT_BLOCK_SIZE = {1: 50, 4: 32}
_GIB = 2**30


def _group_size(pattern_name: str) -> int | None:
    pattern = get_pattern(pattern_name)
    return pattern.block if isinstance(pattern, BlockPattern) else None


@register_method("obert")
class OBertPruning(PruningMethod):
    """Optimal BERT Surgeon (Kurtic et al. 2022): second-order pruning with a block-diagonal empirical Fisher.

    At each pruning step (and each of its `num_recomputations` sub-steps): collect `num_grads` gradients in eval
    mode with the masks applied, build the block Fisher inverse, rank every group (single weight or 4-block) of
    all targeted modules by its OBS saliency, prune the lowest to the schedule's target, and move the remaining
    weights by the summed OBS updates of the pruned groups. The training gradients and optimizer are untouched
    (gradients come from `torch.autograd.grad`, the model's train/eval mode is restored). Under torch.distributed
    the gradients of all processes are gathered into one Fisher, so every process computes the same masks and
    updates; rank 0's weights are broadcast afterwards to make that a guarantee.
    """

    args_class = OBertArgs

    @classmethod
    def validate_config(cls, config) -> None:
        group = _group_size(config.pattern)
        if group is None:
            raise ValueError(
                f"method='obert' prunes single weights or blocks along the input dimension; pattern="
                f"{config.pattern!r} is not supported: use 'unstructured' or '4-block'"
            )
        size = config.method_args.block_size
        if size is not None and size % group:
            raise ValueError(
                f"method_args.block_size={size} must be divisible by {group} for pattern={config.pattern!r}, so "
                f"that a group of {group} weights lies in one Fisher block; use e.g. {DEFAULT_BLOCK_SIZE.get(group, 8 * group)}"
            )

    # ---- set-up ---------------------------------------------------------------------------------------------
    def attach(self) -> None:
        sp = self.sparsifier
        self.group = sp.pattern.block
        self.block = self.args.block_size or DEFAULT_BLOCK_SIZE.get(self.group, 8 * self.group)
        self.dtype = getattr(torch, self.args.dtype)
        self.layouts = {n: BlockLayout(sp.shapes[n], self.block, self.group) for n in sp.targets}
        self.sampler: BatchSampler | None = None
        #: sum of the OBS saliencies of the groups pruned at the last pruning step: the predicted loss increase
        self.predicted_loss_increase = 0.0
        inverse, buffers = self.memory_estimate()
        if self.args.max_memory_gb is not None and inverse + buffers > self.args.max_memory_gb * _GIB:
            raise ValueError(
                f"oBERT's Fisher inverse needs {inverse / _GIB:.2f} GiB (+ {buffers / _GIB:.2f} GiB of gradient "
                f"buffers) for {sum(lay.numel for lay in self.layouts.values())} weights in blocks of {self.block}, "
                f"above method_args.max_memory_gb={self.args.max_memory_gb}. Lower method_args.block_size (memory "
                "grows with it), method_args.fisher_chunk, or the number of targeted modules"
            )

    def memory_estimate(self) -> tuple[int, int]:
        """Bytes of the Fisher inverse and of the gradient buffers (all processes' gradients of one chunk)."""
        inverse = sum(inverse_bytes(lay.num_blocks, self.block, self.dtype) for lay in self.layouts.values())
        world = _dist_info()[1]
        per_grad = (
            sum(lay.num_blocks * self.block for lay in self.layouts.values()) * torch.finfo(self.dtype).bits // 8
        )
        return inverse, per_grad * self.args.fisher_chunk * world

    def detach(self) -> None:
        self.sampler = None

    # ---- pruning --------------------------------------------------------------------------------------------
    def prune(self, pools) -> dict[str, torch.Tensor]:
        sp = self.sparsifier
        current = {n: sp.masks[n].clone() for n in sp.targets}
        start = [sum(int((~current[n]).sum()) for n in pool.names) for pool in pools]
        steps = self.args.num_recomputations
        self.predicted_loss_increase = 0.0
        for sub in range(1, steps + 1):
            targets = [s0 + round((pool.target - s0) * sub / steps) for s0, pool in zip(start, pools)]
            pruned_now = [sum(int((~current[n]).sum()) for n in pool.names) for pool in pools]
            if all(t <= p for t, p in zip(targets, pruned_now)):
                continue  # nothing new to prune in this sub-step
            fisher = self.build_fisher(current)
            current = self._prune_step(fisher, pools, targets, current)
            del fisher
            if sub < steps:
                sp.set_masks(current)  # zero the pruned weights before the next Fisher
        return current

    def build_fisher(self, masks: dict[str, torch.Tensor]) -> dict[str, BlockFisherInverse]:
        """The block Fisher inverse of every targeted weight, from gradients at the current (masked) weights."""
        sp, args = self.sparsifier, self.args
        if sp.dataloader is None:
            raise ValueError(
                "method='obert' needs training data for its Fisher gradients: the Trainer callback passes the "
                "train dataloader; with sparsify_ pass dataloader=<a DataLoader or an iterable of batches>"
            )
        if self.sampler is None:
            self.sampler = BatchSampler(sp.dataloader, args.grad_batch_size, args.seed)
        world = _dist_info()[1]
        local = per_process_count(args.num_grads)
        total = local * world
        inverse, buffers = self.memory_estimate()
        logger.info(
            "oBERT: building the Fisher inverse from %d gradients (%d per process) of %d weights in blocks of %d: "
            "%.2f GiB inverse + %.2f GiB gradient buffers",
            total,
            local,
            sum(lay.numel for lay in self.layouts.values()),
            self.block,
            inverse / _GIB,
            buffers / _GIB,
        )
        weights = {n: m.weight for n, m in sp.targets.items()}
        fisher = {
            n: BlockFisherInverse(self.layouts[n].num_blocks, self.block, args.damping, total, self.dtype, w.device)
            for n, w in weights.items()
        }
        model = sp.model
        device = next(iter(weights.values())).device
        was_training = model.training
        requires_grad = {n: w.requires_grad for n, w in weights.items()}
        chunk: dict[str, list[torch.Tensor]] = {n: [] for n in weights}
        square_sum, t0 = 0.0, time.time()
        model.eval()  # no dropout; a distillation hook does nothing in eval mode
        try:
            for w in weights.values():
                w.requires_grad_(True)
            for i in range(local):
                batch = move_to(next(self.sampler), device)
                with torch.enable_grad():
                    loss = sp.loss_fn(model, batch)
                    if not torch.isfinite(loss):
                        raise ValueError(f"oBERT: the loss of gradient batch {i} is {float(loss)}; check the data")
                    grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
                for (name, w), g in zip(weights.items(), grads):
                    g = torch.zeros_like(w, dtype=self.dtype) if g is None else g.to(self.dtype)
                    g = g.masked_fill(~masks[name], 0.0)  # pruned weights are fixed at zero: no curvature for them
                    chunk[name].append(self.layouts[name].to_blocks(g))
                if len(chunk[name]) == args.fisher_chunk or i == local - 1:  # every module holds as many
                    for n in weights:
                        grads_n = _gather(torch.stack(chunk[n]))
                        square_sum += float(grads_n.square().sum())
                        fisher[n].add(grads_n)
                        chunk[n].clear()
        finally:
            for n, w in weights.items():
                w.requires_grad_(requires_grad[n])
            model.train(was_training)
        numel = sum(lay.numel for lay in self.layouts.values())
        # the damping only matters next to this: if it is not far below, oBERT tends to magnitude pruning
        logger.info(
            "oBERT: Fisher built in %.1f s; mean squared gradient (the mean diagonal of the undamped Fisher) %.3g, "
            "damping %.3g",
            time.time() - t0,
            square_sum / (total * numel),
            args.damping,
        )
        return fisher

    @torch.no_grad()
    def _prune_step(self, fisher, pools, targets, current) -> dict[str, torch.Tensor]:
        sp, g = self.sparsifier, self.group
        weights, saliency, solved, saliency_blocks = {}, {}, {}, {}
        for name, module in sp.targets.items():
            layout = self.layouts[name]
            w = layout.to_blocks(module.weight.detach().to(self.dtype))
            sal, v = group_solve(fisher[name].inv, w, g)
            kept = layout.to_blocks(current[name], False).view(layout.num_blocks, -1, g).any(-1)
            if bool((sal[kept] < 0).any()):
                raise FloatingPointError(
                    f"oBERT: the Fisher inverse of {name!r} lost positive definiteness (negative saliencies): the "
                    f"damping {self.args.damping:g} is too small next to the squared gradients for {self.args.dtype} "
                    "rounding (see the logged mean squared gradient). Raise method_args.damping or set "
                    "method_args.dtype='float64'"
                )
            weights[name], solved[name], saliency_blocks[name] = w, v, sal
            # already pruned groups rank first, so they stay pruned
            saliency[name] = layout.groups_from_blocks(sal.float().masked_fill(~kept, float("-inf")))
        new = {}
        for pool, target in zip(pools, targets):
            new.update(sp.pattern.select({n: saliency[n] for n in pool.names}, sp.shapes, target))
        for name, module in sp.targets.items():
            layout = self.layouts[name]
            keep = new[name] & current[name]
            newly = layout.to_blocks(current[name] & ~keep, False).view(layout.num_blocks, -1, g).any(-1)
            self.predicted_loss_increase += float(saliency_blocks[name][newly].sum())
            newly = newly.repeat_interleave(g, dim=1)
            w = weights[name] + obs_update(fisher[name].inv, solved[name], newly)
            module.weight.copy_(layout.from_blocks(w).masked_fill(~keep, 0.0).to(module.weight.dtype))
            new[name] = keep
        _broadcast_weights([m.weight for m in sp.targets.values()])
        logger.info("oBERT: predicted loss increase of this pruning step %.4g", self.predicted_loss_increase)
        return new


def _gather(grads: torch.Tensor) -> torch.Tensor:
    """All processes' gradients, in rank order (identical on every process)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return grads
    out = [torch.empty_like(grads) for _ in range(dist.get_world_size())]
    dist.all_gather(out, grads.contiguous())
    return torch.cat(out)


def _broadcast_weights(weights: list[torch.Tensor]) -> None:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for w in weights:
        dist.broadcast(w.data, src=0)
