"""Pruning methods. Each lives in its own folder and registers itself in METHODS on import."""

from .base import METHODS, NoArgs, PruningMethod, register_method
from .magnitude import MagnitudePruning


__all__ = ["METHODS", "MagnitudePruning", "NoArgs", "PruningMethod", "register_method"]
