"""COCO-style evaluation of a run's labels against ground truth, with pycocotools' ``COCOeval``. No torch.

**Ground truth** (``load_ground_truth``): a COCO instances JSON (read as is: polygons or RLE, its
``area``, ``iscrowd`` regions kept as COCO's ignore regions), a YOLO dataset (``import_yolo``), or a
run directory (e.g. from ``labelgen import``). Ground-truth images that failed to open are left out.

**Images** match by file name relative to each side's images root (the source's ``images_root()``;
COCO ``file_name``; YOLO: the path under its images folder): (1) equal names; (2) the prediction's name
or image_id equal to the ground truth's image_id (for COCO JSON, its numeric ``id``); (3) a unique path
suffix of either side (``train2017/a.jpg`` vs ``a.jpg``). Prediction images with no match (or whose
match is taken) are counted and listed, not evaluated.

**Which ground-truth images count**: by default only those the run has a committed row for (labelled,
or failed: a failed image is the run's miss), so a partial or interrupted run is scored on what it
labelled instead of every image it never reached counting as missed; ``EvalResult.scope`` says
"evaluated on N of M ground-truth images" (also in ``images`` and the payload). ``all_gt=True``
(``labelgen eval --all-gt``) evaluates every ground-truth image: those without a row are misses.

**Categories**: class-aware maps prediction classes to ground-truth categories by name (other classes
are excluded and counted in ``unknown_classes``); class-agnostic gives every annotation and detection
category 1 (chosen over ``params.useCats = 0`` so per-category arrays stay well-defined). Default:
class-aware when the run's class names overlap the ground truth's; ``EvalResult.class_aware`` says which.

**Detections** go through ``COCO.loadRes`` per IoU type in COCO's result format for it: ``segm`` gets
compressed RLE (area = mask pixels), ``bbox`` the ``boxes_xyxy`` as XYWH (area = box area). Score:
the ``confidence`` column, 1.0 without one.

**Metrics** from ``COCOeval.stats``, rounded to 12 decimals (``None`` where COCO gives -1: no ground truth):
0 AP (IoU .50:.95), 1 AP50, 2 AP75, 3..5 AP_small/medium/large (at max_dets[2]), 6..8 AR@max_dets[0..2],
9..11 AR_small/medium/large. Per-class AP and the precision-recall curves (IoU .50 and .75, area all,
max_dets[2], mean over categories with ground truth) come from ``eval["precision"]`` ``[T, R, K, A, M]``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..atomic import write_bytes_atomic
from ..errors import ConfigError, ExportError, ImageDecodeError
from ..exports.paths import relative_to_root
from ..exports.source import ExportSource, open_export_source
from ..postprocess.filter_config import FilterConfig
from ..exports.importers import image_size, import_yolo
from ..structures.instances import ImageRecord, Instances
from ..structures.masks import rle_areas, rle_to_json, rle_to_pycocotools
from ..structures.rows import Row

IOU_TYPES = ("segm", "bbox")
UNMATCHED_LISTED = 20  # prediction images not in the ground truth listed by name (all are counted)
_AGNOSTIC = "object"


@dataclass(frozen=True)
class GroundTruth:
    """Ground truth in COCO terms. ``images``: ``{"id": 1.., "file_name", "width", "height", "ids"}``
    (``ids``: other names it may be matched by); ``annotations``: ``{"image_id", "class" (name or None),
    "segmentation" (compressed RLE, str counts), "bbox" (XYWH pixels), "area", "iscrowd"}``."""

    description: dict
    class_names: tuple[str, ...] | None  # None: class-agnostic ground truth
    images: tuple[dict, ...]
    annotations: tuple[dict, ...]
    failed_images: int = 0


@dataclass
class EvalResult:
    """What ``evaluate`` found. Metric values are floats in [0, 1] or ``None`` (no ground truth)."""

    class_aware: bool
    iou_types: tuple[str, ...]
    max_dets: tuple[int, ...]
    categories: list[str]
    metrics: dict[str, dict[str, float | None]]  # iou type -> metric name -> value
    per_class_ap: dict[str, dict[str, float | None]]  # iou type -> category -> AP (empty if agnostic)
    pr_curves: dict[str, dict[str, list[float] | None]]  # iou type -> recall, precision_iou50, precision_iou75
    images: dict[str, int]
    instances: dict[str, int]
    unknown_classes: dict[str, int]  # prediction class -> detections excluded (class-aware)
    unmatched_prediction_images: list[str]  # the first UNMATCHED_LISTED; images["unmatched_predictions"] counts all
    ground_truth: dict = field(default_factory=dict)
    predictions: dict = field(default_factory=dict)
    all_gt: bool = False  # every ground-truth image counted (else only those the run has rows for)
    scope: str = ""  # "evaluated on N of M ground-truth images ...": one line for the user

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists; plain JSON types only

    def table(self) -> str:
        """Fixed-width text: one row per metric, one column per IoU type, then per-class AP and notes."""
        lines = [f"ground truth: {self.ground_truth.get('kind')} {self.ground_truth.get('path')}",
                 f"mode: {'class-aware' if self.class_aware else 'class-agnostic'} ({len(self.categories)}"
                 f" categories); images: {self.images['matched']} matched of {self.images['ground_truth']}"
                 f" ground truth; instances: {self.instances['evaluated']} predicted,"
                 f" {self.instances['ground_truth']} ground truth",
                 f"{'metric':<16}" + "".join(f"{t:>9}" for t in self.iou_types)]
        lines += [f"{name:<16}" + "".join(_cell(self.metrics[t][name]) for t in self.iou_types)
                  for name in self.metrics[self.iou_types[0]]]
        if self.class_aware:
            lines.append("AP per class")
            lines += [f"  {name[:14]:<14}" + "".join(_cell(self.per_class_ap[t][name]) for t in self.iou_types)
                      for name in self.categories if self.per_class_ap[self.iou_types[0]][name] is not None]
        if self.images["unmatched_predictions"]:
            listed = ", ".join(self.unmatched_prediction_images)
            lines.append(f"note: {self.images['unmatched_predictions']} prediction image(s) not in the ground truth"
                         f" ({self.instances['unmatched_image']} instances, not evaluated): {listed}")
        if self.unknown_classes:
            listed = ", ".join(f"{name} ({count})" for name, count in self.unknown_classes.items())
            lines.append(f"note: prediction classes not in the ground truth, excluded: {listed}")
        return "\n".join(lines)


def _cell(value: float | None) -> str:
    return f"{'-':>9}" if value is None else f"{value:>9.3f}"


# -- ground truth ---------------------------------------------------------------------------------
def load_ground_truth(gt: str | os.PathLike[str], *, split: str | None = None) -> GroundTruth:
    """Read a COCO JSON file, a labelgen run directory, or a YOLO dataset (``split``: see ``import_yolo``)."""
    path = Path(os.path.abspath(gt))
    if path.is_file() and path.suffix.lower() == ".json":
        return _gt_from_coco_json(path)
    if (path / "run.json").is_file():
        source = open_export_source(path)
        root = source.images_root()
        keyed = ((row, _relative_name(row.image, root)) for row in source)
        names = None if source.class_agnostic else tuple(source.class_names)
        return _gt_from_rows(keyed, names, {"kind": "run", "path": str(path), "run_id": source.run_id})
    if path.is_dir() or path.suffix.lower() in (".yaml", ".yml"):
        dataset = import_yolo(path, split=split)
        keyed = ((row, row.image.image_id) for row in dataset)
        return _gt_from_rows(keyed, dataset.class_names, {"kind": "yolo", "path": str(path), "split": split})
    raise ExportError(f"ground truth {path} is neither a COCO JSON file, a run directory (run.json) nor a YOLO"
                      " dataset folder / data.yaml")


def _gt_from_rows(keyed: Iterable[tuple[Row, str]], class_names: Sequence[str] | None,
                  description: dict) -> GroundTruth:
    """Ground truth from rows, each with the file name it is matched by."""
    images, annotations, failed = [], [], 0
    for row, key in keyed:
        record, instances = row.image, row.instances
        if instances is None:
            failed += 1
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": key, "width": instances.width, "height": instances.height,
                       "ids": [record.image_id]})
        for rle, bbox, area, class_id in _instance_rows(instances):
            name = None if class_names is None or class_id is None else class_names[class_id]
            annotations.append({"image_id": image_id, "class": name, "segmentation": rle, "bbox": bbox,
                                "area": area, "iscrowd": 0})
    names = tuple(class_names) if class_names is not None else None
    return GroundTruth(description, names, tuple(images), tuple(annotations), failed)


def _gt_from_coco_json(path: Path) -> GroundTruth:
    try:
        with _quiet():
            coco = COCO(str(path))
        categories = {c["id"]: str(c["name"]) for c in sorted(coco.dataset.get("categories") or [],
                                                               key=lambda c: c["id"])}
        images = [_coco_image(entry, number, path) for number, entry in enumerate(coco.dataset["images"], 1)]
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        raise ExportError(f"cannot read COCO JSON {path} (expected 'images', 'annotations' and 'categories'"
                          f" lists): {type(exc).__name__}: {exc}") from None
    number_of = {entry["id"]: number for number, entry in enumerate(coco.dataset["images"], 1)}
    annotations = []
    for ann in coco.dataset.get("annotations") or []:
        if ann.get("image_id") not in number_of or ann.get("category_id") not in categories:
            raise ExportError(f"{path}: annotation {ann.get('id')} refers to an unknown image_id"
                              f" {ann.get('image_id')!r} or category_id {ann.get('category_id')!r}")
        if not ann.get("segmentation") and ann.get("bbox"):  # box-only: the box polygon, as loadRes does
            x, y, w, h = ann["bbox"]
            ann["segmentation"] = [[x, y, x, y + h, x + w, y + h, x + w, y]]
        try:
            rle = coco.annToRLE(ann)  # polygons and uncompressed RLE -> compressed
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ExportError(f"{path}: annotation {ann.get('id')} has no usable segmentation: {exc}") from None
        annotations.append({"image_id": number_of[ann["image_id"]], "class": categories[ann["category_id"]],
                            "segmentation": rle_to_json(rle), "iscrowd": int(bool(ann.get("iscrowd"))),
                            "bbox": [float(v) for v in ann.get("bbox") or coco_mask.toBbox(rle)],
                            "area": float(ann["area"] if ann.get("area") is not None else coco_mask.area(rle))})
    return GroundTruth({"kind": "coco", "path": str(path)}, tuple(categories.values()) or None, tuple(images),
                       tuple(annotations))


def _coco_image(entry: dict, number: int, path: Path) -> dict:
    """A COCO image entry (sizes read from the file when the JSON lacks them, in place for ``annToRLE``)."""
    if not entry.get("width") or not entry.get("height"):
        try:
            entry["width"], entry["height"] = image_size(str(path.parent / str(entry["file_name"])))
        except ImageDecodeError as exc:
            raise ExportError(f"{path}: image {entry.get('id')} has no width/height and {exc}") from None
    return {"id": number, "file_name": str(entry["file_name"]), "width": int(entry["width"]),
            "height": int(entry["height"]), "ids": [str(entry.get("id"))]}


# -- evaluation -----------------------------------------------------------------------------------
def evaluate(source: ExportSource, gt: str | os.PathLike[str] | GroundTruth, *,
             iou_types: Sequence[str] = IOU_TYPES, class_agnostic: bool | None = None,
             max_dets: Sequence[int] = (1, 10, 100), gt_split: str | None = None,
             all_gt: bool = False) -> EvalResult:
    """COCO AP/AR of ``source``'s labels against ``gt`` (path, or ``load_ground_truth``'s result).

    ``class_agnostic``: None picks class-aware when both sides have overlapping class names.
    ``max_dets``: three increasing detection limits per image (COCO's 1, 10, 100).
    ``gt_split``: the split of a YOLO ground-truth dataset.
    ``all_gt``: evaluate every ground-truth image; by default only those the run has a row for (see the
    module doc), and ``ExportError`` when there is none."""
    iou_types, max_dets = _check_options(iou_types, max_dets)
    truth = gt if isinstance(gt, GroundTruth) else load_ground_truth(gt, split=gt_split)
    if not truth.images:
        raise ExportError(f"ground truth {truth.description.get('path')} has no usable images")
    class_aware = _choose_mode(source, truth, class_agnostic)
    categories = list(truth.class_names) if class_aware else [_AGNOSTIC]
    category_of = {name: i + 1 for i, name in enumerate(categories)}
    predictions = _collect_predictions(source, truth, category_of if class_aware else None)
    if not all_gt and not predictions.covered:
        raise ExportError(f"none of the run's {predictions.images} images match a ground-truth image"
                          f" ({len(truth.images)} in {truth.description.get('path')}); check --gt (and --gt-split),"
                          " or pass --all-gt to score every ground-truth image as missed")
    evaluated = {image["id"] for image in truth.images} if all_gt else predictions.covered
    coco_gt = _coco_ground_truth(truth, category_of if class_aware else None, categories)
    result = EvalResult(class_aware, iou_types, max_dets, categories, {}, {}, {},
                        *predictions.counts(truth, evaluated), dict(sorted(predictions.unknown.items())),
                        predictions.unmatched[:UNMATCHED_LISTED], truth.description,
                        {"run_dir": str(source.store.root), "run_id": source.run_id, "filtered_on_the_fly":
                         source.filter_config is not None, "copy": source.copy_kind and
                         f"{source.copy_kind}/{source.copy_name}"}, all_gt)
    result.scope = _scope_line(result.images, all_gt)
    for iou_type in iou_types:
        run = _run_cocoeval(coco_gt, predictions.results(iou_type), iou_type, max_dets,
                            None if all_gt else sorted(evaluated))
        result.metrics[iou_type] = _stats(run.stats, max_dets)
        precision = run.eval["precision"]
        result.pr_curves[iou_type] = _pr_curves(precision, run.params)
        result.per_class_ap[iou_type] = {name: _mean_valid(precision[:, :, k, 0, -1])
                                         for k, name in enumerate(categories)} if class_aware else {}
    return result


def _scope_line(images: dict[str, int], all_gt: bool) -> str:
    evaluated, total, outside = images["ground_truth_evaluated"], images["ground_truth"], images["ground_truth_not_in_run"]
    if not outside:
        return f"evaluated on all {total} ground-truth images (the run has a row for each)"
    if all_gt:
        return (f"evaluated on all {total} ground-truth images (--all-gt): the {outside} the run has no row for"
                " count as misses")
    return (f"evaluated on {evaluated} of {total} ground-truth images, those the run has a row for; the other"
            f" {outside} are left out (--all-gt counts them as misses)")


def evaluate_before_after(run_dir: str | os.PathLike[str], gt: str | os.PathLike[str] | GroundTruth,
                          filter_config: FilterConfig, **options: Any) -> dict[str, EvalResult]:
    """``{"before": ..., "after": ...}``: the run unfiltered, then with ``filter_config`` applied.
    ``options`` are ``evaluate``'s keywords; the ground truth is read once."""
    split = options.pop("gt_split", None)
    truth = gt if isinstance(gt, GroundTruth) else load_ground_truth(gt, split=split)
    return {"before": evaluate(open_export_source(run_dir), truth, **options),
            "after": evaluate(open_export_source(run_dir, filter_config=filter_config), truth, **options)}


def _check_options(iou_types: Sequence[str], max_dets: Sequence[int]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    iou_types = tuple(iou_types)
    if not iou_types or any(t not in IOU_TYPES for t in iou_types) or len(set(iou_types)) != len(iou_types):
        raise ConfigError(f"iou_types must be a non-empty subset of {IOU_TYPES}; got {iou_types!r}")
    dets = tuple(max_dets)
    if len(dets) != 3 or any(not isinstance(d, int) or d < 1 for d in dets) or not dets[0] < dets[1] < dets[2]:
        raise ConfigError(f"max_dets must be three increasing positive ints (COCO: 1, 10, 100); got {max_dets!r}")
    return iou_types, dets


def _choose_mode(source: ExportSource, truth: GroundTruth, class_agnostic: bool | None) -> bool:
    """True for class-aware."""
    gt_names, run_names = set(truth.class_names or ()), set() if source.class_agnostic else set(source.class_names)
    if class_agnostic is False and not (gt_names and run_names):
        side = "ground truth" if not gt_names else "run"
        raise ConfigError(f"class-aware evaluation needs class names on both sides; the {side} has none."
                          " Use class-agnostic evaluation")
    aware = bool(gt_names & run_names) if class_agnostic is None else not class_agnostic
    if aware and len(gt_names) != len(truth.class_names or ()):
        raise ExportError("the ground truth repeats category names, so classes cannot be matched by name;"
                          " use class-agnostic evaluation")
    return aware


@dataclass
class _Predictions:
    """Detections of the matched images plus the bookkeeping of what could not be evaluated."""

    rows: list[dict] = field(default_factory=list)  # image_id, category_id, rle, bbox, score
    images: int = 0
    failed: int = 0
    matched: set = field(default_factory=set)  # ground-truth ids with a labelled (ok) row
    covered: set = field(default_factory=set)  # ground-truth ids with any row (ok or failed)
    unmatched: list[str] = field(default_factory=list)
    unmatched_instances: int = 0
    unknown: Counter = field(default_factory=Counter)

    def results(self, iou_type: str) -> list[dict]:
        key, column = ("segmentation", "rle") if iou_type == "segm" else ("bbox", "bbox")
        return [{"image_id": r["image_id"], "category_id": r["category_id"], key: r[column], "score": r["score"]}
                for r in self.rows]

    def counts(self, truth: GroundTruth, evaluated: set) -> tuple[dict[str, int], dict[str, int]]:
        """(image counts, instance counts); ground-truth instances are those of the ``evaluated`` images."""
        inside = [a for a in truth.annotations if a["image_id"] in evaluated]
        crowd = sum(a["iscrowd"] for a in inside)
        outside = sum(1 for a in truth.annotations if a["image_id"] not in self.covered and not a["iscrowd"])
        return ({"ground_truth": len(truth.images), "ground_truth_failed": truth.failed_images,
                 "predicted": self.images, "prediction_failed": self.failed, "matched": len(self.matched),
                 "ground_truth_without_predictions": len(evaluated) - len(self.matched),
                 "unmatched_predictions": len(self.unmatched), "ground_truth_evaluated": len(evaluated),
                 "ground_truth_not_in_run": len(truth.images) - len(self.covered)},
                {"ground_truth": len(inside) - crowd, "ground_truth_crowd": crowd,
                 "ground_truth_not_in_run": outside, "evaluated": len(self.rows),
                 "unmatched_image": self.unmatched_instances, "unknown_class": sum(self.unknown.values())})


def _collect_predictions(source: ExportSource, truth: GroundTruth, category_of: dict | None) -> _Predictions:
    index, found = _ImageIndex(truth.images), _Predictions()
    root = source.images_root()
    names = None if source.class_agnostic else source.class_names
    for row in source:
        found.images += 1
        image_id = index.find(_relative_name(row.image, root), row.image.image_id)
        if row.instances is None:  # the run's miss: its ground truth is evaluated, with no detections
            found.failed += 1
            if image_id is not None:
                found.covered.add(image_id)
            continue
        if image_id is None or image_id in found.matched:
            found.unmatched.append(row.image.image_id)
            found.unmatched_instances += len(row.instances)
            continue
        found.matched.add(image_id)
        found.covered.add(image_id)
        scores = row.instances.scores.get("confidence")
        for i, (rle, bbox, _, class_id) in enumerate(_instance_rows(row.instances)):
            known = names is not None and class_id is not None and class_id < len(names)
            name = names[class_id] if known else f"<class id {class_id}>"
            category = 1 if category_of is None else category_of.get(name)
            if category is None:
                found.unknown[name] += 1
                continue
            found.rows.append({"image_id": image_id, "category_id": category, "rle": rle, "bbox": bbox,
                               "score": 1.0 if scores is None else float(scores[i])})
    return found


class _ImageIndex:
    """Ground-truth image ids by file name, by image_id, and by unique path suffix (see the module doc)."""

    def __init__(self, images: Sequence[dict]):
        self.by_name: dict[str, int] = {}
        self.by_id: dict[str, int] = {}
        self.by_suffix: dict[str, int | None] = {}  # None: several images end with it
        for image in images:
            self.by_name[image["file_name"]] = image["id"]
            for other in image["ids"]:
                self.by_id.setdefault(other, image["id"])
            for suffix in _suffixes(image["file_name"]):
                self.by_suffix[suffix] = None if suffix in self.by_suffix else image["id"]

    def find(self, name: str | None, image_id: str) -> int | None:
        names = [n for n in (name, image_id) if n]
        for table in (self.by_name, self.by_id, self.by_suffix):
            for key in names:
                if table.get(key) is not None:
                    return table[key]
        hits = {self.by_name[s] for key in names for s in _suffixes(key) if s in self.by_name}
        return hits.pop() if len(hits) == 1 else None


def _suffixes(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[i:]) for i in range(1, len(parts))]


def _relative_name(record: ImageRecord, root: str) -> str | None:
    try:
        return relative_to_root(record.uri, root)
    except ExportError:
        return None


def _instance_rows(instances: Instances) -> list[tuple[dict, list[float], float, int | None]]:
    """Per instance: (RLE with str counts, bbox XYWH from ``boxes_xyxy``, mask area, class id or None)."""
    if not len(instances):
        return []
    areas = rle_areas(instances.masks_rle)
    boxes = np.asarray(instances.boxes_xyxy, dtype=np.float64).copy()
    boxes[:, 2:] -= boxes[:, :2]
    ids = instances.class_ids
    return [({"size": list(rle["size"]), "counts": rle["counts"]}, boxes[i].tolist(), float(areas[i]),
             None if ids is None else int(ids[i])) for i, rle in enumerate(instances.masks_rle)]


def _coco_ground_truth(truth: GroundTruth, category_of: dict | None, categories: list[str]) -> COCO:
    annotations = [{"id": i, "image_id": a["image_id"], "category_id": 1 if category_of is None else
                    category_of[a["class"]], "segmentation": a["segmentation"], "bbox": a["bbox"],
                    "area": a["area"], "iscrowd": a["iscrowd"]} for i, a in enumerate(truth.annotations, 1)]
    coco = COCO()
    coco.dataset = {"images": [{k: v for k, v in image.items() if k != "ids"} for image in truth.images],
                    "annotations": annotations,
                    "categories": [{"id": i + 1, "name": name} for i, name in enumerate(categories)]}
    with _quiet():
        coco.createIndex()
    return coco


def _run_cocoeval(coco_gt: COCO, results: list[dict], iou_type: str, max_dets: tuple[int, ...],
                  image_ids: list[int] | None = None) -> COCOeval:
    with _quiet():
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes cannot take an empty list
            coco_dt = COCO()
            coco_dt.dataset = {**coco_gt.dataset, "annotations": []}
            coco_dt.createIndex()
        run = COCOeval(coco_gt, coco_dt, iou_type)
        run.params.maxDets = list(max_dets)
        if image_ids is not None:  # only these ground-truth images (and their detections) count
            run.params.imgIds = list(image_ids)
        run.evaluate()
        run.accumulate()
        run.summarize()
    return run


def _quiet() -> contextlib.AbstractContextManager:
    """pycocotools prints its progress; library code never prints."""
    return contextlib.redirect_stdout(io.StringIO())


def _stats(stats: np.ndarray, max_dets: tuple[int, ...]) -> dict[str, float | None]:
    names = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", *(f"AR@{m}" for m in max_dets),
             "AR_small", "AR_medium", "AR_large"]
    return {name: None if value < 0 else _clean(value) for name, value in zip(names, stats)}


def _clean(value: float) -> float:
    """Rounded to 12 decimals: COCOeval divides by tp + fp + eps, so a perfect 1.0 would read 0.9999999999999998."""
    return round(float(value), 12)


def _mean_valid(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return _clean(valid.mean()) if valid.size else None


def _pr_curves(precision: np.ndarray, params: Any) -> dict[str, list[float] | None]:
    """Precision ``[T, R, K, A, M]`` -> mean over categories with ground truth at IoU .50 and .75."""
    curves: dict[str, list[float] | None] = {"recall": [float(r) for r in params.recThrs]}
    for label, iou in (("precision_iou50", 0.5), ("precision_iou75", 0.75)):
        t = int(np.argmin(np.abs(params.iouThrs - iou)))
        per_class = precision[t, :, :, 0, -1]  # [R, K]
        valid = per_class[:, (per_class > -1).all(axis=0)]
        curves[label] = [_clean(v) for v in valid.mean(axis=1)] if valid.shape[1] else None
    return curves


# -- plots ----------------------------------------------------------------------------------------
def plot_pr_curves(results: EvalResult | Mapping[str, EvalResult], path_png: str | os.PathLike[str],
                   iou_type: str = "segm") -> Path:
    """Precision-recall curves (IoU .50 solid, .75 dashed) of one result, or of several labelled results
    (e.g. ``{"before": ..., "after": ...}``) in one figure; written atomically as PNG. Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, for this figure only
    from matplotlib.figure import Figure

    labelled = {"": results} if isinstance(results, EvalResult) else dict(results)
    figure = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes, dets = figure.add_subplot(), max(result.max_dets[-1] for result in labelled.values())
    for number, (label, result) in enumerate(labelled.items()):
        if iou_type not in result.pr_curves:
            raise ConfigError(f"no {iou_type!r} curves in this result; it has {sorted(result.pr_curves)}")
        curves = result.pr_curves[iou_type]
        for key, style, iou in (("precision_iou50", "-", ".50"), ("precision_iou75", "--", ".75")):
            if curves[key] is not None:
                axes.plot(curves["recall"], curves[key], style, color=f"C{number}",
                          label=f"{label} IoU {iou}".strip())
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
             title=f"precision-recall ({iou_type}, area all, max dets {dets})")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(loc="lower left")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomic(Path(path_png), buffer.getvalue(), "precision-recall plot")
    return Path(path_png)


__all__ = ["EvalResult", "GroundTruth", "IOU_TYPES", "evaluate", "evaluate_before_after", "load_ground_truth",
           "plot_pr_curves"]
