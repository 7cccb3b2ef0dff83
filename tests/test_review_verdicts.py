"""The verdicts.jsonl format (Contract A): write, read back, refuse bad records."""
from __future__ import annotations

import json

import pytest

from labelgen.errors import ExportError
from labelgen.review.verdicts import (ImageVerdicts, LabelVerdict, read_verdicts, verdicts_path,
                                      write_verdicts)


def test_round_trip_in_order(tmp_path):
    items = [ImageVerdicts("b.jpg", (LabelVerdict(0, 3, "correct"), LabelVerdict(1, None, "poor_mask")), 2, False),
             ImageVerdicts("a.jpg", (), 0, True)]
    path = verdicts_path(tmp_path, "s1")
    path.parent.mkdir(parents=True)
    assert write_verdicts(path, items) == 2
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"image_id": "b.jpg", "labels": [{"index": 0, "class_id": 3, "verdict": "correct"},
                        {"index": 1, "class_id": None, "verdict": "poor_mask"}], "missed": 2,
                        "missing_object_tag": False}
    back = read_verdicts(tmp_path, "s1")
    assert back == items
    assert [v.correct for v in back[0].labels] == [True, False] and back[0].correct == 1


def test_bad_verdict_and_missing_file(tmp_path):
    with pytest.raises(ExportError, match="one of"):
        LabelVerdict(0, 1, "ok")
    with pytest.raises(ExportError, match="pull a review sample"):
        read_verdicts(tmp_path, "nope")
    path = verdicts_path(tmp_path, "bad")
    path.parent.mkdir(parents=True)
    path.write_text('{"image_id": "x", "labels": [{"index": 0, "verdict": "maybe"}]}\n')
    with pytest.raises(ExportError, match="line 1"):
        read_verdicts(tmp_path, "bad")
