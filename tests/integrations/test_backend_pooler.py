"""Poolers in one kernel call (`FusedPoolerForward`): every call it takes gives the class's forward's output bit for
bit (the tanh fused into the dense either way), close to `tanh(dense(x[:, 0]))` with the dense's own output, and
every call it does not take goes to the class's forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from hf_sparse import ops
from hf_sparse.integrations.module_swap import FusedActivation, dequantize_model
from hf_sparse.integrations.pooler import FusedPoolerForward
from hf_sparse.nn import SparseLinear
from tests.integrations.backend_support import bert_config, prune, save


pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="the fused pooler runs with the C++ kernels")


def _load(folder_factory, **options):
    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(num_attention_heads=3, num_hidden_layers=2)).eval()
    folder = save(model, folder_factory.mktemp("model"), prune(model, "4-block"), **options)
    return AutoModelForSequenceClassification.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def model(tmp_path_factory):  # every Linear int8 (the pooler's dense: int8 dense)
    return _load(tmp_path_factory, weight_dtype="int8", int8_linears=True)


def test_not_installed_on_a_dense_pooler(tmp_path_factory):
    pooler = _load(tmp_path_factory, weight_dtype="int8").bert.pooler  # (only the pruned Linears converted)
    assert "forward" not in pooler.__dict__ and type(pooler.activation) is nn.Tanh


def _hidden(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, seq, 36, generator=torch.Generator().manual_seed(seed)) * 3


def _class_forward(pooler: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(pooler).forward(pooler, x)


def test_installed_with_the_tanh_in_the_kernel(model):
    pooler = model.bert.pooler
    assert isinstance(pooler.__dict__.get("forward"), FusedPoolerForward)
    assert isinstance(pooler.dense, SparseLinear) and pooler.dense.activation == "tanh"
    assert isinstance(pooler.activation, FusedActivation) and type(pooler.activation.original) is nn.Tanh


@pytest.mark.parametrize("batch, seq", [(1, 1), (1, 9), (3, 11), (17, 5), (0, 4)])
def test_equals_the_class_forward(model, batch, seq):
    pooler = model.bert.pooler
    forward = pooler.__dict__["forward"]
    x = _hidden(batch, seq)
    calls = forward.calls
    with torch.no_grad():
        got = pooler(x)
        expected = _class_forward(pooler, x)
    assert forward.calls == calls + 1
    assert got.shape == (batch, 36) and torch.equal(got, expected)


def test_close_to_the_pure_torch_reference(model):
    pooler = model.bert.pooler
    x = _hidden(4, 7)
    with torch.no_grad():
        expected = pooler.dense.packed.reference(x[:, 0])  # pure torch: int8 numerics, then torch.tanh
        got = pooler(x)
    assert not torch.equal(got, torch.tanh(got))  # (the tanh is applied once)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def _hooked(module: nn.Module):
    return module.register_forward_hook(lambda m, a, o: None)


@pytest.mark.parametrize("case", ["strided", "float64", "autograd", "hook-dense", "hook-act", "empty-seq", "replaced"])
def test_other_calls_go_to_the_class_forward(model, case):
    pooler = copy.deepcopy(model.bert.pooler)
    forward = pooler.__dict__["forward"]
    x = _hidden(3, 6)
    if case == "strided":
        x = _hidden(3, 12)[:, ::2]
    elif case == "float64":
        x = x.double()
    elif case == "autograd":
        x.requires_grad_(True)
    elif case == "hook-dense":
        _hooked(pooler.dense)
    elif case == "hook-act":
        _hooked(pooler.activation)
    elif case == "empty-seq":
        x = x[:, :0]
    elif case == "replaced":
        pooler.activation = nn.Identity()
    try:
        expected = _class_forward(pooler, x)
    except Exception as error:  # the same error either way
        with pytest.raises(type(error)):
            pooler(x)
    else:
        assert torch.equal(pooler(x), expected)
    assert forward.calls == 0


def test_hooks_on_the_pooler_itself_still_run(model):
    pooler = copy.deepcopy(model.bert.pooler)
    forward = pooler.__dict__["forward"]
    seen = []
    pooler.register_forward_hook(lambda m, a, o: seen.append(o))
    x = _hidden(2, 3)
    with torch.no_grad():
        y = pooler(x)
    assert forward.calls == 1 and len(seen) == 1 and seen[0] is y


def test_dequantize_puts_the_tanh_back(model):
    dense_model = dequantize_model(copy.deepcopy(model))
    pooler = dense_model.bert.pooler
    assert "forward" not in pooler.__dict__ and type(pooler.activation) is nn.Tanh
    x = _hidden(2, 5)
    with torch.no_grad():
        expected = model.bert.pooler(x)
        got = pooler(x)
    assert torch.allclose(got, expected, atol=0.05)  # (dense weights: no activation quantization)
