"""Predictions made by other tools, imported as a run: COCO JSON with ``score`` and YOLO txt with a
trailing confidence column. The result is an ``ImportedDataset`` (see ``importers``) that
``write_imported_run`` writes as a run directory, so review, calibration, filter and export work on any
labeler's output.

* **COCO, full dataset file**: an object with ``images``, ``annotations`` and ``categories`` whose every
  annotation has a ``score`` (a labelgen COCO export is one).
* **COCO, results list**: the list pycocotools' ``loadRes`` reads (``image_id``, ``category_id``,
  ``segmentation`` or ``bbox``, ``score``), plus the dataset file it refers to (``dataset_json``), which
  gives images, sizes and categories. Images without a result have no instances.
* **YOLO**: ``cls cx cy w h conf`` or ``cls x1 y1 ... xn yn conf`` (Ultralytics ``save_conf=True``),
  laid out as a YOLO dataset (``import_yolo``'s layouts).

Scores: ``confidence`` is the ``score`` (YOLO: the last column); numeric ``attributes.scores`` columns
present on every annotation of an image (a labelgen export) are kept as score columns. A score must be a
finite number in [0, 1]. The run's ``source.import`` section says where its labels came from
(``"labels": "predictions"``, the predictions file, its layout). The JSON is loaded whole (as for
ground truth); masks are decoded one image at a time. Bad input raises ``ExportError`` naming the file
and the annotation or line.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Sequence


from ..errors import ExportError
from ..structures.instances import ImageRecord, Instances
from ..structures.rows import Row
from .importers import (ImportedDataset, _coco_instances, _coco_records, _load_coco_json, _parse_yolo_line,
                        yolo_import_layout, yolo_label_lines, yolo_shape_to_rle)
from .importers import _instances as _make_instances

PREDICTIONS = "predictions"


# -- COCO -----------------------------------------------------------------------------------------
def import_coco_predictions(predictions_json: str | os.PathLike[str], *,
                            dataset_json: str | os.PathLike[str] | None = None,
                            images_root: str | os.PathLike[str] | None = None) -> ImportedDataset:
    """Predictions in COCO JSON: a full dataset file with ``score`` on every annotation, or a results
    list plus ``dataset_json`` (the dataset file its ``image_id`` / ``category_id`` refer to).

    ``images_root``: the folder ``file_name`` is relative to (default: the dataset file's folder)."""
    pred_path = os.path.abspath(predictions_json)
    raw = _read_json(pred_path)
    if isinstance(raw, list):
        if dataset_json is None:
            raise ExportError(f"{pred_path} is a COCO results list (no images or categories); pass the dataset "
                              "file it refers to (--dataset-json GT.json)")
        data_path = os.path.abspath(dataset_json)
        data = _load_coco_json(data_path)
        annotations, layout = raw, "results"
    elif isinstance(raw, dict) and isinstance(raw.get("images"), list):
        if dataset_json is not None:
            raise ExportError(f"{pred_path} is a full COCO dataset file (it has 'images'); drop --dataset-json,"
                              " which is only for a results list")
        data_path, data, layout = pred_path, raw, "dataset"
        annotations = data.get("annotations") or []
    else:
        raise ExportError(f"{pred_path}: expected a COCO dataset object (images, annotations with score, "
                          f"categories) or a results list [{{image_id, category_id, segmentation|bbox, score}}];"
                          f" got {type(raw).__name__}")
    if not isinstance(annotations, list):
        raise ExportError(f"{pred_path}: 'annotations' must be a list; got {type(annotations).__name__}")
    root = os.path.abspath(images_root) if images_root is not None else os.path.dirname(data_path)
    categories = data.get("categories") or []
    if not isinstance(categories, list) or not categories \
            or not all(isinstance(c, dict) and "id" in c and "name" in c for c in categories) \
            or len({c["id"] for c in categories}) != len(categories):
        raise ExportError(f"{data_path}: expected a 'categories' list of {{id, name}} with unique ids")
    categories = sorted(categories, key=lambda c: c["id"])
    class_of = {c["id"]: i for i, c in enumerate(categories)}
    records, coco_ids = _coco_records(data.get("images") or [], root, data_path)
    by_image: dict[Any, list[dict]] = {coco_id: [] for coco_id in coco_ids.values()}
    crowd = 0
    for index, ann in enumerate(annotations):
        where = f"{pred_path}: annotation {index}" + (f" (id {ann['id']})" if isinstance(ann, dict) and "id" in ann
                                                      else "")
        if not isinstance(ann, dict):
            raise ExportError(f"{where}: expected an object; got {type(ann).__name__}")
        if ann.get("iscrowd"):
            crowd += 1
            continue
        if ann.get("image_id") not in by_image:
            raise ExportError(f"{where} refers to image_id {ann.get('image_id')!r}, which {data_path} does not "
                              "list; predictions must use the dataset file's image ids")
        if ann.get("category_id") not in class_of:
            raise ExportError(f"{where} has category_id {ann.get('category_id')!r}, not one of the categories "
                              f"of {data_path} ({sorted(class_of)[:10]}...)")
        score = ann.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
                or not 0.0 <= score <= 1.0:
            raise ExportError(f"{where}: expected a 'score' in [0, 1] on every prediction; got {score!r}"
                              " (ground truth without scores: import without --predictions)")
        by_image[ann["image_id"]].append({**ann, "id": ann.get("id", f"#{index}")})
    del data, raw, annotations
    spec = {"kind": "coco", "path": data_path, "images_root": root,
            "import": {"format": "coco", "labels": PREDICTIONS, "predictions": pred_path, "layout": layout,
                       "crowd_annotations_skipped": crowd}}

    def load(record: ImageRecord) -> Row:
        instances = _coco_instances(by_image[coco_ids[record.image_id]], record, class_of, pred_path)
        return Row(record, _as_predictions(instances, "coco"))

    return ImportedDataset(tuple(str(c["name"]) for c in categories), spec, tuple(records), load)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read COCO predictions JSON {path}: {exc}") from None


def _as_predictions(instances: Instances, fmt: str) -> Instances:
    return dataclasses.replace(instances, provenance={"generator": "import", "format": fmt, "labels": PREDICTIONS})


# -- YOLO -----------------------------------------------------------------------------------------
def import_yolo_predictions(root: str | os.PathLike[str], *, split: str | None = None,
                            task: Literal["auto", "detect", "segment"] = "auto",
                            class_names: Sequence[str] | None = None) -> ImportedDataset:
    """YOLO label files whose every line ends with a confidence in [0, 1] (``cls cx cy w h conf`` or
    ``cls x1 y1 ... xn yn conf``); layout, ``split``, ``task`` and ``class_names`` as ``import_yolo``."""
    layout = yolo_import_layout(root, split, task, class_names)
    spec = {"labels": PREDICTIONS, "predictions": str(layout.labels_dir), "layout": "confidence column"}
    return layout.dataset(task, split, spec, _read_yolo_predictions)


def _read_yolo_predictions(path: Path, record: ImageRecord, task: str, num_classes: int) -> Instances:
    height, width = int(record.height), int(record.width)
    lines = yolo_label_lines(path)
    rles, boxes, class_ids, confidence = [], [], [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        tokens = line.split()
        if len(tokens) % 2:  # cls + 4 box values or cls + 2n points: odd; with a confidence: even
            raise ExportError(f"{where}: expected a trailing confidence column ('cls cx cy w h conf' or 'cls x1 y1"
                              f" ... xn yn conf'); got {len(tokens)} values, an odd count, as in labels without"
                              " confidence (ground truth: import without --predictions)")
        try:
            score = float(tokens[-1])
        except ValueError:
            raise ExportError(f"{where}: the confidence (last column) must be a number; got {tokens[-1]!r}") from None
        if not math.isfinite(score) or not 0.0 <= score <= 1.0:
            raise ExportError(f"{where}: the confidence (last column) must be in [0, 1]; got {tokens[-1]!r}")
        class_id, coords = _parse_yolo_line(" ".join(tokens[:-1]), where, task, num_classes)
        rle, box = yolo_shape_to_rle(coords, height, width)
        rles.append(rle)
        boxes.append(box)
        class_ids.append(class_id)
        confidence.append(score)
    instances = _make_instances(height, width, rles, boxes, class_ids, {"confidence": confidence}, "yolo")
    return _as_predictions(instances, "yolo")


__all__ = ["PREDICTIONS", "import_coco_predictions", "import_yolo_predictions"]
