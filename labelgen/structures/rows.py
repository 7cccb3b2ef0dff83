"""``Row``: the result of one image, as a shard stores it and as every reader of a run gets it.

On disk (``docs/run-directory.md``) a row is one JSON object with sorted keys:

* labelled: ``{"image": ImageRecord, "status": "ok", "instances": Instances}``
* failed: ``{"image": ImageRecord, "status": "failed", "failure": {"reason": CODE, "message": TEXT}}``

Rows of a filtered or reviewed copy add ``"rejected": [{"index": i, "reason": CODE, ...detail}]``
(``index`` into the run's own row); rows of a reviewed copy also add ``"source_indices"`` (per kept
instance, its index in the run's own row, ``null`` for one added in review) and ``"review"``
(``{"sample_tags": [...] | null}``). ``Row.to_dict`` writes exactly these keys and ``Row.from_dict``
reads them back, so a row survives a round trip byte for byte.

A ``Row`` also reads as that JSON mapping (``row["image"]["image_id"]``, ``{**row}``), which keeps
code written against the on-disk form working; library code uses the attributes.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterator, Sequence

from ..errors import ValidationError
from .instances import ImageRecord, Instances

OK, FAILED = "ok", "failed"
_KEYS = frozenset({"image", "status", "instances", "failure", "rejected", "source_indices", "review"})


@dataclass(frozen=True, eq=False)
class Row(Mapping):
    """One image's result. Frozen; compares equal to a row (or mapping) with the same JSON.

    Attributes:
        image: the image record (size after EXIF orientation).
        instances: the image's labels; ``None`` iff the image failed.
        failure: ``{"reason": CODE, "message": TEXT}`` of a failed image, else ``None``.
        rejected: the rejections of a filtered/reviewed copy, ``({"index", "reason", ...detail}, ...)``;
            ``None`` for a run's own rows (no ``"rejected"`` key on disk).
        source_indices: per instance, its index in the run's own row (``None`` entries: added in
            review); only reviewed copies store it.
        review: ``{"sample_tags": [...] | None}`` of a reviewed copy's labelled row.
    """

    image: ImageRecord
    instances: Instances | None = None
    failure: Mapping[str, Any] | None = None
    rejected: tuple[Mapping[str, Any], ...] | None = None
    source_indices: tuple[int | None, ...] | None = None
    review: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.image, ImageRecord):
            raise ValidationError(f"Row.image must be an ImageRecord; got {type(self.image).__name__}")
        if self.instances is not None and not isinstance(self.instances, Instances):
            raise ValidationError(f"Row.instances must be Instances or None; got {type(self.instances).__name__}")
        if (self.instances is None) == (self.failure is None):
            raise ValidationError(f"row of {self.image.image_id!r}: exactly one of instances (a labelled image)"
                                  " and failure (a failed image) must be given")
        if self.failure is not None:
            object.__setattr__(self, "failure", MappingProxyType(dict(self.failure)))
        if self.rejected is not None:
            object.__setattr__(self, "rejected", tuple(MappingProxyType(dict(r)) for r in self.rejected))
        if self.source_indices is not None:
            object.__setattr__(self, "source_indices", tuple(self.source_indices))
        if self.review is not None:
            object.__setattr__(self, "review", MappingProxyType(dict(self.review)))

    # -- constructors -----------------------------------------------------------------
    @classmethod
    def failed(cls, image: ImageRecord, reason: str, message: str) -> "Row":
        """A failed image's row; ``reason`` is a failure code (``docs/run-directory.md``)."""
        return cls(image, failure={"reason": reason, "message": message})

    def with_instances(self, instances: Instances, **changes: Any) -> "Row":
        """This row with other instances (and any other field changed, e.g. ``rejected``)."""
        return dataclasses.replace(self, instances=instances, **changes)

    # -- access -----------------------------------------------------------------------
    @property
    def status(self) -> str:
        """``"ok"`` (labelled) or ``"failed"``."""
        return FAILED if self.instances is None else OK

    def origin(self) -> tuple[int | None, ...]:
        """Per instance, its index in the run's own row: ``source_indices`` when stored, else the
        indices not in ``rejected`` (in order), else ``0..N-1``. ``()`` for a failed image."""
        if self.instances is None:
            return ()
        if self.source_indices is not None:
            return self.source_indices
        dropped = {r["index"] for r in self.rejected or ()}
        return tuple(i for i in range(len(self.instances) + len(dropped)) if i not in dropped)

    # -- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The row's JSON object, exactly as a shard stores it."""
        data: dict[str, Any] = {"image": self.image.to_dict(), "status": self.status}
        if self.instances is None:
            data["failure"] = dict(self.failure)
        else:
            data["instances"] = self.instances.to_dict()
        if self.rejected is not None:
            data["rejected"] = [dict(r) for r in self.rejected]
        if self.source_indices is not None:
            data["source_indices"] = list(self.source_indices)
        if self.review is not None:
            data["review"] = dict(self.review)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Row":
        """Read a row's JSON object; ``ValidationError`` names what does not fit."""
        if not isinstance(data, Mapping):
            raise ValidationError(f"a row must be a JSON object; got {type(data).__name__}")
        extra = set(data) - _KEYS
        if extra:
            raise ValidationError(f"row has unknown keys {sorted(extra)}; expected a subset of {sorted(_KEYS)}")
        status = data.get("status")
        if "image" not in data or status not in (OK, FAILED) or (status == OK) != ("instances" in data) or \
                (status == FAILED) != ("failure" in data):
            raise ValidationError(f"a row needs an image and status 'ok' with instances or 'failed' with failure;"
                                  f" got status {status!r} with keys {sorted(data)}")
        return cls(
            image=ImageRecord.from_dict(data["image"]),
            instances=Instances.from_dict(data["instances"]) if status == OK else None,
            failure=data["failure"] if status == FAILED else None,
            rejected=_optional_tuple(data, "rejected"),
            source_indices=_optional_tuple(data, "source_indices"),
            review=data.get("review"),
        )

    # -- the read-only JSON mapping -------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Row):
            return self.to_dict() == other.to_dict()
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal rows may differ in identity; like dicts


def _optional_tuple(data: Mapping[str, Any], key: str) -> tuple | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ValidationError(f"row {key!r} must be a list; got {type(value).__name__}")
    return tuple(value)


def summarize(rows: Sequence[Row]) -> dict[str, Any]:
    """The counts a shard's done record holds for ``rows``: ``images``, ``ok``, ``failed``,
    ``instances``, ``failures`` (``{"image_id", "uri", "reason", "message"}`` each) and
    ``failure_reasons`` (``{reason: count}``, sorted)."""
    failures = [{"image_id": r.image.image_id, "uri": r.image.uri, **r.failure}
                for r in rows if r.failure is not None]
    reasons = collections.Counter(f["reason"] for f in failures)
    return {"images": len(rows), "ok": len(rows) - len(failures), "failed": len(failures),
            "instances": sum(len(r.instances) for r in rows if r.instances is not None),
            "failures": failures, "failure_reasons": dict(sorted(reasons.items()))}


__all__ = ["FAILED", "OK", "Row", "summarize"]
