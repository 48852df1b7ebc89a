"""hf_sparse: prune, distil and quantize Transformers models, and run them fast on CPUs.

Entry points: `SparseConfig` (what to prune and how), `SparseCallback` (Trainer), `sparsify_` (any training loop),
`save_sparse` (the compressed checkpoint). Importing hf_sparse registers its transformers backend, so that
`from_pretrained` runs those checkpoints on hf_sparse's CPU kernels.
"""

import importlib.util
import warnings
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


def _register_backend() -> None:
    if importlib.util.find_spec("transformers") is None:  # the core works without transformers
        return
    try:
        from .integrations.quantizer import register
    except ImportError as e:  # a transformers release that moved the quantizer API
        warnings.warn(f"hf_sparse could not register its transformers backend ({e})", RuntimeWarning, stacklevel=2)
        return
    register()


_register_backend()


def __getattr__(name):
    # the Trainer adapter (transformers.Trainer and its dependencies) is imported on first use
    if name == "SparseCallback":
        from .integrations.trainer import SparseCallback

        return SparseCallback
    raise AttributeError(f"module 'hf_sparse' has no attribute {name!r}")
