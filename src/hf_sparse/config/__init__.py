from .base import ConfigMixin
from .distillation import DistillationConfig
from .sparse import SparseConfig


__all__ = ["ConfigMixin", "DistillationConfig", "SparseConfig"]
