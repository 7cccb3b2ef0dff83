"""Mask cleanup for filtering: fill holes and remove speckles, on RLEs, decoding as little as possible.

A mask is decoded only when a cleanup option is on and it may change, one mask at a time,
and cleaned inside its tight box: holes (background not connected to the image border) and
8-connected components never reach outside that box, so the crop gives the same result as
the whole frame.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from ..structures.instances import Instances
from ..structures.masks import RLE, mask_to_rle, rle_areas, rles_to_boxes_xyxy, rles_to_masks

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def clean_mask(mask: np.ndarray, fill_holes: bool, min_component_area: int) -> np.ndarray:
    """``(H, W)`` bool -> cleaned ``(H, W)`` bool (a new array).

    Holes are filled first (``scipy.ndimage.binary_fill_holes``: background 4-connected regions
    that do not touch the border), then 8-connected components smaller than
    ``min_component_area`` pixels are removed (0 = keep all), so a component counts its holes.
    """
    cleaned = ndimage.binary_fill_holes(mask) if fill_holes else np.array(mask, dtype=bool)
    if min_component_area > 0:
        labels, count = ndimage.label(cleaned, structure=_EIGHT_CONNECTED)
        if count:
            small = np.bincount(labels.ravel()) < min_component_area
            small[0] = False  # the background
            if small.any():
                cleaned &= ~small[labels]
    return cleaned


def cleanup_instances(
    instances: Instances, fill_holes: bool, min_component_area: int
) -> tuple[Instances, dict[int, int]]:
    """Clean every mask of one image.

    Returns the instances (the same object when nothing changed; a changed mask gets a new RLE
    and its tight ``boxes_xyxy``, unchanged ones keep theirs) and ``{index: area_before}`` of
    the masks that are empty after cleanup. With both options off nothing is decoded or checked.
    """
    if not (fill_holes or min_component_area) or not len(instances):
        return instances, {}
    areas = rle_areas(instances.masks_rle)
    boxes = rles_to_boxes_xyxy(instances.masks_rle).astype(np.int64)
    rles, boxes_xyxy = list(instances.masks_rle), np.array(instances.boxes_xyxy)
    emptied: dict[int, int] = {}
    for index, area in enumerate(areas.tolist()):
        cleaned = _clean_rle(rles[index], boxes[index], area, instances, fill_holes, min_component_area)
        if cleaned is not None:
            rles[index], boxes_xyxy[index] = cleaned, rles_to_boxes_xyxy([cleaned])[0]
        if (area if cleaned is None else int(rle_areas([cleaned])[0])) == 0:
            emptied[index] = area
    if rles == list(instances.masks_rle):
        return instances, emptied
    return dataclasses.replace(instances, masks_rle=tuple(rles), boxes_xyxy=boxes_xyxy), emptied


def _clean_rle(
    rle: RLE, box_xyxy: np.ndarray, area: int, frame: Instances, fill_holes: bool, min_component_area: int
) -> RLE | None:
    """The cleaned RLE, or ``None`` when cleanup leaves the mask as it is."""
    if area == 0:
        return None
    if not fill_holes and area < min_component_area:  # every part is smaller than the whole: no decode
        return mask_to_rle(np.zeros((frame.height, frame.width), dtype=bool))
    x1, y1, x2, y2 = (int(v) for v in box_xyxy)
    mask = rles_to_masks([rle], frame.height, frame.width)[0]
    crop = mask[y1:y2, x1:x2]
    cleaned = clean_mask(crop, fill_holes, min_component_area)
    if np.array_equal(cleaned, crop):
        return None
    mask[y1:y2, x1:x2] = cleaned
    return mask_to_rle(mask)
