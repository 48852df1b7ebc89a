"""Token embeddings and their LayerNorm in one pass of the CPU kernels, as a torch op: `hf_sparse::embed_layernorm`.

    y = embed_layernorm(input_ids, word.weight, position.weight, position_ids=ids_of_positions,
                        token_type=types.weight, token_type_ids=type_ids, weight=ln.weight, bias=ln.bias, eps=ln.eps)
    # == ln(word(input_ids) + types(type_ids) + position(ids_of_positions)), BERT's embedding module in eval mode

Each token's rows are gathered, summed in torch's order ((word + type) + position, each sum rounded to float32)
and normalized while they are in L1, in one call for the whole batch instead of seven torch ops; the LayerNorm is
`add_layernorm`'s (results differ from torch's in the last bits, its summation order). The word table may be
int8 codes with one scale per row (`Int8Embedding`: rows are `codes * scale`, exactly as its lookup). Positions
are given, or (`position_ids=None`) follow RoBERTa's rule from the ids and `padding_idx`. Token types are given
per token, or (`token_types_by_position=True`) read from a buffer at each token's position, as BERT does when
the caller gives none. Every index is checked: one outside its table raises IndexError naming it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _extension as ext
from .library import _lib
from .packed_linear import can_call_directly


_lib.define(
    "embed_layernorm(Tensor input_ids, Tensor word, Tensor? word_scale, Tensor position, Tensor? position_scale, "
    "Tensor? position_ids, int padding_idx, int past_length, Tensor? token_type, Tensor? token_type_scale, "
    "Tensor? token_type_ids, bool token_types_by_position, Tensor weight, Tensor bias, float eps) -> Tensor"
)

_WHERE = "hf_sparse.ops.embed_layernorm"


def index_args(t, batch: int, seq: int) -> tuple[int, int, int] | None:
    """The kernel's (address, element strides reading it at (b, s)) for an int64 (1 or batch, seq) CPU tensor (a
    dimension of 1 broadcasts); None for anything else."""
    if not (
        type(t) is torch.Tensor and t.dtype is torch.int64 and t.is_cpu and t.dim() == 2
        and t.shape[0] in (1, batch) and t.shape[1] == seq
    ):  # fmt: skip
        return None
    return t.data_ptr(), (t.stride(0) if t.shape[0] > 1 else 0), t.stride(1)


def table_args(t: torch.Tensor, scale: torch.Tensor | None, n: int) -> tuple | str:
    """The kernel's (rows, float32 address, int8 codes address, scales address) for a contiguous CPU table of rows
    of n: float32, or (with `scale`, one float32 per row) int8 codes; or what is wrong with it."""
    dtype = torch.float32 if scale is None else torch.int8
    if t is None or t.dtype is not dtype or not t.is_cpu or not t.is_contiguous() or t.dim() != 2:
        return f"not a contiguous 2-D {dtype} CPU table"
    if t.shape[1] != n:
        return f"rows of {t.shape[1]}, not {n}"
    if scale is None:
        return t.shape[0], t.data_ptr(), 0, 0
    if not (scale.dtype is torch.float32 and scale.is_cpu and scale.is_contiguous() and scale.numel() == t.shape[0]):
        return f"scales not one contiguous float32 CPU value per row ({t.shape[0]})"
    return t.shape[0], 0, t.data_ptr(), scale.data_ptr()


def _index_strides(ids, name: str, batch: int, seq: int) -> tuple[int, int]:
    """`index_args`' strides, or the error naming what is wrong with `ids`."""
    args = index_args(ids, batch, seq)
    if args is not None:
        return args[1:]
    if not isinstance(ids, torch.Tensor) or ids.dtype is not torch.int64 or ids.device.type != "cpu":
        got = f"{ids.dtype} on {ids.device}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{_WHERE}: {name} must be an int64 CPU tensor, got {got}")
    raise ValueError(f"{_WHERE}: {name} has shape {tuple(ids.shape)}; expected (1 or {batch}, {seq})")


def _table(t, scale, name: str, n: int | None) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
    """(table, scales, `table_args`) for a float32 table, or int8 codes with one float32 scale per row (made
    contiguous); raises naming what is wrong."""
    dtype = torch.float32 if scale is None else torch.int8
    if not isinstance(t, torch.Tensor) or t.dtype is not dtype or t.device.type != "cpu" or t.dim() != 2:
        got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{_WHERE}: {name} must be a 2-D {dtype} CPU tensor, got {got}")
    if n is not None and t.shape[1] != n:
        raise ValueError(f"{_WHERE}: {name} has rows of {t.shape[1]}, the word embeddings of {n}")
    t = t.detach().contiguous()
    if scale is not None:
        if not isinstance(scale, torch.Tensor) or scale.numel() != t.shape[0]:
            raise ValueError(f"{_WHERE}: {name}_scale must hold one float32 scale per row ({t.shape[0]})")
        scale = scale.detach().float().contiguous()
    return t, scale, table_args(t, scale, t.shape[1])


def _run(input_ids, word, word_scale, position, position_scale, position_ids, padding_idx, past_length, token_type,
         token_type_scale, token_type_ids, token_types_by_position, weight, bias, eps) -> torch.Tensor:  # fmt: skip
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"{_WHERE}: input_ids must be a (batch, seq) tensor")
    if ext._C is None:
        return embed_layernorm_reference(
            input_ids, word, position, word_scale=word_scale, position_scale=position_scale,
            position_ids=position_ids, padding_idx=padding_idx, past_length=past_length, token_type=token_type,
            token_type_scale=token_type_scale, token_type_ids=token_type_ids,
            token_types_by_position=token_types_by_position, weight=weight, bias=bias, eps=eps,
        )  # fmt: skip
    batch, seq = input_ids.shape
    ids_sb, ids_ss = _index_strides(input_ids, "input_ids", batch, seq)
    word, word_scale, word_args = _table(word, word_scale, "word", None)
    n = word.shape[1]
    position, position_scale, position_args = _table(position, position_scale, "position", n)
    pos_sb = pos_ss = 0
    if position_ids is not None:
        pos_sb, pos_ss = _index_strides(position_ids, "position_ids", batch, seq)
    type_sb = type_ss = type_len = 0
    type_args = (0, 0, 0, 0)
    if token_type is not None:
        token_type, token_type_scale, type_args = _table(token_type, token_type_scale, "token_type", n)
        if token_types_by_position:
            if not isinstance(token_type_ids, torch.Tensor) or token_type_ids.dtype is not torch.int64:
                raise TypeError(f"{_WHERE}: token_type_ids (by position) must be an int64 tensor")
            token_type_ids = token_type_ids.reshape(-1).contiguous()
            type_len = token_type_ids.numel()
        else:
            type_sb, type_ss = _index_strides(token_type_ids, "token_type_ids", batch, seq)
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or t.shape != (n,) or t.dtype is not torch.float32:
            raise ValueError(f"{_WHERE}: {name} must be a float32 tensor of shape ({n},)")
    weight, bias = weight.detach().contiguous(), bias.detach().contiguous()
    y = torch.empty((batch, seq, n), dtype=torch.float32)
    err = ext._C.embed_layernorm_raw(
        batch, seq, n, input_ids.data_ptr(), ids_sb, ids_ss, *word_args, *position_args,
        position_ids.data_ptr() if position_ids is not None else 0, pos_sb, pos_ss, int(padding_idx),
        int(past_length), *type_args, token_type_ids.data_ptr() if token_type is not None else 0, type_sb, type_ss,
        type_len, bool(token_types_by_position), weight.data_ptr(), bias.data_ptr(), float(eps), y.data_ptr(),
        ext.get_num_threads(),
    )  # fmt: skip
    if err is not None:
        raise_index_error(err)
    return y


_TABLE_OF = {"input_ids": "word", "position_ids": "position", "token_type_ids": "token type"}


def raise_index_error(err: tuple) -> None:
    """The kernel's report of an index outside its table, as IndexError."""
    tensor, b, s, value, limit = err
    raise IndexError(
        f"{_WHERE}: {tensor}[{b}, {s}] = {value} is out of range: the {_TABLE_OF.get(tensor, tensor)} embeddings "
        f"have {limit} rows (ids must be in [0, {limit}))"
    )


@torch.library.impl(_lib, "embed_layernorm", "CPU")
def _embed_layernorm_op(*args):
    return _run(*args)


@torch.library.register_fake("hf_sparse::embed_layernorm")
def _embed_layernorm_fake(input_ids, word, *args):
    return word.new_empty((*input_ids.shape, word.shape[1]), dtype=torch.float32)


def embed_layernorm(
    input_ids: torch.Tensor,
    word: torch.Tensor,
    position: torch.Tensor,
    *,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    word_scale: torch.Tensor | None = None,
    position_scale: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    padding_idx: int = 0,
    past_length: int = 0,
    token_type: torch.Tensor | None = None,
    token_type_scale: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    token_types_by_position: bool = False,
) -> torch.Tensor:
    """`LayerNorm(word[input_ids] + token_type[token_type_ids] + position[position_ids])`: float32 (batch, seq, n).

    input_ids: int64 (batch, seq). word / position / token_type: float32 (rows, n) tables, or int8 codes with
    `*_scale` (one per row: rows are codes * scale, as `Int8Embedding`'s). position_ids: int64 (1 or batch, seq);
    None: RoBERTa's positions from input_ids (`padding_idx`, `past_length`). token_type None: no token types;
    token_type_ids: int64 (1 or batch, seq), or with `token_types_by_position` a buffer indexed by each token's
    position. weight / bias / eps: the LayerNorm's. Inference only (no backward)."""
    args = (
        input_ids, word, word_scale, position, position_scale, position_ids, int(padding_idx), int(past_length),
        token_type, token_type_scale, token_type_ids, bool(token_types_by_position), weight, bias, float(eps),
    )  # fmt: skip
    if ext._C is not None and can_call_directly(word) and can_call_directly(input_ids):
        return _run(*args)
    return torch.ops.hf_sparse.embed_layernorm.default(*args)


def roberta_positions(input_ids: torch.Tensor, padding_idx: int, past_length: int = 0) -> torch.Tensor:
    """RoBERTa's position ids: non-padding tokens count from padding_idx + 1 (plus past_length), padding keeps
    padding_idx (transformers' create_position_ids_from_input_ids)."""
    real = input_ids.ne(padding_idx).int()
    return ((torch.cumsum(real, dim=1).type_as(real) + past_length) * real).long() + padding_idx


def _lookup(ids: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return F.embedding(ids, table)
    return F.embedding(ids, table).float() * F.embedding(ids, scale.reshape(-1, 1).float())  # Int8Embedding's


def embed_layernorm_reference(input_ids, word, position, *, weight, bias, eps, word_scale=None, position_scale=None,
                              position_ids=None, padding_idx=0, past_length=0, token_type=None, token_type_scale=None,
                              token_type_ids=None, token_types_by_position=False) -> torch.Tensor:  # fmt: skip
    """The pure-torch result, in the embedding modules' own order."""
    v = _lookup(input_ids, word, word_scale)
    if position_ids is None:
        position_ids = roberta_positions(input_ids, padding_idx, past_length)
    if token_type is not None:
        types = token_type_ids.reshape(-1)[position_ids] if token_types_by_position else token_type_ids
        v = v + _lookup(types, token_type, token_type_scale)
    v = v + _lookup(position_ids, position, position_scale)
    return F.layer_norm(v, (v.shape[-1],), weight, bias, eps)


__all__ = ["embed_layernorm", "embed_layernorm_reference", "roberta_positions"]
