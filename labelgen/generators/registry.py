"""The generator registry and plugin loading (no built-in is imported here, so generators can
register themselves without importing the package that imports them)."""
from __future__ import annotations

import importlib
import os
from importlib import metadata
from typing import Sequence

from ..errors import GeneratorError
from ..registry import Registry
from .base import Generator

GENERATORS: Registry[type[Generator]] = Registry("generator", named=True)

_LOADED: set[str] = set()


def load_plugins(modules: Sequence[str] = ()) -> list[str]:
    """Import plugin modules (explicit, ``LABELGEN_PLUGINS``, entry points); return what was loaded."""
    names = [m.strip() for m in modules if m.strip()]
    names += [m.strip() for m in os.environ.get("LABELGEN_PLUGINS", "").split(",") if m.strip()]
    loaded = []
    for name in names:
        if name in _LOADED:
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise GeneratorError(f"cannot import plugin module {name!r}: {exc}. Is it installed / on PYTHONPATH?") from exc
        _LOADED.add(name)
        loaded.append(name)
    for entry in metadata.entry_points(group="labelgen.plugins"):
        if entry.value not in _LOADED:
            entry.load()
            _LOADED.add(entry.value)
            loaded.append(entry.value)
    return loaded

__all__ = ["GENERATORS", "load_plugins"]
