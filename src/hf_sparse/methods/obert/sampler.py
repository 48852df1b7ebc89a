"""Batches for the Fisher gradients, drawn from the training data without disturbing the training loop."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset


def _dist_info() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors of a batch onto `device`; mappings (BatchEncoding included) become plain dicts for `model(**batch)`."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


class BatchSampler:
    """Yields batches for gradient sampling, forever, shuffled by its own seeded generator.

    A source with a map-style `dataset` (a torch DataLoader, or the Trainer's accelerate-wrapped one) is re-batched
    here with `batch_size` and its own `collate_fn`, so the training loader, its sampler and the global RNG are left
    alone. Under torch.distributed every process draws the same permutation and takes its own slice of it, so the
    processes see different samples. Any other iterable is read as it comes, one batch per gradient, and restarted
    when exhausted.
    """

    def __init__(self, source: Iterable, batch_size: int, seed: int = 0):
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self._iter: Iterator | None = None
        dataset = getattr(source, "dataset", None)
        self.dataset = None
        if (
            dataset is not None
            and not isinstance(dataset, IterableDataset)
            and hasattr(dataset, "__len__")
            and hasattr(dataset, "__getitem__")
            and len(dataset) > 0
        ):
            self.dataset = dataset
            self.collate_fn = getattr(source, "collate_fn", None)
        elif not isinstance(source, Iterable):
            raise TypeError(
                f"the data for gradient-based pruning must be a DataLoader or an iterable of batches, "
                f"got {type(source).__name__}"
            )

    def _new_iterator(self) -> Iterator:
        if self.dataset is None:
            if self._iter is not None and iter(self.source) is self.source:
                raise ValueError(
                    "the iterator given as pruning data is exhausted; pass a DataLoader or a re-iterable list of "
                    "batches (it is read again for every Fisher)"
                )
            return iter(self.source)
        rank, world = _dist_info()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.dataset), generator=g)
        # equal shares, so every process draws the same number of batches
        share = len(order) // world if len(order) >= world else 1
        order = order[rank * share : (rank + 1) * share] if len(order) >= world else order
        kwargs = {"collate_fn": self.collate_fn} if self.collate_fn is not None else {}
        # its own generator also keeps DataLoader from drawing a base seed from the global RNG
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=order.tolist(), generator=g, **kwargs)
        return iter(loader)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        if self._iter is None:
            self._iter = self._new_iterator()
        for _ in range(2):
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = self._new_iterator()
        raise ValueError("the data given for gradient-based pruning yields no batches")


def per_process_count(total: int) -> int:
    """Gradients each process computes so that all together give at least `total`."""
    return math.ceil(total / _dist_info()[1])
