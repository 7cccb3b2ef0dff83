"""Labelers: give class names to any generator's instances (CLIP region labeler).

``Labeler`` (``labelgen.labelers.protocol``) is the contract the engine relies on.
"""
from __future__ import annotations

from .protocol import Labeler

__all__ = ["Labeler"]
