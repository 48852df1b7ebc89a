"""`ExportConfig`: what `save_sparse` converts, and how. The recipe (SparseConfig) supplies the defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..sparsity.patterns import get_pattern
from .formats import check_dtype


def _entries(name: str, value) -> bool | list[str] | None:
    """Normalise a module selection: None / bool pass through; a string becomes a one-entry list."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{name} must be a non-empty list of module names / regexes, got {value!r}")
    for entry in value:
        if not isinstance(entry, str) or not entry:
            raise TypeError(f"{name} entries must be non-empty strings (module names or regexes), got {entry!r}")
        try:
            re.compile(entry)
        except re.error as e:
            raise ValueError(f"{name} entry {entry!r} is not a valid regex: {e}") from e
    return list(value)


@dataclass
class ExportConfig:
    """How `save_sparse` writes a model.

    Args:
        modules: the nn.Linear modules stored sparse: entries as in `SparseConfig.targets` (a module-name suffix or a
            regex over the full name). None: the recipe's targets (`find_targets(model, config)`).
        pattern: their sparsity pattern ("unstructured", "4-block", "2:4", ...); default: the recipe's. Every module is
            checked against it, and the export fails naming the first module that does not follow it.
        weight_dtype: storage dtype of the sparse modules: "int8" (symmetric per output channel, the kernels' scheme),
            "float32", "bfloat16" or "float16". None keeps each weight's own dtype.
        int8_embeddings: also store embedding tables as int8 with one scale per row: True for every nn.Embedding, or a
            list of entries. The word embeddings are ~20% of a BERT-base checkpoint.
        int8_linears: store Linears that are not sparse (pooler, task head) as dense int8: True for all of them, or a
            list of entries.
        float_dtype: storage dtype of the floating-point tensors stored as usual (biases, norms, embeddings and
            Linears left unconverted): "float32", "bfloat16" or "float16". None keeps each tensor's dtype. Narrower
            than the model's dtype it rounds those tensors: an explicit trade, never a default.
        max_shard_size: largest weights file, e.g. "5GB" or a byte count; bigger checkpoints are split into shards
            with a `model.safetensors.index.json`, as `save_pretrained` does.
    """

    modules: list[str] | None = field(default=None, metadata={"help": "Sparse Linear modules (None: the recipe's)."})
    pattern: str | None = field(default=None, metadata={"help": "Sparsity pattern (None: the recipe's)."})
    weight_dtype: str | None = field(default=None, metadata={"help": "Storage dtype of the sparse weights."})
    int8_embeddings: bool | list[str] = field(default=False, metadata={"help": "int8 embedding tables."})
    int8_linears: bool | list[str] = field(default=False, metadata={"help": "Dense int8 for the other Linears."})
    float_dtype: str | None = field(default=None, metadata={"help": "Storage dtype of the other float tensors."})
    max_shard_size: int | str = field(default="5GB", metadata={"help": "Largest weights file."})

    def __post_init__(self):
        self.modules = _entries("modules", self.modules)
        if isinstance(self.modules, bool):
            raise TypeError("modules must be a list of module names / regexes or None, not a bool")
        if self.pattern is not None:
            get_pattern(self.pattern)
        if self.weight_dtype is not None:
            check_dtype("weight_dtype", self.weight_dtype)
        if self.float_dtype is not None and check_dtype("float_dtype", self.float_dtype) == "int8":
            raise ValueError("float_dtype='int8' is not a float dtype; use int8_embeddings / int8_linears for int8")
        self.int8_embeddings = _entries("int8_embeddings", self.int8_embeddings)
        self.int8_linears = _entries("int8_linears", self.int8_linears)
        if self.int8_embeddings is None or self.int8_linears is None:
            raise TypeError("int8_embeddings and int8_linears take True, False or a list of module entries")
        if isinstance(self.max_shard_size, bool) or not isinstance(self.max_shard_size, (int, str)):
            raise TypeError(f"max_shard_size must be a byte count or a string like '5GB', got {self.max_shard_size!r}")
        if isinstance(self.max_shard_size, int) and self.max_shard_size <= 0:
            raise ValueError(f"max_shard_size={self.max_shard_size} must be > 0")

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> ExportConfig:
        """Build from `save_sparse(**kwargs)`, naming unknown keywords."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"save_sparse got unknown keyword(s) {unknown}; export options: {sorted(known)}")
        return cls(**kwargs)
