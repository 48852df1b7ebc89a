"""The fused embeddings kernel (`embed_layernorm`) under every instruction set: bit for bit the lookups, the sums
in torch's order and `add_layernorm`'s LayerNorm; close to torch in float64; every index checked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_sparse import ops
from hf_sparse.ops import add_layernorm, embed_layernorm, embed_layernorm_reference
from hf_sparse.ops.embeddings import roberta_positions
from tests.ops.conftest import ISAS, assert_close, assert_same, using_isa


needs_extension = pytest.mark.skipif(not ops.extension_available(), reason="the kernel needs the C++ extension")


def _tables(n: int, vocab: int, positions: int, types: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "word": torch.randn(vocab, n, generator=gen),
        "position": torch.randn(positions, n, generator=gen) * 0.5,
        "token_type": torch.randn(types, n, generator=gen) * 0.1 if types else None,
        "weight": torch.randn(n, generator=gen),
        "bias": torch.randn(n, generator=gen),
    }


def _int8(table: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(-127, 128, table.shape, dtype=torch.int8, generator=gen), torch.rand(table.shape[0], 1) * 0.1


def _expected(ids, t, position_ids, type_ids, scales=None) -> torch.Tensor:
    """The same sums in float32 (torch's order), then add_layernorm: what the kernel must equal bit for bit."""
    scales = scales or {}

    def rows(name, idx):
        table = t[name]
        if name in scales:
            return F.embedding(idx, table).float() * F.embedding(idx, scales[name])
        return F.embedding(idx, table)

    v = rows("word", ids)
    if t["token_type"] is not None:
        v = v + rows("token_type", type_ids)
    pos = rows("position", position_ids).expand_as(v)
    return add_layernorm(v, pos.contiguous(), weight=t["weight"], bias=t["bias"], eps=1e-12)


@pytest.mark.parametrize("n", [1, 7, 16, 33, 96, 200])
@pytest.mark.parametrize("types", [0, 2])
def test_matches_lookups_and_add_layernorm_on_every_isa(n, types):
    gen = torch.Generator().manual_seed(n + types)
    t = _tables(n, 50, 40, types, seed=n)
    batch, seq = 3, 13
    ids = torch.randint(0, 50, (batch, seq), generator=gen)
    position_ids = torch.arange(2, 2 + seq).unsqueeze(0)  # broadcast over the batch
    type_ids = torch.randint(0, max(types, 1), (batch, seq), generator=gen) if types else None
    reference = embed_layernorm_reference(ids, t["word"].double(), t["position"].double(), weight=t["weight"].double(),
                                          bias=t["bias"].double(), eps=1e-12, position_ids=position_ids,
                                          token_type=t["token_type"].double() if types else None,
                                          token_type_ids=type_ids).float()  # fmt: skip
    for isa in ISAS:
        with using_isa(isa):
            y = embed_layernorm(ids, t["word"], t["position"], weight=t["weight"], bias=t["bias"], eps=1e-12,
                                position_ids=position_ids, token_type=t["token_type"], token_type_ids=type_ids)  # fmt: skip
            expected = _expected(ids, t, position_ids, type_ids)
        assert y.shape == (batch, seq, n) and y.dtype is torch.float32
        assert_same(y, expected, f"embed_layernorm n={n} types={types} on {isa} vs lookups + add_layernorm")
        assert_close(y, reference, f"n={n} on {isa} vs float64", rtol=1e-5, atol=1e-5 * float(t["weight"].abs().max()))


@needs_extension
def test_int8_tables_strides_and_threads():
    gen = torch.Generator().manual_seed(1)
    n, batch, seq = 48, 4, 21
    t = _tables(n, 60, 30, 3, seed=3)
    (wc, ws), (pc, ps), (tc, tsc) = (_int8(t[k], gen) for k in ("word", "position", "token_type"))
    q = {**t, "word": wc, "position": pc, "token_type": tc}
    scales = {"word": ws, "position": ps, "token_type": tsc}
    wide = torch.randint(0, 60, (batch, 2 * seq), generator=gen)
    ids = wide[:, ::2]  # strided: read in place
    position_ids = torch.randint(0, 30, (batch, seq), generator=gen)
    type_ids = torch.randint(0, 3, (1, seq), generator=gen)
    outs = []
    for threads in (1, 2, 3):
        ops.set_num_threads(threads)
        try:
            outs.append(embed_layernorm(ids, wc, pc, word_scale=ws, position_scale=ps, token_type=tc,
                                        token_type_scale=tsc, token_type_ids=type_ids, position_ids=position_ids,
                                        weight=t["weight"], bias=t["bias"], eps=1e-12))  # fmt: skip
        finally:
            ops.set_num_threads(None)
    expected = _expected(ids, q, position_ids, type_ids, scales)
    for y in outs:
        assert_same(y, expected, "int8 tables (codes * scale, as Int8Embedding) vs lookups + add_layernorm")


@needs_extension
@pytest.mark.parametrize("padding_idx", [0, 1])
def test_positions_from_padding_and_types_by_position(padding_idx):
    gen = torch.Generator().manual_seed(padding_idx)
    n, batch, seq = 32, 3, 9
    t = _tables(n, 20, 16, 2, seed=4)
    ids = torch.randint(2, 20, (batch, seq), generator=gen)
    ids[0, 6:] = padding_idx  # right padding
    ids[2, :3] = padding_idx  # left padding
    types_buffer = torch.randint(0, 2, (1, 16), generator=gen)  # read at each token's position
    y = embed_layernorm(ids, t["word"], t["position"], padding_idx=padding_idx, past_length=2,
                        token_type=t["token_type"], token_type_ids=types_buffer, token_types_by_position=True,
                        weight=t["weight"], bias=t["bias"], eps=1e-12)  # fmt: skip
    positions = roberta_positions(ids, padding_idx, 2)
    assert positions[0, 6:].eq(padding_idx).all() and positions[1].tolist() == list(
        range(padding_idx + 3, padding_idx + 3 + seq)
    )
    assert_same(y, _expected(ids, t, positions, types_buffer[0][positions]), "RoBERTa positions, types by position")


@needs_extension
def test_every_index_is_checked():
    n, batch, seq = 16, 2, 5
    t = _tables(n, 10, 8, 2, seed=5)
    ids = torch.randint(0, 10, (batch, seq))
    pos = torch.arange(seq).unsqueeze(0)
    types = torch.zeros(batch, seq, dtype=torch.long)
    kw = {"weight": t["weight"], "bias": t["bias"], "eps": 1e-12, "token_type": t["token_type"]}

    def call(ids=ids, pos=pos, types=types, **extra):
        return embed_layernorm(ids, t["word"], t["position"], position_ids=pos, token_type_ids=types, **kw, **extra)

    bad = ids.clone()
    bad[1, 3] = 10
    with pytest.raises(IndexError, match=r"input_ids\[1, 3\] = 10 is out of range: the word embeddings have 10 rows"):
        call(ids=bad)
    bad[1, 3], bad[0, 4] = 0, -1
    with pytest.raises(IndexError, match=r"input_ids\[0, 4\] = -1"):
        call(ids=bad)
    with pytest.raises(IndexError, match=r"position_ids\[0, 2\] = 8 .* position embeddings have 8 rows"):
        call(pos=torch.tensor([[0, 1, 8, 3, 4]]))
    with pytest.raises(IndexError, match=r"token_type_ids\[1, 0\] = 2 .* token type embeddings have 2 rows"):
        call(types=torch.tensor([[0] * 5, [2, 0, 0, 0, 0]]))
    with pytest.raises(IndexError, match=r"position_ids\[0, 7\] = 8"):  # RoBERTa positions 1..8, 8 beyond the table
        embed_layernorm(torch.ones(1, 8, dtype=torch.long), t["word"], t["position"], padding_idx=0, **kw,
                        token_type_ids=torch.zeros(1, 8, dtype=torch.long))  # fmt: skip
    with pytest.raises(TypeError, match="position_ids must be an int64 CPU tensor"):
        call(pos=pos.int())
    with pytest.raises(ValueError, match=r"token_type_ids has shape \(2, 4\); expected \(1 or 2, 5\)"):
        call(types=types[:, :4])
    with pytest.raises(ValueError, match="position has rows of 8, the word embeddings of 16"):
        embed_layernorm(ids, t["word"], t["position"][:, :8], position_ids=pos, **{**kw, "token_type": None})
    assert call().shape == (batch, seq, n)  # nothing above broke the good call


@needs_extension
def test_the_op_and_its_fake():
    t = _tables(24, 30, 20, 2, seed=6)
    ids = torch.randint(0, 30, (2, 7))
    args = (ids, t["word"], None, t["position"], None, torch.arange(7).unsqueeze(0), 0, 0, t["token_type"], None,
            torch.ones(2, 7, dtype=torch.long), False, t["weight"], t["bias"], 1e-12)  # fmt: skip
    op = torch.ops.hf_sparse.embed_layernorm.default(*args)
    direct = embed_layernorm(ids, t["word"], t["position"], position_ids=args[5], token_type=t["token_type"],
                             token_type_ids=args[10], weight=t["weight"], bias=t["bias"], eps=1e-12)  # fmt: skip
    assert torch.equal(op, direct)
    torch.library.opcheck(
        torch.ops.hf_sparse.embed_layernorm.default, args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )  # fmt: skip
