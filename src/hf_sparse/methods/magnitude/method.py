from __future__ import annotations

import torch

from ..base import PruningMethod, register_method


@register_method("magnitude")
class MagnitudePruning(PruningMethod):
    """Gradual magnitude pruning (Zhu & Gupta 2017): drop the weights (groups) with the smallest |w|.

    Groups are ranked by their squared L2 norm, which for single weights is the same order as |w|.
    """

    def scores(self) -> dict[str, torch.Tensor]:
        return {name: module.weight.detach().float().square() for name, module in self.sparsifier.targets.items()}
