"""Embedding modules on the kernels (`EmbeddingsFusion` rules): installing them, and when they may run.

`pack_model` replaces the `forward` of each eligible embedding module instance (BertEmbeddings, RobertaEmbeddings,
DistilBERT's Embeddings...) by a `FusedEmbeddingsForward`: one `hf_sparse.ops.embed_layernorm` call for the
lookups, their sum and the LayerNorm, instead of seven torch ops that each cost their dispatch and a pass over
the activations (at batch 1 the module took ~0.3 ms of a ~9 ms BERT-base forward). It runs when it computes
what the class's forward would (up to the LayerNorm's last bits): ids given, not embeddings; eval mode (or no
dropout); no hook inside the module; float32 tables (or `Int8Embedding`s); not `HF_SPARSE_ATTENTION=fp32`,
which keeps every LayerNorm on the model's own code. Otherwise the class's forward runs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from ..nn import Int8Embedding
from ..ops import _extension as ext
from ..ops import attention_precision, extension_available
from ..ops.embeddings import index_args, raise_index_error, table_args
from ..ops.packed_linear import can_call_directly
from .fusion_rules import EmbeddingsFusion


class FusedEmbeddingsForward:
    """Stands in for `forward` on one embedding module instance. Not a Module (it must not become a child);
    `dequantize_model` removes it, which brings the class's forward back. `calls` counts the fused calls.

    Everything it reads is looked up in the modules' own parameter and buffer dicts at each call (so replaced or
    converted tensors are seen) and checked (float32, contiguous, CPU) before its address goes to the kernel."""

    def __init__(self, module: nn.Module, rule: EmbeddingsFusion):
        self.module, self.rule = module, rule
        names = (rule.word, rule.position, rule.token_type, rule.norm, rule.dropout)
        self.parts = {n: module._modules[n] for n in names if n}  # checked to be still the module's at each call
        self.params = frozenset(rule.params)
        self.calls = 0

    def __deepcopy__(self, memo):
        # the copied module (it may be half-built here: no lookups in it) and its parts
        new = copy.copy(self)
        new.module = copy.deepcopy(self.module, memo)
        new.parts = {n: copy.deepcopy(p, memo) for n, p in self.parts.items()}
        return new

    def __call__(self, *args, **kwargs):
        call = self._bind(args, kwargs)
        raw = self._prepare(call) if call is not None else None
        if type(raw) is not tuple:
            return type(self.module).forward(self.module, *args, **kwargs)
        self.calls += 1
        args, shape = raw
        y = torch.empty(shape, dtype=torch.float32)
        err = ext._C.embed_layernorm_raw(*args, y.data_ptr(), ext.get_num_threads())
        if err is not None:
            raise_index_error(err)
        return y

    def _bind(self, args: tuple, kwargs: dict) -> dict | None:
        """The call's arguments by name, or None for a call this class does not know (the class's forward then
        raises what it raises)."""
        if not args and self.params.issuperset(kwargs):
            return kwargs
        if len(args) > len(self.rule.params):
            return None
        call = dict(zip(self.rule.params, args))
        for key, value in kwargs.items():
            if key not in self.params or key in call:
                return None
            call[key] = value
        return call

    def why_not(self, call: dict) -> str | None:
        """None when the fused path may run this call (arguments by name), else the reason it may not."""
        raw = self._prepare(call)
        return None if type(raw) is tuple else raw

    def _prepare(self, call: dict) -> tuple | str:
        """(the kernel's arguments but the output and threads, the output's shape), or the reason the fused path
        may not run."""
        if attention_precision() == "fp32":  # the fp32 switch keeps every LayerNorm on the model's own code
            return "attention precision fp32 (HF_SPARSE_ATTENTION / set_attention_precision): the module's forward"
        ids = call.get("input_ids")
        if ids is None or call.get("inputs_embeds") is not None:
            return "embeddings given instead of ids"
        if not can_call_directly(ids):  # compiling, tracing, subclasses, modes
            return "input_ids: not a plain CPU tensor outside compilation"
        if ids.dtype is not torch.int64 or ids.dim() != 2 or ids.shape[1] == 0:
            return "input_ids: not int64 (batch, seq)"
        batch, seq = ids.shape
        past = call.get("past_key_values_length", 0)
        if type(past) is not int or past < 0:
            return "past_key_values_length: not an int >= 0"
        module, rule = self.module, self.rule
        parts = self.parts
        if any(module._modules.get(n) is not p for n, p in parts.items()):
            return "a submodule was replaced"
        dropout = parts[rule.dropout]
        if dropout.training and dropout.p > 0:
            return "training mode (dropout)"
        if _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
            return "global forward hooks"
        if any(p._forward_hooks or p._forward_pre_hooks for p in parts.values()):
            return "forward hooks inside the module"
        norm = parts[rule.norm]
        gamma, beta = norm._parameters.get("weight"), norm._parameters.get("bias")
        if not (_float32(gamma) and _float32(beta) and gamma.dim() == 1 and beta.shape == gamma.shape):
            return "LayerNorm: weight and bias not contiguous float32 CPU vectors"
        n = gamma.shape[0]
        tables = []
        for name in (rule.word, rule.position, rule.token_type):
            table = _table_args(parts[name], n) if name is not None else (0, 0, 0, 0)
            if type(table) is str:
                return f"{name}: {table}"
            tables.append(table)
        if torch.is_grad_enabled() and any(p.requires_grad for part in parts.values() for p in part.parameters()):
            return "autograd: the kernel has no backward"

        position_ids = call.get("position_ids")
        if position_ids is not None:
            pos = index_args(position_ids, batch, seq)
            if pos is None:
                return "position_ids: not int64 (1 or batch, seq)"
            pos_ptr, pos_sb, pos_ss = pos
        elif rule.positions == "buffer":
            buffer = module._buffers.get("position_ids")
            if buffer is None or buffer.dtype is not torch.int64 or buffer.dim() != 2 or buffer.shape[1] < past + seq:
                return "no position_ids buffer long enough"
            pos_ss = buffer.stride(1)
            pos_ptr, pos_sb = buffer.data_ptr() + past * pos_ss * 8, 0  # the class's buffer[:, past:past + seq]
        else:
            pos_ptr = pos_sb = pos_ss = 0  # RoBERTa's rule, in the kernel
        type_ptr = type_sb = type_ss = type_len = 0
        by_position = False
        if rule.token_type is not None:
            type_ids = call.get("token_type_ids")
            if type_ids is not None:
                types = index_args(type_ids, batch, seq)
                if types is None:
                    return "token_type_ids: not int64 (1 or batch, seq)"
                type_ptr, type_sb, type_ss = types
            else:  # the class gathers its buffer at the positions
                buffer = module._buffers.get("token_type_ids")
                if buffer is None or buffer.dtype is not torch.int64 or buffer.dim() != 2 or buffer.stride(1) != 1:
                    return "no token_type_ids buffer"
                type_ptr, type_len, by_position = buffer.data_ptr(), buffer.shape[1], True
        ids_sb, ids_ss = ids.stride()
        args = (
            batch, seq, n, ids.data_ptr(), ids_sb, ids_ss, *tables[0], *tables[1], pos_ptr, pos_sb, pos_ss,
            getattr(module, "padding_idx", 0) or 0, past, *tables[2], type_ptr, type_sb, type_ss, type_len,
            by_position, gamma.data_ptr(), beta.data_ptr(), float(norm.eps),
        )  # fmt: skip
        return args, (batch, seq, n)

    def __repr__(self) -> str:
        return f"FusedEmbeddingsForward({type(self.module).__name__})"


def _float32(t) -> bool:
    return t is not None and t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()


def _table_args(table: nn.Module, n: int) -> tuple | str:
    """`table_args` for an `nn.Embedding` or an `Int8Embedding` (returning float32) with rows of n."""
    if isinstance(table, Int8Embedding):
        if table.output_dtype is not torch.float32:
            return "int8 codes returning another dtype than float32"
        return table_args(table._parameters.get("weight"), table._parameters.get("weight_scale"), n)
    return table_args(table._parameters.get("weight"), None, n)


def fuse_embeddings(module: nn.Module, rule: EmbeddingsFusion) -> bool:
    """Install `FusedEmbeddingsForward` on `module` when the C++ kernels are loaded and its parts are what the
    kernel computes (plain lookups, an affine LayerNorm over the embedding width, a Dropout). Returns whether it
    was installed."""
    if not extension_available():
        return False
    names = (rule.word, rule.position, rule.token_type, rule.norm, rule.dropout)
    parts = {n: module._modules.get(n) for n in names if n}
    norm = parts[rule.norm]
    tables = [parts[n] for n in (rule.word, rule.position, rule.token_type) if n]
    for t in tables:  # (max_norm renormalizes the table at lookup)
        if not (type(t) is Int8Embedding or (type(t) is nn.Embedding and t.max_norm is None)):
            return False
    if type(parts[rule.dropout]) is not nn.Dropout:
        return False
    width = tables[0].embedding_dim
    if any(t.embedding_dim != width for t in tables):
        return False
    if type(norm) is not nn.LayerNorm or not norm.elementwise_affine or norm.bias is None:
        return False
    if tuple(norm.normalized_shape) != (width,):
        return False
    if rule.positions == "padding" and not isinstance(getattr(module, "padding_idx", None), int):
        return False
    module.__dict__["forward"] = FusedEmbeddingsForward(module, rule)  # an instance attribute, not a child
    return True


__all__ = ["FusedEmbeddingsForward", "fuse_embeddings"]
