"""The result row (``labelgen.structures.rows``) and the RLE-counts helpers."""
import json

import numpy as np
import pytest

from labelgen.atomic import json_bytes
from labelgen.errors import ValidationError
from labelgen.structures.instances import ImageRecord, Instances
from labelgen.structures.masks import mask_to_rle, rle_to_json, rle_to_pycocotools
from labelgen.structures.rows import Row, summarize

RECORD = ImageRecord("a.png", "/images/a.png", 6, 4)


def _instances(n=3):
    masks = np.zeros((n, 4, 6), bool)
    for i in range(n):
        masks[i, :, i] = True
    return Instances.from_masks(masks, scores={"confidence": np.linspace(0.2, 0.9, n)},
                                class_ids=np.arange(n) % 2, attributes={"band": list(range(n))})


@pytest.mark.parametrize("extra", [{}, {"rejected": [{"index": 1, "reason": "too_small"}]},
                                   {"rejected": [], "source_indices": [0, 2, None],
                                    "review": {"sample_tags": ["approved"]}}])
def test_labelled_rows_round_trip_byte_for_byte(extra):
    data = {"image": RECORD.to_dict(), "status": "ok", "instances": _instances().to_dict(), **extra}
    row = Row.from_dict(json.loads(json_bytes(data)))
    assert row.to_dict() == data and json_bytes(row.to_dict()) == json_bytes(data)
    assert row == data and row["image"]["image_id"] == "a.png" and {**row} == data
    assert row.status == "ok" and len(row.instances) == 3


def test_failed_row_round_trips_and_is_counted():
    failed = Row.failed(RECORD, "truncated", "cut short")
    assert failed.to_dict() == {"image": RECORD.to_dict(), "status": "failed",
                                "failure": {"reason": "truncated", "message": "cut short"}}
    assert Row.from_dict(failed.to_dict()) == failed and failed.origin() == ()
    other = ImageRecord("b.png", "/images/b.png", 6, 4)
    assert summarize([failed, Row(other, _instances(2))]) == {
        "images": 2, "ok": 1, "failed": 1, "instances": 2, "failure_reasons": {"truncated": 1},
        "failures": [{"image_id": "a.png", "uri": "/images/a.png", "reason": "truncated", "message": "cut short"}]}


@pytest.mark.parametrize("data, match", [
    ({"status": "ok", "instances": {}}, "needs an image"),
    ({"image": RECORD.to_dict(), "status": "ok"}, "status 'ok' with instances"),
    ({"image": RECORD.to_dict(), "status": "failed", "instances": {}}, "'failed' with failure"),
    ({"image": RECORD.to_dict(), "status": "failed", "failure": {}, "extra": 1}, "unknown keys"),
])
def test_malformed_rows_are_refused(data, match):
    with pytest.raises(ValidationError, match=match):
        Row.from_dict(data)


def test_a_row_has_instances_or_a_failure_never_both():
    with pytest.raises(ValidationError, match="exactly one"):
        Row(RECORD)
    with pytest.raises(ValidationError, match="exactly one"):
        Row(RECORD, _instances(), {"reason": "x", "message": "y"})


def test_origin_maps_instances_back_to_the_runs_row():
    kept = _instances(2)
    assert Row(RECORD, kept).origin() == (0, 1)
    assert Row(RECORD, kept, rejected=[{"index": 0, "reason": "too_small"}]).origin() == (1, 2)
    assert Row(RECORD, kept, rejected=[], source_indices=[4, None]).origin() == (4, None)


def test_rle_counts_helpers_convert_both_ways():
    rle = mask_to_rle(np.eye(4, dtype=bool))
    coco = rle_to_pycocotools(rle)
    assert isinstance(coco["counts"], bytes) and rle_to_json(coco) == rle
    assert rle_to_json(rle) == rle and rle_to_pycocotools(coco) == coco
