"""Sparsity patterns: which sets of weights are pruned together, and how a budget of zeros is spent.

A pattern sees a 2-D weight (out_features, in_features) as *groups*: the units that are kept or pruned together.
Methods score weights (higher = more important); the pattern turns element scores into group scores, picks the
lowest-scoring groups for a budget of pruned elements, and expands group masks back to weight shape.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod

import torch

from ..utils.registry import Registry


PATTERNS: Registry[type[Pattern]] = Registry("sparsity pattern", field="pattern")
_NM_RE = re.compile(r"^(\d+):(\d+)$")


def get_pattern(name: str) -> Pattern:
    """The pattern for a config string: a registered name ("unstructured", "4-block") or "N:M" such as "2:4"."""
    if not isinstance(name, str):
        raise TypeError(f"pattern must be a string such as 'unstructured', '4-block' or '2:4', got {name!r}")
    match = _NM_RE.match(name)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m or m > 64:
            raise ValueError(f"pattern={name!r}: N:M needs 0 < N < M <= 64, e.g. '2:4'")
        return NMPattern(n, m)
    if name not in PATTERNS:
        raise ValueError(f"Unknown pattern={name!r}; known: {', '.join(PATTERNS.names())} or 'N:M' such as '2:4'")
    return PATTERNS.get(name)()


def select_lowest(scores: list[torch.Tensor], sizes: list[torch.Tensor | int], target: int) -> list[torch.Tensor]:
    """Mark the lowest-scoring groups, over all tensors together, until about `target` elements are marked.

    `sizes[i]` is the element count of each group of `scores[i]` (an int when all are equal). Ties are broken by
    position, so every process picks the same groups. Returns boolean "pruned" tensors shaped like `scores`.
    """
    shapes = [s.shape for s in scores]
    counts = [s.numel() for s in scores]
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores]) if scores else torch.empty(0)
    if torch.isnan(flat).any():
        raise ValueError("pruning scores contain NaN; check the model's weights and gradients for NaN/inf")
    pruned = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if target > 0 and flat.numel():
        if all(isinstance(s, int) for s in sizes) and len(set(sizes)) == 1:
            k = min(flat.numel(), int(round(target / sizes[0])))
            if k > 0:
                threshold = torch.kthvalue(flat.cpu(), k).values.to(flat.device)
                pruned = flat < threshold
                missing = k - int(pruned.sum())
                if missing > 0:  # ties at the threshold: take the first ones, deterministically
                    ties = torch.nonzero(flat == threshold).flatten()[:missing]
                    pruned[ties] = True
        else:
            size = torch.cat(
                [
                    (torch.full((c,), s) if isinstance(s, int) else s.reshape(-1)).to(flat.device)
                    for s, c in zip(sizes, counts)
                ]
            )
            order = torch.argsort(flat, stable=True)
            csum = torch.cumsum(size[order], 0)
            k = int(torch.searchsorted(csum, torch.tensor(target, device=csum.device)))
            # take the count whose total is nearest the target
            if k < len(csum) and (k == 0 or abs(int(csum[k]) - target) < abs(int(csum[k - 1]) - target)):
                k += 1
            pruned[order[:k]] = True
    return [p.reshape(shape) for p, shape in zip(torch.split(pruned, counts), shapes)]


class Pattern(ABC):
    """A way of grouping the weights of a Linear for pruning."""

    name: str

    def check_sparsity(self, field: str, value: float) -> None:  # noqa: B027 - most patterns allow any sparsity
        """Raise if `value` (a final sparsity from config field `field`) is impossible with this pattern."""

    @abstractmethod
    def group_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Element scores (out, in) -> group scores."""

    @abstractmethod
    def group_sizes(self, shape: torch.Size) -> torch.Tensor | int:
        """Element count of each group (an int when all are equal)."""

    @abstractmethod
    def expand(self, group_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Group mask -> element mask of `shape`."""

    def select(
        self, group_scores: dict[str, torch.Tensor], shapes: dict[str, torch.Size], target: int
    ) -> dict[str, torch.Tensor]:
        """Element keep-masks that prune about `target` elements of the modules in `group_scores` together."""
        names = list(group_scores)
        pruned = select_lowest([group_scores[n] for n in names], [self.group_sizes(shapes[n]) for n in names], target)
        return {n: self.expand(~p, shapes[n]) for n, p in zip(names, pruned)}

    @abstractmethod
    def keep_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The keep-mask implied by the zeros already in `weight` (to resume or to keep existing sparsity)."""

    @abstractmethod
    def follows(self, keep: torch.Tensor, final: bool = True) -> bool:
        """Whether an element keep-mask respects the pattern (`final`: the pattern's full constraint)."""

    def to_dict(self) -> dict:
        return {"pattern": self.name}


class BlockPattern(Pattern):
    """Groups of `block` consecutive weights along the input dimension of one output row.

    The last group of a row is shorter when in_features is not a multiple of `block`.
    """

    block: int = 1

    def _padded(self, t: torch.Tensor, value: float) -> torch.Tensor:
        out, cols = t.shape
        pad = (-cols) % self.block
        if pad:
            t = torch.nn.functional.pad(t, (0, pad), value=value)
        return t.reshape(out, -1, self.block)

    def group_scores(self, scores: torch.Tensor) -> torch.Tensor:
        if self.block == 1:
            return scores
        return self._padded(scores, 0.0).sum(-1)

    def group_sizes(self, shape: torch.Size) -> torch.Tensor | int:
        out, cols = shape
        if cols % self.block == 0:
            return self.block
        sizes = torch.full((out, math.ceil(cols / self.block)), self.block)
        sizes[:, -1] = cols % self.block
        return sizes

    def expand(self, group_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.block == 1:
            return group_mask.reshape(shape)
        return group_mask.repeat_interleave(self.block, dim=1)[:, : shape[1]].contiguous()

    def keep_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        nonzero = self._padded(weight.detach() != 0, False).any(-1)
        return self.expand(nonzero, weight.shape)

    def follows(self, keep: torch.Tensor, final: bool = True) -> bool:
        groups = self._padded(keep, False)
        valid = self._padded(torch.ones_like(keep), False)
        all_kept = (groups | ~valid).all(-1)
        none_kept = ~groups.any(-1)
        return bool((all_kept | none_kept).all())


@PATTERNS.register("unstructured")
class UnstructuredPattern(BlockPattern):
    """Any weight may be pruned on its own."""

    name = "unstructured"
    block = 1


@PATTERNS.register("4-block", "1x4")
class Block4Pattern(BlockPattern):
    """4 consecutive input weights of one output row are pruned together: one 4-byte VNNI dot product in int8."""

    name = "4-block"
    block = 4


class NMPattern(Pattern):
    """At most N non-zeros in every M consecutive input weights of a row (2:4 is the semi-structured GPU format).

    The final sparsity is 1 - N/M. On the way there the schedule's budget is spent on whole M-groups: the groups
    whose M-N smallest scores sum lowest are brought to N:M first; the others stay dense. A short last group (when
    in_features % M != 0) keeps min(N, its length) weights.
    """

    def __init__(self, n: int, m: int):
        self.n, self.m = n, m
        self.name = f"{n}:{m}"

    @property
    def max_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def check_sparsity(self, field: str, value: float) -> None:
        if not math.isclose(value, self.max_sparsity, abs_tol=1e-6):
            raise ValueError(
                f"{field}={value} is impossible with pattern={self.name!r}, which gives exactly "
                f"{self.max_sparsity:g} sparsity; set {field}={self.max_sparsity:g}"
            )

    def group_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return scores

    def group_sizes(self, shape: torch.Size) -> torch.Tensor | int:
        return 1

    def expand(self, group_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return group_mask.reshape(shape)

    def _groups(self, t: torch.Tensor, value) -> torch.Tensor:
        out, cols = t.shape
        pad = (-cols) % self.m
        if pad:
            t = torch.nn.functional.pad(t, (0, pad), value=value)
        return t.reshape(out, -1, self.m)

    def _drop_counts(self, shape: torch.Size) -> torch.Tensor:
        """How many weights each M-group loses when brought to N:M (a short last group: len - N, at least 0)."""
        out, cols = shape
        drop = torch.full((out, math.ceil(cols / self.m)), self.m - self.n, dtype=torch.long)
        if cols % self.m:
            drop[:, -1] = max(0, cols % self.m - self.n)
        return drop

    def select(
        self, group_scores: dict[str, torch.Tensor], shapes: dict[str, torch.Size], target: int
    ) -> dict[str, torch.Tensor]:
        names = list(group_scores)
        costs, drops, orders = [], [], []
        for name in names:
            # pad with +inf: padding sorts last and is never among a group's `drop` lowest
            sorted_scores, order = torch.sort(self._groups(group_scores[name].float().cpu(), float("inf")), -1)
            drop = self._drop_counts(shapes[name])
            lowest = torch.arange(self.m) < drop.unsqueeze(-1)
            costs.append(torch.where(lowest, sorted_scores, torch.zeros(())).sum(-1))
            drops.append(drop)
            orders.append(order)
        sizes = [self.m - self.n if shapes[n][1] % self.m == 0 else d for n, d in zip(names, drops)]
        chosen = select_lowest(costs, sizes, target)
        masks = {}
        for name, pick, order, drop in zip(names, chosen, orders, drops):
            shape = shapes[name]
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(self.m).expand_as(order).contiguous())
            prune = (rank < drop.unsqueeze(-1)) & pick.unsqueeze(-1)
            keep = ~prune.reshape(shape[0], -1)[:, : shape[1]]
            masks[name] = keep.to(group_scores[name].device)
        return masks

    def keep_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach() != 0

    def follows(self, keep: torch.Tensor, final: bool = True) -> bool:
        kept = self._groups(keep, False).sum(-1)
        ok = kept <= self.n
        if not final:  # mid-schedule a group is either still dense or already N:M
            ok |= kept == self._groups(torch.ones_like(keep), False).sum(-1)
        return bool(ok.all())

    def to_dict(self) -> dict:
        return {"pattern": self.name, "n": self.n, "m": self.m}
