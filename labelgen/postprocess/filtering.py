"""Filtering stored results after the fact. Loads no model (no torch, open_clip or SAM).

Every option works on the stored RLE masks and score columns of a finished run, so a new
threshold never re-runs a model. For one image the steps run in this order, and a rejected
instance gets the reason of the FIRST step that rejects it (exactly one reason each):

1. mask cleanup: ``fill_holes``, then ``min_component_area`` (speckle removal). A mask
   left empty is ``empty_after_cleanup``. Masks are decoded only when a cleanup option is on,
   one at a time, cropped to their box; a changed mask gets a new RLE and its tight box.
2. ``scoring`` recomputes ``confidence_column`` from its stored components.
3. confidence: the class's own minimum (``min_confidence_per_class``) when it has one
   (``low_confidence_class``), else ``min_confidence`` (``low_confidence``).
4. area: absolute (``too_small``, ``too_large``), then as a fraction of the image
   (``too_small_fraction``, ``too_large_fraction``).
5. border: ``touches_border``.
6. mask NMS among the survivors with ``labelgen.structures.nms.mask_nms`` (``duplicate_iou`` when the
   IoU criterion fired against the suppressor, else ``duplicate_ios``).
7. ``max_instances``: the highest confidences stay (``over_max_instances``).

Steps 1, 2, 4 and 5 do not depend on the confidence threshold; ``count_kept`` runs them
once and then evaluates many thresholds (see its docstring). The run-level API (streaming,
summary, sweep, saving) is in ``labelgen.postprocess.filter_store``, the options in ``labelgen.postprocess.filter_config``
(re-exported here), mask cleanup in ``labelgen.postprocess.mask_cleanup``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ValidationError
from .filter_config import FilterConfig, load_filter_config, resolve_class_minimums
from ..structures.instances import Instances
from .mask_cleanup import cleanup_instances
from ..structures.masks import rle_areas, rles_to_boxes_xyxy
from ..structures.nms import mask_iou_ios, mask_nms
from ..structures.scoring import with_combined_score

REASONS = (
    "empty_after_cleanup",
    "low_confidence",
    "low_confidence_class",
    "too_small",
    "too_large",
    "too_small_fraction",
    "too_large_fraction",
    "touches_border",
    "duplicate_iou",
    "duplicate_ios",
    "over_max_instances",
)
NO_CLASS = "(no class)"  # summary label of class-agnostic instances

Rejection = tuple[str, dict]  # (reason, JSON-ready detail)

__all__ = ["REASONS", "FilterConfig", "FilterResult", "class_label", "count_kept", "filter_instances",
           "load_filter_config", "resolve_class_minimums"]


@dataclass(frozen=True)
class FilterResult:
    """What the filter did to one image.

    Attributes:
        kept: the kept instances in input order (cleaned masks, recomputed scores).
        kept_indices: their indices in the input.
        rejected: ``(input_index, reason, detail)`` by index; ``reason`` is one of ``REASONS``,
            ``detail`` a JSON-ready dict (for duplicates ``suppressed_by``, ``iou``, ``ios``).
        input_class_ids: the class id of every input instance, or ``None`` (class-agnostic).
    """

    kept: Instances
    kept_indices: tuple[int, ...]
    rejected: tuple[tuple[int, str, dict], ...]
    input_class_ids: tuple[int, ...] | None = None

    def reason_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, reason, _ in self.rejected:
            counts[reason] = counts.get(reason, 0) + 1
        return counts


@dataclass(frozen=True)
class _Prepared:
    """One image after the threshold-independent steps 1, 2, 4 and 5."""

    instances: Instances  # cleaned (step 1), rescored (step 2)
    confidence: np.ndarray | None  # (N,) float64, None when the column is absent and unused
    class_minimum: np.ndarray  # (N,) float64 own minimum of the instance's class, NaN = use the global one
    early: dict[int, Rejection]  # step 1 rejections
    geometry: dict[int, Rejection]  # first rejection of steps 4-5 (applies only to confidence survivors)
    labels: tuple[str, ...] | None  # class label per instance, None when class-agnostic


# -- public per-image API ----------------------------------------------------------------
def filter_instances(
    instances: Instances, config: FilterConfig, class_names: Sequence[str] | None = None
) -> FilterResult:
    """Apply ``config`` to one image's instances (steps 1-7 of the module docstring).

    Args:
        instances: one image's result, ``N`` instances.
        class_names: the run's vocabulary that ``class_ids`` index into; ``None`` when the run
            has none (then ``min_confidence_per_class`` keys are class ids as strings).
    """
    prep = _prepare(instances, config, class_names, need_confidence=config.needs_confidence())
    rejected = dict(prep.early)
    alive = _alive(len(prep.instances), rejected)
    _reject_low_confidence(prep, config.min_confidence, alive, rejected)
    for index, why in prep.geometry.items():
        if alive[index]:
            rejected[index], alive[index] = why, False
    _reject_duplicates(prep, config, alive, rejected)
    _reject_over_max(prep, config, alive, rejected)
    kept = np.flatnonzero(alive)
    ids = instances.class_ids
    return FilterResult(
        kept=prep.instances if len(kept) == len(prep.instances) else prep.instances[kept],
        kept_indices=tuple(int(i) for i in kept),
        rejected=tuple((i, reason, detail) for i, (reason, detail) in sorted(rejected.items())),
        input_class_ids=None if ids is None else tuple(int(c) for c in ids),
    )


def count_kept(
    instances: Instances, config: FilterConfig, values: Sequence[float], class_names: Sequence[str] | None = None
) -> np.ndarray:
    """``(V,)`` int64: how many instances ``filter_instances`` keeps with ``min_confidence = v``.

    Exact: equal to filtering once per value. Steps 1, 2, 4 and 5 run once. The candidates are
    the instances those steps leave; for a value ``v`` the survivors of step 3 are the candidates
    that pass their minimum. NMS then depends on which instances survive, so:

    * when no candidate has a class minimum of its own, the survivors of every ``v`` are a
      prefix of NMS's visiting order (descending confidence, ties by index), and greedy NMS on
      a prefix keeps exactly the prefix of what it keeps on all candidates (a mask's fate only
      depends on the masks visited before it): one ``mask_nms`` call serves every value;
    * otherwise ``mask_nms`` runs once per distinct survivor set.

    Step 7 keeps ``min(max_instances, NMS survivors)``.
    """
    thresholds = np.asarray(values, dtype=np.float64).reshape(-1)
    prep = _prepare(instances, config, class_names, need_confidence=True)
    n = len(prep.instances)
    if n == 0:
        return np.zeros(len(thresholds), dtype=np.int64)
    candidates = _alive(n, {**prep.early, **prep.geometry})
    survivors = np.stack([candidates & _passes_confidence(prep, v) for v in thresholds]) if len(thresholds) \
        else np.zeros((0, n), dtype=bool)
    counts = _count_after_nms(prep, config, candidates, survivors)
    return np.minimum(counts, config.max_instances) if config.max_instances else counts


def class_label(class_id: int | None, class_names: Sequence[str] | None) -> str:
    """The display name of a class id (its name, else the id as a string; ``NO_CLASS`` for None)."""
    if class_id is None:
        return NO_CLASS
    if class_names is not None and 0 <= class_id < len(class_names):
        return str(class_names[class_id])
    return str(class_id)


# -- threshold-independent steps ------------------------------------------------------------
def _prepare(
    instances: Instances, config: FilterConfig, class_names: Sequence[str] | None, need_confidence: bool
) -> _Prepared:
    cleaned, emptied = cleanup_instances(instances, config.fill_holes, config.min_component_area)  # step 1
    early = {i: ("empty_after_cleanup", {"area_before": area}) for i, area in emptied.items()}
    if config.scoring is not None and len(cleaned):  # step 2
        cleaned = with_combined_score(cleaned, config.scoring)
    ids = cleaned.class_ids
    return _Prepared(
        instances=cleaned,
        confidence=_confidence(cleaned, config.confidence_column, need_confidence),
        class_minimum=_class_minimum_column(cleaned, config, class_names),
        early=early,
        geometry=_geometry_rejections(cleaned, config),
        labels=None if ids is None else tuple(class_label(int(c), class_names) for c in ids),
    )


def _confidence(instances: Instances, column: str, needed: bool) -> np.ndarray | None:
    if column in instances.scores:
        return instances.scores[column].astype(np.float64)
    if needed and len(instances):
        raise ValidationError(f"filter.confidence_column {column!r} is not a score column of this result; it has"
                              f" {sorted(instances.scores)}. Set confidence_column, or scoring to compute it.")
    return None


def _class_minimum_column(instances: Instances, config: FilterConfig, class_names: Sequence[str] | None) -> np.ndarray:
    column = np.full(len(instances), np.nan)
    if instances.class_ids is not None and config.min_confidence_per_class:
        for class_id, minimum in resolve_class_minimums(config, class_names).items():
            column[instances.class_ids == class_id] = minimum
    return column


def _geometry_rejections(instances: Instances, config: FilterConfig) -> dict[int, Rejection]:
    """Steps 4-5: the first area or border rejection of each instance."""
    areas = rle_areas(instances.masks_rle)
    fractions = areas / float(instances.height * instances.width)
    never = np.zeros(len(areas), dtype=bool)
    checks = [
        ("too_small", areas < config.min_area, lambda i: {"area": int(areas[i]), "min_area": config.min_area}),
        ("too_large", areas > config.max_area if config.max_area else never,
         lambda i: {"area": int(areas[i]), "max_area": config.max_area}),
        ("too_small_fraction", fractions < config.min_area_fraction,
         lambda i: {"area_fraction": _num(fractions[i]), "min_area_fraction": config.min_area_fraction}),
        ("too_large_fraction", fractions > config.max_area_fraction,
         lambda i: {"area_fraction": _num(fractions[i]), "max_area_fraction": config.max_area_fraction}),
    ]
    if config.drop_border:
        boxes = rles_to_boxes_xyxy(instances.masks_rle)
        checks.append(("touches_border", _touches_border(boxes, areas, instances, config.border_margin),
                       lambda i: {"box_xyxy": boxes[i].tolist(), "border_margin": config.border_margin}))
    rejected: dict[int, Rejection] = {}
    for reason, hits, detail in checks:
        for index in np.flatnonzero(hits):
            rejected.setdefault(int(index), (reason, detail(index)))
    return rejected


def _touches_border(boxes_xyxy: np.ndarray, areas: np.ndarray, frame: Instances, margin: int) -> np.ndarray:
    """``(N,)`` bool: a pixel at column ``x <= margin`` or ``x >= width - 1 - margin`` (rows alike).

    ``boxes_xyxy`` are the tight mask boxes, ``x2``/``y2`` exclusive; empty masks never touch.
    """
    x1, y1, x2, y2 = boxes_xyxy.T
    near = (x1 <= margin) | (y1 <= margin) | (x2 >= frame.width - margin) | (y2 >= frame.height - margin)
    return near & (areas > 0)


# -- threshold-dependent steps ---------------------------------------------------------------
def _alive(n: int, rejected: Mapping[int, Any]) -> np.ndarray:
    alive = np.ones(n, dtype=bool)
    alive[list(rejected)] = False
    return alive


def _passes_confidence(prep: _Prepared, min_confidence: float) -> np.ndarray:
    """``(N,)`` bool: confidence >= the instance's minimum (its class's own, else ``min_confidence``)."""
    if prep.confidence is None:
        return np.ones(len(prep.instances), dtype=bool)
    minimum = np.where(np.isnan(prep.class_minimum), min_confidence, prep.class_minimum)
    return prep.confidence >= minimum


def _reject_low_confidence(prep: _Prepared, min_confidence: float, alive: np.ndarray, rejected: dict) -> None:
    """Step 3."""
    for index in np.flatnonzero(alive & ~_passes_confidence(prep, min_confidence)):
        own = prep.class_minimum[index]
        detail = {"confidence": _num(prep.confidence[index]),
                  "min_confidence": _num(min_confidence if np.isnan(own) else own)}
        if np.isnan(own):
            rejected[int(index)] = ("low_confidence", detail)
        else:
            rejected[int(index)] = ("low_confidence_class", {**detail, "class": prep.labels[index]})
        alive[index] = False


def _nms_suppressed_by(prep: _Prepared, config: FilterConfig, indices: np.ndarray) -> np.ndarray:
    """``mask_nms`` over ``indices``; returns ``(len(indices),)`` input indices of suppressors, -1 = kept."""
    if not config.nms_enabled or len(indices) < 2:
        return np.full(len(indices), -1, dtype=np.int64)
    rles = [prep.instances.masks_rle[i] for i in indices]
    ids = prep.instances.class_ids
    _, by_local = mask_nms(rles, prep.confidence[indices], config.nms_iou, config.nms_ios,
                           class_ids=None if ids is None else ids[indices], across_classes=config.nms_across_classes)
    return np.where(by_local >= 0, indices[np.maximum(by_local, 0)], -1)


def _reject_duplicates(prep: _Prepared, config: FilterConfig, alive: np.ndarray, rejected: dict) -> None:
    """Step 6: mask NMS among the survivors."""
    indices = np.flatnonzero(alive)
    suppressed_by = _nms_suppressed_by(prep, config, indices)
    if not (suppressed_by >= 0).any():
        return
    iou, ios = mask_iou_ios([prep.instances.masks_rle[i] for i in indices])  # once, for the details
    position = {int(index): p for p, index in enumerate(indices)}
    for p, by in enumerate(suppressed_by):
        if by < 0:
            continue
        index, q = int(indices[p]), position[int(by)]
        iou_fired = config.nms_iou < 1.0 and iou[p, q] > config.nms_iou
        detail = {"suppressed_by": int(by), "iou": _num(iou[p, q]), "ios": _num(ios[p, q])}
        rejected[index] = ("duplicate_iou" if iou_fired else "duplicate_ios", detail)
        alive[index] = False


def _reject_over_max(prep: _Prepared, config: FilterConfig, alive: np.ndarray, rejected: dict) -> None:
    """Step 7: keep the ``max_instances`` highest confidences (ties: lower index first)."""
    indices = np.flatnonzero(alive)
    limit = config.max_instances
    if not limit or len(indices) <= limit:
        return
    ranked = indices[np.argsort(-prep.confidence[indices], kind="stable")]
    for rank, index in enumerate(ranked[limit:], start=limit + 1):
        rejected[int(index)] = ("over_max_instances", {"rank": rank, "max_instances": limit,
                                                       "confidence": _num(prep.confidence[index])})
        alive[index] = False


def _count_after_nms(prep: _Prepared, config: FilterConfig, candidates: np.ndarray, survivors: np.ndarray) -> np.ndarray:
    """``(V,)`` NMS survivors of each row of ``survivors`` ``(V, N)`` bool (see ``count_kept``)."""
    if not config.nms_enabled:
        return survivors.sum(axis=1).astype(np.int64)
    if np.isnan(prep.class_minimum[candidates]).all():  # prefix case: one NMS call
        indices = np.flatnonzero(candidates)
        kept = np.zeros(len(candidates), dtype=bool)
        kept[indices[_nms_suppressed_by(prep, config, indices) < 0]] = True
        return (survivors & kept).sum(axis=1).astype(np.int64)
    memo: dict[bytes, int] = {}
    counts = np.zeros(len(survivors), dtype=np.int64)
    for row, alive in enumerate(survivors):
        key = alive.tobytes()
        if key not in memo:
            memo[key] = int((_nms_suppressed_by(prep, config, np.flatnonzero(alive)) < 0).sum())
        counts[row] = memo[key]
    return counts


def _num(value: Any) -> float:
    return round(float(value), 6)
