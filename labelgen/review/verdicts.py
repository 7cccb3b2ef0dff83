"""Reviewer verdicts of a review sample: ``RUN_DIR/reviewed/NAME/verdicts.jsonl``.

One JSON object per sampled image, in sample order (written by ``labelgen pull`` of a sample dataset,
inside the staged reviewed copy, so its ``checksums.json`` covers it)::

    {"image_id": str,
     "labels": [{"index": int, "class_id": int | null, "verdict": "correct" | "false_positive" |
                 "wrong_class" | "poor_mask"}],
     "missed": int,               # labels the reviewer drew (objects the run missed)
     "missing_object_tag": bool}  # the sample was tagged ``missing_object``

``index`` points into the run's own row of that image (its ``Instances``), ``class_id`` is the run's
class of that label. ``read_verdicts`` streams nothing clever: a sample is small (N images).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..atomic import atomic_file, json_bytes
from ..errors import ExportError

VERDICTS_FILE = "verdicts.jsonl"
VERDICTS = ("correct", "false_positive", "wrong_class", "poor_mask")
ERROR_VERDICTS = VERDICTS[1:]  # the reviewer tags, in the FiftyOne convention


@dataclass(frozen=True)
class LabelVerdict:
    """The verdict on one of the run's labels: ``index`` into the image's instances."""

    index: int
    class_id: int | None
    verdict: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ExportError(f"label verdict must be one of {VERDICTS}; got {self.verdict!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ExportError(f"label verdict index must be an int >= 0; got {self.index!r}")

    @property
    def correct(self) -> bool:
        return self.verdict == "correct"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "class_id": self.class_id, "verdict": self.verdict}


@dataclass(frozen=True)
class ImageVerdicts:
    """The verdicts on one sampled image."""

    image_id: str
    labels: tuple[LabelVerdict, ...] = field(default_factory=tuple)
    missed: int = 0
    missing_object_tag: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        if isinstance(self.missed, bool) or not isinstance(self.missed, int) or self.missed < 0:
            raise ExportError(f"'missed' must be an int >= 0; got {self.missed!r}")

    @property
    def correct(self) -> int:
        """How many of the image's labels the reviewer accepted."""
        return sum(label.correct for label in self.labels)

    def to_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "labels": [label.to_dict() for label in self.labels],
                "missed": self.missed, "missing_object_tag": bool(self.missing_object_tag)}

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "ImageVerdicts":
        labels = tuple(LabelVerdict(int(v["index"]), None if v.get("class_id") is None else int(v["class_id"]),
                                    str(v["verdict"])) for v in obj.get("labels") or [])
        return cls(str(obj["image_id"]), labels, int(obj.get("missed", 0)), bool(obj.get("missing_object_tag")))


def verdicts_path(run_dir: str | os.PathLike[str], name: str) -> Path:
    return Path(run_dir) / "reviewed" / name / VERDICTS_FILE


def write_verdicts(path: str | os.PathLike[str], items: Iterable[ImageVerdicts]) -> int:
    """Write ``items`` as JSON Lines at ``path`` (atomically); return how many were written."""
    path = Path(path)
    count = 0
    with atomic_file(path, "review verdicts") as handle:
        for item in items:
            handle.write(json_bytes(item.to_dict(), separators=(",", ":")) + b"\n")
            count += 1
    return count


def iter_verdicts_file(path: str | os.PathLike[str]) -> Iterator[ImageVerdicts]:
    path = Path(path)
    try:
        with open(path, "r", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield ImageVerdicts.from_dict(json.loads(line))
                except (ValueError, KeyError, TypeError, ExportError) as exc:
                    raise ExportError(f"{path} line {number}: not a verdicts record ({type(exc).__name__}:"
                                      f" {exc}); re-create it with `labelgen pull`") from None
    except FileNotFoundError:
        raise ExportError(f"no verdicts at {path}: pull a review sample first (`labelgen review RUN --sample N`,"
                          " review in FiftyOne, then `labelgen pull RUN --dataset NAME --name NAME`)") from None


def read_verdicts(run_dir: str | os.PathLike[str], name: str) -> list[ImageVerdicts]:
    """The verdicts of the reviewed copy ``name`` of the run at ``run_dir``, in sample order."""
    return list(iter_verdicts_file(verdicts_path(run_dir, name)))
