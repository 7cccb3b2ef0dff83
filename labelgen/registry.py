"""A tiny named-plugin registry (generators, exporters). Lookup errors list what exists.

A registry made with ``named=True`` holds classes whose ``name`` class attribute is their
registered name: ``register`` sets it when the class does not define one itself and raises
``RegistryError`` when the class defines another, so the name is written once and cannot drift.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to plugin objects. ``register`` works as a decorator.

    ``named``: the objects are classes whose ``name`` attribute must equal the registered name.
    """

    def __init__(self, kind: str, *, named: bool = False):
        self.kind = kind
        self.named = named
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            existing = self._items.get(name)
            if existing is not None and existing is not obj:
                raise RegistryError(f"{self.kind} {name!r} is already registered to {existing!r}")
            if self.named:
                _claim_name(self.kind, name, obj)
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(self._unknown_message(name)) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _unknown_message(self, name: str) -> str:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return (
            f"unknown {self.kind} {name!r}; available: {', '.join(names) or '(none)'}.{hint}"
            " Plugins from other modules are loaded with --plugin MODULE or LABELGEN_PLUGINS."
        )


def _claim_name(kind: str, name: str, cls: object) -> None:
    """Give ``cls`` its registered ``name``, or raise if it declares a different one itself.

    Only the class's own ``name`` counts: a subclass registered under a new name does not keep
    the name it inherits.
    """
    if not isinstance(cls, type):
        raise RegistryError(f"a {kind} is registered as a class; got {cls!r} for {name!r}")
    declared = vars(cls).get("name")
    if declared is None:
        cls.name = name  # type: ignore[attr-defined]
    elif declared != name:
        raise RegistryError(
            f"{kind} class {cls.__qualname__} declares name = {declared!r} but is registered as {name!r};"
            f" drop its name attribute (the registry sets it) or register it as {declared!r}"
        )
