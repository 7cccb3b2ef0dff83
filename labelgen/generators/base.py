"""The generator interface: one model-driven engine that turns an image into ``Instances``."""
from __future__ import annotations

import abc
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import numpy as np

from ..structures.instances import ImageRecord, Instances

if TYPE_CHECKING:
    from ..models.feature_cache import FeatureCache


@dataclass(frozen=True)
class NoConfig:
    """The ``Config`` of a generator that takes no settings (its recipe section holds only ``name``)."""


class Generator(abc.ABC):
    """A mask generator: everything the engine uses is declared here, with a default.

    Class attributes:

    * ``name``: the registered name, set by ``@GENERATORS.register("name")`` (do not repeat it;
      a different ``name`` on the class is a ``RegistryError``);
    * ``Config``: a frozen dataclass loaded strictly from the recipe's ``generator`` section
      (default ``NoConfig``: no settings);
    * ``uses_feature_cache``: ``True`` when the generator reads and writes ``feature_cache``.

    Instance attributes (execution settings the engine sets after ``from_config``):

    * ``config``: the ``Config`` instance the generator was built from (``None`` until set);
    * ``batch_size``: the most images one ``generate_batch`` call gets; ``label_images`` sets it
      (from ``execution.batch_size``) before the first batch;
    * ``feature_cache``: a ``FeatureCache`` or ``None``; set by the worker when the recipe has
      ``execution.cache_dir`` and ``uses_feature_cache`` is ``True``.

    ``preflight`` runs once before any worker starts; ``from_config`` loads models once per
    worker process, which then calls ``generate_batch`` on consecutive batches of the images
    of every shard it runs.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    uses_feature_cache: ClassVar[bool] = False
    config: Any = None
    batch_size: int = 1
    feature_cache: "FeatureCache | None" = None

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
        return None if self.config is None else type(self).vocabulary(self.config)

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
