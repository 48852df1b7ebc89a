import pytest
import torch

from hf_sparse.sparsity.patterns import get_pattern, select_lowest


def test_select_lowest_matches_sorting_reference():
    torch.manual_seed(0)
    scores = [torch.randn(13, 7), torch.randn(5, 11)]
    target = 60
    pruned = select_lowest(scores, [1, 1], target)
    flat = torch.cat([s.flatten() for s in scores])
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[torch.argsort(flat)[:target]] = True
    assert torch.equal(torch.cat([p.flatten() for p in pruned]), expected)


def test_select_lowest_breaks_ties_by_position():
    scores = [torch.zeros(4, 4)]
    pruned = select_lowest(scores, [1], 5)[0].flatten()
    assert pruned.tolist() == [True] * 5 + [False] * 11


def test_select_lowest_with_unequal_group_sizes_hits_target_within_a_group():
    torch.manual_seed(1)
    scores = torch.rand(6, 3)
    sizes = torch.tensor([[4, 4, 1]] * 6)
    for target in range(0, 55, 5):
        pruned = select_lowest([scores], [sizes], target)[0]
        assert abs(int(sizes[pruned].sum()) - target) <= 4


@pytest.mark.parametrize("shape", [(830, 545), (8, 16), (3, 5)])
@pytest.mark.parametrize("name", ["unstructured", "4-block", "2:4", "1:8"])
def test_select_prunes_the_budget_in_the_pattern(shape, name):
    torch.manual_seed(0)
    pattern = get_pattern(name)
    scores = torch.rand(shape)
    numel = scores.numel()
    target = int(0.3 * numel)
    keep = pattern.select({"w": pattern.group_scores(scores)}, {"w": torch.Size(shape)}, target)["w"]
    assert keep.shape == shape and keep.dtype == torch.bool
    assert pattern.follows(keep, final=False)
    block = {"unstructured": 1, "4-block": 4}[name] if ":" not in name else int(name.split(":")[1])
    assert abs(int((~keep).sum()) - target) <= block


@pytest.mark.parametrize("shape", [(830, 545), (16, 64)])
def test_n_m_final_has_at_most_n_per_group(shape):
    torch.manual_seed(0)
    pattern = get_pattern("2:4")
    scores = torch.rand(shape)
    keep = pattern.select({"w": scores}, {"w": torch.Size(shape)}, scores.numel())["w"]
    assert pattern.follows(keep, final=True)
    full = shape[1] // 4 * 4
    groups = keep[:, :full].reshape(shape[0], -1, 4).sum(-1)
    assert (groups == 2).all()
    # the two kept weights of a full group are its two highest scores
    top2 = scores[:, :full].reshape(shape[0], -1, 4).topk(2, dim=-1).indices
    assert keep[:, :full].reshape(shape[0], -1, 4).gather(-1, top2).all()


def test_block_pattern_keeps_whole_blocks_with_the_largest_norm():
    pattern = get_pattern("4-block")
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 5.0, 0.1]])  # block sums 4.0 vs 5.3
    keep = pattern.select({"w": pattern.group_scores(scores)}, {"w": scores.shape}, 4)["w"]
    assert keep.tolist() == [[False] * 4 + [True] * 4]


@pytest.mark.parametrize("name", ["unstructured", "4-block", "2:4"])
def test_keep_from_weight_recovers_masks(name):
    torch.manual_seed(0)
    pattern = get_pattern(name)
    w = torch.randn(12, 18)
    keep = pattern.select({"w": pattern.group_scores(w.abs())}, {"w": w.shape}, 100)["w"]
    assert torch.equal(pattern.keep_from_weight(w * keep), keep)


def test_follows_detects_violations():
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, 1] = False
    assert not get_pattern("4-block").follows(keep)
    assert get_pattern("unstructured").follows(keep)
    assert not get_pattern("2:4").follows(keep, final=True)
    keep3 = torch.tensor([[True, True, True, False]])
    assert not get_pattern("2:4").follows(keep3, final=False)


def test_unknown_pattern_lists_known_ones():
    with pytest.raises(ValueError, match="4-block"):
        get_pattern("diagonal")
