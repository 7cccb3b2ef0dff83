"""Masks handed over column by column are RLE-encoded without a copy and to the same RLEs."""
import numpy as np
import pytest

from labelgen.errors import ValidationError
from labelgen.structures.masks import column_major_masks, masks_to_rles


def _masks(count=7, height=33, width=21, seed=0):
    return np.random.default_rng(seed).random((count, height, width)) > 0.6


def test_column_major_view_encodes_to_the_same_rles():
    masks = _masks()
    view = column_major_masks(np.ascontiguousarray(masks.transpose(0, 2, 1)))
    assert view.shape == masks.shape and np.array_equal(view, masks)
    assert view.transpose(1, 2, 0).flags["F_CONTIGUOUS"]  # what pycocotools reads, as it is
    assert masks_to_rles(view) == masks_to_rles(masks)
    assert masks_to_rles(masks.astype(np.uint8)) == masks_to_rles(masks)  # non-bool input still works


def test_column_major_masks_needs_a_stack():
    with pytest.raises(ValidationError, match=r"\(N, W, H\)"):
        column_major_masks(np.zeros((3, 4), bool))


def test_refiner_masks_are_column_major_and_concatenate_so():
    pytest.importorskip("segment_anything")
    from labelgen.generators.zip.refine import RefineResult

    parts = [RefineResult(column_major_masks(np.ascontiguousarray(m[None].transpose(0, 2, 1))),
                          np.ones(1, np.float32), np.ones(1, np.float32), np.zeros(1, np.int64))
             for m in _masks()]
    whole = RefineResult.concatenate(parts, 33, 21)
    assert np.array_equal(whole.masks, _masks())
    assert whole.masks.transpose(1, 2, 0).flags["F_CONTIGUOUS"]
