from .config import OBertArgs
from .method import OBertPruning


__all__ = ["OBertArgs", "OBertPruning"]
