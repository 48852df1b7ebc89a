"""The block-diagonal inverse of the damped empirical Fisher, built gradient by gradient.

F = damping * I + (1/m) sum_i g_i g_i^T, with F taken block-diagonal: each flattened weight is cut into contiguous
blocks of B weights, so the inverse costs B floats per weight. Starting from F_0^-1 = I / damping, each gradient
is folded in with Sherman-Morrison, batched over all blocks of a tensor:

    F_i^-1 = F_{i-1}^-1 - (F_{i-1}^-1 g_i)(F_{i-1}^-1 g_i)^T / (m + g_i^T F_{i-1}^-1 g_i)

k gradients are folded in at once with the composition of their k rank-one updates (the Woodbury identity), so
F^-1 is read and written once per k gradients instead of once per gradient.
"""

from __future__ import annotations

import math

import torch


class BlockLayout:
    """How a 2-D weight maps to Fisher blocks.

    Rows are padded to a multiple of `group` (the pattern's group: 1 or 4 consecutive input weights), flattened,
    and padded to a multiple of `block`; `block` is a multiple of `group`, so a group never straddles two blocks.
    Padding holds zero weights with zero gradients, which leaves the real entries of the inverse untouched.
    """

    def __init__(self, shape: torch.Size, block: int, group: int = 1):
        if block % group:
            raise ValueError(f"Fisher block size {block} must be a multiple of the group size {group}")
        self.shape = torch.Size(shape)
        self.block, self.group = block, group
        rows, cols = self.shape
        self.padded_cols = math.ceil(cols / group) * group
        self.numel = rows * self.padded_cols
        self.num_blocks = math.ceil(self.numel / block)

    def to_blocks(self, t: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
        """(rows, cols) -> (num_blocks, block), padded with `fill`."""
        cols = self.shape[1]
        if self.padded_cols != cols:
            t = torch.nn.functional.pad(t, (0, self.padded_cols - cols), value=fill)
        flat = t.reshape(-1)
        pad = self.num_blocks * self.block - self.numel
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad), value=fill)
        return flat.view(self.num_blocks, self.block)

    def from_blocks(self, t: torch.Tensor) -> torch.Tensor:
        """(num_blocks, block) -> (rows, cols), dropping the padding."""
        rows, cols = self.shape
        return t.reshape(-1)[: self.numel].view(rows, self.padded_cols)[:, :cols]

    def groups_from_blocks(self, t: torch.Tensor) -> torch.Tensor:
        """Per-group values (num_blocks, block // group) -> (rows, padded_cols // group), the pattern's layout."""
        rows = self.shape[0]
        return t.reshape(-1)[: self.numel // self.group].view(rows, self.padded_cols // self.group)

    def groups_to_blocks(self, t: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
        """(rows, padded_cols // group) -> (num_blocks, block // group)."""
        flat = t.reshape(-1)
        per_block = self.block // self.group
        pad = self.num_blocks * per_block - flat.numel()
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad), value=fill)
        return flat.view(self.num_blocks, per_block)


_SLICE = 16384


def _sherman_morrison(inv: torch.Tensor, grads: torch.Tensor, m: float) -> None:
    """k successive Sherman-Morrison updates of every block of `inv` (blocks, B, B), in place; grads (k, blocks, B).

    Composed, the k rank-one updates are the rank-k identity F^-1 - U (m I + G U)^-1 U^T with U = F^-1 G^T, so
    `inv` is read and written once per k gradients. The k x k system is solved in float64 through its Cholesky
    factor L (m I + G U = L L^T): the update is Y^T Y with Y = L^-1 U^T, which stays accurate when the damping is
    tiny next to the squared gradients, where an explicit inverse of m I + G U would not.
    """
    k = grads.shape[0]
    g = grads.permute(1, 2, 0)  # (blocks, B, k)
    u = torch.bmm(inv, g)
    if k == 1:
        d = m + (g * u).sum(dim=1, keepdim=True)
        inv.baddbmm_(u / d, u.transpose(1, 2), alpha=-1.0)
        return
    inner = torch.bmm(g.transpose(1, 2), u).double()  # G F^-1 G^T
    inner = 0.5 * (inner + inner.transpose(1, 2))
    inner.diagonal(dim1=1, dim2=2).add_(m)
    chol, info = torch.linalg.cholesky_ex(inner)
    if bool(info.any()):  # rounding broke positive definiteness: one rank-one update at a time instead
        for i in range(k):
            _sherman_morrison(inv, grads[i : i + 1], m)
        return
    # U (L L^T)^-1 U^T = Y^T Y with Y = L^-1 U^T: a triangular solve, never an explicit (ill-conditioned) inverse
    y = torch.linalg.solve_triangular(chol, u.transpose(1, 2).double(), upper=False).to(inv.dtype)
    inv.baddbmm_(y.transpose(1, 2), y, alpha=-1.0)


def inverse_bytes(num_blocks: int, block: int, dtype: torch.dtype) -> int:
    return num_blocks * block * block * torch.finfo(dtype).bits // 8


class BlockFisherInverse:
    """F^-1 of one weight tensor as `num_blocks` dense (B x B) blocks, accumulated from `num_grads` gradients.

    Call `add(grads)` with gradients shaped (k, num_blocks, B) until `num_grads` have been added; `inv` then holds
    (damping * I + (1/num_grads) sum g g^T)^-1 block by block.
    """

    def __init__(
        self,
        num_blocks: int,
        block: int,
        damping: float,
        num_grads: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        self.num_grads = num_grads
        self.seen = 0
        self.inv = torch.zeros(num_blocks, block, block, dtype=dtype, device=device)
        self.inv.diagonal(dim1=1, dim2=2).fill_(1.0 / damping)

    @torch.no_grad()
    def add(self, grads: torch.Tensor) -> None:
        """Fold in k gradients, shaped (k, num_blocks, B) (or (num_blocks, B) for one), in order."""
        if grads.dim() == 2:
            grads = grads.unsqueeze(0)
        k = grads.shape[0]
        if self.seen + k > self.num_grads:
            raise ValueError(f"Fisher built for {self.num_grads} gradients got {self.seen + k}")
        for lo in range(0, self.inv.shape[0], _SLICE):  # bounds the temporaries
            hi = min(lo + _SLICE, self.inv.shape[0])
            _sherman_morrison(self.inv[lo:hi], grads[:, lo:hi].to(self.inv.dtype), float(self.num_grads))
        self.seen += k

    @property
    def complete(self) -> bool:
        return self.seen == self.num_grads
