from .config import MovementArgs
from .method import MovementPruning


__all__ = ["MovementArgs", "MovementPruning"]
