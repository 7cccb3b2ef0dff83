"""Stitching tiled results into one image's instances: pure numpy + pycocotools, no torch.

Every mask here is a compressed COCO RLE in the **full image frame**; nothing decodes a mask to a
full-size dense array. A part is one instance a generator found in one tile (``TileWindow``).

The rule (``docs/tiling.md``), in three steps:

1. **Cut parts.** A part is *cut* when its box touches a tile edge that is a seam (an edge inside the
   image, not the image border): the object may continue in the neighbouring tile.
2. **Merge.** Two parts from different tiles whose windows overlap are one object when they have the
   same class (or the result is class-agnostic), at least one of them is cut, and inside the two
   windows' shared region ``S`` their overlap is large relative to the smaller one there:
   ``|a ∩ b ∩ S| / min(|a ∩ S|, |b ∩ S|) >= seam_ios``. Two tiles see the same pixels in ``S``, so the
   two parts of one object coincide there, while two different objects that only touch share no
   pixel. Groups are closed transitively (an object across a corner of four tiles is one group) and
   their masks are united. Scores: ``max`` for the ``max_columns`` (presence-like, e.g.
   ``clip_class_prob``), the area-weighted mean of the parts for every other column. Attributes come
   from the group's largest part.
3. **Deduplicate** (containment-aware, across tiles only: the generator already did its own NMS in a
   tile, and two instances of one tile are never compared). By descending ``confidence`` (area where
   there is none), drop an instance whose IoU with a kept one from another tile is ``> nms_iou``
   (an object seen whole by two tiles). Then, largest first, drop a *cut* instance that lies inside a
   larger kept one of the same class by more than ``nms_ios`` (intersection over its own area): a
   fragment of an object another tile saw whole. A whole (uncut) object inside a larger one is kept:
   it is nested (food in a bowl), not a fragment.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from pycocotools import mask as coco_mask

from ..errors import ValidationError
from .instances import Instances
from .masks import RLE, rle_areas, rle_to_json, rle_to_pycocotools, rles_to_boxes_xyxy

TILE_ATTRIBUTE = "tile_parts"  # per instance: how many tile parts were merged into it
WINDOW_ATTRIBUTE = "tile_window_xyxy"  # per instance: the window of its largest part (its attributes' frame)


@dataclass(frozen=True, order=True)
class TileWindow:
    """One tile: ``[x0, x1) x [y0, y1)`` in absolute full-image pixels."""

    x0: int
    y0: int
    x1: int
    y1: int

    def __post_init__(self) -> None:
        if not (0 <= self.x0 < self.x1 and 0 <= self.y0 < self.y1):
            raise ValidationError(f"a tile window needs 0 <= x0 < x1 and 0 <= y0 < y1; got {self.xyxy}")

    @property
    def xyxy(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def intersection(self, other: "TileWindow") -> "TileWindow | None":
        x0, y0 = max(self.x0, other.x0), max(self.y0, other.y0)
        x1, y1 = min(self.x1, other.x1), min(self.y1, other.y1)
        return TileWindow(x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


@dataclass(frozen=True)
class StitchRule:
    """The thresholds of the rule above (``images.tiling`` in a recipe sets them)."""

    seam_ios: float = 0.5
    nms_iou: float = 0.5
    nms_ios: float = 0.8
    max_columns: tuple[str, ...] = ("clip_class_prob",)
    order_column: str = "confidence"


@dataclass(frozen=True)
class Parts:
    """Instances of several tiles in one full frame, with where each came from."""

    instances: Instances
    tile_index: np.ndarray  # (N,) int64 index into ``windows``; -1 = not from a tile (global view)
    windows: tuple[TileWindow, ...]
    cut: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (N,) bool, box touches a seam


# -- RLE building blocks (no full-frame dense array) ------------------------------------------------
def crop_mask_to_rle(mask_crop: np.ndarray, x0: int, y0: int, height: int, width: int) -> RLE:
    """A full-frame RLE of ``mask_crop`` ``(h, w)`` bool placed with its top-left pixel at ``(x0, y0)``.

    Runs are computed from the crop alone (column-major, as COCO RLE is), so memory is bounded by the
    crop; the crop must lie inside the ``height`` x ``width`` frame.
    """
    crop = np.asarray(mask_crop, bool)
    if crop.ndim != 2 or x0 < 0 or y0 < 0 or x0 + crop.shape[1] > width or y0 + crop.shape[0] > height:
        raise ValidationError(f"a {crop.shape} crop at x0={x0}, y0={y0} does not fit a {width}x{height} frame")
    starts, ends = _column_runs(crop)
    columns = starts // max(crop.shape[0], 1)
    offset = (x0 + columns) * height + y0 - columns * crop.shape[0]
    return _runs_to_rle(starts + offset, ends + offset, height, width)


def enlarged_mask_to_rle(mask: np.ndarray, factor: int, height: int, width: int) -> RLE:
    """The full-frame RLE of ``mask`` ``(h, w)`` bool (a view shrunk by ``factor``) enlarged by
    nearest neighbour (pixel ``(y, x)`` covers ``[y f, (y + 1) f) x [x f, (x + 1) f)``), clipped to the
    ``height`` x ``width`` frame. Runs are enlarged, not pixels: memory is bounded by the runs."""
    mask = np.asarray(mask, bool)
    starts, ends = _column_runs(mask)
    h = max(mask.shape[0], 1)
    cols, row0, row1 = starts // h, starts % h, ends - (starts // h) * h
    k = np.arange(factor, dtype=np.int64)
    xs = (cols[:, None] * factor + k[None, :]).ravel()
    y0s = np.repeat(np.minimum(row0 * factor, height), factor)
    y1s = np.repeat(np.minimum(row1 * factor, height), factor)
    keep = (xs < width) & (y1s > y0s)
    xs, y0s, y1s = xs[keep], y0s[keep], y1s[keep]
    order = np.lexsort((y0s, xs))
    xs, y0s, y1s = xs[order], y0s[order], y1s[order]
    return _runs_to_rle(xs * height + y0s, xs * height + y1s, height, width)


def box_rle(window: TileWindow, height: int, width: int) -> RLE:
    """The full-frame RLE of the rectangle ``window`` (every pixel inside it set)."""
    if window.x1 > width or window.y1 > height:
        raise ValidationError(f"window {window.xyxy} does not fit a {width}x{height} frame")
    columns = np.arange(window.x0, window.x1, dtype=np.int64)
    return _runs_to_rle(columns * height + window.y0, columns * height + window.y1, height, width)


def shift_rle(rle: RLE, x0: int, y0: int, height: int, width: int) -> RLE:
    """A tile-frame RLE moved to ``(x0, y0)`` of the full frame; decodes the tile mask only."""
    mask = coco_mask.decode(rle_to_pycocotools(rle)).astype(bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return _runs_to_rle(np.zeros(0, np.int64), np.zeros(0, np.int64), height, width)
    crop = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return crop_mask_to_rle(crop, x0 + int(cols[0]), y0 + int(rows[0]), height, width)


def _column_runs(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half-open runs of set pixels in the column-major flattening of ``crop`` (never across columns)."""
    h, w = crop.shape
    padded = np.zeros((w, h + 2), np.int8)
    padded[:, 1:-1] = crop.T
    diff = np.diff(padded, axis=1)  # (w, h + 1): +1 where a run starts, -1 after it ends
    col_s, row_s = np.nonzero(diff == 1)
    col_e, row_e = np.nonzero(diff == -1)
    return (col_s * h + row_s).astype(np.int64), (col_e * h + row_e).astype(np.int64)


def _runs_to_rle(starts: np.ndarray, ends: np.ndarray, height: int, width: int) -> RLE:
    """Compressed RLE of sorted, disjoint half-open runs over the column-major ``height*width`` frame."""
    if starts.size:
        joined = np.flatnonzero(starts[1:] == ends[:-1])  # a run ending at a column's bottom row, next at the top
        starts, ends = np.delete(starts, joined + 1), np.delete(ends, joined)
    bounds = np.empty(2 * starts.size + 2, np.int64)
    bounds[0], bounds[-1] = 0, height * width
    bounds[1:-1:2], bounds[2:-1:2] = starts, ends
    counts = np.diff(bounds)
    if counts.size > 1 and counts[-1] == 0:  # the mask reaches the last pixel: no trailing empty run
        counts = counts[:-1]                  # (pycocotools' encoder writes none either)
    rle = coco_mask.frPyObjects({"counts": [int(c) for c in counts], "size": [height, width]}, height, width)
    return rle_to_json(rle)


def _intersect(a: RLE, b: RLE) -> RLE:
    return coco_mask.merge([rle_to_pycocotools(a), rle_to_pycocotools(b)], intersect=True)


def union_rles(rles: Sequence[RLE]) -> RLE:
    """The pixel union of RLEs of one frame."""
    if len(rles) == 1:
        return rle_to_json(dict(rles[0]))
    return rle_to_json(coco_mask.merge([rle_to_pycocotools(r) for r in rles], intersect=False))


def _area(rle: dict) -> int:
    return int(coco_mask.area(rle_to_pycocotools(rle)))


# -- step 1: cut parts --------------------------------------------------------------------------------
def cut_flags(boxes_xyxy: np.ndarray, tile_index: np.ndarray, windows: Sequence[TileWindow],
              height: int, width: int) -> np.ndarray:
    """``(N,)`` bool: the part's box (XYXY, x2/y2 exclusive) touches a seam edge of its tile."""
    cut = np.zeros(len(boxes_xyxy), bool)
    for i, (box, t) in enumerate(zip(np.asarray(boxes_xyxy, np.float64), tile_index)):
        if t < 0:
            continue
        w = windows[t]
        cut[i] = ((w.x0 > 0 and box[0] <= w.x0) or (w.y0 > 0 and box[1] <= w.y0)
                  or (w.x1 < width and box[2] >= w.x1) or (w.y1 < height and box[3] >= w.y1))
    return cut


# -- step 2: merge ----------------------------------------------------------------------------------
def merge_groups(parts: Parts, rule: StitchRule) -> list[list[int]]:
    """Groups of part indices that are one object (singletons included), each sorted, in order of
    their first part."""
    inst = parts.instances
    parent = list(range(len(inst)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in _merge_pairs(parts, rule):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(len(inst)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _merge_pairs(parts: Parts, rule: StitchRule) -> Iterable[tuple[int, int]]:
    """Pairs ``(a, b)`` of parts from overlapping tiles that pass the seam test."""
    inst, tiles = parts.instances, parts.tile_index
    by_tile: dict[int, np.ndarray] = {int(t): np.flatnonzero(tiles == t) for t in np.unique(tiles) if t >= 0}
    used = sorted(by_tile)
    boxes = np.asarray([parts.windows[t].xyxy for t in used], np.int64).reshape(-1, 4)
    for i, ta in enumerate(used):  # neighbours found with one vectorised test per tile (thousands of tiles)
        meet = ((boxes[i + 1:, 0] < boxes[i, 2]) & (boxes[i + 1:, 2] > boxes[i, 0])
                & (boxes[i + 1:, 1] < boxes[i, 3]) & (boxes[i + 1:, 3] > boxes[i, 1]))
        for j in np.flatnonzero(meet):
            tb = used[i + 1 + int(j)]
            shared = parts.windows[ta].intersection(parts.windows[tb])
            yield from _seam_pairs(inst, parts.cut, by_tile[ta], by_tile[tb], shared, rule)


def _seam_pairs(inst: Instances, cut: np.ndarray, in_a: np.ndarray, in_b: np.ndarray, shared: TileWindow,
                rule: StitchRule) -> Iterable[tuple[int, int]]:
    a_idx, b_idx = _touching(inst.boxes_xyxy, in_a, shared), _touching(inst.boxes_xyxy, in_b, shared)
    if not a_idx.size or not b_idx.size:
        return
    region = box_rle(shared, inst.height, inst.width)
    clipped = {int(i): _intersect(inst.masks_rle[i], region) for i in np.concatenate([a_idx, b_idx])}
    area = {i: _area(r) for i, r in clipped.items()}
    for a in a_idx:
        for b in b_idx:
            a, b = int(a), int(b)
            if not (cut[a] or cut[b]) or not area[a] or not area[b] or not _same_class(inst, a, b):
                continue
            if not _boxes_meet(inst.boxes_xyxy[a], inst.boxes_xyxy[b]):
                continue
            overlap = _area(_intersect(clipped[a], clipped[b]))
            if overlap and overlap / min(area[a], area[b]) >= rule.seam_ios:
                yield a, b


def _touching(boxes: np.ndarray, indices: np.ndarray, window: TileWindow) -> np.ndarray:
    """The ``indices`` whose boxes intersect ``window``."""
    b = boxes[indices]
    hit = (b[:, 0] < window.x1) & (b[:, 2] > window.x0) & (b[:, 1] < window.y1) & (b[:, 3] > window.y0)
    return indices[hit]


def _boxes_meet(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


def _same_class(inst: Instances, a: int, b: int) -> bool:
    return inst.class_ids is None or inst.class_ids[a] == inst.class_ids[b]


def merge_parts(parts: Parts, groups: Sequence[Sequence[int]], rule: StitchRule) -> Parts:
    """One instance per group: mask union, tight box, scores and attributes by the rule above;
    ``cut`` is true when any member was cut, ``tile_index`` is the largest member's."""
    inst = parts.instances
    areas = rle_areas(inst.masks_rle).astype(np.float64)
    masks = [union_rles([inst.masks_rle[i] for i in g]) for g in groups]
    largest = np.asarray([g[int(np.argmax(areas[list(g)]))] for g in groups], np.int64)
    scores = {name: np.asarray([_combine(column[list(g)], areas[list(g)], name in rule.max_columns)
                                for g in groups], np.float32) for name, column in inst.scores.items()}
    attributes = {k: tuple(v[i] for i in largest) for k, v in inst.attributes.items()
                  if k not in (TILE_ATTRIBUTE, WINDOW_ATTRIBUTE)}
    counts = inst.attributes.get(TILE_ATTRIBUTE, (1,) * len(inst))
    attributes[TILE_ATTRIBUTE] = tuple(int(sum(counts[i] for i in g)) for g in groups)
    attributes[WINDOW_ATTRIBUTE] = tuple(_window_of(parts, i) for i in largest)
    merged = Instances(
        height=inst.height, width=inst.width, masks_rle=tuple(masks), boxes_xyxy=rles_to_boxes_xyxy(masks),
        scores=scores, class_ids=None if inst.class_ids is None else inst.class_ids[largest],
        attributes=attributes, provenance=dict(inst.provenance),
    )
    cut = np.asarray([bool(parts.cut[list(g)].any()) for g in groups], bool)
    return Parts(merged, parts.tile_index[largest], parts.windows, cut)


def _window_of(parts: Parts, index: int) -> list[int] | None:
    if WINDOW_ATTRIBUTE in parts.instances.attributes:
        return parts.instances.attributes[WINDOW_ATTRIBUTE][index]
    t = int(parts.tile_index[index])
    return list(parts.windows[t].xyxy) if t >= 0 else None


def _combine(values: np.ndarray, weights: np.ndarray, use_max: bool) -> float:
    if use_max or weights.sum() <= 0:
        return float(values.max())
    return float(np.average(values, weights=weights))


# -- step 3: deduplicate ------------------------------------------------------------------------------
def dedupe(parts: Parts, rule: StitchRule) -> np.ndarray:
    """Indices of the instances kept by step 3, in ascending order."""
    inst = parts.instances
    n = len(inst)
    if n == 0:
        return np.zeros(0, np.int64)
    areas = rle_areas(inst.masks_rle).astype(np.float64)
    order_score = inst.scores.get(rule.order_column, areas)
    alive = np.ones(n, bool)
    for i in np.lexsort((np.arange(n), -areas, -np.asarray(order_score, np.float64))):  # by score
        if alive[i]:
            alive &= ~_duplicates_of(parts, int(i), alive, areas, rule)
    for i in np.lexsort((np.arange(n), -areas)):  # largest first
        if alive[i]:
            alive &= ~_fragments_in(parts, int(i), alive, areas, rule)
    return np.flatnonzero(alive)


def _candidates(parts: Parts, i: int, alive: np.ndarray) -> np.ndarray:
    """Alive instances other than ``i``, from another tile, whose boxes meet ``i``'s."""
    boxes = parts.instances.boxes_xyxy
    b = boxes[i]
    meet = (boxes[:, 0] < b[2]) & (boxes[:, 2] > b[0]) & (boxes[:, 1] < b[3]) & (boxes[:, 3] > b[1])
    meet &= alive & (parts.tile_index != parts.tile_index[i])
    meet[i] = False
    return np.flatnonzero(meet)


def _intersections(parts: Parts, i: int, others: np.ndarray) -> np.ndarray:
    rles = parts.instances.masks_rle
    a = [rle_to_pycocotools(rles[i])]
    over_a = np.asarray(coco_mask.iou(a, [rle_to_pycocotools(rles[j]) for j in others], [1] * len(others)))
    return np.rint(over_a.reshape(-1) * _area(rles[i]))


def _duplicates_of(parts: Parts, i: int, alive: np.ndarray, areas: np.ndarray, rule: StitchRule) -> np.ndarray:
    drop = np.zeros(len(alive), bool)
    others = _candidates(parts, i, alive)
    if others.size:
        inter = _intersections(parts, i, others)
        union = areas[i] + areas[others] - inter
        drop[others[(union > 0) & (inter > rule.nms_iou * np.maximum(union, 1))]] = True
    return drop


def _fragments_in(parts: Parts, i: int, alive: np.ndarray, areas: np.ndarray, rule: StitchRule) -> np.ndarray:
    """Cut, smaller, same-class instances lying inside ``i`` by more than ``nms_ios``."""
    drop = np.zeros(len(alive), bool)
    others = _candidates(parts, i, alive)
    inst = parts.instances
    others = others[parts.cut[others] & (areas[others] <= areas[i])]
    if inst.class_ids is not None:
        others = others[inst.class_ids[others] == inst.class_ids[i]]
    if others.size:
        inter = _intersections(parts, i, others)
        drop[others[inter > rule.nms_ios * np.maximum(areas[others], 1)]] = True
    return drop


# -- the whole rule -------------------------------------------------------------------------------
def stitch(parts: Parts, rule: StitchRule = StitchRule()) -> Instances:
    """Steps 1-3 on parts already in the full frame: one ``Instances`` per image, instances in the
    order of their first part. Adds the ``tile_parts`` and ``tile_window_xyxy`` attributes."""
    return stitch_parts(parts, rule).instances


def stitch_parts(parts: Parts, rule: StitchRule = StitchRule()) -> Parts:
    """:func:`stitch`, keeping each result's ``cut`` flag and largest part's tile."""
    inst = parts.instances
    if len(parts.tile_index) != len(inst):
        raise ValidationError(f"tile_index has {len(parts.tile_index)} entries for {len(inst)} parts")
    cut = cut_flags(inst.boxes_xyxy, parts.tile_index, parts.windows, inst.height, inst.width)
    parts = Parts(inst, np.asarray(parts.tile_index, np.int64), parts.windows, cut | _given_cut(parts))
    merged = merge_parts(parts, merge_groups(parts, rule), rule)
    keep = dedupe(merged, rule)
    return Parts(merged.instances[keep], merged.tile_index[keep], merged.windows, merged.cut[keep])


def _given_cut(parts: Parts) -> np.ndarray:
    return parts.cut if len(parts.cut) == len(parts.instances) else np.zeros(len(parts.instances), bool)


def concat_parts(pieces: Sequence[tuple[int, Instances]], windows: Sequence[TileWindow], height: int,
                 width: int) -> Parts:
    """``(tile index or -1, full-frame Instances)`` pieces -> one ``Parts``. Score columns, class ids
    and attributes must agree across pieces (a column missing in some piece is an error)."""
    given = list(pieces)
    pieces = [(t, p) for t, p in given if len(p)]
    if not pieces:  # nothing found: keep the (empty) columns the generator returns
        empty = given[0][1] if given else Instances.empty(height, width)
        if (empty.height, empty.width) != (height, width):
            raise ValidationError(f"a part is in a {empty.width}x{empty.height} frame; expected {width}x{height}")
        return Parts(empty, np.zeros(0, np.int64), tuple(windows), np.zeros(0, bool))
    first = pieces[0][1]
    for _, p in pieces:
        if (p.height, p.width) != (height, width):
            raise ValidationError(f"a part is in a {p.width}x{p.height} frame; expected {width}x{height}")
        if set(p.scores) != set(first.scores) or set(p.attributes) != set(first.attributes):
            raise ValidationError("tiles returned different score or attribute columns: "
                                  f"{sorted(p.scores)} / {sorted(first.scores)}")
        if (p.class_ids is None) != (first.class_ids is None):
            raise ValidationError("some tiles returned class ids and others did not")
    inst = Instances(
        height=height, width=width,
        masks_rle=tuple(r for _, p in pieces for r in p.masks_rle),
        boxes_xyxy=np.concatenate([p.boxes_xyxy for _, p in pieces]),
        scores={k: np.concatenate([p.scores[k] for _, p in pieces]) for k in first.scores},
        class_ids=None if first.class_ids is None else np.concatenate([p.class_ids for _, p in pieces]),
        attributes={k: tuple(v for _, p in pieces for v in p.attributes[k]) for k in first.attributes},
        provenance=dict(first.provenance),
    )
    tile_index = np.concatenate([np.full(len(p), t, np.int64) for t, p in pieces])
    return Parts(inst, tile_index, tuple(windows), np.zeros(len(inst), bool))


__all__ = ["Parts", "StitchRule", "TileWindow", "box_rle", "concat_parts", "crop_mask_to_rle", "cut_flags",
           "dedupe", "enlarged_mask_to_rle", "merge_groups", "merge_parts", "shift_rle", "stitch", "stitch_parts", "union_rles"]
