"""`dense`: the weight as a plain checkpoint stores it (used for int8 embeddings and non-pruned int8 Linears)."""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..formats import Codec, WeightFormat, expect, register_codec


@register_codec
class DenseCodec(Codec):
    format = WeightFormat.DENSE
    names = ("weight",)
    values = "weight"

    def encode(self, stored, keep, pattern) -> dict[str, torch.Tensor]:
        return {"weight": stored}

    def check(self, tensors, name) -> tuple[int, int]:
        weight = expect(tensors, name, "weight")
        if weight.ndim != 2 or weight.numel() == 0:
            raise CheckpointError(f"tensor '{name}.weight' has shape {tuple(weight.shape)}; expected a 2-D matrix")
        return tuple(weight.shape)

    def decode(self, tensors) -> torch.Tensor:
        return tensors["weight"]
