"""SparseQuantizationConfig: the quantization_config block validates itself and checks the format version first."""

from __future__ import annotations

import pytest

from hf_sparse.export import FORMAT_VERSION, CheckpointError, ModuleEntry, SparseQuantizationConfig, TensorScheme


def block(**changes) -> dict:
    data = SparseQuantizationConfig(
        pattern="4-block",
        weights=TensorScheme.int8("weights"),
        input_activations=TensorScheme.int8("input_activations"),
        sparsity=0.9,
        modules={"layer.0.query": ModuleEntry("block4-bitmask", "int8", 0.9)},
        modules_to_not_convert=["classifier"],
    ).to_dict()
    data.update(changes)
    return data


def test_round_trip():
    data = block()
    assert data["quant_method"] == "hf_sparse" and data["format_version"] == FORMAT_VERSION == 1
    assert data["weights"] == {
        "dtype": "int8",
        "num_bits": 8,
        "symmetric": True,
        "strategy": "channel",
        "dynamic": False,
    }
    assert data["input_activations"]["strategy"] == "token" and data["input_activations"]["dynamic"] is True
    assert data["modules"] == {"layer.0.query": {"format": "block4-bitmask", "dtype": "int8", "sparsity": 0.9}}
    assert "hf_sparse_version" in data
    assert SparseQuantizationConfig.from_dict(data).to_dict() == data


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format_version": 2}, "format_version is 2, but this hf_sparse reads versions up to 1"),
        ({"format_version": "1"}, "format_version must be an int"),
        ({"format_version": 0}, "versions start at 1"),
        ({"quant_method": "bitsandbytes"}, "quant_method is 'bitsandbytes'; this is not an hf_sparse checkpoint"),
        ({"pattern": "3-block"}, "quantization_config.pattern: Unknown pattern"),
        ({"pattern": None}, "pattern is missing, but some modules are stored sparse"),
        (
            {"weights": {"dtype": "int8", "num_bits": 8, "symmetric": True, "strategy": "tensor", "dynamic": False}},
            "weights.strategy='tensor' is not supported with dtype int8",
        ),
        ({"input_activations": None}, "input_activations must describe int8 activations"),
        (
            {"modules": {"q": {"format": "csr", "dtype": "int8"}}},
            r"modules\['q'\].format: Unknown weight format 'csr'",
        ),
        ({"modules": {"q": {"format": "dense", "dtype": "int4"}}}, r"modules\['q'\].dtype='int4'"),
        ({"modules": {"q": {"format": "dense", "dtype": "int8", "sparsity": 1.5}}}, r"sparsity=1.5 is outside"),
        ({"modules": {"q": {"format": "dense", "dtype": "int8", "zeros": 3}}}, "unexpected keyword argument 'zeros'"),
        ({"modules_to_not_convert": ["layer.0.query"]}, "'layer.0.query' is both converted and in modules_to_not"),
        ({"sparsity": 2.0}, "sparsity=2.0 must be a number in"),
        ({"typo": 1}, r"unknown field\(s\) \['typo'\]"),
    ],
)
def test_refusals(changes, message):
    with pytest.raises(CheckpointError, match=message):
        SparseQuantizationConfig.from_dict(block(**changes))


def test_version_is_checked_before_anything_else():
    # a newer version may add fields: the error must say "upgrade", not "unknown field"
    with pytest.raises(CheckpointError, match="upgrade it"):
        SparseQuantizationConfig.from_dict(block(format_version=3, new_field=True))
