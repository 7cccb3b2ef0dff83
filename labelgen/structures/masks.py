"""Binary masks <-> compressed COCO RLE (pycocotools), and box helpers.

Conventions used everywhere in labelgen:

* a dense mask stack is ``(N, H, W)`` bool, row-major, image pixel frame;
* an RLE is pycocotools' compressed form ``{"size": [height, width], "counts": str}``
  with ``counts`` kept as an ASCII ``str`` so it is JSON-ready;
* boxes are ``(N, 4)`` float32 ``XYXY`` in absolute pixels, ``x2``/``y2`` exclusive
  (a mask covering column 0 only has ``x1 = 0, x2 = 1``), which is what
  ``pycocotools.mask.toBbox`` gives as ``x + w``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from pycocotools import mask as coco_mask

from ..errors import ValidationError

RLE = dict  # {"size": [height, width], "counts": str}


def masks_to_rles(masks: np.ndarray) -> list[RLE]:
    """Encode ``(N, H, W)`` bool masks as compressed RLEs with ``str`` counts.

    pycocotools reads each mask column by column. A stack whose memory is already in that order (the
    ``(N, H, W)`` view of a C-contiguous ``(N, W, H)`` array: see :func:`column_major_masks`) is encoded
    without a copy; any other layout is copied once into it (for 200 masks of 640x480 the copy costs
    about 3x the encoding itself)."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValidationError(f"masks must be (N, H, W); got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    planes = masks.transpose(1, 2, 0)  # (H, W, N): Fortran-contiguous when masks is column-major
    planes = planes.view(np.uint8) if planes.dtype == np.bool_ else planes.astype(np.uint8)
    fortran = np.asfortranarray(planes)
    encoded = coco_mask.encode(fortran)
    return [rle_to_json(rle) for rle in encoded]


def column_major_masks(masks_nwh: np.ndarray) -> np.ndarray:
    """The ``(N, H, W)`` view of C-contiguous ``(N, W, H)`` masks (each mask stored column by column, as
    pycocotools reads it): what a model stage hands over so that :func:`masks_to_rles` copies nothing.
    Transposing on the model's device (``logits.transpose(1, 2).contiguous()``) makes it free there."""
    masks_nwh = np.ascontiguousarray(masks_nwh)
    if masks_nwh.ndim != 3:
        raise ValidationError(f"masks must be (N, W, H); got shape {masks_nwh.shape}")
    return masks_nwh.transpose(0, 2, 1)


def mask_to_rle(mask: np.ndarray) -> RLE:
    """Encode one ``(H, W)`` bool mask."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValidationError(f"mask must be (H, W); got shape {mask.shape}")
    return masks_to_rles(mask[None])[0]


def rles_to_masks(rles: Sequence[RLE], height: int, width: int) -> np.ndarray:
    """Decode RLEs to ``(N, H, W)`` bool; an empty list gives ``(0, H, W)``."""
    if len(rles) == 0:
        return np.zeros((0, height, width), dtype=bool)
    decoded = coco_mask.decode([rle_to_pycocotools(r) for r in rles])  # (H, W, N) uint8
    return np.ascontiguousarray(decoded.transpose(2, 0, 1)).astype(bool)


AREA_CHUNK = 255  # pycocotools' area() fails on more RLEs than this under numpy 2 (see rle_areas)


def rle_areas(rles: Sequence[RLE]) -> np.ndarray:
    """Pixel counts, ``(N,)`` int64, for any ``N``.

    ``pycocotools.mask.area`` (2.0.x) builds a scratch ``np.array((n,), dtype=np.uint8)``, which numpy 2
    refuses with ``OverflowError`` once ``n > 255``; so the RLEs go through it in chunks of 255.
    """
    if len(rles) == 0:
        return np.zeros((0,), dtype=np.int64)
    objects = [rle_to_pycocotools(r) for r in rles]
    return np.concatenate([np.asarray(coco_mask.area(objects[i:i + AREA_CHUNK]), dtype=np.int64)
                           for i in range(0, len(objects), AREA_CHUNK)])


def rles_to_boxes_xyxy(rles: Sequence[RLE]) -> np.ndarray:
    """Tight boxes of the masks, ``(N, 4)`` float32 XYXY absolute pixels (empty mask -> zeros)."""
    if len(rles) == 0:
        return np.zeros((0, 4), dtype=np.float32)
    xywh = np.asarray(coco_mask.toBbox([rle_to_pycocotools(r) for r in rles]), dtype=np.float32)
    return boxes_xywh_to_xyxy(xywh)


def boxes_xywh_to_xyxy(boxes_xywh: np.ndarray) -> np.ndarray:
    """``(N, 4)`` XYWH -> ``(N, 4)`` float32 XYXY."""
    boxes = np.asarray(boxes_xywh, dtype=np.float32).reshape(-1, 4).copy()
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def boxes_xyxy_to_xywh(boxes_xyxy: np.ndarray) -> np.ndarray:
    """``(N, 4)`` XYXY -> ``(N, 4)`` float32 XYWH."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4).copy()
    boxes[:, 2:] -= boxes[:, :2]
    return boxes


def validate_rle(rle: Any, height: int, width: int, where: str) -> RLE:
    """Check one RLE's structure and frame; return it with ``str`` counts."""
    if not isinstance(rle, dict) or set(rle) != {"size", "counts"}:
        keys = sorted(rle) if isinstance(rle, dict) else type(rle).__name__
        raise ValidationError(f"{where}: expected an RLE dict with keys ['counts', 'size']; got {keys}")
    size = list(rle["size"])
    if size != [height, width]:
        raise ValidationError(
            f"{where}: RLE size must equal the image frame [height, width] = [{height}, {width}]; got {size}"
        )
    counts = rle_to_json(rle)["counts"]
    if not isinstance(counts, str):
        raise ValidationError(
            f"{where}: RLE counts must be compressed (str/bytes); got {type(counts).__name__}."
            " Convert uncompressed RLE with pycocotools.mask.frPyObjects first."
        )
    return {"size": size, "counts": counts}


# -- the two forms of a compressed RLE: str counts (JSON, labelgen) and bytes counts (pycocotools) --
def rle_to_json(rle: dict) -> RLE:
    """``{"size": [h, w] (ints), "counts": str}``: an RLE as JSON and labelgen hold it (bytes counts,
    as pycocotools returns them, are decoded; other counts are left for the caller to refuse)."""
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes)
            else counts}


def rle_to_pycocotools(rle: dict) -> dict:
    """``{"size": [h, w], "counts": bytes}``: an RLE as pycocotools' C functions read it."""
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}

