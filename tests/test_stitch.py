"""The stitching rule (``labelgen/structures/stitch.py``) on hand-built tile parts: no model, no torch.

Each case draws whole objects in a full frame, cuts them by tile windows the way a perfect generator
would see them (the part of an object inside a tile), and checks what ``stitch`` makes of the parts.
"""
import numpy as np
import pytest

from labelgen.errors import ValidationError
from labelgen.structures.instances import Instances
from labelgen.structures.masks import mask_to_rle, masks_to_rles, rles_to_masks
from labelgen.structures.stitch import (Parts, StitchRule, TileWindow, box_rle, concat_parts, crop_mask_to_rle,
                                        enlarged_mask_to_rle, shift_rle, stitch)


def disk(height, width, cx, cy, r):
    yy, xx = np.mgrid[:height, :width]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def rect(height, width, x0, y0, x1, y1):
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def cut_by_tiles(objects, windows, scores=None, class_ids=None, change=None):
    """Parts of full-frame ``objects`` (N, H, W) as each window sees them. ``scores[i]`` is object
    i's confidence in every tile; ``change(tile, obj, mask)`` may alter a part's mask."""
    height, width = objects.shape[1:]
    pieces = []
    for t, w in enumerate(windows):
        masks, conf, ids, origin = [], [], [], []
        for i, obj in enumerate(objects):
            part = np.zeros_like(obj)
            part[w.y0:w.y1, w.x0:w.x1] = obj[w.y0:w.y1, w.x0:w.x1]
            if change is not None:
                part = change(t, i, part)
            if part.any():
                masks.append(part)
                conf.append(1.0 if scores is None else scores[i][t] if isinstance(scores[i], dict) else scores[i])
                ids.append(0 if class_ids is None else class_ids[i])
                origin.append(i)
        if masks:
            pieces.append((t, Instances.from_masks(
                np.stack(masks), scores={"confidence": np.float32(conf), "clip_class_prob": np.float32(conf)},
                class_ids=None if class_ids is None else np.int32(ids), attributes={"object": origin})))
    return concat_parts(pieces, windows, height, width)


def four_tiles():  # 100 x 100 in 2 x 2 tiles of 60 that share a 20-px band
    return (TileWindow(0, 0, 60, 60), TileWindow(40, 0, 100, 60), TileWindow(0, 40, 60, 100),
            TileWindow(40, 40, 100, 100))


def two_tiles():  # 100 x 100 in two tiles side by side that share the band x in [40, 60)
    return (TileWindow(0, 0, 60, 100), TileWindow(40, 0, 100, 100))


def as_masks(inst):
    return rles_to_masks(inst.masks_rle, inst.height, inst.width)


def test_an_object_across_the_corner_of_four_tiles_is_one_instance():
    obj = disk(100, 100, 50, 50, 18)
    parts = cut_by_tiles(obj[None], four_tiles())
    assert len(parts.instances) == 4  # every tile holds a cut part
    out = stitch(parts)
    assert len(out) == 1
    assert np.array_equal(as_masks(out)[0], obj)
    assert out.boxes_xyxy.tolist() == [[32.0, 32.0, 69.0, 69.0]]
    assert out.attributes["tile_parts"] == (4,)


def test_merged_scores_are_the_area_weighted_mean_and_max_for_presence_columns():
    obj = rect(100, 100, 10, 10, 70, 30)  # across the vertical seam; tile 0 holds [10, 60), tile 1 [40, 70)
    windows = two_tiles()
    parts = cut_by_tiles(obj[None], windows, scores=[{0: 0.9, 1: 0.3}])
    out = stitch(parts, StitchRule(max_columns=("clip_class_prob",)))
    area0, area1 = 50 * 20, 30 * 20
    assert len(out) == 1
    assert out.scores["confidence"][0] == pytest.approx((0.9 * area0 + 0.3 * area1) / (area0 + area1), rel=1e-6)
    assert out.scores["clip_class_prob"][0] == pytest.approx(0.9)


def test_two_touching_objects_across_a_seam_stay_two():
    a = rect(100, 100, 30, 30, 50, 70)  # a and b touch along x = 50, inside the tiles' shared band [40, 60)
    b = rect(100, 100, 50, 30, 75, 70)
    parts = cut_by_tiles(np.stack([a, b]), two_tiles())
    assert len(parts.instances) == 4
    out = stitch(parts)  # class-agnostic: only the masks keep them apart
    masks = as_masks(out)
    assert len(out) == 2
    assert sorted(int(m.sum()) for m in masks) == sorted([int(a.sum()), int(b.sum())])
    assert any(np.array_equal(m, a) for m in masks) and any(np.array_equal(m, b) for m in masks)


def test_a_long_thin_object_across_three_tiles_is_one_instance():
    windows = (TileWindow(0, 0, 60, 30), TileWindow(40, 0, 100, 30), TileWindow(80, 0, 140, 30))
    bar = rect(30, 140, 5, 12, 135, 15)  # 3 px thick
    parts = cut_by_tiles(bar[None], windows)
    assert len(parts.instances) == 3
    out = stitch(parts)
    assert len(out) == 1 and np.array_equal(as_masks(out)[0], bar)
    assert out.attributes["tile_parts"] == (3,)


def test_an_object_seen_whole_by_two_tiles_is_kept_once():
    obj = disk(100, 100, 50, 20, 6)  # inside the shared band of tiles 0 and 1, touching no seam
    out = stitch(cut_by_tiles(obj[None], two_tiles()))
    assert len(out) == 1 and np.array_equal(as_masks(out)[0], obj)


def test_imperfect_parts_still_merge_when_they_agree_on_most_of_the_shared_band():
    obj = rect(100, 100, 20, 20, 80, 40)

    def shave(tile, i, mask):  # tile 1 misses the 6 columns next to its left edge
        if tile == 1:
            mask = mask.copy()
            mask[:, 40:46] = False
        return mask

    out = stitch(cut_by_tiles(obj[None], two_tiles(), change=shave))
    assert len(out) == 1 and np.array_equal(as_masks(out)[0], obj)  # tile 0 saw the shaved columns


def test_a_cut_fragment_inside_an_object_another_tile_saw_whole_is_dropped():
    obj = disk(100, 100, 50, 20, 9)  # whole in tile 1 ([40, 100)); tile 0 sees it cut at x = 60

    def fragment(tile, i, mask):  # tile 0 finds a piece at its seam with one stray pixel: no merge at 1.0
        if tile == 0:
            mask = mask.copy()
            mask[:, :54] = False
            mask[11, 55] = True
        return mask

    parts = cut_by_tiles(obj[None], two_tiles(), change=fragment)
    assert len(parts.instances) == 2 and not obj[11, 55]
    out = stitch(parts, StitchRule(seam_ios=1.0))
    assert len(out) == 1 and np.array_equal(as_masks(out)[0], obj)
    assert len(stitch(parts, StitchRule(seam_ios=1.0, nms_ios=1.0))) == 2  # the containment pass did it


def test_a_whole_object_nested_in_a_larger_one_from_another_tile_is_kept():
    big = rect(100, 100, 45, 10, 95, 50)  # tile 1 only
    small = rect(100, 100, 46, 20, 52, 26)  # inside big, inside the shared band: tiles 0 and 1 see it whole
    out = stitch(cut_by_tiles(np.stack([big, small]), two_tiles()))
    assert sorted(int(m.sum()) for m in as_masks(out)) == [int(small.sum()), int(big.sum())]


def test_different_classes_are_never_merged():
    a = rect(100, 100, 20, 20, 80, 40)
    parts = cut_by_tiles(np.stack([a]), two_tiles(), class_ids=[3])
    inst = parts.instances
    relabelled = Parts(Instances(height=100, width=100, masks_rle=inst.masks_rle, boxes_xyxy=inst.boxes_xyxy,
                                 scores=inst.scores, class_ids=np.int32([3, 4]), attributes=inst.attributes),
                       parts.tile_index, parts.windows, parts.cut)
    assert len(stitch(parts)) == 1
    assert len(stitch(relabelled)) == 2


@pytest.mark.parametrize("height,width,x0,y0,shape", [
    (7, 5, 0, 0, (7, 5)),    # the whole frame: runs join across columns
    (9, 11, 3, 2, (4, 6)),
    (9, 11, 10, 8, (1, 1)),  # the last pixel
    (9, 11, 0, 0, (0, 0)),   # empty
])
def test_rle_building_blocks_match_pycocotools(height, width, x0, y0, shape):
    rng = np.random.default_rng(height * width + x0)
    crop = rng.random(shape) < 0.5
    full = np.zeros((height, width), bool)
    full[y0:y0 + shape[0], x0:x0 + shape[1]] = crop
    assert crop_mask_to_rle(crop, x0, y0, height, width) == mask_to_rle(full)
    assert shift_rle(mask_to_rle(crop), x0, y0, height, width) == mask_to_rle(full) if crop.size else True
    if crop.size:
        window = TileWindow(x0, y0, x0 + shape[1], y0 + shape[0])
        assert box_rle(window, height, width) == masks_to_rles(rect(height, width, *window.xyxy)[None])[0]


@pytest.mark.parametrize("call,message", [
    (lambda: crop_mask_to_rle(np.ones((3, 3), bool), 9, 0, 10, 10), "does not fit"),
    (lambda: TileWindow(5, 0, 5, 10), "x0 < x1"),
    (lambda: stitch(Parts(Instances.empty(4, 4), np.zeros(2, np.int64), ())), "tile_index has 2"),
])
def test_bad_input_is_refused_clearly(call, message):
    with pytest.raises(ValidationError, match=message):
        call()


@pytest.mark.parametrize("factor,height,width", [(1, 6, 7), (3, 18, 21), (3, 16, 20), (4, 22, 25)])
def test_enlarged_masks_equal_the_dense_nearest_neighbour_enlargement(factor, height, width):
    small = np.random.default_rng(factor).random((6, 7)) < 0.5
    small[:, 0] = True  # a column set top to bottom: its runs join the next column's
    dense = np.repeat(np.repeat(small, factor, axis=0), factor, axis=1)
    full = np.zeros((height, width), bool)
    h, w = min(height, dense.shape[0]), min(width, dense.shape[1])
    full[:h, :w] = dense[:h, :w]
    assert enlarged_mask_to_rle(small, factor, height, width) == mask_to_rle(full)
