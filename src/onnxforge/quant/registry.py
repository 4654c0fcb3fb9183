"""A named registry that refuses duplicates (schemes, templates)."""
from __future__ import annotations

from typing import Generic, TypeVar

from ..errors import RecipeError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> None:
        if name in self._items:
            raise RecipeError(f"{self.kind} {name!r} is already registered; unregister it first")
        self._items[name] = item

    def unregister(self, name: str) -> None:
        if name not in self._items:
            raise RecipeError(f"{self.kind} {name!r} is not registered")
        del self._items[name]

    def get(self, name: str) -> T:
        if name not in self._items:
            raise RecipeError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._items))}")
        return self._items[name]

    def all(self) -> dict[str, T]:
        return dict(self._items)
