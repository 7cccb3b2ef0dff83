"""A simulated reviewer (test-only, like the fake generator): reviews a FiftyOne dataset exported by
labelgen (a review sample) from ground truth, through the real FiftyOne API, with the reviewer
conventions of ``labelgen.review.sample``, so ``labelgen pull`` reads real tags and drawn labels.

Per sample, the labels are taken in decreasing ``confidence``; a label is accepted when it matches a
not yet matched ground-truth object of the same class at mask IoU >= ``iou`` (one label per object).
Any other label is tagged ``wrong_class`` when it overlaps an object of another class at IoU >= ``iou``,
``poor_mask`` when it overlaps a same-class object at IoU in [``poor_iou``, ``iou``), else
``false_positive``. Each ground-truth object no accepted label matched is drawn as a new Detection
(its box and mask, its class name); when its class is not one of the run's, the sample is tagged
``missing_object`` instead. Masks are read from the Detections (``mask`` or ``mask_path``).
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import mask as coco_mask

from ..exports.fiftyone import FIELD, box_pixels
from ..exports.source import open_export_source
from ..review.review import _box_crop_to_mask, _box_xyxy
from ..review.sample import ACCEPTED_TAG, MISSING_OBJECT_TAG
from ..structures.instances import Instances
from ..structures.masks import mask_to_rle, rle_to_pycocotools, rles_to_masks


def load_truth(ground_truth: str | os.PathLike[str] | Mapping[str, Instances],
               class_names: Sequence[str] | None) -> tuple[dict[str, Instances], list[str] | None]:
    """``({image_id: Instances}, class names)`` from a run directory (e.g. imported ground truth) or a mapping."""
    if isinstance(ground_truth, Mapping):
        return dict(ground_truth), None if class_names is None else list(class_names)
    source = open_export_source(ground_truth)
    truth = {row.image.image_id: row.instances for row in source if row.instances is not None}
    return truth, list(source.class_names)


def simulate_review(fo: Any, dataset_name: str, ground_truth: str | os.PathLike[str] | Mapping[str, Instances], *,
                    class_names: Sequence[str] | None = None, iou: float = 0.5, poor_iou: float = 0.1,
                    accept_tag: bool = False) -> Counter:
    """Review every sample of ``dataset_name`` from ``ground_truth`` (module doc): a run directory, or
    ``{image_id: Instances}`` whose class ids index ``class_names`` (default: the dataset's classes).
    Samples are matched by ``labelgen_image_id``, else by file name. ``accept_tag``: tag accepted labels
    ``accepted`` (else they stay untagged). Returns counts of the verdicts given and objects drawn."""
    dataset = fo.load_dataset(dataset_name)
    run_names = list(dataset.info.get("labelgen_class_names") or [])
    truth, gt_names = load_truth(ground_truth, class_names)
    gt_names = gt_names if gt_names is not None else run_names
    by_file = {os.path.basename(k): v for k, v in truth.items()}
    counts: Counter = Counter()
    for sample in dataset.iter_samples(autosave=True):
        image_id = sample["labelgen_image_id"]
        gt = truth.get(image_id) or by_file.get(os.path.basename(image_id))
        if gt is None:
            counts["no_ground_truth"] += 1
            continue
        detections = list(sample[FIELD].detections) if sample[FIELD] else []
        _review_sample(fo, sample, detections, gt, gt_names, run_names, iou, poor_iou, accept_tag, counts)
    return counts


def _review_sample(fo: Any, sample: Any, detections: list[Any], gt: Instances, gt_names: Sequence[str],
                   run_names: Sequence[str], iou: float, poor_iou: float, accept_tag: bool, counts: Counter) -> None:
    height, width = gt.height, gt.width
    gt_rles = [rle_to_pycocotools(r) for r in gt.to_dict()["masks_rle"]]
    gt_classes = [None if gt.class_ids is None else gt_names[int(c)] for c in (gt.class_ids if gt.class_ids is not None
                                                                               else [None] * len(gt))]
    label_rles = [_detection_rle(d, width, height) for d in detections]
    ious = np.asarray(coco_mask.iou(label_rles, gt_rles, [0] * len(gt_rles)), dtype=np.float64).reshape(
        len(label_rles), len(gt_rles)) if label_rles and gt_rles else np.zeros((len(label_rles), len(gt_rles)))
    matched: set[int] = set()
    order = sorted(range(len(detections)), key=lambda i: -(detections[i].confidence or 0.0))
    for i in order:
        detection = detections[i]
        same = [j for j in range(len(gt_rles)) if gt_classes[j] is None or gt_classes[j] == detection.label]
        free = [j for j in same if j not in matched and ious[i, j] >= iou]
        if free:
            matched.add(max(free, key=lambda j: ious[i, j]))
            verdict = "correct"
        elif any(ious[i, j] >= iou for j in range(len(gt_rles)) if j not in same):
            verdict = "wrong_class"
        elif any(ious[i, j] >= poor_iou for j in same):
            verdict = "poor_mask"
        else:
            verdict = "false_positive"
        counts[verdict] += 1
        if verdict != "correct":
            detection.tags = [*detection.tags, verdict]
        elif accept_tag:
            detection.tags = [*detection.tags, ACCEPTED_TAG]
    missing = [j for j in range(len(gt_rles)) if j not in matched]
    drawn = [j for j in missing if gt_classes[j] is None or gt_classes[j] in run_names]
    full = rles_to_masks([gt.to_dict()["masks_rle"][j] for j in drawn], height, width) if drawn else []
    for j, mask in zip(drawn, full):
        x1, y1, x2, y2 = (float(v) for v in gt.boxes_xyxy[j])
        c0, r0, c1, r1 = box_pixels([x1, y1, x2, y2], width, height)
        label = gt_classes[j] if gt_classes[j] is not None else (run_names[0] if run_names else "object")
        detections.append(fo.Detection(label=label, bounding_box=[x1 / width, y1 / height, (x2 - x1) / width,
                                                                  (y2 - y1) / height], mask=mask[r0:r1, c0:c1]))
    counts["drawn"] += len(drawn)
    if len(drawn) < len(missing):
        sample.tags = [*sample.tags, MISSING_OBJECT_TAG]
        counts["missing_object_tags"] += 1
    if sample[FIELD] is None:
        sample[FIELD] = fo.Detections()
    sample[FIELD].detections = detections


def _detection_rle(detection: Any, width: int, height: int) -> dict:
    """A Detection's full-frame mask (its crop placed in its box; the filled box without a mask)."""
    box = _box_xyxy(detection, width, height)
    crop = detection.get_mask() if detection.has_mask else None
    c0, r0, c1, r1 = box_pixels(box, width, height)
    if crop is None:
        crop = np.ones((max(r1 - r0, 0), max(c1 - c0, 0)), dtype=bool)
    return rle_to_pycocotools(mask_to_rle(_box_crop_to_mask(crop, box, width, height)))


__all__ = ["load_truth", "simulate_review"]
