"""The batch sampler behind oBERT's Fisher gradients."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.methods.obert.sampler import BatchSampler, move_to


def test_rebatches_a_dataloader_with_its_own_generator():
    data = torch.utils.data.TensorDataset(torch.arange(20))
    loader = torch.utils.data.DataLoader(data, batch_size=7, shuffle=True)
    rng = torch.get_rng_state()
    sampler = BatchSampler(loader, batch_size=4, seed=3)
    epoch = torch.cat([next(sampler)[0] for _ in range(5)])
    assert torch.equal(epoch.sort().values, torch.arange(20))  # one pass covers every sample once
    assert not torch.equal(epoch, torch.arange(20))  # shuffled
    again = torch.cat([next(sampler)[0] for _ in range(5)])
    assert not torch.equal(again, epoch)  # a new permutation each pass
    assert torch.equal(torch.get_rng_state(), rng)
    same_seed = BatchSampler(loader, batch_size=4, seed=3)
    assert torch.equal(torch.cat([next(same_seed)[0] for _ in range(5)]), epoch)


def test_reads_an_iterable_of_batches_in_order_and_restarts():
    batches = [{"x": torch.tensor([i])} for i in range(3)]
    sampler = BatchSampler(batches, batch_size=99)
    assert [int(next(sampler)["x"]) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_an_exhausted_iterator_is_a_clear_error():
    sampler = BatchSampler(iter([1, 2]), batch_size=1)
    assert [next(sampler), next(sampler)] == [1, 2]
    with pytest.raises(ValueError, match="iterator given as pruning data is exhausted.*re-iterable"):
        next(sampler)


def test_refuses_what_is_not_data():
    with pytest.raises(TypeError, match="must be a DataLoader or an iterable of batches, got int"):
        BatchSampler(3, batch_size=1)
    with pytest.raises(ValueError, match="yields no batches"):
        next(BatchSampler([], batch_size=1))


def test_move_to_turns_mappings_into_plain_dicts():
    from transformers import BatchEncoding

    batch = BatchEncoding({"input_ids": torch.ones(2, 3), "labels": [torch.zeros(2)]})
    moved = move_to(batch, torch.device("cpu"))
    assert type(moved) is dict and torch.equal(moved["input_ids"], torch.ones(2, 3))
