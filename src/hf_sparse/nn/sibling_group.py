"""`SiblingGroup`: Linears that read the same input, packed side by side and computed together on the first call.

Attention's query/key/value (and a gated MLP's gate/up) are called one after the other with the very same tensor.
One `pack_linears` call quantizes that input once and runs one kernel for all of them; the first sibling called
computes every output, and the others pick theirs up from a cache. The cache is per thread (concurrent forwards
never see each other's results) and is keyed by the input's identity and version counter, so a sibling called
with another tensor, or with the same tensor modified in place, recomputes instead of reading a stale output.
Inference tensors (`torch.inference_mode`) have no version counter: for them the key is the identity alone, which
is why groups are formed only for module classes whose forward is known to call the siblings back to back
(`hf_sparse.integrations.fusion_rules`).
"""

from __future__ import annotations

import threading

import torch

from ..ops import PackedLinear


class SiblingGroup:
    """One `PackedLinear` (from `pack_linears`) shared by the `SparseLinear` modules it holds, in order.

    Args:
        packed: the packed weights of all members, output rows member by member (`packed.splits` sizes).
        names: the members' module names, for messages and repr.
    """

    def __init__(self, packed: PackedLinear, names: list[str]):
        if packed.splits is None or len(packed.splits) != len(names):
            raise ValueError(f"SiblingGroup needs one packed output split per member, got {packed.splits} for {names}")
        self.packed = packed
        self.names = list(names)
        self.offsets = [sum(packed.splits[:i]) for i in range(len(names))]
        self._all = (1 << len(names)) - 1
        self._local = threading.local()

    def __deepcopy__(self, memo):
        # a copied model shares the (never modified) packed weights, with its own caches
        new = memo[id(self)] = SiblingGroup(self.packed, self.names)
        return new

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member `index`'s output for input `x`: from this thread's cache when a sibling just computed it for the
        very same, unmodified tensor; otherwise all members are computed now and the others' outputs cached."""
        local = self._local
        # inference tensors have no version counter; they can only be modified in place inside inference_mode
        version = -1 if x.is_inference() else x._version
        if getattr(local, "x", None) is x and local.version == version and (local.pending >> index) & 1:
            out = local.outputs[index]
            local.pending &= ~(1 << index)
            if not local.pending:
                local.x = local.outputs = None  # everything served: do not keep the tensors alive
            return out
        outputs = self.packed(x)
        local.x, local.version, local.outputs = x, version, outputs
        local.pending = self._all & ~(1 << index)
        return outputs[index]

    def clear(self) -> None:
        """Drop this thread's cached outputs."""
        self._local.x = self._local.outputs = None

    def __repr__(self) -> str:
        return f"SiblingGroup({', '.join(self.names)}; {self.packed!r})"
