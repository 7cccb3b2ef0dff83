"""Tiled generation: any generator on tiles of a large image, results stitched in the full frame.

``images.tiling`` (``config.TilingConfig``, ``docs/tiling.md``) turns it on. For one image:

1. **plan**: square tiles of ``tile_size`` that overlap by at least ``overlap`` pixels, spread evenly
   so the last tile ends at the image border (:func:`plan_tiles`);
2. **generate**: tiles are cut from the decoded image (or read region by region from a tiled TIFF,
   ``decode.TiffRegions``) and go through ``generator.generate_batch`` ``batch_size`` at a time, like
   images; each tile's finisher runs at once, so a tile's dense masks never outlive its batch;
3. **shift**: each tile result is moved into the full frame as RLE (``structures.stitch.shift_rle``:
   only the tile mask is ever dense);
4. **global view** (``global_pass``): the whole image shrunk by an integer factor to about
   ``global_size`` goes through the generator too; its masks are enlarged run by run (never dense);
5. **stitch**: ``structures.stitch.stitch`` merges parts cut by seams and removes duplicates; with a
   global view, objects with a box side >= ``global_min_side`` come from it and smaller ones from tiles.

The generator never knows: a tile's ``ImageRecord`` is the image's record with ``image_id``
``"<image_id>#tile=x0,y0,x1,y1"`` (:func:`tile_record`, :func:`parse_tile_id`), its tile size as
``width``/``height`` and no ``sha256``. Its feature cache keys tiles by content, as any image.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import numpy as np
from pycocotools import mask as coco_mask

from ..config import TilingConfig
from ..errors import ValidationError
from ..generators import Generator
from ..generators.base import failed
from ..structures.instances import ImageRecord, Instances
from ..structures.masks import rle_to_pycocotools, rles_to_boxes_xyxy
from ..structures.stitch import (Parts, StitchRule, TileWindow, concat_parts, dedupe, enlarged_mask_to_rle,
                                 shift_rle, stitch_parts)


TILE_ID = re.compile(r"^(?P<parent>.+)#tile=(?P<x0>\d+),(?P<y0>\d+),(?P<x1>\d+),(?P<y1>\d+)$")
GLOBAL_TAG = "global"


# -- the plan --------------------------------------------------------------------------------------
def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``[0, length)`` with at least ``overlap``
    shared pixels between neighbours, spread evenly (first at 0, last ending at ``length``)."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def plan_tiles(height: int, width: int, tile_size: int, overlap: int) -> tuple[TileWindow, ...]:
    """The tiles of a ``height`` x ``width`` image, row by row (a side shorter than ``tile_size`` is
    one tile as long as that side)."""
    rows = axis_starts(height, tile_size, overlap)
    cols = axis_starts(width, tile_size, overlap)
    return tuple(TileWindow(x, y, min(x + tile_size, width), min(y + tile_size, height)) for y in rows for x in cols)


def image_size(image: Any) -> tuple[int, int]:
    """``(height, width)`` of a decoded ``(H, W, 3)`` array or of a region reader."""
    return int(image.shape[0]), int(image.shape[1])


def wants_tiles(image: Any, tiling: TilingConfig | None) -> bool:
    """Whether ``image`` is tiled: ``always``; ``auto`` when it does not fit one tile; a region
    reader always (it is never decoded whole)."""
    if tiling is None or tiling.mode == "never":
        return False
    if not isinstance(image, np.ndarray):
        return True
    height, width = image_size(image)
    return tiling.mode == "always" or max(height, width) > tiling.tile_size


def read_window(image: Any, window: TileWindow) -> np.ndarray:
    """The ``(h, w, 3)`` uint8 pixels of ``window``: a copy of the array's slice, or a region read."""
    if isinstance(image, np.ndarray):
        return np.ascontiguousarray(image[window.y0:window.y1, window.x0:window.x1])
    return image.read_window(window)


# -- tile records -----------------------------------------------------------------------------------
def tile_record(record: ImageRecord, window: TileWindow) -> ImageRecord:
    """The record a generator gets for one tile of ``record``'s image."""
    return dataclasses.replace(record, image_id=f"{record.image_id}#tile={window.x0},{window.y0},{window.x1},"
                                                f"{window.y1}", width=window.width, height=window.height, sha256=None)


def parse_tile_id(image_id: str) -> tuple[str, TileWindow] | None:
    """``(parent image_id, window)`` of a tile's ``image_id``; ``None`` for a whole image."""
    match = TILE_ID.match(image_id)
    if match is None:
        return None
    x0, y0, x1, y1 = (int(match[k]) for k in ("x0", "y0", "x1", "y1"))
    return match["parent"], TileWindow(x0, y0, x1, y1)


def stitch_rule(tiling: TilingConfig) -> StitchRule:
    return StitchRule(seam_ios=tiling.seam_ios, nms_iou=tiling.nms_iou, nms_ios=tiling.nms_ios,
                      max_columns=tuple(tiling.max_score_columns))


# -- the model work of one tiled image --------------------------------------------------------------
def tiled_work(generator: Generator, image: Any, record: ImageRecord, tiling: TilingConfig,
               batch_size: int) -> Callable[[], Instances]:
    """Run the generator on every tile (and the global view) now; return the finisher that stitches.

    Never raises: a failure of any tile fails the image (its finisher raises the error). A region
    reader is closed when its tiles are read.
    """
    try:
        height, width = image_size(image)
        windows = plan_tiles(height, width, tiling.tile_size, tiling.overlap)
        pieces = _tile_pieces(generator, image, record, windows, batch_size)
        global_piece = _global_piece(generator, image, record, tiling) if tiling.global_pass else None
    except Exception as exc:  # this image's failure, raised (and logged) when its finisher runs
        return failed(exc)
    finally:
        if not isinstance(image, np.ndarray) and hasattr(image, "close"):
            image.close()
    return lambda: _stitched(pieces, global_piece, windows, height, width, tiling)


def _tile_pieces(generator: Generator, image: Any, record: ImageRecord, windows: Sequence[TileWindow],
                 batch_size: int) -> list[tuple[int, Instances]]:
    """``(tile index, full-frame Instances)`` of every tile, ``batch_size`` tiles per call."""
    height, width = image_size(image)
    pieces: list[tuple[int, Instances]] = []
    numbered = list(enumerate(windows))
    for start in range(0, len(numbered), batch_size):
        batch = numbered[start:start + batch_size]
        tiles = [read_window(image, w) for _, w in batch]
        records = [tile_record(record, w) for _, w in batch]
        finishers = generator.generate_batch(tiles, records)
        if len(finishers) != len(records):
            raise ValidationError(f"{type(generator).__name__}.generate_batch returned {len(finishers)} results"
                                  f" for {len(records)} tiles")
        for (index, window), tile_rec, finish in zip(batch, records, finishers):
            pieces.append((index, shift_instances(_checked(finish(), tile_rec), window, height, width)))
    return pieces


def _checked(instances: Instances, record: ImageRecord) -> Instances:
    if not isinstance(instances, Instances):
        raise ValidationError(f"generator must return Instances; got {type(instances).__name__}")
    if (instances.height, instances.width) != (record.height, record.width):
        raise ValidationError(f"generator returned a {instances.width}x{instances.height} frame for the "
                              f"{record.width}x{record.height} tile {record.image_id!r}")
    return instances


def shift_instances(instances: Instances, window: TileWindow, height: int, width: int) -> Instances:
    """A tile's ``Instances`` in the full ``height`` x ``width`` frame (masks, boxes); scores, class ids
    and attributes unchanged (attributes stay in the tile's frame: see ``tile_window_xyxy``)."""
    masks = tuple(shift_rle(r, window.x0, window.y0, height, width) for r in instances.masks_rle)
    boxes = np.asarray(instances.boxes_xyxy, np.float32) + np.float32([window.x0, window.y0, window.x0, window.y0])
    boxes = np.minimum(boxes, np.float32([width, height, width, height]))
    return dataclasses.replace(instances, height=height, width=width, masks_rle=masks, boxes_xyxy=boxes,
                               provenance=dict(instances.provenance))


# -- the global view --------------------------------------------------------------------------------
def shrink_factor(height: int, width: int, global_size: int) -> int:
    """The integer factor that brings the long side to ``global_size`` or just below."""
    return max(1, math.ceil(max(height, width) / global_size))


def shrunk(image: Any, factor: int, strip_rows: int = 256) -> np.ndarray:
    """``(ceil(H/f), ceil(W/f), 3)`` uint8: the mean of each ``f`` x ``f`` block, read in strips of
    about ``strip_rows`` rows (a region reader is never read whole)."""
    height, width = image_size(image)
    out_h, out_w = math.ceil(height / factor), math.ceil(width / factor)
    out = np.empty((out_h, out_w, 3), np.uint8)
    step = max(1, strip_rows // factor) * factor
    for y in range(0, height, step):
        strip = read_window(image, TileWindow(0, y, width, min(y + step, height))).astype(np.float32)
        rows, cols = math.ceil(strip.shape[0] / factor) * factor, out_w * factor
        strip = np.pad(strip, ((0, rows - strip.shape[0]), (0, cols - width), (0, 0)), mode="edge")
        blocks = strip.reshape(rows // factor, factor, out_w, factor, 3).mean(axis=(1, 3))
        out[y // factor:y // factor + blocks.shape[0]] = np.rint(blocks).astype(np.uint8)
    return out


def _global_piece(generator: Generator, image: Any, record: ImageRecord, tiling: TilingConfig) -> Instances:
    height, width = image_size(image)
    factor = shrink_factor(height, width, tiling.global_size)
    small = shrunk(image, factor)
    small_record = dataclasses.replace(record, image_id=f"{record.image_id}#{GLOBAL_TAG}={factor}",
                                       width=small.shape[1], height=small.shape[0], sha256=None)
    finish = generator.generate_batch([small], [small_record])[0]
    return enlarge_instances(_checked(finish(), small_record), factor, height, width)


def enlarge_instances(instances: Instances, factor: int, height: int, width: int) -> Instances:
    """Instances of the view shrunk by ``factor`` in the full frame: each mask's runs are enlarged
    (nearest neighbour), so no full-resolution mask is ever dense."""
    masks = tuple(_enlarged_rle(r, factor, height, width) for r in instances.masks_rle)
    return dataclasses.replace(instances, height=height, width=width, masks_rle=masks,
                               boxes_xyxy=rles_to_boxes_xyxy(masks), provenance=dict(instances.provenance))


def _enlarged_rle(rle: dict, factor: int, height: int, width: int) -> dict:
    mask = coco_mask.decode(rle_to_pycocotools(rle)).astype(bool)  # the shrunk view's size
    return enlarged_mask_to_rle(mask, factor, height, width)


# -- stitching ----------------------------------------------------------------------------------------
def _stitched(pieces: list[tuple[int, Instances]], global_piece: Instances | None, windows: Sequence[TileWindow],
              height: int, width: int, tiling: TilingConfig) -> Instances:
    rule = stitch_rule(tiling)
    tiles = stitch_parts(concat_parts(pieces, windows, height, width), rule)
    result = tiles.instances
    if global_piece is not None:
        result = with_global_view(tiles, global_piece, tiling, rule)
    provenance = {**dict(result.provenance), "tiling": {"tiles": len(windows), "tile_size": tiling.tile_size,
                                                         "overlap": tiling.overlap, "global_pass": tiling.global_pass}}
    return dataclasses.replace(result, provenance=provenance)


def with_global_view(tiles: Parts, global_view: Instances, tiling: TilingConfig, rule: StitchRule) -> Instances:
    """Large objects (a box side >= ``global_min_side``, 0 = ``tile_size // 2``) from the global view,
    small ones from the stitched tiles; then step 3 of ``stitch`` between the two sources only: a tile
    instance that duplicates a global one (IoU), or a seam-cut one inside it, is dropped."""
    min_side = tiling.global_min_side or tiling.tile_size // 2
    small_keep = _long_sides(tiles.instances.boxes_xyxy) < min_side
    small = tiles.instances[small_keep]
    large = global_view[_long_sides(global_view.boxes_xyxy) >= min_side]
    if not len(large):
        return small
    large = _with_tile_columns(large, small)
    pieces = [(0, small), (1, large)] if len(small) else [(1, large)]
    parts = concat_parts(pieces, tiles.windows, small.height, small.width)
    cut = np.concatenate([tiles.cut[small_keep], np.zeros(len(large), bool)])
    keep = dedupe(Parts(parts.instances, parts.tile_index, parts.windows, cut), rule)
    return parts.instances[keep]


def _long_sides(boxes_xyxy: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    return np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def _with_tile_columns(large: Instances, small: Instances) -> Instances:
    """The global instances with the stitching attributes the tile instances carry."""
    attributes = dict(large.attributes)
    attributes.setdefault("tile_parts", (0,) * len(large))
    attributes.setdefault("tile_window_xyxy", (None,) * len(large))
    if len(small):
        for name in small.attributes:
            attributes.setdefault(name, (None,) * len(large))
    return dataclasses.replace(large, attributes=attributes, provenance=dict(large.provenance))


__all__ = ["axis_starts", "enlarge_instances", "parse_tile_id", "plan_tiles", "read_window", "shift_instances",
           "shrink_factor", "shrunk", "tile_record", "tiled_work", "wants_tiles", "with_global_view"]
