import json

import numpy as np
import pytest

from labelgen.errors import ValidationError
from labelgen.structures.instances import ImageRecord, Instances
from labelgen.structures.masks import mask_to_rle, masks_to_rles, rle_areas, rles_to_boxes_xyxy, rles_to_masks


def _masks():
    masks = np.zeros((3, 6, 8), bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 5, 7] = True
    masks[2, 0:6, 0] = True
    return masks


def _instances(**kwargs):
    return Instances.from_masks(
        _masks(),
        scores={"confidence": [0.9, 0.5, 0.1]},
        class_ids=[0, 2, 1],
        attributes={"cluster_ids": [[1, 2], [3], []]},
        provenance={"generator": "t"},
        **kwargs,
    )


def test_from_masks_boxes_areas_and_decode():
    inst = _instances()
    assert inst.boxes_xyxy.tolist() == [[2, 1, 5, 3], [7, 5, 8, 6], [0, 0, 1, 6]]
    assert inst.boxes_xyxy.dtype == np.float32
    assert rle_areas(inst.masks_rle).tolist() == [6, 1, 6]
    np.testing.assert_array_equal(inst.masks(), _masks())


def test_json_round_trip_is_exact():
    inst = _instances()
    text = json.dumps(inst.to_dict())
    back = Instances.from_dict(json.loads(text))
    assert back == inst
    np.testing.assert_array_equal(back.scores["confidence"], inst.scores["confidence"])
    assert back.attributes["cluster_ids"] == ([1, 2], [3], [])


def test_empty_round_trip_and_class_agnostic():
    inst = Instances.empty(10, 20)
    assert len(inst) == 0 and inst.class_ids is None
    assert Instances.from_dict(inst.to_dict()) == inst
    assert inst.masks().shape == (0, 10, 20)


@pytest.mark.parametrize(
    "index, expected",
    [
        (np.array([True, False, True]), [0, 2]),
        (np.array([2, 0]), [2, 0]),
        (slice(1, None), [1, 2]),
        (np.array([], dtype=np.int64), []),
    ],
)
def test_indexing_selects_every_column(index, expected):
    inst = _instances()
    sub = inst[index]
    assert len(sub) == len(expected)
    assert sub.class_ids.tolist() == [[0, 2, 1][i] for i in expected]
    np.testing.assert_array_equal(sub.masks(), _masks()[expected])
    np.testing.assert_array_equal(sub.boxes_xyxy, inst.boxes_xyxy[expected])
    assert list(sub.attributes["cluster_ids"]) == [[[1, 2], [3], []][i] for i in expected]


def test_columns_are_read_only():
    inst = _instances()
    with pytest.raises(ValueError):
        inst.boxes_xyxy[0, 0] = 5
    with pytest.raises(ValueError):
        inst.scores["confidence"][0] = 0


RLE_6x8 = mask_to_rle(np.ones((6, 8), bool))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 0, "width": 8}, "height must be a positive int"),
        ({"masks_rle": (RLE_6x8,), "boxes_xyxy": np.zeros((2, 4))}, "shape (1, 4)"),
        ({"masks_rle": (mask_to_rle(np.ones((5, 8), bool)),), "boxes_xyxy": np.zeros((1, 4))}, "[6, 8]"),
        ({"masks_rle": ({"size": [6, 8]},), "boxes_xyxy": np.zeros((1, 4))}, "keys ['counts', 'size']"),
        ({"masks_rle": (RLE_6x8,), "boxes_xyxy": [[3, 0, 1, 1]]}, "x2 >= x1"),
        ({"masks_rle": (RLE_6x8,), "boxes_xyxy": [[0, 0, np.nan, 1]]}, "finite"),
        ({"masks_rle": (RLE_6x8,), "boxes_xyxy": [[0, 0, 1, 1]], "scores": {"c": [0.1, 0.2]}}, "score 'c' must have shape (1,)"),
        ({"masks_rle": (RLE_6x8,), "boxes_xyxy": [[0, 0, 1, 1]], "scores": {"c": [np.inf]}}, "finite"),
        ({"masks_rle": (RLE_6x8,), "boxes_xyxy": [[0, 0, 1, 1]], "class_ids": [0.5]}, "integers"),
        ({"masks_rle": (RLE_6x8,), "boxes_xyxy": [[0, 0, 1, 1]], "class_ids": [-1]}, ">= 0"),
        ({"masks_rle": (RLE_6x8,), "boxes_xyxy": [[0, 0, 1, 1]], "class_ids": [1, 2]}, "shape (1,)"),
        ({"masks_rle": (RLE_6x8,), "boxes_xyxy": [[0, 0, 1, 1]], "attributes": {"a": []}}, "1 values"),
        ({"masks_rle": (RLE_6x8,), "boxes_xyxy": [[0, 0, 1, 1]], "attributes": {"a": [object()]}}, "JSON values"),
        ({"provenance": {"x": float("nan")}}, "finite"),
    ],
)
def test_validation_errors_say_expected_and_actual(kwargs, message):
    base = {"height": 6, "width": 8}
    with pytest.raises(ValidationError) as info:
        Instances(**{**base, **kwargs})
    assert message in str(info.value)


@pytest.mark.parametrize(
    "index, message",
    [(0, "not a scalar"), (np.array([True]), "shape (3,)"), (np.array([5]), "within"), (np.array([0.5]), "dtype")],
)
def test_bad_index(index, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _instances()[index]


def test_from_dict_rejects_unknown_keys():
    data = _instances().to_dict()
    data["bogus"] = 1
    with pytest.raises(ValidationError, match="unknown keys"):
        Instances.from_dict(data)


def test_rle_helpers_round_trip():
    masks = _masks()
    rles = masks_to_rles(masks)
    assert all(isinstance(r["counts"], str) for r in rles)
    np.testing.assert_array_equal(rles_to_masks(rles, 6, 8), masks)
    assert rles_to_boxes_xyxy(rles)[0].tolist() == [2, 1, 5, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_id": "", "uri": "/x"}, "image_id"),
        ({"image_id": "a", "uri": ""}, "uri"),
        ({"image_id": "a", "uri": "/x", "width": 0}, "width"),
        ({"image_id": "a", "uri": "/x", "height": 2.5}, "height"),
        ({"image_id": "a", "uri": "/x", "sha256": "abc"}, "sha256"),
    ],
)
def test_image_record_validation(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        ImageRecord(**kwargs)


def test_image_record_round_trip():
    record = ImageRecord("a/b.jpg", "/data/a/b.jpg", 4, 3, "0" * 64)
    assert ImageRecord.from_dict(record.to_dict()) == record
    assert record.with_size(10, 20).width == 10
