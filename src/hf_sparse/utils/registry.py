"""Name -> implementation registries, so that new methods, patterns and schedules are new files, not if-branches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar


T = TypeVar("T")


class Registry(Generic[T]):
    """A case-sensitive map from a public name to an object, filled with the `register` decorator.

    Args:
        kind: what the registry holds, used in error messages ("pruning method", "schedule", ...).
        field: the config field whose value is looked up here, so errors can name it.
    """

    def __init__(self, kind: str, field: str | None = None):
        self.kind = kind
        self.field = field
        self._items: dict[str, T] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            for key in (name, *aliases):
                if key in self._items and self._items[key] is not obj:
                    raise ValueError(f"{self.kind} {key!r} is already registered to {self._items[key]!r}")
                self._items[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            where = f"{self.field}=" if self.field else ""
            raise ValueError(
                f"Unknown {self.kind} {where}{name!r}; known: {', '.join(sorted(self._items))}."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
