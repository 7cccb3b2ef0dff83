"""The generator interface: one model-driven engine that turns an image into ``Instances``."""
from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np

from ..instances import ImageRecord, Instances


class Generator(abc.ABC):
    """A mask generator.

    Subclasses set ``name`` and ``Config`` (a frozen dataclass loaded strictly from the
    recipe's ``generator`` section) and register themselves in ``GENERATORS``.
    ``from_config`` loads models once; workers call it once per process and then
    ``generate`` for every image of every shard they run.
    """

    name: ClassVar[str]
    Config: ClassVar[type]

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: Any, *, device: str = "cpu") -> "Generator":
        """Build the generator and load its weights. Raises ``WeightsNotFoundError`` offline."""

    @classmethod
    def preflight(cls, config: Any) -> None:
        """Cheap check, run once before any worker starts, that ``from_config`` can succeed
        (e.g. every weight file is present). Raises a ``LabelgenError`` that says what to do."""

    @abc.abstractmethod
    def generate(self, image_rgb: np.ndarray, record: ImageRecord) -> Instances:
        """Find instances in one image.

        Args:
            image_rgb: ``(H, W, 3)`` uint8 RGB, EXIF orientation applied.
            record: the image's record, ``width``/``height`` filled in.
        Returns:
            ``Instances`` in the image's pixel frame (``height = H``, ``width = W``).
        """

    def provenance(self) -> dict[str, Any]:
        """JSON facts about the loaded models (names, checkpoint hashes, random weights...)."""
        return {"generator": self.name}

    def class_names(self) -> tuple[str, ...] | None:
        """Vocabulary that ``class_ids`` index into, or ``None`` when class-agnostic."""
        return type(self).vocabulary(self.config) if hasattr(self, "config") else None

    @classmethod
    def vocabulary(cls, config: Any) -> tuple[str, ...] | None:
        """The class names a config makes ``class_ids`` refer to (known without loading models)."""
        return None
