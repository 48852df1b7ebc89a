"""Runtime modules that run hf_sparse checkpoints on the CPU kernels of `hf_sparse.ops`.

`SparseLinear` replaces an `nn.Linear` (sparse and/or int8 weight), `Int8Embedding` an `nn.Embedding` stored as int8,
`SiblingGroup` lets Linears that read the same input (attention Q/K/V) share one packed kernel call, and
`FusedEncoderLayer` runs a whole post-LayerNorm encoder layer in one extension call (six kernel steps),
`FusedEncoderStack` several layers in one call. They know nothing of transformers: `hf_sparse.integrations` puts
them into a model.
"""

from .encoder_layer import FusedEncoderLayer
from .encoder_stack import FusedEncoderStack
from .int8_embedding import Int8Embedding
from .sibling_group import SiblingGroup
from .sparse_linear import STORAGE_DTYPES, SparseLinear, pack_siblings


__all__ = [
    "STORAGE_DTYPES",
    "FusedEncoderLayer",
    "FusedEncoderStack",
    "Int8Embedding",
    "SiblingGroup",
    "SparseLinear",
    "pack_siblings",
]
