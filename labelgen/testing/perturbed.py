"""Test-only: labels made from ground truth with known errors, to measure the review queue.

``perturb_instances`` turns one image's ground truth into "predictions": each object is dropped
(a missed object), relabelled (wrong class), shifted by 30% of its box both ways (poor mask) or kept, and
false positives (random rectangles of random classes) are added. ``confidence`` correlates imperfectly
with correctness (kept labels ~ Beta(6, 2), wrong ones ~ Beta(2, 3)). The number of errors a reviewer
would fix in the image (dropped + relabelled + shifted + false positives) is returned with it.

``write_perturbed_run`` does that to every row of an ``ImportedDataset`` (e.g. coco128 through
``import_yolo``) and writes the result as a run; seeded per image, so the same seed gives the same run.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..exports.importers import ImportedDataset, write_imported_run
from ..structures.instances import Instances
from ..structures.rows import Row


@dataclass(frozen=True)
class Perturbation:
    drop: float = 0.15
    relabel: float = 0.10
    shift: float = 0.10
    false_positives: float = 0.5  # per image, Poisson mean


def perturb_instances(gt: Instances, num_classes: int, rng: np.random.Generator,
                      how: Perturbation = Perturbation()) -> tuple[Instances, int]:
    """``(predictions, errors)`` for one image's ground truth (see the module docstring)."""
    h, w = gt.height, gt.width
    masks, classes, conf, errors = [], [], [], 0
    dense = gt.masks() if len(gt) else np.zeros((0, h, w), bool)
    gt_classes = gt.class_ids if gt.class_ids is not None else np.zeros(len(gt), np.int32)
    for k in range(len(gt)):
        u = rng.random()
        mask, cls, wrong = dense[k], int(gt_classes[k]), False
        if u < how.drop:
            errors += 1
            continue
        if u < how.drop + how.relabel and num_classes > 1:
            cls = int((cls + rng.integers(1, num_classes)) % num_classes)
            wrong = True
        elif u < how.drop + how.relabel + how.shift:
            x0, y0, x1, y1 = gt.boxes_xyxy[k]
            dx, dy = int(round(0.3 * max(x1 - x0, 1))), int(round(0.3 * max(y1 - y0, 1)))
            shifted = np.zeros_like(mask)
            if dy < h and dx < w:  # a rectangle shifted so: mask IoU about 0.3
                shifted[dy:, dx:] = mask[:h - dy, :w - dx]
            mask, wrong = (shifted, True) if shifted.any() else (mask, False)
        errors += wrong
        masks.append(mask)
        classes.append(cls)
        conf.append(rng.beta(2, 3) if wrong else rng.beta(6, 2))
    for _ in range(rng.poisson(how.false_positives)):
        bw, bh = int(rng.integers(max(w // 10, 1), max(w // 3, 2))), int(rng.integers(max(h // 10, 1), max(h // 3, 2)))
        x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        mask = np.zeros((h, w), bool)
        mask[y:y + bh, x:x + bw] = True
        masks.append(mask)
        classes.append(int(rng.integers(0, max(num_classes, 1))))
        conf.append(rng.beta(2, 3))
        errors += 1
    stacked = np.stack(masks) if masks else np.zeros((0, h, w), bool)
    return Instances.from_masks(stacked, class_ids=np.array(classes, np.int32),
                                scores={"confidence": np.array(conf, np.float32)}), errors


def write_perturbed_run(dataset: ImportedDataset, out: str | Path, seed: int = 0,
                        how: Perturbation = Perturbation()) -> tuple[Path, dict[str, int]]:
    """Perturb every row of ``dataset`` and write a run at ``out``; returns ``(run dir, errors per image)``."""
    errors: dict[str, int] = {}

    def load(record: Any) -> Row:
        row = dataset.load_item(record)
        if row.instances is None:
            return row
        digest = hashlib.sha256(f"{seed}/{record.image_id}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        instances, errors[record.image_id] = perturb_instances(row.instances, len(dataset.class_names), rng, how)
        return Row(row.image, instances)

    spec = {**dataset.spec, "import": {**dataset.spec.get("import", {}), "perturbed": {"seed": seed,
                                                                                      **how.__dict__}}}
    root = write_imported_run(ImportedDataset(dataset.class_names, spec, dataset.records, load), out)
    return root, errors


__all__ = ["Perturbation", "perturb_instances", "write_perturbed_run"]
