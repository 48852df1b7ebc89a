"""`SparseLinear`: the runtime stand-in for an `nn.Linear` whose weight is stored sparse and/or int8.

It lives in two phases. While a checkpoint loads it holds the decoded weight as parameters, the way the loader
fills them: `weight` (the stored matrix: int8 codes or float values, `(out, in)`), `weight_scale` (int8 only,
float32 `(out, 1)`) and `bias`. `pack()` (or `pack_siblings`) then packs them once for the CPU kernels of
`hf_sparse.ops` and drops the dense copy; from then on the module holds no parameters and `forward` runs the kernel.
Nothing here knows about transformers.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops import PackedLinear, get_handler, pack_linear, pack_linears
from .sibling_group import SiblingGroup


#: storage dtype names (as in the checkpoint's quantization_config) -> torch dtypes
STORAGE_DTYPES = {"int8": torch.int8, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SparseLinear(nn.Module):
    """`y = x @ W^T + b` on hf_sparse's kernels, for a weight stored as int8 codes or sparse float values.

    Args:
        in_features / out_features: the Linear's sizes.
        bias: whether it has a bias.
        storage_dtype: "int8" (int8 codes + per-channel scales: the int8 kernels, per-token int8 activations) or a
            float dtype ("float32", "bfloat16", "float16": the fp32 sparse kernel).
        dtype: dtype of the bias parameter while loading (the kernels compute in float32; outputs take the input's
            dtype).
        device: where the loading parameters are created (transformers builds models on "meta").
        scale_from: the module name of an int8 embedding whose `weight_scale` this (tied) head uses; it then has no
            `weight_scale` parameter of its own.

    Attributes: `activation` ("none", "gelu" or "tanh", fused into the kernel), `packed` (the `PackedLinear`, when packed
    alone), `group` / `index` (the `SiblingGroup` and this module's place in it), `checkpoint_format` (the on-disk
    format it was loaded from, used when saving again).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        storage_dtype: str = "int8",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        scale_from: str | None = None,
        checkpoint_format: str | None = None,
    ):
        super().__init__()
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype={storage_dtype!r}; choose one of {', '.join(STORAGE_DTYPES)}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.storage_dtype = storage_dtype
        self.scheme = "int8" if storage_dtype == "int8" else "fp32"
        self.has_bias = bool(bias)
        self.scale_from = scale_from
        self.checkpoint_format = checkpoint_format
        self.activation = "none"
        self.packed: PackedLinear | None = None
        self.group: SiblingGroup | None = None
        self.index = 0
        shape = (self.out_features, self.in_features)
        self.weight = nn.Parameter(torch.empty(shape, dtype=STORAGE_DTYPES[storage_dtype], device=device), False)
        if self.scheme == "int8" and scale_from is None:
            scale = torch.empty(self.out_features, 1, dtype=torch.float32, device=device)
            self.weight_scale = nn.Parameter(scale, requires_grad=False)
        else:
            self.register_parameter("weight_scale", None)
        if self.has_bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device), False)
        else:
            self.register_parameter("bias", None)

    # ---- running ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        if group is not None:
            if torch.compiler.is_compiling():  # no Python-side cache inside a graph
                y = group.packed(x)[self.index]
            else:
                y = group.output(self.index, x)
        elif self.packed is not None:
            y = self.packed(x)
        else:
            raise RuntimeError(
                "SparseLinear is not packed yet: call pack() (from_pretrained does it after loading the weights)"
            )
        return y if y.dtype is x.dtype or not x.is_floating_point() else y.to(x.dtype)

    def __deepcopy__(self, memo):
        # packed weights are never modified after packing, so copies share them (they cannot be pickled)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = value if key == "packed" else copy.deepcopy(value, memo)
        return new

    @property
    def is_packed(self) -> bool:
        return self.packed is not None or self.group is not None

    # ---- packing ------------------------------------------------------------------------------------------------
    def loaded_tensors(self, weight_scale: torch.Tensor | None = None):
        """(weight, weight_scale or None, bias or None) as loaded; raises if they were never filled."""
        if self.is_packed:
            raise RuntimeError("this SparseLinear is already packed")
        for name in ("weight", "weight_scale", "bias"):
            t = getattr(self, name)
            if t is not None and t.device.type == "meta":
                raise RuntimeError(f"SparseLinear.{name} was never loaded (it is still on the meta device)")
        scale = self.weight_scale if weight_scale is None else weight_scale
        if self.scheme == "int8" and scale is None:
            raise RuntimeError(f"this int8 SparseLinear shares its scales with {self.scale_from!r}: pass weight_scale")
        bias = self.bias.detach() if self.bias is not None else None
        return self.weight.detach(), (scale.detach() if scale is not None else None), bias

    def pack(
        self, activation: str = "none", weight_scale: torch.Tensor | None = None, workload: str = "batch"
    ) -> PackedLinear:
        """Pack the loaded weight for the kernels (layout chosen from its zeros for `workload`, see `pack_linear`),
        fusing `activation`; the loading parameters are dropped. `weight_scale` overrides the module's own (a tied
        head's scales)."""
        weight, scale, bias = self.loaded_tensors(weight_scale)
        packed = pack_linear(
            weight, bias=bias, scheme=self.scheme, weight_scale=scale, activation=activation, workload=workload
        )
        self._set_packed(packed, None, 0, activation)
        return packed

    def _set_packed(self, packed: PackedLinear | None, group: SiblingGroup | None, index: int, activation: str):
        self.packed, self.group, self.index, self.activation = packed, group, index, activation
        for name in ("weight", "weight_scale", "bias"):
            self.register_parameter(name, None)

    # ---- reading the packed weight back ------------------------------------------------------------------------
    def _packed_and_rows(self) -> tuple[PackedLinear, slice]:
        if self.group is not None:
            start = self.group.offsets[self.index]
            return self.group.packed, slice(start, start + self.out_features)
        if self.packed is None:
            raise RuntimeError("SparseLinear is not packed yet")
        return self.packed, slice(None)

    def stored_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the stored matrix `(out, in)` in the storage dtype, the int8 scales `(out,)` or None), read back from
        the packed layout: exactly the codes (or values) the kernels multiply by."""
        packed, rows = self._packed_and_rows()
        tensors = packed.tensors
        stored = get_handler(packed.layout).dense_codes(tensors, packed.out_features, packed.in_features)[rows]
        if self.scheme == "int8":
            return stored.contiguous(), tensors["weight_scale"][rows].clone()
        return stored.to(STORAGE_DTYPES[self.storage_dtype]).contiguous(), None

    def stored_bias(self) -> torch.Tensor | None:
        """The bias (float32 `(out,)`) the kernels add, or None."""
        if not self.has_bias:
            return None
        packed, rows = self._packed_and_rows()
        return packed.tensors["bias"][rows].clone()

    def dequantized_weight(self) -> torch.Tensor:
        """The dense float32 weight the kernels multiply by (codes * scales for int8)."""
        stored, scale = self.stored_weight()
        return stored.float() * scale[:, None] if scale is not None else stored.float()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The pure-torch float32 result the kernel reproduces (`PackedLinear.reference`), for tests."""
        packed, _ = self._packed_and_rows()
        y = packed.reference(x)
        return y[self.index] if self.group is not None else y

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", f"bias={self.has_bias}"]
        parts.append(f"storage_dtype={self.storage_dtype}")
        if self.activation != "none":
            parts.append(f"activation={self.activation}")
        if self.group is not None:
            siblings = "/".join(n.rpartition(".")[2] for n in self.group.names)
            parts.append(f"siblings={siblings}, layout={self.group.packed.layout.value}")
        elif self.packed is not None:
            parts.append(f"layout={self.packed.layout.value}, density={self.packed.density:.3f}")
        else:
            parts.append("packed=False")
        return ", ".join(parts)


def pack_siblings(
    members: list[SparseLinear], names: list[str], activation: str = "none", workload: str = "batch"
) -> SiblingGroup:
    """Pack Linears that read the same input side by side (`pack_linears`) into one `SiblingGroup`; each member
    then computes through it. All must have the same scheme and in_features."""
    if len({m.scheme for m in members}) != 1 or len({m.in_features for m in members}) != 1:
        raise ValueError(f"siblings {names} must share scheme and in_features to be packed together")
    loaded = [m.loaded_tensors() for m in members]
    packed = pack_linears(
        [w for w, _, _ in loaded],
        biases=[b for _, _, b in loaded],
        weight_scales=[s for _, s, _ in loaded],
        scheme=members[0].scheme,
        activation=activation,
        workload=workload,
    )
    group = SiblingGroup(packed, names)
    for i, member in enumerate(members):
        member._set_packed(None, group, i, activation)
    return group
