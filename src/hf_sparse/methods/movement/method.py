from __future__ import annotations

import logging

import torch

from ..base import PruningMethod, register_method
from .config import MovementArgs


logger = logging.getLogger(__name__)

_BETAS, _EPS = (0.9, 0.999), 1e-8
_TABLES = {"scores": "scores_", "values": "values", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


@register_method("movement")
class MovementPruning(PruningMethod):
    """Movement pruning (Sanh et al. 2020): keep the weights moving away from zero, drop those moving towards it.

    The module's weight is the paper's masked weight W' = W * M. The stored value W of each masked weight lives in
    `values` (saved with checkpoints like the scores). A gradient hook on each weight passes on dL/dW = dL/dW' * M:
    masked weights do not train, and gradient clipping sees only the kept weights (with 90% of the weights masked,
    their dL/dW' would dominate the norm and shrink every update). At each optimizer step (`before_optimizer_step`,
    after clipping) the kept weights' scores move with W * .grad, the movement under the clipped gradient the
    optimizer applies. Without `regrow` masked groups rank below all kept ones and their scores stay put. With it,
    the hook also sums the straight-through dL/dS = W * dL/dW' of the masked weights (their stored W) over the
    step's backward passes, their scores move with that sum times the clip factor (`_gradient_scale`), and each
    pruning step ranks all weights (groups: the sum of their scores) through the pattern: a masked weight whose
    score rose back into the top is restored to its stored value.
    """

    args_class = MovementArgs
    #: the engine's own masking hook would hide dL/dW' of the masked weights; this method's hook masks after use
    mask_gradients = False

    def attach(self) -> None:
        sp = self.sparsifier
        if sp.timeline.start == 0 and not sp.schedule.keeps_existing:
            raise ValueError(
                f"method='movement' ranks weights by their movement accumulated over training steps, so it cannot "
                f"prune at step 0 (start={sp.config.start!r}); set start to a later step, e.g. start=0.1 (a fraction "
                "of training) or start=100 (optimizer steps)"
            )
        weights = {n: m.weight for n, m in sp.targets.items()}
        self.scores_: dict[str, torch.Tensor] = {
            n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in weights.items()
        }
        # stored values of the masked weights (zero where kept), in the weight's dtype so regrowth is exact
        self.values: dict[str, torch.Tensor] = {n: torch.zeros_like(w.detach()) for n, w in weights.items()}
        self.soft = self.args.variant == "soft"
        self.adam = self.args.score_update == "adam"
        if self.adam:
            self.exp_avg = {n: torch.zeros_like(s) for n, s in self.scores_.items()}
            self.exp_avg_sq = {n: torch.zeros_like(s) for n, s in self.scores_.items()}
        self.steps = 0
        self.last_gradient_scale = 1.0
        self._numel = sum(s.numel() for s in self.scores_.values())
        # with regrowth: dL/dS summed over the backward passes of the current optimizer step (gradient
        # accumulation included); without it masked weights' scores never matter, and the scores read .grad only
        self._pending = {n: torch.zeros_like(s) for n, s in self.scores_.items()} if self.args.regrow else {}
        self._seen = False
        self._hooks = [m.weight.register_hook(self._straight_through(n)) for n, m in sp.targets.items()]

    def _straight_through(self, name: str):
        weight, masks = self.sparsifier.targets[name].weight, self.sparsifier.masks

        @torch.no_grad()
        def hook(grad: torch.Tensor) -> torch.Tensor:
            keep = masks[name]
            if self.args.regrow:
                stored = torch.where(keep, weight.detach(), self.values[name])
                self._pending[name].add_(stored.float() * grad.float())
            self._seen = True
            return grad.masked_fill(~keep, 0.0)

        return hook

    def detach(self) -> None:
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._hooks = []
        self.scores_, self.values, self._pending = {}, {}, {}
        self.exp_avg, self.exp_avg_sq = {}, {}

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        if not self._seen:
            raise ValueError(
                "movement pruning found no gradient on any targeted weight: call sparsifier.before_optimizer_step() "
                "after loss.backward() and before optimizer.zero_grad()"
            )
        self.steps += 1
        self._seen = False
        world = _world_size()
        if world > 1:  # the mean over processes, as DDP averages the weights' gradients
            for pending in self._pending.values():
                torch.distributed.all_reduce(pending)
                pending.div_(world)
        scale = self._gradient_scale() if self.args.regrow else 1.0
        self.last_gradient_scale = scale
        for name, module in self.sparsifier.targets.items():
            # dL/dS = W * dL/dW' with the gradient the optimizer applies, clipped: unclipped, the gradient spikes
            # after a cut outweighed all other steps and drove every SST-2 run to a constant output (docs/methods.md).
            # Kept weights read it from .grad (masked ones hold W' = 0 there); hard movement accumulates its negative
            grad = module.weight.grad
            weight = module.weight.detach()
            ste = weight.float() * grad.float() if grad is not None else torch.zeros_like(self.scores_[name])
            if self.args.regrow:  # masked weights: the hooks' W * dL/dW' times the clip factor
                pending = self._pending[name]
                ste.add_(pending.masked_fill_(self.sparsifier.masks[name], 0.0), alpha=scale)
                pending.zero_()
            if self.soft:
                sig = torch.sigmoid(self.scores_[name])
                self._adam(name, ste.add_(sig * (1.0 - sig), alpha=self.args.regularization / self._numel))
            elif self.adam:
                self._adam(name, ste)
            else:
                self.scores_[name].sub_(ste)

    def _gradient_scale(self) -> float:
        """The factor c by which the loop scaled the gradients between backward and now (gradient clipping).

        The hooks saw dL/dW' before the loop clipped it. The kept weights' scores read the clipped .grad; the masked
        weights have none, so their dL/dW' is scaled by c (clipping scales every gradient by one factor; the paper
        clips its scores' gradients together with the weights'). c is the least-squares fit of the kept weights'
        W * .grad to the hooks' W * dL/dW': 1 without clipping, or when nothing moved.
        """
        num = den = 0.0
        for name, module in self.sparsifier.targets.items():
            grad = module.weight.grad
            if grad is None:
                continue
            seen = self._pending[name].masked_fill(~self.sparsifier.masks[name], 0.0)
            applied = module.weight.detach().float() * grad.float()
            num += float(torch.dot(seen.flatten(), applied.flatten()))
            den += float(torch.dot(seen.flatten(), seen.flatten()))
        return num / den if den > 0.0 else 1.0

    def _adam(self, name: str, grad: torch.Tensor) -> None:
        (b1, b2), t = _BETAS, self.steps
        m, v = self.exp_avg[name], self.exp_avg_sq[name]
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v / (1 - b2**t)).sqrt_().add_(_EPS)
        self.scores_[name].addcdiv_(m, denom, value=-self.args.score_lr / (1 - b1**t))

    def scores(self) -> dict[str, torch.Tensor]:
        if self.steps == 0:
            raise ValueError(
                "movement pruning has no scores yet: no optimizer step went through before_optimizer_step(). In a "
                "custom loop call sparsifier.before_optimizer_step() after every backward, and start pruning later"
            )
        return self.scores_

    # ---- pruning --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, pools) -> dict[str, torch.Tensor]:
        """Rank every weight, masked ones included; soft movement's ramp takes its pool targets from the threshold."""
        sp = self.sparsifier
        scores = self.scores()
        if self.soft and sp.global_step < sp.timeline.end:
            self._threshold_targets(pools)
        group_scores = {n: sp.pattern.group_scores(s.float()) for n, s in scores.items()}
        if not self.args.regrow:  # masked groups rank first, so they stay masked
            for n, g in group_scores.items():
                kept = sp.pattern.group_scores(sp.masks[n].float()) > 0
                group_scores[n] = g.masked_fill(~kept, float("-inf"))
        masks = {}
        for pool in pools:
            masks.update(sp.pattern.select({n: group_scores[n] for n in pool.names}, sp.shapes, pool.target))
        self._swap_values(masks)
        return masks

    def _threshold_targets(self, pools) -> None:
        """Set each pool's target to the count of weights with sigmoid(S) <= tau, at most the final sparsity."""
        tau, sp = self.args.threshold, self.sparsifier
        scheduled = sum(p.target for p in pools)
        below_all = 0
        for pool in pools:
            below = sum(int((torch.sigmoid(self.scores_[n]) <= tau).sum()) for n in pool.names)
            below_all += below
            # like the paper's floor on kept weights: the ramp never prunes past the final sparsity
            pool.target = min(below, int(round(pool.final * pool.numel)))
        total = sum(p.numel for p in pools)
        logger.info(
            "movement (soft) step %d: sigmoid(S) <= %g for %.4f of the weights (regularization=%g); pruning %.4f "
            "(the schedule's target %.4f is enforced at the last pruning step, %d)",
            sp.global_step,
            tau,
            below_all / total,
            self.args.regularization,
            sum(p.target for p in pools) / total,
            scheduled / total,
            sp.timeline.end,
        )

    def _swap_values(self, masks: dict[str, torch.Tensor]) -> None:
        """Store the newly masked weights' values; put the stored values back into the regrown ones."""
        sp, regrown_all = self.sparsifier, 0
        for name, keep in masks.items():
            old = sp.masks[name]
            weight, stored = sp.targets[name].weight.data, self.values[name]
            newly_pruned, regrown = old & ~keep, ~old & keep
            stored[newly_pruned] = weight[newly_pruned]
            # the optimizer may have moved a masked weight since the last step(): the stored value is the truth
            weight[regrown] = stored[regrown]
            stored[regrown] = 0
            regrown_all += int(regrown.sum())
        if regrown_all:
            logger.info("movement step %d: %d masked weights regrown", sp.global_step, regrown_all)

    # ---- checkpoint state -----------------------------------------------------------------------------------
    def _state_names(self) -> list[str]:
        return ["scores", "values", "exp_avg", "exp_avg_sq"] if self.adam else ["scores", "values"]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"steps": torch.tensor(self.steps, dtype=torch.int64)}
        for kind in self._state_names():
            out.update({f"{kind}.{n}": t for n, t in getattr(self, _TABLES[kind]).items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {"steps"} | {f"{k}.{n}" for k in self._state_names() for n in self.scores_}
        if not any(k.startswith("values.") for k in state):
            # states written before masked weights were kept: their pruned weights were dead at zero
            logger.warning("movement state has no stored values of masked weights (older hf_sparse); using zeros")
            expected = {k for k in expected if not k.startswith("values.")}
            for stored in self.values.values():
                stored.zero_()
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise KeyError(
                f"movement pruning state ({self.args.variant}, score_update={self.args.score_update!r}) does not "
                f"match the targeted modules: missing {missing[:3]}, unexpected {extra[:3]}; it was saved with other "
                "targets, another variant or another score_update (Adam's moments are saved only with Adam)"
            )
        for key in sorted(expected - {"steps"}):
            kind, name = key.split(".", 1)
            table = getattr(self, _TABLES[kind])
            if state[key].shape != table[name].shape:
                raise ValueError(
                    f"movement state tensor {key!r} has shape {tuple(state[key].shape)}, but module {name!r} has "
                    f"weight shape {tuple(table[name].shape)}"
                )
            table[name].copy_(state[key])
        self.steps = int(state["steps"])


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
