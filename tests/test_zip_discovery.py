"""Stage 3 of the Zip method: fragment selection, instance discovery, activation masks, box scaling.

Pure numpy: grids are drawn as ASCII art. Labels: one character per cell, the digit is the cluster id.
Activation: ``#`` = activated cell, ``.`` = not.
"""
from __future__ import annotations

import numpy as np
import pytest

from labelgen.errors import ValidationError
from labelgen.generators.zip.config import DiscoveryConfig
from labelgen.generators.zip.discovery import (
    activation_mask,
    class_map_to_grid,
    discover_instances,
    grid_boxes_to_image,
    min_instance_cells,
)


def grid(*rows: str) -> np.ndarray:
    return np.array([[int(c) for c in row] for row in rows], dtype=np.int32)


def active(*rows: str) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


# (name, labels, activated, config overrides, expected [(box_xyxy, cluster_ids, fragment_count, area)])
DISCOVERY_CASES = [
    (
        "two separate squares, two clusters, both activated",
        grid("00000000",
             "01100000",
             "01100000",
             "00000222",
             "00000222",
             "00000000"),
        active("........",
               ".##.....",
               ".##.....",
               ".....###",
               ".....###",
               "........"),
        {},
        [((1, 1, 3, 3), (1,), 1, 4), ((5, 3, 8, 5), (2,), 1, 6)],
    ),
    (
        "thin L-shape: bbox/area = 36/12 = 3 rejected (strict <); square kept",
        grid("111111000",
             "110000000",
             "100000000",
             "100000022",
             "100000022",
             "100000000"),
        active("######...",
               "##.......",
               "#........",
               "#......##",
               "#......##",
               "#........"),
        {},
        [((7, 3, 9, 5), (2,), 1, 4)],
    ),
    (
        "L-shape with one more cell: bbox/area = 36/13 < 3 kept",
        grid("111111",
             "111000",
             "100000",
             "100000",
             "100000",
             "100000"),
        active("######",
               "###...",
               "#.....",
               "#.....",
               "#.....",
               "#....."),
        {},
        [((0, 0, 6, 6), (1,), 1, 13)],
    ),
    (
        "activated fraction exactly 0.3 rejected (strict >), 0.4 kept; the full fragment is the instance",
        grid("11111000",
             "11111000",
             "00000000",
             "00022222",
             "00022222"),
        active("###.....",
               "........",
               "........",
               "...####.",
               "........"),
        {},
        [((3, 3, 8, 5), (2,), 1, 10)],
    ),
    (
        "fragments of two touching clusters merge into one instance",
        grid("000000",
             "011220",
             "011220",
             "000000"),
        active("......",
               ".####.",
               ".####.",
               "......"),
        {},
        [((1, 1, 5, 3), (1, 2), 2, 8)],
    ),
    (
        "a cluster in two 4-connected parts touching diagonally: two fragments, two instances",
        grid("1100",
             "1100",
             "0011",
             "0011"),
        active("##..",
               "##..",
               "..##",
               "..##"),
        {},
        [((0, 0, 2, 2), (1,), 1, 4), ((2, 2, 4, 4), (1,), 1, 4)],
    ),
    (
        "only the activated fragment of a cluster is kept",
        grid("110011",
             "110011"),
        active("##....",
               "##...."),
        {},
        [((0, 0, 2, 2), (1,), 1, 4)],
    ),
    (
        "instance below min_cells dropped, one at min_cells kept",
        grid("1100220",
             "1000220"),
        active("##..##.",
               "#...##."),
        {"min_cells": 4},
        [((4, 0, 6, 2), (2,), 1, 4)],
    ),
    (
        "a cluster without activated cells is skipped even when every fraction would pass",
        grid("1100",
             "1100",
             "0000"),
        active("....",
               "....",
               "...."),
        {"min_activated_fraction": 0.0},
        [],
    ),
    (
        "output in raster order of the first cell, not by activation or cluster id",
        grid("22000",
             "22000",
             "00011",
             "00011"),
        active("#....",
               ".....",
               "...##",
               "...##"),
        {"min_activated_fraction": 0.2},
        [((0, 0, 2, 2), (2,), 1, 4), ((3, 2, 5, 4), (1,), 1, 4)],
    ),
]


@pytest.mark.parametrize("name, labels, activated, overrides, expected", DISCOVERY_CASES,
                         ids=[case[0] for case in DISCOVERY_CASES])
def test_discover_instances(name, labels, activated, overrides, expected):
    config = DiscoveryConfig(**{"min_cells": 1, **overrides})
    instances = discover_instances(labels, activated, config)
    got = [(i.box_xyxy_grid, i.cluster_ids, i.fragment_count, i.area_cells) for i in instances]
    assert got == expected
    for instance in instances:
        x1, y1, x2, y2 = instance.box_xyxy_grid
        assert instance.cells.shape == labels.shape and instance.cells.dtype == bool
        assert int(instance.cells.sum()) == instance.area_cells
        assert not instance.cells[:y1].any() and not instance.cells[y2:].any()
        assert not instance.cells[:, :x1].any() and not instance.cells[:, x2:].any()
        assert instance.extent == instance.area_cells / ((x2 - x1) * (y2 - y1))
        assert instance.activated_fraction == activated[instance.cells].sum() / instance.area_cells


def test_instance_statistics_and_read_only_cells():
    labels = grid("11111", "11111")
    activated = active("####.", ".....")
    (instance,) = discover_instances(labels, activated, DiscoveryConfig(min_cells=1))
    assert instance.activated_fraction == 0.4 and instance.extent == 1.0
    with pytest.raises(ValueError):
        instance.cells[0, 0] = False


def test_default_min_cells_is_100():
    labels = np.zeros((12, 12), dtype=np.int64)
    labels[1:11, 1:11] = 1  # exactly 100 cells
    activated = labels == 1
    assert len(discover_instances(labels, activated, DiscoveryConfig())) == 1
    labels[10, 10] = 0
    activated = labels == 1
    assert discover_instances(labels, activated, DiscoveryConfig()) == []


@pytest.mark.parametrize("grid_h, grid_w, min_cells, reference, expected", [
    (128, 170, 100, 0, 100),  # as released
    (30, 40, 100, 480, 100),  # 30 * 16 == 480
    (30, 40, 100, 960, 25),  # (480 / 960)^2
    (128, 170, 100, 480, round(100 * (2048 / 480) ** 2)),
    (2, 2, 100, 480, 0),
])
def test_min_instance_cells(grid_h, grid_w, min_cells, reference, expected):
    config = DiscoveryConfig(min_cells=min_cells, min_cells_reference_short_side=reference)
    assert min_instance_cells(grid_h, grid_w, config) == expected


@pytest.mark.parametrize("labels, activated", [
    (np.zeros((3, 3), dtype=float), np.zeros((3, 3), dtype=bool)),
    (np.zeros((3, 3), dtype=int), np.zeros((3, 4), dtype=bool)),
    (np.zeros((3, 3), dtype=int), np.zeros((3, 3), dtype=int)),
    (np.full((3, 3), -1), np.zeros((3, 3), dtype=bool)),
    (np.zeros(9, dtype=int), np.zeros(9, dtype=bool)),
], ids=["float labels", "shape mismatch", "int activation", "negative ids", "1-D"])
def test_discover_instances_rejects_bad_grids(labels, activated):
    with pytest.raises(ValidationError):
        discover_instances(labels, activated, DiscoveryConfig())


# ---- activation mask -------------------------------------------------------------------------


def reference_grid_map(class_map, image_h, image_w, grid_h, grid_w):
    """Independent slow reference: full bilinear (half-pixel) image, then cell-centre nearest."""
    gh, gw = class_map.shape
    image = np.empty((image_h, image_w))
    for r in range(image_h):
        y = min(max((r + 0.5) * gh / image_h - 0.5, 0.0), gh - 1)
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, gh - 1), y - y0
        for c in range(image_w):
            x = min(max((c + 0.5) * gw / image_w - 0.5, 0.0), gw - 1)
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, gw - 1), x - x0
            top = class_map[y0, x0] * (1 - fx) + class_map[y0, x1] * fx
            bottom = class_map[y1, x0] * (1 - fx) + class_map[y1, x1] * fx
            image[r, c] = top * (1 - fy) + bottom * fy
    rows = [int((i + 0.5) * image_h / grid_h) for i in range(grid_h)]
    cols = [int((j + 0.5) * image_w / grid_w) for j in range(grid_w)]
    return image[np.ix_(rows, cols)]


@pytest.mark.parametrize("class_map, image_hw, grid_hw, ratio, expected", [
    # rows upsample to 0, .25, .75, 1; cell centres are pixel rows 1, 3 -> .25, 1; mean .625
    (np.array([[0.0, 0.0], [1.0, 1.0]]), (4, 4), (2, 2), 0.7, active("..", "##")),
    # non-square: columns 0, .25, .75, 1; mean .5 -> threshold .35 (ratio .7) or .2 (ratio .4)
    (np.array([[0.0, 1.0]]), (2, 4), (1, 4), 0.7, active("..##")),
    (np.array([[0.0, 1.0]]), (2, 4), (1, 4), 0.4, active(".###")),
    (np.zeros((4, 4)), (8, 8), (2, 2), 0.7, active("..", "..")),
])
def test_activation_mask_known(class_map, image_hw, grid_hw, ratio, expected):
    mask = activation_mask(class_map, *image_hw, *grid_hw, ratio=ratio)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("map_hw, image_hw, grid_hw", [
    ((32, 32), (48, 64), (6, 8)),  # non-square image and grid
    ((32, 32), (60, 40), (8, 5)),
    ((5, 7), (33, 50), (7, 9)),  # sizes that do not divide
    ((4, 4), (10, 12), (20, 24)),  # grid finer than the image
])
def test_activation_mask_matches_reference(map_hw, image_hw, grid_hw):
    class_map = np.random.default_rng(0).random(map_hw)
    grid_map = class_map_to_grid(class_map, *image_hw, *grid_hw)
    reference = reference_grid_map(class_map, *image_hw, *grid_hw)
    np.testing.assert_allclose(grid_map, reference, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(
        activation_mask(class_map, *image_hw, *grid_hw), reference > 0.7 * reference.mean()
    )


def test_activation_mask_object_in_quadrant():
    class_map = np.zeros((32, 32))
    class_map[:16, 16:] = 1.0  # top-right quadrant of the image
    mask = activation_mask(class_map, 480, 640, 30, 40)
    expected = np.zeros((30, 40), dtype=bool)
    expected[:15, 20:] = True
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("class_map", [np.zeros((0, 3)), np.zeros(4), np.full((2, 2), np.nan)],
                         ids=["empty", "1-D", "nan"])
def test_activation_mask_rejects_bad_maps(class_map):
    with pytest.raises(ValidationError):
        activation_mask(class_map, 10, 10, 2, 2)


# ---- boxes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("boxes, grid_hw, image_hw, expected", [
    # image 480 (H) x 640 (W), grid 24 x 40: x by 640/40 = 16, y by 480/24 = 20 (swapping fails)
    ([[0, 0, 40, 24]], (24, 40), (480, 640), [[0, 0, 640, 480]]),
    ([[10, 3, 20, 12]], (24, 40), (480, 640), [[160, 60, 320, 240]]),
    # kept aspect (640x480 -> 2731x2048 -> grid 128 x 170): factors 640/170 and 480/128
    ([[17, 16, 34, 32]], (128, 170), (480, 640), [[64, 60, 128, 120]]),
    # portrait, clipped to the image
    ([[-1, 5, 12, 40]], (30, 10), (600, 200), [[0, 100, 200, 600]]),
])
def test_grid_boxes_to_image(boxes, grid_hw, image_hw, expected):
    out = grid_boxes_to_image(np.array(boxes), *grid_hw, *image_hw)
    assert out.dtype == np.float32 and out.shape == (len(boxes), 4)
    np.testing.assert_allclose(out, np.array(expected, dtype=np.float32), rtol=1e-6)


def test_grid_boxes_to_image_empty_and_bad_shape():
    assert grid_boxes_to_image(np.zeros((0, 4)), 2, 3, 20, 30).shape == (0, 4)
    with pytest.raises(ValidationError):
        grid_boxes_to_image(np.zeros((2, 3)), 2, 3, 20, 30)
