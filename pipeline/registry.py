"""Name -> builder registries, so configs choose components without if-chains."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .store import StageError

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """Builders by name; `lookup` fails with a one-line error naming the config key and the choices."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(fn: T) -> T:
            self._items[name] = fn
            return fn

        return wrap

    def names(self) -> list[str]:
        return sorted(self._items)

    def lookup(self, name: str) -> T:
        if name not in self._items:
            raise StageError(f"{self.key}: unknown '{name}' (known: {', '.join(self.names())})")
        return self._items[name]
