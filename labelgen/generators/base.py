"""The generator interface: one model-driven engine that turns an image into ``Instances``."""
from __future__ import annotations

import abc
import functools
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from ..structures.instances import ImageRecord, Instances


class Generator(abc.ABC):
    """A mask generator.

    Subclasses set ``name`` and ``Config`` (a frozen dataclass loaded strictly from the
    recipe's ``generator`` section) and register themselves in ``GENERATORS``.
    ``from_config`` loads models once; workers call it once per process and then
    ``generate_batch`` on consecutive batches of the images of every shard they run.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    batch_size: int = 1  # images per encoder call; an execution setting the worker sets after building

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

    def generate_batch(self, images_rgb: Sequence[np.ndarray],
                       records: Sequence[ImageRecord]) -> list[Callable[[], Instances]]:
        """The model work for several images; per image a ``finish()`` for the rest.

        ``finish()`` returns that image's ``Instances`` (as :meth:`generate` would) or raises
        that image's error, so one bad image never fails the others. It must do CPU work only
        (RLE encoding, NMS...) and touch no model: the worker calls it on another thread while
        the next batch is on the model. Generators that batch their encoders across images
        override this; the default runs :meth:`generate` on each image now.
        """
        finishers: list[Callable[[], Instances]] = []
        for image_rgb, record in zip(images_rgb, records, strict=True):
            try:
                finishers.append(functools.partial(_done, self.generate(image_rgb, record)))
            except Exception as exc:  # this image's failure, raised when its finisher runs
                finishers.append(failed(exc))
        return finishers

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


def _done(instances: Instances) -> Instances:
    return instances


def _raise(exc: BaseException) -> Instances:
    raise exc


def failed(exc: BaseException) -> Callable[[], Instances]:
    """A ``finish()`` that raises ``exc``: how :meth:`Generator.generate_batch` reports one image's error."""
    return functools.partial(_raise, exc)
