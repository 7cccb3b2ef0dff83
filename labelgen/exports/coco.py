"""COCO instances JSON export, streamed: memory does not grow with the dataset.

``export_coco`` iterates the source once, writing image entries to one temp file and annotations
to another beside the target, then concatenates them into ``annotations.json`` with an atomic
rename; the temp files are always removed. ``export_report.json`` (a ``CocoExportReport``) is
written after it. The export holds the folder's lock (``paths.export_lock``: a second export into
the same folder is refused at once), removes the temp files that killed exports left there, and
creates its own exclusively under unpredictable names (a planted symlink is never followed). A run
with pending or failed shards is exported as far as it is committed, with a logged warning and
``incomplete`` in the report. OS errors (disk full, file size limit) are ``StoreWriteError``. Ids are stable: image ``id`` = plan position + 1; annotation ``id`` = 1, 2, ...
in export order; two exports of the same source give identical bytes (no timestamps).

Each annotation has ``segmentation`` (compressed RLE with ``str`` counts, holes kept; or
polygons), ``area`` (pixels of the mask, also in polygon mode), ``bbox`` (XYWH, tight box of the
mask), ``iscrowd`` 0, ``score`` (the ``confidence`` column, when present) and ``attributes``
(``{"scores": {column: value}, "instance": {attribute: value}}``: labelgen's extras, which COCO
readers ignore). Masks with no pixels are skipped (counted in the report).

Polygon mode: each outer boundary of the mask becomes one polygon, traced along pixel edges (on a
2x upsampled copy, vertices 1/4 pixel inside the edge), so pycocotools rasterises a hole-free mask
back exactly. **Holes are filled** (COCO polygons are unioned and cannot subtract), so a mask with
holes has IoU < 1. Every object's IoU between its rasterised polygons and its mask is checked; if
any is below ``polygon_tolerance``, nothing is written (the folder is left as it was) and
``ExportError`` names the worst objects; the error's ``report`` attribute holds the report, whose
``polygon_worst`` lists the 25 lowest-IoU objects (every object under tolerance when <= 25).
"""
from __future__ import annotations

import contextlib
import heapq
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Literal

from pycocotools import mask as coco_mask

from .. import __version__
from ..atomic import EXPORT_NOTE, atomic_file, create_temp, json_bytes, store_write_error, write_json_atomic
from ..errors import ExportError
from ..structures.instances import Instances
from ..structures.masks import rle_areas, rle_to_pycocotools
from .paths import export_lock, relative_to_root, remove_stale_export_temps, safe_join
from .polygons import mask_to_polygons, polygons_iou
from ..structures.rows import Row
from .source import ExportSource, log_incomplete

ANNOTATIONS_FILE = "annotations.json"
REPORT_FILE = "export_report.json"
WORST_KEPT = 25  # lowest-IoU objects listed in the report (all under tolerance when there are <= 25)


@dataclass
class CocoExportReport:
    """What ``export_coco`` wrote (also ``export_report.json``)."""

    annotations_json: str
    mask_format: str
    images: int = 0
    annotations: int = 0
    categories: int = 0
    skipped_failed_images: int = 0  # failed images left out (include_failed_images=False)
    included_failed_images: int = 0  # failed images written without annotations
    skipped_empty_masks: int = 0
    polygon_tolerance: float | None = None
    polygon_iou_min: float | None = None
    polygon_iou_mean: float | None = None
    polygons_below_tolerance: int = 0
    # the WORST_KEPT lowest-IoU objects, lowest first: {annotation_id, image_id, file_name, iou}
    polygon_worst: list[dict] = field(default_factory=list)
    # the run's shards not exported: {pending_shards, failed_shards, images_not_exported}; None if complete
    incomplete: dict | None = None
    stale_temps_removed: int = 0  # temp files of killed exports removed from the folder first


def export_coco(source: ExportSource, out_dir: str | os.PathLike[str], *, images_root: str | None = None,
                mask_format: Literal["rle", "polygon"] = "rle", polygon_tolerance: float = 0.9,
                include_failed_images: bool = False) -> CocoExportReport:
    """Write ``out_dir/annotations.json`` and ``out_dir/export_report.json``; return the report.

    ``images_root``: folder that ``file_name`` is relative to (default ``source.images_root()``); an
    image outside it is an ``ExportError``. ``polygon_tolerance`` (0..1): minimum per-object IoU of
    the polygons against the mask in polygon mode. ``include_failed_images``: also list images that
    failed to process (with no annotations; width/height null when never read).
    """
    if mask_format not in ("rle", "polygon"):
        raise ExportError(f"mask_format must be 'rle' or 'polygon'; got {mask_format!r}")
    if not 0.0 <= polygon_tolerance <= 1.0:
        raise ExportError(f"polygon_tolerance must be in [0, 1]; got {polygon_tolerance!r}")
    out = _prepare_out_dir(out_dir)
    with export_lock(out, "COCO export"):
        stale = remove_stale_export_temps(out, (ANNOTATIONS_FILE, REPORT_FILE))
        target = safe_join(out, ANNOTATIONS_FILE)
        report_path = safe_join(out, REPORT_FILE)
        writer = _CocoWriter(source, images_root or source.images_root(), mask_format, polygon_tolerance,
                             include_failed_images, str(target))
        writer.report.stale_temps_removed = stale
        writer.report.incomplete = log_incomplete(source, f"COCO export {target}")
        parts: list[Path] = []
        try:
            with contextlib.ExitStack() as stack:
                handles = []
                for name in ("images", "anns"):  # ANNOTATIONS_FILE.images.tmp-PID-RANDOM, created exclusively
                    handle, part = create_temp(target, name)
                    parts.append(part)
                    handles.append(stack.enter_context(handle))
                writer.write_parts(*handles)
            report = writer.finish()
            if report.polygons_below_tolerance:
                raise _tolerance_error(report)
            _concatenate(target, writer.head(), parts)
        except OSError as exc:
            raise store_write_error(exc, target, "COCO annotations", note=EXPORT_NOTE) from exc
        finally:
            for part in parts:
                with contextlib.suppress(OSError):
                    os.unlink(part)
        write_json_atomic(report_path, asdict(report), "COCO export report", note=EXPORT_NOTE)
    return report


def _prepare_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"COCO export target {out} is a file; expected a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise store_write_error(exc, out, "the COCO export folder", note=EXPORT_NOTE) from None
    return out


class _CocoWriter:
    """One pass over the source: image and annotation entries as JSON lines, plus the statistics."""

    def __init__(self, source: ExportSource, images_root: str, mask_format: str, tolerance: float,
                 include_failed: bool, target: str):
        self.source, self.images_root, self.mask_format = source, images_root, mask_format
        self.include_failed = include_failed
        names = source.class_names
        self.categories = [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(names)]
        self.report = CocoExportReport(target, mask_format, categories=len(names),
                                       polygon_tolerance=tolerance if mask_format == "polygon" else None)
        self._iou_sum, self._iou_count = 0.0, 0
        self._worst: list[tuple[float, int, dict]] = []  # max-heap by -iou, WORST_KEPT entries

    def write_parts(self, images: BinaryIO, annotations: BinaryIO) -> None:
        first_image = first_annotation = True
        for image_id, row in enumerate(self.source, start=1):  # stable ids: position in plan order + 1
            if row.instances is None and not self.include_failed:
                self.report.skipped_failed_images += 1
                continue
            images.write(_line(self._image_entry(image_id, row), first_image))
            first_image = False
            for entry in self._annotations(image_id, row):
                annotations.write(_line(entry, first_annotation))
                first_annotation = False

    def head(self) -> dict[str, Any]:
        return {"info": {"description": f"labelgen export of run {self.source.run_id}",
                         "labelgen_version": __version__, "run_id": self.source.run_id,
                         "mask_format": self.mask_format},
                "licenses": [], "categories": self.categories}

    def finish(self) -> CocoExportReport:
        report = self.report
        if self._iou_count:
            report.polygon_iou_min = min(-neg for neg, _, _ in self._worst)
            report.polygon_iou_mean = self._iou_sum / self._iou_count
        report.polygon_worst = [entry for _, _, entry in sorted(self._worst, key=lambda w: (-w[0], -w[1]))]
        return report

    def _image_entry(self, image_id: int, row: Row) -> dict[str, Any]:
        self.report.images += 1
        self.report.included_failed_images += row.instances is None
        return {"id": image_id, "file_name": relative_to_root(row.image.uri, self.images_root),
                "width": row.image.width, "height": row.image.height}

    def _annotations(self, image_id: int, row: Row) -> Iterator[dict[str, Any]]:
        instances = row.instances
        if instances is None or not len(instances):
            return
        category_ids = self._category_ids(instances, row)
        areas = rle_areas(instances.masks_rle)
        boxes = coco_mask.toBbox([rle_to_pycocotools(r) for r in instances.masks_rle])
        for i, rle in enumerate(instances.masks_rle):
            if areas[i] == 0:
                self.report.skipped_empty_masks += 1
                continue
            self.report.annotations += 1
            entry = {"id": self.report.annotations, "image_id": image_id, "category_id": category_ids[i],
                     "segmentation": self._segmentation(rle, instances, image_id, row), "area": int(areas[i]),
                     "bbox": [float(v) for v in boxes[i]], "iscrowd": 0,
                     "attributes": {"scores": {k: float(v[i]) for k, v in sorted(instances.scores.items())},
                                    "instance": {k: v[i] for k, v in sorted(instances.attributes.items())}}}
            if "confidence" in instances.scores:
                entry["score"] = float(instances.scores["confidence"][i])
            yield entry

    def _category_ids(self, instances: Instances, row: Row) -> list[int]:
        if self.source.class_agnostic or instances.class_ids is None:
            return [1] * len(instances)
        ids = instances.class_ids
        if ids.size and ids.max() >= len(self.categories):
            raise ExportError(f"image {row.image.image_id}: class id {int(ids.max())} is outside the run's"
                              f" {len(self.categories)} class names; the run's labels are inconsistent")
        return [int(c) + 1 for c in ids]

    def _segmentation(self, rle: dict, instances: Instances, image_id: int, row: Row) -> Any:
        if self.mask_format == "rle":
            return {"size": list(rle["size"]), "counts": rle["counts"]}
        mask = coco_mask.decode(rle_to_pycocotools(rle)).astype(bool)
        polygons = mask_to_polygons(mask)
        iou = polygons_iou(polygons, rle, instances.height, instances.width)
        self._note_iou(iou, image_id, row)
        return polygons

    def _note_iou(self, iou: float, image_id: int, row: Row) -> None:
        self._iou_sum += iou
        self._iou_count += 1
        if iou < self.report.polygon_tolerance:
            self.report.polygons_below_tolerance += 1
        entry = {"annotation_id": self.report.annotations, "image_id": image_id,
                 "file_name": relative_to_root(row.image.uri, self.images_root), "iou": round(float(iou), 6)}
        key = (-float(iou), -self.report.annotations, entry)  # ties: the earlier annotation is "worse"
        if len(self._worst) < WORST_KEPT:
            heapq.heappush(self._worst, key)
        elif key[:2] > self._worst[0][:2]:
            heapq.heapreplace(self._worst, key)


def _tolerance_error(report: CocoExportReport) -> ExportError:
    worst = ", ".join(f"annotation {w['annotation_id']} in {w['file_name']} (IoU {w['iou']:.3f})"
                      for w in report.polygon_worst[:5])
    error = ExportError(
        f"{report.polygons_below_tolerance} object(s) are approximated by polygons with IoU below "
        f"{report.polygon_tolerance} (min {report.polygon_iou_min:.3f}); worst: {worst}. Nothing was written."
        " Use --mask-format rle (exact, keeps holes) or lower --polygon-tolerance.")
    error.report = report  # type: ignore[attr-defined]
    return error


def _concatenate(target: Path, head: dict[str, Any], parts: list[Path]) -> None:
    """``{head..., "images": [part0], "annotations": [part1]}`` written atomically."""
    with atomic_file(target, "COCO annotations", note=EXPORT_NOTE) as handle:
        handle.write(json_bytes(head, sort_keys=False)[:-1])  # keys in head's order
        for key, part in zip(("images", "annotations"), parts):
            handle.write(f', "{key}": [\n'.encode())
            with open(part, "rb") as chunk:
                shutil.copyfileobj(chunk, handle, 1 << 20)
            handle.write(b"\n]")
        handle.write(b"}\n")


def _line(entry: dict[str, Any], first: bool) -> bytes:
    data = json_bytes(entry, separators=(",", ":"))  # non-UTF-8 file names are written \\udcXX-escaped
    return data if first else b",\n" + data


__all__ = ["CocoExportReport", "export_coco", "mask_to_polygons", "polygons_iou"]
