"""Mask non-maximum suppression on compressed COCO RLEs. No torch.

Overlap is measured two ways, both from exact pixel intersections:

* IoU  = |a ∩ b| / |a ∪ b|;
* IoS  = |a ∩ b| / min(|a|, |b|) ("intersection over the smaller"), which catches a
  small mask lying inside a large one, where IoU stays low.

Both are 0 where the denominator is 0 (an empty mask overlaps nothing).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from pycocotools import mask as coco_mask

from ..errors import ValidationError
from .masks import RLE, rle_areas, rle_to_pycocotools


def pairwise_intersections(rles_a: Sequence[RLE], rles_b: Sequence[RLE]) -> np.ndarray:
    """Pixel counts ``|a_i ∩ b_j|``, ``(A, B)`` float64 holding whole numbers.

    All RLEs must share one frame. pycocotools' ``iou`` with every ``b`` marked as a crowd
    returns ``|a ∩ b| / |a|``; multiplying back by ``|a|`` and rounding gives the exact count.
    """
    _check_one_frame(list(rles_a) + list(rles_b))
    if len(rles_a) == 0 or len(rles_b) == 0:
        return np.zeros((len(rles_a), len(rles_b)), dtype=np.float64)
    coco_a = [rle_to_pycocotools(r) for r in rles_a]
    coco_b = [rle_to_pycocotools(r) for r in rles_b]
    over_a = np.asarray(coco_mask.iou(coco_a, coco_b, [1] * len(coco_b)), dtype=np.float64)
    over_a = over_a.reshape(len(coco_a), len(coco_b))
    areas_a = rle_areas(rles_a).astype(np.float64)
    return np.rint(over_a * areas_a[:, None])


def mask_iou_ios(rles: Sequence[RLE]) -> tuple[np.ndarray, np.ndarray]:
    """``(iou, ios)``, each ``(N, N)`` float64 in [0, 1]; the diagonal is 1 for non-empty masks."""
    inter = pairwise_intersections(rles, rles)
    areas = rle_areas(rles).astype(np.float64)
    union = areas[:, None] + areas[None, :] - inter
    smaller = np.minimum(areas[:, None], areas[None, :])
    return _safe_ratio(inter, union), _safe_ratio(inter, smaller)


def mask_nms(
    rles: Sequence[RLE],
    scores: np.ndarray,
    iou_threshold: float,
    ios_threshold: float,
    class_ids: np.ndarray | None = None,
    across_classes: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy mask NMS.

    Masks are visited by descending score (ties: lower index first). A mask is suppressed
    when its IoU with an already kept mask is strictly above ``iou_threshold``, or its IoS is
    strictly above ``ios_threshold``. A threshold >= 1 disables that criterion. With
    ``across_classes=False`` and ``class_ids`` given, only masks of the same class compete.

    Args:
        rles: ``N`` compressed RLEs of one image frame.
        scores: ``(N,)`` finite scores, higher is better.
        class_ids: ``(N,)`` integer class ids, or ``None``.

    Returns:
        ``keep``: ``(K,)`` int64 indices of kept masks, by descending score;
        ``suppressed_by``: ``(N,)`` int64, ``-1`` for a kept mask, else the index of the
        highest-scoring kept mask that suppressed it.
    """
    n = len(rles)
    scores = _check_column(scores, n, "scores").astype(np.float64)
    if not np.all(np.isfinite(scores)):
        raise ValidationError(f"scores must be finite; got {scores[~np.isfinite(scores)].tolist()[:5]}")
    same_class = _same_class_matrix(class_ids, n, across_classes)
    order = np.argsort(-scores, kind="stable")
    suppressed_by = np.full((n,), -1, dtype=np.int64)
    if n == 0:
        return np.zeros((0,), dtype=np.int64), suppressed_by
    iou, ios = mask_iou_ios(rles)
    overlapping = np.zeros((n, n), dtype=bool)
    if iou_threshold < 1.0:
        overlapping |= iou > iou_threshold
    if ios_threshold < 1.0:
        overlapping |= ios > ios_threshold
    if same_class is not None:
        overlapping &= same_class
    keep: list[int] = []
    for index in order:
        hits = np.flatnonzero(overlapping[index, keep]) if keep else ()
        if len(hits):
            suppressed_by[index] = keep[hits[0]]
        else:
            keep.append(int(index))
    return np.asarray(keep, dtype=np.int64), suppressed_by


def _same_class_matrix(class_ids: np.ndarray | None, n: int, across_classes: bool) -> np.ndarray | None:
    if class_ids is None or across_classes:
        return None
    ids = _check_column(class_ids, n, "class_ids")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValidationError(f"class_ids must be integers; got dtype {ids.dtype}")
    return ids[:, None] == ids[None, :]


def _check_column(values: np.ndarray, n: int, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != (n,):
        raise ValidationError(f"{name} must have shape ({n},), one per mask; got {values.shape}")
    return values


def _check_one_frame(rles: Sequence[RLE]) -> None:
    sizes = {tuple(int(v) for v in r["size"]) for r in rles}
    if len(sizes) > 1:
        raise ValidationError(f"all RLEs must share one [height, width] frame; got {sorted(sizes)}")


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out
