"""The torch ops: same results as the fast path, fake implementations for tracing, and safe on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from hf_sparse import ops
from hf_sparse.ops import Layout, pack_linear
from tests.ops.conftest import assert_same, make_weight


def _packed(layout: Layout, activation: str = "none"):
    w = make_weight(48, 70, 0.8, "4-block", torch.Generator().manual_seed(0))
    scheme = "int8" if layout.value.startswith("int8") else "fp32"
    return pack_linear(w, bias=torch.randn(48), scheme=scheme, layout=layout, activation=activation)


SPARSE_AND_INT8 = [Layout.INT8_BLOCK4, Layout.INT8_CSR, Layout.INT8_DENSE, Layout.FP32_CSR]


@pytest.mark.parametrize("layout", SPARSE_AND_INT8)
def test_op_path_equals_fast_path(layout):
    packed = _packed(layout, "gelu")
    x = torch.randn(2, 9, 70)
    assert_same(packed._call_op(x), packed(x), f"op vs fast path, {layout.value}")
    op = getattr(torch.ops.hf_sparse, packed._op.__name__.split(".")[0])
    args = [packed.tensors.get(name) for name in ops.library.OPS[layout][1]]
    assert_same(op(x, *args, 70, 48, "gelu"), packed(x), "torch.ops call")


@pytest.mark.parametrize("layout", SPARSE_AND_INT8)
def test_opcheck(layout):
    packed = _packed(layout)
    args = (torch.randn(5, 70), *packed._op_args, 70, 48, "none")
    torch.library.opcheck(packed._op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_fake_tensors_and_compile_see_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    packed = _packed(Layout.INT8_BLOCK4)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        y = packed(mode.from_tensor(torch.randn(3, 4, 70)))
    assert y.shape == (3, 4, 48) and y.dtype == torch.float32

    calls = []

    def backend(gm, example_inputs):
        calls.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm

    x = torch.randn(6, 70)
    compiled = torch.compile(lambda t: packed(t) * 2, backend=backend, fullgraph=True)
    assert_same(compiled(x), packed(x) * 2, "compiled")
    assert any("hf_sparse" in str(t) for t in calls[0]), f"the graph holds no hf_sparse op: {calls[0]}"


def test_op_checks_hand_made_tensors():
    packed = _packed(Layout.INT8_BLOCK4)
    t = packed.state_dict()
    x = torch.randn(4, 70)
    op = torch.ops.hf_sparse.int8_block4_linear
    with pytest.raises(ValueError, match="ptr must be torch.int32"):
        op(x, t["ptr"].long(), t["cols"], t["values"], t["weight_sum"], t["weight_scale"], None, 70, 48, "none")
    with pytest.raises(ValueError, match="cols must be contiguous"):
        cols = torch.stack([t["cols"], t["cols"]], 1)[:, 0]
        op(x, t["ptr"], cols, t["values"], t["weight_sum"], t["weight_scale"], None, 70, 48, "none")
    with pytest.raises(ValueError, match="activation='relu'"):
        op(x, t["ptr"], t["cols"], t["values"], t["weight_sum"], t["weight_scale"], None, 70, 48, "relu")
    if ops.extension_available():
        bad = t["ptr"].clone()
        bad[-1] += 5  # claims entries past the end of cols: checked before any kernel runs
        with pytest.raises(ValueError, match=r"ptr\[-1\]"):
            op(x, bad, t["cols"], t["values"], t["weight_sum"], t["weight_scale"], None, 70, 48, "none")
        bad = t["ptr"].clone()
        bad[7] = 10**6
        with pytest.raises(ValueError, match="ptr decreases"):
            op(x, bad, t["cols"], t["values"], t["weight_sum"], t["weight_scale"], None, 70, 48, "none")
    # Column indices are not scanned per call; the kernels clamp them, so garbage cannot read out of bounds.
    cols = torch.full_like(t["cols"], 65535)
    y = op(x, t["ptr"], cols, t["values"], t["weight_sum"], t["weight_scale"], None, 70, 48, "none")
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("layout", [Layout.INT8_BLOCK4, Layout.INT8_CSR])
def test_edited_packed_tensors_cannot_break_the_kernel(layout):
    if not ops.extension_available():
        pytest.skip("no extension")
    packed = _packed(layout)
    x = torch.randn(5, 70)
    before = packed(x)
    packed.tensors["ptr"].fill_(10**6)  # the kernels read a private copy of the pointers
    assert_same(packed(x), before, "after editing the public ptr")
    packed.tensors["cols"].fill_(65535)  # clamped indices: wrong numbers, no crash
    assert torch.isfinite(packed(x)).all()
    assert torch.isfinite(packed(x[:1])).all()  # the few-token kernel (wrapped indices) too


def test_fp32_dense_runs_torch():
    packed = _packed(Layout.FP32_DENSE, "gelu")
    w, b = packed.unpack()
    x = torch.randn(3, 70)
    assert_same(packed(x), torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)), "fp32 dense")
    assert not packed.runs_extension


def test_grad_mode_inputs_use_the_op():
    packed = _packed(Layout.INT8_BLOCK4)
    x = torch.randn(3, 70, requires_grad=True)
    assert_same(packed(x).detach(), packed(x.detach()), "input requiring grad")
