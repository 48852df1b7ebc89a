"""Sparse safetensors checkpoints: the on-disk formats, the writer, the reader, the model card, the Hub upload.

    from hf_sparse import save_sparse
    save_sparse(model, "out", config, weight_dtype="int8", tokenizer=tokenizer)

docs/format.md specifies the format.
"""

from . import codecs
from .card import CardInfo
from .config import FORMAT_VERSION, ModuleEntry, SparseQuantizationConfig, TensorScheme, check_format_version
from .errors import CheckpointError
from .formats import FORMATS, STORAGE_DTYPES, WeightFormat, compress, decompress, format_for, tensor_names, validate
from .hub import push_to_hub
from .options import ExportConfig
from .reader import CompressedModule, SparseCheckpoint
from .save import save_sparse


__all__ = [
    "FORMATS",
    "FORMAT_VERSION",
    "STORAGE_DTYPES",
    "CardInfo",
    "CheckpointError",
    "CompressedModule",
    "ExportConfig",
    "ModuleEntry",
    "SparseCheckpoint",
    "SparseQuantizationConfig",
    "TensorScheme",
    "WeightFormat",
    "check_format_version",
    "codecs",
    "compress",
    "decompress",
    "format_for",
    "push_to_hub",
    "save_sparse",
    "tensor_names",
    "validate",
]
