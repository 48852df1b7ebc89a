"""oBERT's mathematics against direct computation: Fisher inverse, block layout, OBS saliency and update."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.methods.obert.fisher import BlockFisherInverse, BlockLayout
from hf_sparse.methods.obert.obs import group_solve, obs_update
from hf_sparse.sparsity.patterns import get_pattern


def _grads(m: int, blocks: int, size: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Correlated gradients (a few shared directions plus noise), like a network's, in float64."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(blocks, 4, size, generator=g, dtype=torch.float64)
    coef = torch.randn(m, blocks, 4, generator=g, dtype=torch.float64)
    noise = 0.3 * torch.randn(m, blocks, size, generator=g, dtype=torch.float64)
    return (torch.einsum("mbr,brj->mbj", coef, basis) + noise) * scale


def _damped_fisher(grads: torch.Tensor, damping: float) -> torch.Tensor:
    m, _, size = grads.shape
    return damping * torch.eye(size, dtype=torch.float64) + torch.einsum("mbi,mbj->bij", grads, grads) / m


@pytest.mark.parametrize("chunk", [1, 3, 16])
@pytest.mark.parametrize("blocks,size,m", [(5, 8, 21), (3, 12, 7)])  # m > B and m < B (rank-deficient)
def test_accumulated_inverse_equals_inverse_of_damped_fisher(chunk, blocks, size, m):
    grads = _grads(m, blocks, size)
    fisher = BlockFisherInverse(blocks, size, damping=1e-2, num_grads=m, dtype=torch.float64)
    for i in range(0, m, chunk):
        fisher.add(grads[i : i + chunk])
    assert fisher.complete
    expected = torch.linalg.inv(_damped_fisher(grads, 1e-2))
    torch.testing.assert_close(fisher.inv, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


@pytest.mark.parametrize("chunk", [1, 16])
def test_float32_inverse_at_the_papers_damping(chunk):
    # gradients of a trained network are ~1e-4..1e-3; damping 1e-7 sits below their squares, as in the paper
    grads = _grads(256, 7, 50, scale=3e-4)
    fisher = BlockFisherInverse(7, 50, damping=1e-7, num_grads=256, dtype=torch.float32)
    for i in range(0, 256, chunk):
        fisher.add(grads[i : i + chunk].float())
    expected = torch.linalg.inv(_damped_fisher(grads, 1e-7))
    err = (fisher.inv.double() - expected).norm(dim=(1, 2)) / expected.norm(dim=(1, 2))
    assert err.max() < 1e-4, f"relative error {err.max():.2e}"


def test_fisher_refuses_more_gradients_than_announced():
    fisher = BlockFisherInverse(2, 4, damping=1.0, num_grads=2)
    fisher.add(torch.ones(2, 2, 4))
    with pytest.raises(ValueError, match="built for 2 gradients got 3"):
        fisher.add(torch.ones(2, 4))


@pytest.mark.parametrize("shape,block,group", [((7, 13), 12, 4), ((5, 9), 50, 1), ((3, 8), 8, 4), ((6, 10), 6, 1)])
def test_layout_round_trip_and_group_order(shape, block, group):
    layout = BlockLayout(torch.Size(shape), block, group)
    w = torch.randn(shape)
    blocks = layout.to_blocks(w)
    assert blocks.shape == (layout.num_blocks, block)
    torch.testing.assert_close(layout.from_blocks(blocks), w)
    assert blocks.abs().sum() == pytest.approx(w.abs().sum().item(), rel=1e-6)  # padding holds zeros
    # per-group sums in block layout land where the pattern keeps its group scores
    sums = blocks.view(layout.num_blocks, -1, group).sum(-1)
    pattern = get_pattern("4-block" if group == 4 else "unstructured")
    torch.testing.assert_close(layout.groups_from_blocks(sums), pattern.group_scores(w))
    torch.testing.assert_close(layout.groups_to_blocks(layout.groups_from_blocks(sums)), sums)


def test_layout_refuses_block_not_multiple_of_group():
    with pytest.raises(ValueError, match="multiple of the group size 4"):
        BlockLayout(torch.Size((4, 8)), 50, 4)


def _spd(blocks: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(blocks, size, size, generator=g, dtype=torch.float64)
    return a @ a.transpose(1, 2) / size + 0.1 * torch.eye(size, dtype=torch.float64)


def test_single_weight_saliency_and_update_closed_form():
    inv = _spd(3, 6)
    w = torch.randn(3, 6, dtype=torch.float64)
    saliency, v = group_solve(inv, w, 1)
    diag = inv.diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(saliency, w**2 / (2 * diag))
    pruned = torch.zeros(3, 6, dtype=torch.bool)
    pruned[1, 4] = True
    dw = obs_update(inv, v, pruned)
    expected = torch.zeros(3, 6, dtype=torch.float64)
    expected[1] = -(w[1, 4] / inv[1, 4, 4]) * inv[1, :, 4]
    torch.testing.assert_close(dw, expected)
    assert (w + dw)[1, 4].abs() < 1e-12  # the pruned weight lands exactly on zero


def _constrained_min_increase(hessian: torch.Tensor, w: torch.Tensor, fixed: list[int]) -> tuple[float, torch.Tensor]:
    """Minimise 1/2 (w' - w)^T H (w' - w) subject to w'_fixed = 0 by solving for the free weights directly."""
    size = len(w)
    free = [i for i in range(size) if i not in fixed]
    # d = w' - w; d_fixed = -w_fixed; the free part solves H_ff d_f = -H_fq d_q
    d = torch.zeros(size, dtype=torch.float64)
    d[fixed] = -w[fixed]
    d[free] = torch.linalg.solve(hessian[free][:, free], -hessian[free][:, fixed] @ d[fixed])
    return float(0.5 * d @ hessian @ d), w + d


def test_4block_saliency_and_update_equal_the_closed_form_and_the_constrained_minimum():
    fisher = _spd(2, 8, seed=1)
    inv = torch.linalg.inv(fisher)
    w = torch.randn(2, 8, dtype=torch.float64)
    saliency, v = group_solve(inv, w, 4)
    for b in range(2):
        for q in range(2):
            idx = list(range(4 * q, 4 * q + 4))
            closed = 0.5 * w[b, idx] @ torch.linalg.inv(inv[b][idx][:, idx]) @ w[b, idx]
            torch.testing.assert_close(saliency[b, q], closed)
            increase, best = _constrained_min_increase(fisher[b], w[b], idx)
            assert saliency[b, q].item() == pytest.approx(increase, rel=1e-9)
            pruned = torch.zeros(2, 8, dtype=torch.bool)
            pruned[b, idx] = True
            torch.testing.assert_close((w + obs_update(inv, v, pruned))[b], best)
