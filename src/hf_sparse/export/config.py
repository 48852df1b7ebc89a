"""The `quantization_config` block of an hf_sparse checkpoint's config.json, as a self-validating dataclass.

The transformers backend wraps this class (a `QuantizationConfigMixin` subclass that holds one); it owns the
format version check, so every reader refuses a file it cannot interpret in the same words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config.base import VERSION_KEY, ConfigMixin
from ..sparsity.patterns import get_pattern
from ..version import __version__
from .errors import CheckpointError
from .formats import STORAGE_DTYPES, WeightFormat, as_format


QUANT_METHOD = "hf_sparse"
#: the on-disk format version this hf_sparse writes; it reads every version up to it (docs/format.md)
FORMAT_VERSION = 1

# the one int8 scheme the kernels implement (hf_sparse.quantization.numerics)
INT8_WEIGHTS = {"num_bits": 8, "symmetric": True, "strategy": "channel", "dynamic": False}
INT8_ACTIVATIONS = {"num_bits": 8, "symmetric": True, "strategy": "token", "dynamic": True}


def check_format_version(value: Any, where: str = "quantization_config") -> int:
    """Raise CheckpointError unless `value` is a format version this hf_sparse reads."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}.format_version must be an int, got {value!r}")
    if value > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}.format_version is {value}, but this hf_sparse reads versions up to {FORMAT_VERSION}: the "
            "checkpoint was written by a newer hf_sparse; upgrade it (pip install -U hf-sparse)"
        )
    if value < 1:
        raise CheckpointError(f"{where}.format_version is {value}; versions start at 1")
    return value


@dataclass
class TensorScheme:
    """How one kind of tensor is represented. For int8 the only scheme is the one of hf_sparse.quantization.

    Args:
        dtype: "float32", "bfloat16", "float16" or "int8".
        num_bits / symmetric / strategy / dynamic: int8 only: 8, True, "channel" (weights, static) or "token"
            (activations, quantized at run time, dynamic=True). None for float dtypes.
    """

    dtype: str = "float32"
    num_bits: int | None = None
    symmetric: bool | None = None
    strategy: str | None = None
    dynamic: bool | None = None

    @classmethod
    def int8(cls, role: str) -> TensorScheme:
        return cls("int8", **(INT8_WEIGHTS if role == "weights" else INT8_ACTIVATIONS))

    def check(self, role: str) -> None:
        where = f"quantization_config.{role}"
        if self.dtype not in STORAGE_DTYPES:
            raise CheckpointError(f"{where}.dtype={self.dtype!r}; known: {', '.join(STORAGE_DTYPES)}")
        got = {
            "num_bits": self.num_bits,
            "symmetric": self.symmetric,
            "strategy": self.strategy,
            "dynamic": self.dynamic,
        }
        if self.dtype == "int8":
            want = INT8_WEIGHTS if role == "weights" else INT8_ACTIVATIONS
        else:
            want = dict.fromkeys(got)
        for key, value in want.items():
            if got[key] != value:
                raise CheckpointError(
                    f"{where}.{key}={got[key]!r} is not supported with dtype {self.dtype}: hf_sparse implements "
                    f"{key}={value!r} (see docs/format.md)"
                )


@dataclass
class ModuleEntry:
    """One converted module: its on-disk format, storage dtype and measured sparsity (fraction of zero weights)."""

    format: str
    dtype: str
    sparsity: float = 0.0

    def check(self, name: str) -> None:
        where = f"quantization_config.modules[{name!r}]"
        try:
            self.format = as_format(self.format).value
        except ValueError as e:
            raise CheckpointError(f"{where}.format: {e}") from None
        if self.dtype not in STORAGE_DTYPES:
            raise CheckpointError(f"{where}.dtype={self.dtype!r}; known: {', '.join(STORAGE_DTYPES)}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise CheckpointError(f"{where}.sparsity must be a number, got {self.sparsity!r}")
        if not 0.0 <= self.sparsity <= 1.0:
            raise CheckpointError(f"{where}.sparsity={self.sparsity} is outside [0, 1]")


def _as(cls, value, where: str):
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} must be an object, got {type(value).__name__}")
    try:
        return cls(**value)
    except TypeError as e:
        raise CheckpointError(f"{where}: {e}") from None


@dataclass
class SparseQuantizationConfig(ConfigMixin):
    """`config.json["quantization_config"]` of an hf_sparse checkpoint (docs/format.md).

    Args:
        quant_method: always "hf_sparse": the name transformers looks the loader up by.
        format_version: on-disk format version; readers refuse versions newer than `FORMAT_VERSION`.
        pattern: the sparsity pattern of the sparse modules ("unstructured", "4-block", "2:4", ...), or None.
        weights: storage scheme of the sparse Linear weights.
        input_activations: scheme of the inputs of int8 modules (int8, per token, dynamic), or None without int8.
        sparsity: fraction of zeros over all sparse modules together (None when there are none).
        modules: {module name: ModuleEntry} for every converted module (sparse Linears, int8 Linears, int8
            embeddings); everything else is stored as usual.
        modules_to_not_convert: the Linear and Embedding modules stored as usual.
    """

    config_name = "quantization_config.json"

    quant_method: str = QUANT_METHOD
    format_version: int = FORMAT_VERSION
    pattern: str | None = None
    weights: TensorScheme = field(default_factory=TensorScheme)
    input_activations: TensorScheme | None = None
    sparsity: float | None = None
    modules: dict[str, ModuleEntry] = field(default_factory=dict)
    modules_to_not_convert: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.quant_method != QUANT_METHOD:
            raise CheckpointError(
                f"quantization_config.quant_method is {self.quant_method!r}; this is not an hf_sparse checkpoint "
                f"(expected {QUANT_METHOD!r})"
            )
        check_format_version(self.format_version)
        if self.pattern is not None:
            try:
                get_pattern(self.pattern)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"quantization_config.pattern: {e}") from None
        self.weights = _as(TensorScheme, self.weights, "quantization_config.weights")
        self.weights.check("weights")
        if self.input_activations is not None:
            self.input_activations = _as(TensorScheme, self.input_activations, "quantization_config.input_activations")
            self.input_activations.check("input_activations")
        if not isinstance(self.modules, dict):
            raise CheckpointError("quantization_config.modules must be an object {module name: entry}")
        self.modules = {
            name: _as(ModuleEntry, entry, f"quantization_config.modules[{name!r}]")
            for name, entry in self.modules.items()
        }
        for name, entry in self.modules.items():
            entry.check(name)
        sparse = [e for e in self.modules.values() if e.format != WeightFormat.DENSE.value]
        if sparse and self.pattern is None:
            raise CheckpointError("quantization_config.pattern is missing, but some modules are stored sparse")
        if any(e.dtype == "int8" for e in self.modules.values()) and (
            self.input_activations is None or self.input_activations.dtype != "int8"
        ):
            raise CheckpointError(
                "quantization_config.input_activations must describe int8 activations when a module is int8"
            )
        if self.sparsity is not None and (
            isinstance(self.sparsity, bool)
            or not isinstance(self.sparsity, (int, float))
            or not 0.0 <= self.sparsity <= 1.0
            or math.isnan(self.sparsity)
        ):
            raise CheckpointError(f"quantization_config.sparsity={self.sparsity!r} must be a number in [0, 1]")
        if not isinstance(self.modules_to_not_convert, list):
            raise CheckpointError("quantization_config.modules_to_not_convert must be a list of module names")
        both = sorted(set(self.modules_to_not_convert) & set(self.modules))
        if both:
            raise CheckpointError(f"module {both[0]!r} is both converted and in modules_to_not_convert")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparseQuantizationConfig:
        """Parse a config.json block: the method and version are checked before anything else."""
        if not isinstance(data, dict):
            raise CheckpointError(f"quantization_config must be an object, got {type(data).__name__}")
        if data.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(
                f"quantization_config.quant_method is {data.get('quant_method')!r}; this is not an hf_sparse "
                f"checkpoint (expected {QUANT_METHOD!r})"
            )
        check_format_version(data.get("format_version"))
        try:
            return super().from_dict(data)
        except (TypeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"quantization_config: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out[VERSION_KEY] = __version__
        return out

    def sparse_modules(self) -> dict[str, ModuleEntry]:
        return {n: e for n, e in self.modules.items() if e.format != WeightFormat.DENSE.value}
