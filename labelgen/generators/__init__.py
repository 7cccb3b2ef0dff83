"""Generator plugins. Built-in generators register here; others through plugins.

A plugin is any importable module that registers generators with
``@GENERATORS.register("name")``. Load one with ``labelgen run --plugin MODULE``,
the ``LABELGEN_PLUGINS`` environment variable (comma-separated), or the
``labelgen.plugins`` entry-point group of an installed package.
"""
from __future__ import annotations

from .base import Generator
from .registry import GENERATORS, load_plugins
from .zip import generator as _zip  # noqa: E402,F401  (built-in: registers "zip")
from . import sam_auto as _sam_auto  # noqa: E402,F401  (built-in: registers "sam-auto")
from . import sam2_auto as _sam2_auto  # noqa: E402,F401  (built-in: registers "sam2-auto")
from . import sam3_concepts as _sam3  # noqa: E402,F401  (built-in: registers "sam3")

__all__ = ["GENERATORS", "Generator", "load_plugins"]
