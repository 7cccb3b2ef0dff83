"""YOLO export in the Ultralytics / YOLOv5 layout, read by trainers and FiftyOne's ``YOLOv5Dataset``.

::

    OUT/data.yaml                  path (absolute OUT), train and val (images/SPLIT), nc, names {id: name}
    OUT/images/SPLIT/REL           symlink to (or copy of) each image; REL = its path below the images root
    OUT/labels/SPLIT/REL.txt       one line per object; an EMPTY file for an image without objects
    OUT/confidence/SPLIT/REL.txt   one confidence per line, aligned line by line with the label file
    OUT/export_report.json         what was written and what the multi-part policy changed

``segment`` lines are ``cls x1 y1 ... xn yn`` (the mask's outer contour, holes filled), ``detect`` lines
``cls cx cy w h`` (from ``boxes_xyxy``); coordinates are divided by the image width/height, clipped to
[0, 1], 6 decimals; ``cls`` is 0 in class-agnostic runs (named ``object``). Vertices are pixel indices of
boundary pixels (``cv2.findContours``): ``cv2.fillPoly`` on the H x W grid gives the mask back. A mask of
several 8-connected parts becomes, per ``multipart``: ``largest`` (the biggest part; the area fraction of
the rest is reported), ``merge`` (one polygon joining the parts by zero-width bridges, see ``merge_parts``)
or ``split`` (one line per part, same class and confidence). Contours of fewer than 3 vertices (a pixel, a
1-pixel-wide straight line) are dropped. FiftyOne reads the export with ``fo.Dataset.from_dir(OUT,
fo.types.YOLOv5Dataset, yaml_path="data.yaml", split=SPLIT, label_type="polylines")``.

``images="none"`` places no images and points ``data.yaml`` at the original images root. Trainers (and
FiftyOne) find a label file by replacing the last ``/images/`` of the image path with ``/labels/``, so the
labels are found only when that root is ``OUT/images/SPLIT`` (export into the dataset's own root);
otherwise the report says ``labels_found_by_trainers: false`` and a warning is logged.

Re-exporting replaces the split: each folder is built under a hidden temporary name beside its target and
swapped in at the end (``labelgen.atomic.staged_folder``), so label files of images no longer exported
disappear and a failed export leaves the previous one intact. Only folders listed as ``owned_folders`` in
the report of an earlier export are ever replaced; anything else already there is refused.

One export per OUT at a time: the export holds ``OUT/.labelgen-export.lock`` (``paths.export_lock``) and
a second export into the same OUT is refused at once with ``ExportLockedError`` naming the holder. Holding
it, an export first removes what killed exports left (``.SPLIT.tmp-*`` / ``.SPLIT.old-*`` folders,
``data.yaml`` / ``export_report.json`` temp files). Every file and folder it creates is created
exclusively (temp and staging names are unpredictable), so a planted symlink is never followed. A run
with pending or failed shards is exported as far as it is committed, with a logged warning and
``incomplete`` in the report. OS errors (disk full, file size limit) are ``StoreWriteError``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal, Sequence

import numpy as np
import yaml

from ..atomic import (EXPORT_NOTE, create_exclusive, remove_staged_leftovers, staged_folder, store_write_error,
                      write_bytes_atomic, write_json_atomic)
from ..errors import ExportError
from ..structures.instances import Instances
from ..structures.masks import RLE, rles_to_masks
from ..structures.rows import Row
from .paths import export_lock, relative_to_root, remove_stale_export_temps, safe_join
from .polygons import mask_parts, merge_parts
from .source import ExportSource, log_incomplete

log = logging.getLogger(__name__)

REPORT_FORMAT = "labelgen-yolo-export/1"
REPORT_NAME = "export_report.json"
TASKS = ("segment", "detect")
MULTIPART = ("largest", "merge", "split")
IMAGE_MODES = ("symlink", "copy", "none")


@dataclass
class YoloExportReport:
    """What one export wrote (also saved as ``OUT/export_report.json``)."""

    out_dir: str
    split: str
    task: str
    multipart: str
    images_mode: str
    class_names: list[str]
    images_root: str
    include_failed_images: bool
    data_yaml: str = ""
    label_files: int = 0  # one per exported image
    empty_label_files: int = 0
    failed_images_skipped: int = 0
    failed_images_included: int = 0  # exported with an empty label file (include_failed_images)
    instances: int = 0
    lines: int = 0
    instances_without_shape: int = 0  # empty mask, only degenerate parts, or a zero-size box: no line
    degenerate_parts_dropped: int = 0  # contours of fewer than 3 vertices
    multipart_instances: int = 0  # segment: masks with 2+ usable parts
    parts_dropped: int = 0  # largest: parts left out
    parts_merged: int = 0  # merge: parts joined into one polygon
    parts_split: int = 0  # split: parts written as separate lines
    area_fraction_lost: float = 0.0  # largest: sum over instances of dropped pixels / mask pixels
    instances_without_confidence: int = 0  # no "confidence" score: written as 1.0
    stale_label_files_removed: int = 0  # label files of the previous export for images not exported now
    labels_found_by_trainers: bool = True  # false only for images="none" outside OUT/images/SPLIT
    owned_folders: list[str] = field(default_factory=list)
    # the run's shards not exported: {pending_shards, failed_shards, images_not_exported}; None if complete
    incomplete: dict | None = None
    stale_temps_removed: int = 0  # temp files and staging folders of killed exports removed first
    format: str = REPORT_FORMAT


def export_yolo(source: ExportSource, out_dir: str | os.PathLike[str], *,
                task: Literal["segment", "detect"] = "segment",
                multipart: Literal["largest", "merge", "split"] = "largest",
                images: Literal["symlink", "copy", "none"] = "symlink", split: str = "train",
                images_root: str | os.PathLike[str] | None = None,
                include_failed_images: bool = False) -> YoloExportReport:
    """Write ``source`` as a YOLO dataset split into ``out_dir`` (streaming, one image at a time).

    Args:
        task: ``segment`` (polygons from the masks) or ``detect`` (boxes).
        multipart: ``largest`` / ``merge`` / ``split``: what a mask of several parts becomes (segment).
        images: ``symlink`` (default), ``copy``, or ``none`` (no images placed; see the module doc).
        split: the split folder name (one path segment, e.g. ``train``); ``data.yaml`` uses it for
            both ``train`` and ``val``.
        images_root: folder the exported relative paths start from; default ``source.images_root()``.
            An image outside it is an ``ExportError``.
        include_failed_images: export images that failed to process, with empty label files.

    Raises:
        ExportError: bad options, an unsafe path, two images sharing one label file, or a target
            folder that an earlier labelgen export did not write.
    """
    for name, value, allowed in (("task", task, TASKS), ("multipart", multipart, MULTIPART),
                                 ("images", images, IMAGE_MODES)):
        if value not in allowed:
            raise ExportError(f"YOLO export: {name} must be one of {list(allowed)}; got {value!r}")
    out = _prepare_out_dir(out_dir, split)
    with export_lock(out, "YOLO export"):
        report = _export_locked(source, out, split, images, YoloExportReport(
            str(out), split, task, multipart, images, list(source.class_names),
            os.path.abspath(images_root or source.images_root()), include_failed_images))
    if not report.labels_found_by_trainers:
        log.warning("YOLO labels in %s will not be found by trainers: they look for them at the images root %s"
                    " with /images/ replaced by /labels/; export into that dataset root or place images",
                    out / "labels" / split, report.images_root)
    return report


def _export_locked(source: ExportSource, out: Path, split: str, images: str,
                   report: YoloExportReport) -> YoloExportReport:
    """The export proper, with the folder's lock held."""
    kinds = ("labels", "confidence") + (("images",) if images != "none" else ())
    report.stale_temps_removed = remove_stale_export_temps(out, (REPORT_NAME, "data.yaml"))
    report.stale_temps_removed += sum(remove_staged_leftovers(out / kind / split, any_writer=True) for kind in kinds)
    owned = _previously_owned(out)
    _check_targets(out, split, kinds, owned, report)
    report.incomplete = log_incomplete(source, f"YOLO export {out}")
    with contextlib.ExitStack() as stack:  # each folder is swapped in as the stack unwinds: labels first
        staging = {kind: stack.enter_context(staged_folder(out / kind / split, f"the YOLO {kind} folder",
                                                           note=EXPORT_NOTE)) for kind in reversed(kinds)}
        for row in source:
            _export_row(row, staging, report)
        report.stale_label_files_removed = _count_missing(out / "labels" / split, staging["labels"])
        report.labels_found_by_trainers = images != "none" or _trainers_find_labels(report.images_root, out, split)
        report.owned_folders = sorted({f for f in owned if (out / f).exists()} | {f"{k}/{split}" for k in kinds})
        report.data_yaml = str(out / "data.yaml")
        write_json_atomic(out / REPORT_NAME, dataclasses.asdict(report), "YOLO export report",  # ownership first
                          note=EXPORT_NOTE)
    _write_data_yaml(out, report)
    return report


# -- one image ------------------------------------------------------------------------------------
def _export_row(row: Row, staging: dict[str, Path], report: YoloExportReport) -> None:
    if row.instances is None:
        if not report.include_failed_images:
            report.failed_images_skipped += 1
            return
        report.failed_images_included += 1
    rel = relative_to_root(row.image.uri, report.images_root)
    if "images" in PurePosixPath(rel).parts[:-1]:
        raise ExportError(f"image {row.image.uri} has a folder named 'images' below the images root"
                          f" {report.images_root}; trainers would look for its labels in the wrong place."
                          " Pass an images root below that folder")
    label_rel = PurePosixPath(rel).with_suffix(".txt").as_posix()
    label_path = safe_join(staging["labels"], label_rel)
    if label_path.exists():
        raise ExportError(f"two images share the label file {label_rel} (same name, different extension);"
                          f" the second is {row.image.uri}. Rename one of them")
    lines, confidences = _label_lines(row.instances, report) if row.instances is not None else ([], [])
    _write_lines(label_path, lines)
    _write_lines(safe_join(staging["confidence"], label_rel), confidences)
    report.label_files += 1
    report.empty_label_files += not lines
    report.lines += len(lines)
    if "images" in staging:
        _place_image(row.image.uri, safe_join(staging["images"], rel), report.images_mode)


def _label_lines(instances: Instances, report: YoloExportReport) -> tuple[list[str], list[str]]:
    """Label lines and the aligned confidence lines of one image."""
    confidence = instances.scores.get("confidence")
    if confidence is None:
        report.instances_without_confidence += len(instances)
    lines, confidences = [], []
    for i in range(len(instances)):
        class_id = 0 if instances.class_ids is None else int(instances.class_ids[i])
        if class_id >= len(report.class_names):
            raise ExportError(f"class id {class_id} is outside the run's {len(report.class_names)} class names")
        if report.task == "detect":
            shapes = _box_shapes(instances.boxes_xyxy[i], instances.width, instances.height)
        else:
            shapes = _mask_shapes(instances.masks_rle[i], instances.height, instances.width, report)
        report.instances += 1
        report.instances_without_shape += not shapes
        score = 1.0 if confidence is None else float(confidence[i])
        for values in shapes:
            lines.append(f"{class_id} " + " ".join(f"{v:.6f}" for v in values))
            confidences.append(f"{score:.6f}")
    return lines, confidences


def _box_shapes(box_xyxy: np.ndarray, width: int, height: int) -> list[np.ndarray]:
    """``[cx, cy, w, h]`` normalised, or nothing for a box of zero size inside the frame."""
    x1, x2 = np.clip(box_xyxy[[0, 2]].astype(np.float64), 0, width)
    y1, y2 = np.clip(box_xyxy[[1, 3]].astype(np.float64), 0, height)
    if x2 <= x1 or y2 <= y1:
        return []
    return [np.array([(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height])]


def _mask_shapes(rle: RLE, height: int, width: int, report: YoloExportReport) -> list[np.ndarray]:
    """Flat normalised polygons ``[x1, y1, ..., xn, yn]`` for one mask under the multi-part policy."""
    mask = rles_to_masks([rle], height, width)[0]
    parts, areas, degenerate = mask_parts(mask)
    report.degenerate_parts_dropped += degenerate
    if len(parts) > 1:
        report.multipart_instances += 1
        if report.multipart == "largest":
            report.parts_dropped += len(parts) - 1
            report.area_fraction_lost += float(sum(areas[1:]) / mask.sum())
            parts = parts[:1]
        elif report.multipart == "merge":
            report.parts_merged += len(parts)
            parts = [merge_parts(parts)]
        else:
            report.parts_split += len(parts)
    scale = np.array([width, height], dtype=np.float64)
    return [np.clip(part / scale, 0.0, 1.0).reshape(-1) for part in parts]


# -- polygons -------------------------------------------------------------------------------------
def _prepare_out_dir(out_dir: str | os.PathLike[str], split: str) -> Path:
    if (not isinstance(split, str) or not split or "/" in split or "\\" in split or split.startswith(".")
            or split in ("images", "labels")):
        raise ExportError(f"YOLO export: split must be one folder name such as 'train' (not 'images' or"
                          f" 'labels'); got {split!r}")
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"YOLO export target {out} is a file; expected a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise store_write_error(exc, out, "the YOLO export folder", note=EXPORT_NOTE) from exc
    return out


def _previously_owned(out: Path) -> set[str]:
    """Folders an earlier labelgen YOLO export into ``out`` wrote (from its report; a symlink there is
    not read: ownership is only what an export wrote into this folder itself)."""
    try:
        fd = os.open(out / REPORT_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as handle:
            report = json.loads(handle.read(1 << 24).decode("utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        return set()
    return {str(f) for f in report.get("owned_folders", [])}


def _check_targets(out: Path, split: str, kinds: Sequence[str], owned: set[str], report: YoloExportReport) -> None:
    """Refuse to replace folders this exporter did not write, or the images being exported."""
    for kind in kinds:
        target = out / kind / split
        if (target.exists() or target.is_symlink()) and f"{kind}/{split}" not in owned:
            raise ExportError(
                f"{target} exists and was not written by a labelgen YOLO export (see {out / REPORT_NAME});"
                " choose an empty --out folder or remove it" +
                ("; to label images in place use --images none" if kind != "confidence" else ""))
        safe_join(out, f"{kind}/{split}")
    images_target = (out / "images" / split).resolve()
    root = Path(report.images_root).resolve()
    if report.images_mode != "none" and (root == images_target or images_target in root.parents):
        raise ExportError(f"the images root {root} is inside {images_target}, which this export replaces;"
                          " use --images none to export labels for images in place")


def _count_missing(previous: Path, current: Path) -> int:
    """Files under ``previous`` with no counterpart under ``current``."""
    if not previous.is_dir():
        return 0
    return sum(1 for path in previous.rglob("*")
               if path.is_file() and not (current / path.relative_to(previous)).exists())


def _write_lines(path: Path, lines: list[str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with create_exclusive(path) as handle:  # in the fresh staging folder: a new file, never through a link
            handle.write("".join(line + "\n" for line in lines).encode("utf-8"))
    except OSError as exc:
        raise store_write_error(exc, path, "a YOLO label file", note=EXPORT_NOTE) from exc


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _place_image(uri: str, target: Path, mode: str) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if mode == "symlink":
            os.symlink(os.path.abspath(uri), target)  # fails on an existing name: never replaces anything
        else:
            with open(uri, "rb") as source, create_exclusive(target) as copy:
                shutil.copyfileobj(source, copy, 1 << 20)
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS:
            raise store_write_error(exc, target, f"a {mode} of image {uri}", note=EXPORT_NOTE) from exc
        raise ExportError(f"cannot {mode} image {uri} to {target}: {exc}; check the file, or use --images"
                          " symlink / none") from exc


def _trainers_find_labels(images_root: str, out: Path, split: str) -> bool:
    """Whether ``/images/`` -> ``/labels/`` on an image under ``images_root`` lands in ``OUT/labels/SPLIT``."""
    root = os.path.abspath(images_root) + os.sep  # as data.yaml gives it to trainers
    marker = f"{os.sep}images{os.sep}"
    if marker not in root:
        return False
    head, tail = root.rsplit(marker, 1)
    return Path(head + f"{os.sep}labels{os.sep}" + tail).resolve() == (out / "labels" / split).resolve()


def _write_data_yaml(out: Path, report: YoloExportReport) -> None:
    images = f"images/{report.split}" if report.images_mode != "none" else report.images_root
    data = {"path": str(out), "train": images, "val": images, "nc": len(report.class_names),
            "names": dict(enumerate(report.class_names))}
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    write_bytes_atomic(out / "data.yaml", text.encode("utf-8"), "data.yaml", note=EXPORT_NOTE)


__all__: Sequence[str] = ["YoloExportReport", "export_yolo", "mask_parts", "merge_parts"]
