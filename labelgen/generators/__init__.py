"""Generator plugins. Built-in generators register here; others through plugins.

A plugin is any importable module that registers generators with
``@GENERATORS.register("name")``. Load one with ``labelgen run --plugin MODULE``,
the ``LABELGEN_PLUGINS`` environment variable (comma-separated), or the
``labelgen.plugins`` entry-point group of an installed package.
"""
from __future__ import annotations

import importlib
import os
from importlib import metadata
from typing import Sequence

from ..errors import GeneratorError
from ..registry import Registry
from .base import Generator

GENERATORS: Registry[type[Generator]] = Registry("generator")

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


from .zip import generator as _zip  # noqa: E402,F401  (built-in: registers "zip")
from . import sam_auto as _sam_auto  # noqa: E402,F401  (built-in: registers "sam-auto")

__all__ = ["GENERATORS", "Generator", "load_plugins"]
