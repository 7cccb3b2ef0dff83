"""The labeler contract: what the engine calls on the object that names a generator's instances.

A labeler runs after the generator, on the finish thread (``engine.pipeline``), one image at a
time. It needs no base class: any object with these members is a ``Labeler``
(``isinstance(obj, Labeler)`` checks that they exist). ``labelgen.labelers.clip.ClipLabeler``
is the built-in one, built from a recipe's ``labeler:`` section.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..structures.instances import Instances


@runtime_checkable
class Labeler(Protocol):
    """Names instances; the engine uses exactly these members.

    ``name``: a short label for provenance (e.g. ``"clip"``).
    """

    name: str

    def label(self, image_rgb: np.ndarray, instances: Instances) -> Instances:
        """The same instances with ``class_ids`` (and any score / attribute columns) written.

        Args:
            image_rgb: ``(H, W, 3)`` uint8 RGB, the image the instances were found in.
            instances: ``N`` instances in that image's frame (``height = H``, ``width = W``).
        Returns:
            ``Instances`` with the same ``N`` masks in the same order; ``class_ids`` ``(N,)`` int
            indexing the labeler's class names. Raise a ``LabelgenError`` to fail this image only.
        """

    def provenance(self) -> dict[str, Any]:
        """JSON facts about the labeler (model, weights, classes), stored in each shard's done record."""
