from .method import MagnitudePruning


__all__ = ["MagnitudePruning"]
