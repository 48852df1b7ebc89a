"""Pruning methods. Each lives in its own folder and registers itself in METHODS on import."""

from .base import METHODS, NoArgs, PruningMethod, register_method
from .magnitude import MagnitudePruning
from .movement import MovementArgs, MovementPruning
from .obert import OBertArgs, OBertPruning


__all__ = [
    "METHODS",
    "MagnitudePruning",
    "MovementArgs",
    "MovementPruning",
    "NoArgs",
    "OBertArgs",
    "OBertPruning",
    "PruningMethod",
    "register_method",
]
