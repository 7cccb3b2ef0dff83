"""The two core records: ``ImageRecord`` (one input image) and ``Instances``
(the columnar result of one generator call on one image). No torch here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from ..errors import ValidationError
from .masks import RLE, masks_to_rles, rles_to_boxes_xyxy, rles_to_masks, validate_rle

_JSON_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One input image.

    Attributes:
        image_id: stable id, unique within a source (for a folder: the posix path
            relative to the folder, e.g. ``"sub/a.jpg"``). Never depends on listing order.
        uri: where to read it (an absolute local path).
        width, height: pixels after EXIF orientation; ``None`` until the image is read.
        sha256: hex digest of the file's bytes, when computed.
    """

    image_id: str
    uri: str
    width: int | None = None
    height: int | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.image_id, str) or not self.image_id:
            raise ValidationError(f"image_id must be a non-empty str; got {self.image_id!r}")
        if not isinstance(self.uri, str) or not self.uri:
            raise ValidationError(f"uri must be a non-empty str; got {self.uri!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValidationError(f"{name} must be a positive int or None; got {value!r} for {self.image_id!r}")
        if self.sha256 is not None and (len(self.sha256) != 64 or not _is_hex(self.sha256)):
            raise ValidationError(f"sha256 must be 64 hex characters; got {self.sha256!r}")

    def with_size(self, width: int, height: int, sha256: str | None = None) -> "ImageRecord":
        return dataclasses.replace(self, width=width, height=height, sha256=sha256 or self.sha256)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ImageRecord":
        return cls(**_only_keys(data, {f.name for f in dataclasses.fields(cls)}, "ImageRecord"))


@dataclass(frozen=True, eq=False)
class Instances:
    """All instances found in one image, stored column by column.

    Attributes:
        height, width: the image frame every column refers to (pixels).
        masks_rle: ``N`` compressed COCO RLEs (``{"size": [height, width], "counts": str}``).
        boxes_xyxy: ``(N, 4)`` float32, XYXY absolute pixels in the image frame.
        scores: named ``(N,)`` float32 columns (e.g. ``confidence``, ``sam_predicted_iou``).
        class_ids: ``(N,)`` int32 0-based ids into the run's vocabulary, or ``None``
            when the generator is class-agnostic.
        attributes: named length-``N`` tuples of JSON values (e.g. ``cluster_ids``).
        provenance: JSON metadata about how the result was made (generator, versions).

    Arrays are read-only; ``inst[bool_or_index_array]`` returns a new ``Instances``.
    """

    height: int
    width: int
    masks_rle: tuple[RLE, ...] = ()
    boxes_xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: Mapping[str, np.ndarray] = field(default_factory=dict)
    class_ids: np.ndarray | None = None
    attributes: Mapping[str, tuple] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_frame(self.height, self.width)
        n = len(self.masks_rle)
        rles = tuple(
            validate_rle(r, self.height, self.width, f"masks_rle[{i}]") for i, r in enumerate(self.masks_rle)
        )
        object.__setattr__(self, "masks_rle", rles)
        object.__setattr__(self, "boxes_xyxy", _check_boxes(self.boxes_xyxy, n))
        object.__setattr__(self, "scores", _check_scores(self.scores, n))
        object.__setattr__(self, "class_ids", _check_class_ids(self.class_ids, n))
        object.__setattr__(self, "attributes", _check_attributes(self.attributes, n))
        object.__setattr__(self, "provenance", MappingProxyType(dict(_check_json(self.provenance, "provenance"))))

    # -- constructors -----------------------------------------------------------------
    @classmethod
    def empty(cls, height: int, width: int, **kwargs: Any) -> "Instances":
        return cls(height=height, width=width, **kwargs)

    @classmethod
    def from_masks(
        cls,
        masks: np.ndarray,
        *,
        boxes_xyxy: np.ndarray | None = None,
        **kwargs: Any,
    ) -> "Instances":
        """Build from dense ``(N, H, W)`` bool masks; boxes default to the tight mask boxes."""
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise ValidationError(f"masks must be (N, H, W) bool; got shape {masks.shape}")
        rles = masks_to_rles(masks.astype(bool, copy=False))
        if boxes_xyxy is None:
            boxes_xyxy = rles_to_boxes_xyxy(rles)
        return cls(height=masks.shape[1], width=masks.shape[2], masks_rle=tuple(rles), boxes_xyxy=boxes_xyxy, **kwargs)

    # -- access ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.masks_rle)

    def masks(self) -> np.ndarray:
        """Decode to ``(N, H, W)`` bool."""
        return rles_to_masks(self.masks_rle, self.height, self.width)

    def __getitem__(self, index: Any) -> "Instances":
        idx = _as_index_array(index, len(self))
        return dataclasses.replace(
            self,
            masks_rle=tuple(self.masks_rle[i] for i in idx),
            boxes_xyxy=self.boxes_xyxy[idx],
            scores={k: v[idx] for k, v in self.scores.items()},
            class_ids=None if self.class_ids is None else self.class_ids[idx],
            attributes={k: tuple(v[i] for i in idx) for k, v in self.attributes.items()},
            provenance=dict(self.provenance),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Instances):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    # -- JSON -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``from_dict(to_dict())`` gives an equal object (float32 exact)."""
        return {
            "height": self.height,
            "width": self.width,
            "masks_rle": [dict(r) for r in self.masks_rle],
            "boxes_xyxy": self.boxes_xyxy.tolist(),
            "scores": {k: v.tolist() for k, v in sorted(self.scores.items())},
            "class_ids": None if self.class_ids is None else self.class_ids.tolist(),
            "attributes": {k: list(v) for k, v in sorted(self.attributes.items())},
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Instances":
        allowed = {f.name for f in dataclasses.fields(cls)}
        data = _only_keys(data, allowed, "Instances")
        missing = {"height", "width"} - set(data)
        if missing:
            raise ValidationError(f"Instances JSON is missing {sorted(missing)}")
        n = len(data.get("masks_rle", ()))
        boxes = data.get("boxes_xyxy", [])
        return cls(
            height=data["height"],
            width=data["width"],
            masks_rle=tuple(data.get("masks_rle", ())),
            boxes_xyxy=np.asarray(boxes, dtype=np.float32).reshape(-1, 4) if n or boxes else np.zeros((0, 4), np.float32),
            scores={k: np.asarray(v, dtype=np.float32) for k, v in data.get("scores", {}).items()},
            class_ids=None if data.get("class_ids") is None else np.asarray(data["class_ids"], dtype=np.int32),
            attributes={k: tuple(v) for k, v in data.get("attributes", {}).items()},
            provenance=data.get("provenance", {}),
        )


# -- validation helpers -----------------------------------------------------------------
def _check_frame(height: Any, width: Any) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValidationError(f"{name} must be a positive int; got {value!r}")


def _readonly(array: np.ndarray) -> np.ndarray:
    array = np.array(array, copy=True)
    array.flags.writeable = False
    return array


def _check_boxes(boxes: Any, n: int) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float32)
    if n == 0 and boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.shape != (n, 4):
        raise ValidationError(f"boxes_xyxy must have shape ({n}, 4) to match {n} masks; got {boxes.shape}")
    if not np.all(np.isfinite(boxes)):
        raise ValidationError("boxes_xyxy must be finite; got NaN or inf")
    bad = np.nonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0]
    if bad.size:
        raise ValidationError(f"boxes_xyxy must have x2 >= x1 and y2 >= y1; row {int(bad[0])} is {boxes[bad[0]].tolist()}")
    return _readonly(boxes)


def _check_scores(scores: Mapping[str, Any], n: int) -> Mapping[str, np.ndarray]:
    checked = {}
    for name, column in scores.items():
        if not isinstance(name, str) or not name:
            raise ValidationError(f"score names must be non-empty str; got {name!r}")
        column = np.asarray(column, dtype=np.float32)
        if column.shape != (n,):
            raise ValidationError(f"score {name!r} must have shape ({n},); got {column.shape}")
        if not np.all(np.isfinite(column)):
            raise ValidationError(f"score {name!r} must be finite; got NaN or inf")
        checked[name] = _readonly(column)
    return MappingProxyType(checked)


def _check_class_ids(class_ids: Any, n: int) -> np.ndarray | None:
    if class_ids is None:
        return None
    raw = np.asarray(class_ids)
    if raw.size and not np.issubdtype(raw.dtype, np.integer):
        raise ValidationError(f"class_ids must be integers; got dtype {raw.dtype}")
    ids = raw.astype(np.int32).reshape(-1) if raw.size else np.zeros((0,), np.int32)
    if ids.shape != (n,):
        raise ValidationError(f"class_ids must have shape ({n},); got {raw.shape}")
    if ids.size and ids.min() < 0:
        raise ValidationError(f"class_ids must be >= 0; got {int(ids.min())}")
    return _readonly(ids)


def _check_attributes(attributes: Mapping[str, Any], n: int) -> Mapping[str, tuple]:
    checked = {}
    for name, column in attributes.items():
        column = tuple(column)
        if len(column) != n:
            raise ValidationError(f"attribute {name!r} must have {n} values; got {len(column)}")
        checked[name] = tuple(_check_json(v, f"attribute {name!r}") for v in column)
    return MappingProxyType(checked)


def _check_json(value: Any, where: str) -> Any:
    """Return a JSON-safe copy of ``value`` (lists for tuples), or raise."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            raise ValidationError(f"{where}: values must be finite; got {value!r}")
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_check_json(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _check_json(v, where) for k, v in value.items()}
    raise ValidationError(f"{where}: expected JSON values (str, number, bool, None, list, dict); got {type(value).__name__}")


def _as_index_array(index: Any, n: int) -> np.ndarray:
    if isinstance(index, slice):
        return np.arange(n)[index]
    if isinstance(index, (int, np.integer)):
        raise ValidationError("index Instances with a boolean or integer array (inst[[i]]), not a scalar")
    idx = np.asarray(index)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise ValidationError(f"boolean index must have shape ({n},); got {idx.shape}")
        return np.nonzero(idx)[0]
    if idx.size == 0:
        return np.zeros((0,), dtype=np.int64)
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValidationError(f"index must be a boolean or integer array; got dtype {idx.dtype}")
    if idx.ndim != 1 or idx.min() < -n or idx.max() >= n:
        raise ValidationError(f"integer index must be 1-D within [-{n}, {n}); got {idx.tolist()}")
    return idx


def _only_keys(data: Mapping[str, Any], allowed: set[str], what: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ValidationError(f"{what} JSON must be an object; got {type(data).__name__}")
    extra = set(data) - allowed
    if extra:
        raise ValidationError(f"{what} JSON has unknown keys {sorted(extra)}; expected a subset of {sorted(allowed)}")
    return dict(data)


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True
