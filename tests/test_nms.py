"""Mask NMS on compressed RLEs: exact intersections, IoU/IoS, greedy suppression rules."""
import numpy as np
import pytest

from labelgen.errors import ValidationError
from labelgen.structures.masks import mask_to_rle, masks_to_rles
from labelgen.structures.nms import mask_iou_ios, mask_nms, pairwise_intersections

H, W = 20, 30


def box_mask(x1, y1, x2, y2):
    mask = np.zeros((H, W), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


BIG = box_mask(0, 0, 20, 20)  # 400 px
SMALL_INSIDE = box_mask(2, 2, 7, 7)  # 25 px inside BIG: IoU 1/16, IoS 1
FAR = box_mask(22, 0, 30, 10)  # disjoint from BIG
HALF = box_mask(10, 0, 30, 20)  # overlaps BIG on 200 px of 600 union: IoU 1/3, IoS 0.5
EMPTY = np.zeros((H, W), dtype=bool)


def dense_intersections(a, b):
    return np.einsum("ahw,bhw->ab", a.astype(np.int64), b.astype(np.int64)).astype(np.float64)


def test_intersections_equal_dense_computation_on_random_masks():
    rng = np.random.default_rng(0)
    a = rng.random((7, 23, 17)) < 0.4
    b = rng.random((5, 23, 17)) < 0.2
    b[0] = False  # an empty mask
    got = pairwise_intersections(masks_to_rles(a), masks_to_rles(b))
    assert got.shape == (7, 5) and got.dtype == np.float64
    np.testing.assert_array_equal(got, dense_intersections(a, b))


@pytest.mark.parametrize("n_a, n_b", [(0, 0), (0, 3), (3, 0)])
def test_intersections_of_empty_lists(n_a, n_b):
    masks = masks_to_rles(np.ones((3, H, W), dtype=bool))
    assert pairwise_intersections(masks[:n_a], masks[:n_b]).shape == (n_a, n_b)


def test_intersections_refuse_mixed_frames():
    with pytest.raises(ValidationError, match="one \\[height, width\\] frame"):
        pairwise_intersections([mask_to_rle(BIG)], [mask_to_rle(np.zeros((5, 5), dtype=bool))])


def test_iou_and_ios_of_known_shapes():
    iou, ios = mask_iou_ios(masks_to_rles(np.stack([BIG, SMALL_INSIDE, HALF, EMPTY])))
    np.testing.assert_allclose(iou[0, 1:], [25 / 400, 200 / 600, 0.0])
    np.testing.assert_allclose(ios[0, 1:], [1.0, 0.5, 0.0])
    np.testing.assert_allclose(np.diag(iou), [1, 1, 1, 0])
    np.testing.assert_array_equal(iou, iou.T)
    np.testing.assert_array_equal(ios, ios.T)


# (masks, scores, iou_thr, ios_thr, class_ids, across_classes, expected keep, expected suppressed_by)
NMS_CASES = {
    "identical masks: the better one stays": (
        [BIG, BIG], [0.5, 0.9], 0.7, 0.9, None, True, [1], [1, -1]),
    "disjoint masks both stay": (
        [BIG, FAR], [0.9, 0.8], 0.1, 0.1, None, True, [0, 1], [-1, -1]),
    "nested small-in-large: suppressed by IoS only": (
        [BIG, SMALL_INSIDE], [0.9, 0.8], 0.5, 0.9, None, True, [0], [-1, 0]),
    "nested with IoS disabled (threshold 1) survives": (
        [BIG, SMALL_INSIDE], [0.9, 0.8], 0.5, 1.0, None, True, [0, 1], [-1, -1]),
    "IoU exactly at the threshold is not suppression": (
        [BIG, HALF], [0.9, 0.8], 1 / 3, 1.0, None, True, [0, 1], [-1, -1]),
    "IoU just above the threshold is suppression": (
        [BIG, HALF], [0.9, 0.8], 0.33, 1.0, None, True, [0], [-1, 0]),
    "IoS exactly at the threshold is not suppression": (
        [BIG, HALF], [0.9, 0.8], 1.0, 0.5, None, True, [0, 1], [-1, -1]),
    "score ties: the lower index wins": (
        [BIG, BIG, BIG], [0.7, 0.7, 0.7], 0.5, 0.9, None, True, [0], [-1, 0, 0]),
    "suppressor is the best kept overlapping mask": (
        [BIG, FAR, BIG], [0.6, 0.9, 0.8], 0.5, 0.9, None, True, [1, 2], [2, -1, -1]),
    "per class: different classes both stay": (
        [BIG, BIG], [0.9, 0.8], 0.5, 0.9, [0, 1], False, [0, 1], [-1, -1]),
    "per class: same class still suppressed": (
        [BIG, BIG, BIG], [0.9, 0.8, 0.7], 0.5, 0.9, [0, 1, 0], False, [0, 1], [-1, -1, 0]),
    "across classes ignores class ids": (
        [BIG, BIG], [0.9, 0.8], 0.5, 0.9, [0, 1], True, [0], [-1, 0]),
    "empty masks never suppress": (
        [EMPTY, EMPTY], [0.9, 0.8], 0.0, 0.0, None, True, [0, 1], [-1, -1]),
}


@pytest.mark.parametrize("case", list(NMS_CASES), ids=list(NMS_CASES))
def test_mask_nms_table(case):
    masks, scores, iou_thr, ios_thr, class_ids, across, keep, suppressed_by = NMS_CASES[case]
    got_keep, got_by = mask_nms(
        masks_to_rles(np.stack(masks)), np.asarray(scores), iou_thr, ios_thr,
        class_ids=None if class_ids is None else np.asarray(class_ids), across_classes=across,
    )
    assert got_keep.tolist() == keep
    assert got_by.tolist() == suppressed_by
    assert got_keep.dtype == np.int64 and got_by.dtype == np.int64


def test_mask_nms_empty_input():
    keep, suppressed_by = mask_nms([], np.zeros((0,)), 0.5, 0.9)
    assert keep.shape == (0,) and suppressed_by.shape == (0,)


def test_mask_nms_is_deterministic_with_many_ties():
    rng = np.random.default_rng(1)
    rles = masks_to_rles(rng.random((12, H, W)) < 0.5)
    scores = np.repeat([0.3, 0.6, 0.9], 4)
    first = mask_nms(rles, scores, 0.3, 0.6)
    for _ in range(3):
        again = mask_nms(list(rles), scores.copy(), 0.3, 0.6)
        np.testing.assert_array_equal(first[0], again[0])
        np.testing.assert_array_equal(first[1], again[1])
    assert first[0][0] == 8  # first of the best-scored group


@pytest.mark.parametrize(
    "scores, class_ids, message",
    [
        ([0.9], None, "scores must have shape \\(2,\\)"),
        ([0.9, float("nan")], None, "scores must be finite"),
        ([0.9, 0.8], [0], "class_ids must have shape \\(2,\\)"),
        ([0.9, 0.8], [0.0, 1.0], "class_ids must be integers"),
    ],
)
def test_mask_nms_rejects_bad_columns(scores, class_ids, message):
    rles = masks_to_rles(np.stack([BIG, FAR]))
    with pytest.raises(ValidationError, match=message):
        mask_nms(rles, np.asarray(scores), 0.5, 0.9,
                 class_ids=None if class_ids is None else np.asarray(class_ids), across_classes=False)


def test_more_than_255_masks_have_areas_and_nms():
    """pycocotools' area() overflows a uint8 scratch array past 255 RLEs under numpy 2: labelgen chunks it."""
    from labelgen.structures.masks import masks_to_rles, rle_areas
    from labelgen.structures.nms import mask_nms

    count, size = 300, 40
    masks = np.zeros((count, size, size), bool)
    for i in range(count):
        masks[i, i % size, : 1 + i // size] = True  # area 1 + i // 40
    assert list(rle_areas(masks_to_rles(masks))) == [1 + i // size for i in range(count)]
    disjoint = np.zeros((count, 20, 20), bool)
    disjoint[np.arange(count), np.arange(count) // 20, np.arange(count) % 20] = True
    keep, _ = mask_nms(masks_to_rles(disjoint), np.linspace(1, 0, count, dtype=np.float32), 0.7, 0.9)
    assert sorted(keep.tolist()) == list(range(count))
