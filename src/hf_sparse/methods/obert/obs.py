"""Optimal Brain Surgeon on a block-diagonal inverse Fisher: saliency of a group of weights and the update.

For a group Q (one weight, or `group` consecutive weights of a block), with F^-1 the block's inverse Fisher:

    saliency  rho_Q = 1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q       (predicted loss increase of zeroing w_Q)
    update    dw    = -F^-1 E_Q^T ([F^-1]_QQ)^-1 w_Q     (best change of the other weights, with w_Q -> 0)

For a single weight these are w_i^2 / (2 [F^-1]_ii) and -(w_i / [F^-1]_ii) F^-1 e_i.
"""

from __future__ import annotations

import torch


def group_solve(inv: torch.Tensor, w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Saliency of every group and v_Q = ([F^-1]_QQ)^-1 w_Q.

    Args:
        inv: (blocks, B, B) inverse Fisher blocks.
        w: (blocks, B) weights in the same layout.
        group: group size; B must be a multiple of it.

    Returns:
        saliency (blocks, B // group) and v (blocks, B) (v of each group in its group's slots).
    """
    blocks, size = w.shape
    w = w.to(inv.dtype)
    if group == 1:
        v = w / inv.diagonal(dim1=1, dim2=2)
        return 0.5 * w * v, v
    q = size // group
    # the (group x group) blocks on the diagonal of every (B x B) block: (blocks, q, group, group)
    diag_blocks = inv.view(blocks, q, group, q, group).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    wq = w.view(blocks, q, group)
    v = torch.linalg.solve(diag_blocks, wq.unsqueeze(-1)).squeeze(-1)
    return 0.5 * (wq * v).sum(-1), v.reshape(blocks, size)


def obs_update(inv: torch.Tensor, v: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Sum of the OBS updates of the groups marked in `pruned` (blocks, B): -F^-1 (v masked to those groups)."""
    s = torch.where(pruned, v, torch.zeros((), dtype=v.dtype, device=v.device))
    return -torch.bmm(inv, s.unsqueeze(-1)).squeeze(-1)
