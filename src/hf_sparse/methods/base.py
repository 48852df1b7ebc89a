"""The interface every pruning method implements. A method is a folder under methods/ and one registration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..utils.registry import Registry


if TYPE_CHECKING:
    from ..sparsity.sparsifier import Pool, Sparsifier

METHODS: Registry[type[PruningMethod]] = Registry("pruning method", field="method")


def register_method(name: str):
    """Class decorator: make a PruningMethod subclass available as `SparseConfig(method=name)`."""

    def decorator(cls: type[PruningMethod]) -> type[PruningMethod]:
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator


@dataclass
class NoArgs:
    """This method has no settings."""


class PruningMethod:
    """Decides which weights to prune. The Sparsifier owns masks, schedule, targets and state bookkeeping.

    Lifecycle: `attach()` once; `before_optimizer_step()` after each backward (gradients are in `.grad`, already
    clipped); `prune(pools)` at each scheduled step, returning new keep-masks; `detach()` at the end.
    Tensor state a method keeps (e.g. movement scores) goes through `state_dict` / `load_state_dict` so that it is
    saved with Trainer checkpoints.
    """

    name: ClassVar[str]
    args_class: ClassVar[type] = NoArgs
    #: zero the gradients of pruned weights during backward (movement turns this off: its scores read them, then it
    #: zeroes them itself before the optimizer step)
    mask_gradients: ClassVar[bool] = True

    def __init__(self, sparsifier: Sparsifier, args: Any):
        self.sparsifier = sparsifier
        self.args = args

    @classmethod
    def validate_config(cls, config) -> None:
        """Raise for settings this method cannot honour (called from SparseConfig.__post_init__)."""

    def attach(self) -> None:
        """Allocate state for the targeted modules."""

    def detach(self) -> None:
        """Release state and hooks."""

    def before_optimizer_step(self) -> None:
        """Called once per optimizer step, before it, with gradients in `.grad`."""

    def scores(self) -> dict[str, torch.Tensor]:
        """Importance of every targeted weight (higher = keep), shaped like the weights."""
        raise NotImplementedError(f"{type(self).__name__} must implement scores() or prune()")

    def prune(self, pools: list[Pool]) -> dict[str, torch.Tensor]:
        """New keep-masks for every targeted module, with each pool's `target` elements pruned.

        The default ranks `scores()` through the pattern; pruned weights stay pruned.
        """
        sp = self.sparsifier
        scores = self.scores()
        group_scores = {}
        for name, score in scores.items():
            score = score.detach().float().masked_fill(~sp.masks[name], float("-inf"))
            group_scores[name] = sp.pattern.group_scores(score)
        masks = {}
        for pool in pools:
            masks.update(sp.pattern.select({n: group_scores[n] for n in pool.names}, sp.shapes, pool.target))
        return masks

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but got keys {sorted(state)[:5]}")
