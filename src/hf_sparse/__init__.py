"""hf_sparse: prune, distil and quantize Transformers models, and run them fast on CPUs.

Entry points: `SparseConfig` (what to prune and how), `SparseCallback` (Trainer), `sparsify_` (any training loop).
"""

from typing import TYPE_CHECKING

from .config import DistillationConfig, SparseConfig
from .export import CardInfo, SparseCheckpoint, push_to_hub, save_sparse
from .methods import METHODS, PruningMethod, register_method
from .sparsity.sparsifier import Sparsifier, sparsify_
from .version import __version__


if TYPE_CHECKING:
    from .integrations.trainer import SparseCallback

__all__ = [
    "METHODS",
    "CardInfo",
    "DistillationConfig",
    "PruningMethod",
    "SparseCallback",
    "SparseCheckpoint",
    "SparseConfig",
    "Sparsifier",
    "__version__",
    "push_to_hub",
    "register_method",
    "save_sparse",
    "sparsify_",
]


def __getattr__(name):
    # transformers is imported only when the Trainer adapter is used
    if name == "SparseCallback":
        from .integrations.trainer import SparseCallback

        return SparseCallback
    raise AttributeError(f"module 'hf_sparse' has no attribute {name!r}")
