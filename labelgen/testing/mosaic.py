"""Mosaics of coco128-seg images and their ground truth, for the tiling check (test helper only).

``build_mosaic`` pastes ``grid x grid`` images into one large image, each at the top-left corner of a
``cell`` x ``cell`` square, and writes the layout (``<name>.layout.json``: frame size, which image
lies where). The ground truth of the mosaic is each image's YOLO-seg masks shifted to its place
(:func:`mosaic_truth`, full-frame RLEs built without a full-size dense mask).

``zip-oracle-mosaic`` (registered on import) is ``zip-oracle`` answering for a *window* of a mosaic:
a tile record (``engine.tiling.tile_record``) or the global view (``<id>#global=F``: the mosaic
shrunk by ``F``, sampled at each ``F`` x ``F`` block's centre pixel) gets the ground truth of the
images it overlaps, cut to the window. So the oracle sees exactly what a perfect model would see
in that tile, and stitching is what is measured.

:func:`measure` scores a run's instances against the mosaic truth: COCO segm AP (pycocotools),
recall at IoU 0.5 of the objects a tile border cuts, and duplicates left (a prediction matching,
or lying inside, a ground-truth object another better prediction already matched).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from ..engine.tiling import GLOBAL_TAG, parse_tile_id, plan_tiles
from ..errors import ValidationError
from ..generators import GENERATORS
from ..structures.instances import ImageRecord, Instances
from ..structures.masks import rle_to_pycocotools
from ..structures.stitch import TileWindow, crop_mask_to_rle
from .oracle import OracleConfig, OracleImage, ZipOracleGenerator, _ground_truth, paint_owners

BACKGROUND = 114  # grey, as mosaic augmentations pad
GLOBAL_ID = re.compile(rf"^(?P<parent>.+)#{GLOBAL_TAG}=(?P<factor>\d+)$")


@dataclass(frozen=True)
class Placement:
    image: str  # coco128 file name
    x0: int
    y0: int


@dataclass(frozen=True)
class Layout:
    width: int
    height: int
    placements: tuple[Placement, ...]

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "Layout":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(data["width"], data["height"], tuple(Placement(**p) for p in data["placements"]))

    def write(self, path: str | os.PathLike[str]) -> None:
        data = {"width": self.width, "height": self.height,
                "placements": [{"image": p.image, "x0": p.x0, "y0": p.y0} for p in self.placements]}
        Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")


def build_mosaic(gt_root: str | os.PathLike[str], split: str, grid: int, out_dir: str | os.PathLike[str],
                 cell: int = 640, first: int = 0, suffix: str = ".png") -> tuple[Path, Layout]:
    """Write ``mosaic_<grid>x<grid>_<first>.png`` and its layout into ``out_dir``; images ``first``,
    ``first + 1``, ... of the split (sorted by name), row by row."""
    truth = _ground_truth(os.path.abspath(gt_root), split)
    records = sorted(truth.records, key=lambda r: Path(r.image_id).name)[first:first + grid * grid]
    if len(records) < grid * grid:
        raise ValidationError(f"a {grid}x{grid} mosaic needs {grid * grid} images; {gt_root} has {len(records)}")
    canvas = np.full((grid * cell, grid * cell, 3), BACKGROUND, np.uint8)
    placements = []
    for i, record in enumerate(records):
        image = np.asarray(Image.open(record.uri).convert("RGB"))
        y0, x0 = (i // grid) * cell, (i % grid) * cell
        canvas[y0:y0 + image.shape[0], x0:x0 + image.shape[1]] = image[:cell, :cell]
        placements.append(Placement(Path(record.image_id).name, x0, y0))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"mosaic_{grid}x{grid}_{first}{suffix}"
    Image.fromarray(canvas).save(path)
    layout = Layout(canvas.shape[1], canvas.shape[0], tuple(placements))
    layout.write(out / f"{path.name}.layout.json")
    return path, layout


def _source_truth(gt_root: str, split: str, name: str) -> Instances:
    truth = _ground_truth(os.path.abspath(gt_root), split)
    record = {Path(r.image_id).name: r for r in truth.records}[name]
    item = truth.load_item(record)
    if item.instances is None:
        raise ValidationError(f"ground truth of {name!r} unreadable: {item.failure}")
    return item.instances


def mosaic_truth(gt_root: str, split: str, layout: Layout) -> Instances:
    """The mosaic's ground truth in its full frame (RLE masks, boxes, class ids; ``source`` attribute)."""
    masks, boxes, ids, sources = [], [], [], []
    for p in layout.placements:
        inst = _source_truth(gt_root, split, p.image)
        for rle, box, cid in zip(inst.masks_rle, inst.boxes_xyxy, inst.class_ids):
            mask = coco_mask.decode(rle_to_pycocotools(rle)).astype(bool)
            masks.append(crop_mask_to_rle(mask, p.x0, p.y0, layout.height, layout.width))
            boxes.append(np.asarray(box) + np.float32([p.x0, p.y0, p.x0, p.y0]))
            ids.append(int(cid))
            sources.append(p.image)
    return Instances(height=layout.height, width=layout.width, masks_rle=tuple(masks),
                     boxes_xyxy=np.asarray(boxes, np.float32).reshape(-1, 4), class_ids=np.int32(ids),
                     attributes={"source": tuple(sources)})


def window_truth(gt_root: str, split: str, layout: Layout, window: TileWindow, factor: int = 1) -> OracleImage:
    """Ground truth of the pixels of ``window`` sampled every ``factor`` pixels (the centre of each
    ``factor`` x ``factor`` block), in a ``ceil(h / f)`` x ``ceil(w / f)`` frame."""
    out_h, out_w = math.ceil(window.height / factor), math.ceil(window.width / factor)
    centre = factor // 2
    rows_full = window.y0 + np.arange(out_h) * factor + centre
    cols_full = window.x0 + np.arange(out_w) * factor + centre
    masks, ids = [], []
    for p in layout.placements:
        inst = _source_truth(gt_root, split, p.image)
        rows = rows_full - p.y0
        cols = cols_full - p.x0
        row_in = (rows >= 0) & (rows < inst.height)
        col_in = (cols >= 0) & (cols < inst.width)
        if not row_in.any() or not col_in.any():
            continue
        for rle, cid in zip(inst.masks_rle, inst.class_ids):
            src = coco_mask.decode(rle_to_pycocotools(rle)).astype(bool)
            mask = np.zeros((out_h, out_w), bool)
            mask[np.ix_(row_in, col_in)] = src[np.ix_(rows[row_in], cols[col_in])]
            if mask.any():
                masks.append(mask)
                ids.append(int(cid))
    stack = np.stack(masks) if masks else np.zeros((0, out_h, out_w), bool)
    boxes = _boxes_of(stack)
    return OracleImage(stack, np.asarray(ids, np.int64), boxes, paint_owners(stack))


def _boxes_of(masks: np.ndarray) -> np.ndarray:
    boxes = np.zeros((len(masks), 4), np.float64)
    for i, m in enumerate(masks):
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        boxes[i] = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
    return boxes


@dataclass(frozen=True)
class MosaicOracleConfig(OracleConfig):
    """``zip-oracle`` for mosaics: ``layouts`` is the folder of the ``*.layout.json`` files."""

    layouts: str = ""


@GENERATORS.register("zip-oracle-mosaic")
class MosaicOracleGenerator(ZipOracleGenerator):
    """``zip-oracle`` answering for whole mosaics, their tiles and their global view (test only)."""

    Config = MosaicOracleConfig

    @classmethod
    def from_config(cls, config: MosaicOracleConfig, *, device: str = "cpu") -> "MosaicOracleGenerator":
        return cls(config)

    def _image_truth(self, record: ImageRecord, frame: tuple[int, int]) -> OracleImage:
        parent, window, factor = _window_of(record.image_id)
        layout = _layout(os.path.abspath(self.oracle_config.layouts), Path(parent).name)
        if window is None:
            window = TileWindow(0, 0, layout.width, layout.height)
        truth = window_truth(self.oracle_config.gt_root, self.oracle_config.split, layout, window, factor)
        if truth.owner.shape != tuple(frame):
            raise ValidationError(f"zip-oracle-mosaic: {record.image_id!r} is {frame[0]}x{frame[1]} but its "
                                  f"ground truth window is {truth.owner.shape[0]}x{truth.owner.shape[1]}")
        return truth


def _window_of(image_id: str) -> tuple[str, TileWindow | None, int]:
    tile = parse_tile_id(image_id)
    if tile is not None:
        return tile[0], tile[1], 1
    match = GLOBAL_ID.match(image_id)
    if match is not None:
        return match["parent"], None, int(match["factor"])
    return image_id, None, 1


@functools.lru_cache(maxsize=16)
def _layout(folder: str, name: str) -> Layout:
    path = Path(folder) / f"{name}.layout.json"
    if not path.is_file():
        raise ValidationError(f"zip-oracle-mosaic: no layout {path} for image {name!r}")
    return Layout.read(path)


# -- measurement -----------------------------------------------------------------------------------------
def seam_crossing(truth: Instances, windows: Sequence[TileWindow]) -> np.ndarray:
    """``(N,)`` bool: the object's box is cut by some tile's border (it meets the tile, not inside it)."""
    out = np.zeros(len(truth), bool)
    for i, b in enumerate(truth.boxes_xyxy):
        for w in windows:
            meets = b[0] < w.x1 and b[2] > w.x0 and b[1] < w.y1 and b[3] > w.y0
            inside = b[0] >= w.x0 and b[2] <= w.x1 and b[1] >= w.y0 and b[3] <= w.y1
            if meets and not inside:
                out[i] = True
                break
    return out


def measure(truth: Instances, predictions: Instances, windows: Sequence[TileWindow]) -> dict[str, Any]:
    """AP (segm, pycocotools), recall @ IoU 0.5 (all objects, and those a tile border cuts), and what is
    left over: ``duplicates`` (a second prediction at IoU >= 0.5 with a matched object), ``fragments``
    (a prediction >= 80% inside an object another prediction matched, IoU < 0.5) and ``pieces`` (any
    prediction >= 80% inside one object with IoU < 0.5, whether or not the object was found)."""
    crossing = seam_crossing(truth, windows)
    iou = _iou(predictions, truth)  # (P, G)
    order = np.argsort(-np.asarray(predictions.scores["confidence"], np.float64), kind="stable")
    matched = np.full(len(truth), -1)
    duplicates = fragments = 0
    inside = _inside(predictions, truth)  # (P, G): |p ∩ g| / |p|
    for p in order:
        g = int(np.argmax(iou[p])) if iou.shape[1] else -1
        if g >= 0 and iou[p, g] >= 0.5:
            if matched[g] < 0:
                matched[g] = p
            else:
                duplicates += 1
        elif iou.shape[1] and (inside[p] >= 0.8).any() and (matched[inside[p] >= 0.8] >= 0).any():
            fragments += 1
    found = matched >= 0
    pieces = int(((iou.max(axis=1) < 0.5) & (inside >= 0.8).any(axis=1)).sum()) if iou.size else 0
    return {"objects": int(len(truth)), "seam_crossing": int(crossing.sum()), "pieces": pieces,
            "recall": float(found.mean()) if len(truth) else 0.0,
            "seam_recall": float(found[crossing].mean()) if crossing.any() else 0.0,
            "duplicates": int(duplicates), "fragments": int(fragments), "predictions": int(len(predictions)),
            "AP": coco_ap(truth, predictions)}


def _iou(a: Instances, b: Instances) -> np.ndarray:
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    return np.asarray(coco_mask.iou([rle_to_pycocotools(r) for r in a.masks_rle],
                                    [rle_to_pycocotools(r) for r in b.masks_rle], [0] * len(b))).reshape(len(a), len(b))


def _inside(a: Instances, b: Instances) -> np.ndarray:
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    return np.asarray(coco_mask.iou([rle_to_pycocotools(r) for r in a.masks_rle],
                                    [rle_to_pycocotools(r) for r in b.masks_rle], [1] * len(b))).reshape(len(a), len(b))


def coco_ap(truth: Instances, predictions: Instances) -> float:
    """COCO segm AP of ``predictions`` on one image (class-aware when both carry class ids)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    classes = sorted(set(truth.class_ids.tolist()) | set((predictions.class_ids if predictions.class_ids is not None
                                                          else np.zeros(0, int)).tolist()))
    gt = {"images": [{"id": 1, "width": truth.width, "height": truth.height}],
          "categories": [{"id": int(c) + 1, "name": str(c)} for c in classes],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": int(c) + 1, "segmentation": dict(r),
                           "area": float(coco_mask.area(rle_to_pycocotools(r))), "iscrowd": 0,
                           "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
                          for i, (r, c, b) in enumerate(zip(truth.masks_rle, truth.class_ids, truth.boxes_xyxy))]}
    if not len(predictions):
        return 0.0
    pred_ids = predictions.class_ids if predictions.class_ids is not None else np.zeros(len(predictions), int)
    dets = [{"image_id": 1, "category_id": int(c) + 1, "segmentation": dict(r), "score": float(s)}
            for r, c, s in zip(predictions.masks_rle, pred_ids, predictions.scores["confidence"])]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(dets), "segm")
        evaluation.params.maxDets = [10_000]  # a mosaic holds hundreds of objects
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][:, :, :, 0, -1]  # IoU x recall x class, area "all"
    return float(precision[precision > -1].mean()) if (precision > -1).any() else 0.0


def shifted_to_mosaic(per_image: Sequence[tuple[Placement, Instances]], layout: Layout) -> Instances:
    """Untiled results of the source images, moved to their places in the mosaic frame."""
    from ..engine.tiling import shift_instances
    from ..structures.stitch import concat_parts

    pieces = [(0, shift_instances(inst, TileWindow(p.x0, p.y0, p.x0 + inst.width, p.y0 + inst.height),
                                  layout.height, layout.width)) for p, inst in per_image]
    return concat_parts(pieces, (), layout.height, layout.width).instances


__all__ = ["Layout", "MosaicOracleConfig", "MosaicOracleGenerator", "Placement", "build_mosaic", "coco_ap",
           "measure", "mosaic_check", "mosaic_truth", "seam_crossing", "shifted_to_mosaic", "window_truth"]


ORACLE_PARAMS = {  # the recipe of tests/test_oracle_pipeline.py, but with a fixed minimum instance size:
    # scaled by the short side (min_cells_reference_short_side), the minimum would be larger in a 512-px tile
    # (25 cells) than in the 427..480-px-high coco128 images (17..22 cells), and tiling would lose small
    # objects for a reason that has nothing to do with stitching
    "split": "train2017", "grid_stride": 4, "part_size": 8, "map_size": 128, "map_coverage": "visible",
    "predicted_iou": "box_iou",
    "discovery": {"activation_ratio": 0.7, "min_activated_fraction": 0.3, "max_box_to_area": 3.0, "min_cells": 20,
                  "min_cells_reference_short_side": 0},
    "sam": {"nms_iou": 0.7, "nms_ios": 1.0},
}


def mosaic_check(gt_root: str, grid: int, out_dir: str | os.PathLike[str], tiling: dict[str, Any],
                 first: int = 0, batch_size: int = 4) -> dict[str, dict[str, Any]]:
    """Build a ``grid`` x ``grid`` mosaic, label it tiled (``images.tiling`` = ``tiling``) with
    ``zip-oracle-mosaic`` and its source images untiled with ``zip-oracle``; :func:`measure` both
    against the mosaic's ground truth. Returns ``{"tiled": ..., "untiled": ...}``."""
    from ..config import recipe_from_dict
    from ..engine.pipeline import label_images

    path, layout = build_mosaic(gt_root, ORACLE_PARAMS["split"], grid, out_dir, first=first)
    params = {**ORACLE_PARAMS, "gt_root": str(gt_root)}
    tiled_recipe = recipe_from_dict({"generator": {"name": "zip-oracle-mosaic", **params, "layouts": str(out_dir)},
                                     "images": {"compute_sha256": False, "tiling": tiling}})
    plain_recipe = recipe_from_dict({"generator": {"name": "zip-oracle", **params}, "images": {"compute_sha256": False}})
    tiled_gen = MosaicOracleGenerator.from_config(tiled_recipe.generator.params)
    plain_gen = ZipOracleGenerator(plain_recipe.generator.params)
    [row] = label_images(tiled_gen, [ImageRecord(path.name, str(path))], tiled_recipe.images, batch_size=batch_size)
    if row.instances is None:
        raise ValidationError(f"the tiled run failed: {row}")
    truth_root = _ground_truth(os.path.abspath(gt_root), ORACLE_PARAMS["split"])
    by_name = {Path(r.image_id).name: r for r in truth_root.records}
    sources = [ImageRecord(p.image, by_name[p.image].uri) for p in layout.placements]
    rows = label_images(plain_gen, sources, plain_recipe.images, batch_size=1)
    per_image = [(p, r.instances) for p, r in zip(layout.placements, rows) if r.instances is not None]
    truth = mosaic_truth(str(gt_root), ORACLE_PARAMS["split"], layout)
    windows = plan_tiles(layout.height, layout.width, tiled_recipe.images.tiling.tile_size,
                         tiled_recipe.images.tiling.overlap)
    return {"tiled": {**measure(truth, row.instances, windows), "tiles": len(windows)},
            "untiled": measure(truth, shifted_to_mosaic(per_image, layout), windows)}
