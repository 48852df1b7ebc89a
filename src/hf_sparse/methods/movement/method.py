from __future__ import annotations

import logging

import torch

from ..base import PruningMethod, register_method
from .config import MovementArgs


logger = logging.getLogger(__name__)

_BETAS, _EPS = (0.9, 0.999), 1e-8


@register_method("movement")
class MovementPruning(PruningMethod):
    """Movement pruning (Sanh et al. 2020): keep the weights moving away from zero, drop those moving towards it.

    Scores are updated once per optimizer step from the clipped gradients (`before_optimizer_step`) and ranked
    through the pattern at each pruning step (groups score the sum of their weights' scores). They are saved with
    checkpoints as `method.scores.<module>` in the hf_sparse state. Pruned weights are exactly zero here, so their
    movement W * dL/dW is zero and their scores stop changing: unlike the paper's masked-but-kept weights, a
    pruned weight never comes back. (Its gradient would not change that, so gradients stay masked.)
    """

    args_class = MovementArgs

    def attach(self) -> None:
        sp = self.sparsifier
        if sp.timeline.start == 0 and not sp.schedule.keeps_existing:
            raise ValueError(
                f"method='movement' ranks weights by their movement accumulated over training steps, so it cannot "
                f"prune at step 0 (start={sp.config.start!r}); set start to a later step, e.g. start=0.1 (a fraction "
                "of training) or start=100 (optimizer steps)"
            )
        self.scores_: dict[str, torch.Tensor] = {
            n: torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device) for n, m in sp.targets.items()
        }
        self.soft = self.args.variant == "soft"
        if self.soft:
            self.exp_avg = {n: torch.zeros_like(s) for n, s in self.scores_.items()}
            self.exp_avg_sq = {n: torch.zeros_like(s) for n, s in self.scores_.items()}
        self.steps = 0
        self._numel = sum(s.numel() for s in self.scores_.values())

    def detach(self) -> None:
        self.scores_ = {}
        self.exp_avg, self.exp_avg_sq = {}, {}

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        self.steps += 1
        seen = False
        for name, module in self.sparsifier.targets.items():
            grad = module.weight.grad
            if grad is None:
                continue
            seen = True
            # dL/dS through the straight-through mask: W * dL/dW; hard movement accumulates its negative
            ste = module.weight.detach().float() * grad.float()
            if not self.soft:
                self.scores_[name].sub_(ste)
                continue
            s = self.scores_[name]
            sig = torch.sigmoid(s)
            ste.add_(sig * (1.0 - sig), alpha=self.args.regularization / self._numel)
            self._adam(name, ste)
        if not seen:
            raise ValueError(
                "movement pruning found no gradient on any targeted weight: call sparsifier.before_optimizer_step() "
                "after loss.backward() and before optimizer.zero_grad()"
            )

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

    # ---- checkpoint state -----------------------------------------------------------------------------------
    def _state_names(self) -> list[str]:
        return ["scores", "exp_avg", "exp_avg_sq"] if self.soft else ["scores"]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"steps": torch.tensor(self.steps, dtype=torch.int64)}
        tables = {
            "scores": self.scores_,
            **({"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq} if self.soft else {}),
        }
        for kind, table in tables.items():
            out.update({f"{kind}.{n}": t for n, t in table.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {"steps"} | {f"{k}.{n}" for k in self._state_names() for n in self.scores_}
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise KeyError(
                f"movement pruning state ({self.args.variant}) does not match the targeted modules: missing "
                f"{missing[:3]}, unexpected {extra[:3]}; it was saved with other targets or another variant"
            )
        for key in sorted(expected - {"steps"}):
            kind, name = key.split(".", 1)
            table = {"scores": self.scores_}.get(kind) or getattr(self, kind)
            if state[key].shape != table[name].shape:
                raise ValueError(
                    f"movement state tensor {key!r} has shape {tuple(state[key].shape)}, but module {name!r} has "
                    f"weight shape {tuple(table[name].shape)}"
                )
            table[name].copy_(state[key])
        self.steps = int(state["steps"])
