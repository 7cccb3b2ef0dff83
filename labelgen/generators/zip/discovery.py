"""Stage 3: fragment selection and instance discovery on the feature grid (numpy + scipy only).

Specification: ``docs/zip-method.md`` (Stage 3). Coordinates: grid cells are indexed (row, col) on
the layer3 feature grid of ``grid_height x grid_width`` cells; boxes are XYXY with exclusive
``x2, y2``. No torch import.

Choices **[ours]** where the specification leaves room:

* Bilinear upsampling uses half-pixel centres with edge clamping (``src = (dst + 0.5) * in / out -
  0.5``, clipped to ``[0, in - 1]``), which is ``torch.nn.functional.interpolate(mode="bilinear",
  align_corners=False)``; implemented in numpy.
* ``fidelity="fast"`` (ours): the nearest resize from the image to the grid takes, for cell ``i``,
  the pixel under the cell centre, ``floor((i + 0.5) * H / h)`` in exact integer arithmetic; only
  those pixels of the upsampled map are computed (float64), and the mean in
  ``A = map > ratio * mean(map)`` is taken over the grid-sized map.
* ``fidelity="release"`` (the authors' code): the whole image-sized map is computed in float32 as
  torch's bilinear ``interpolate`` does, the mean is numpy's over that image-sized map, and the grid
  takes pixel ``floor(i * (H / h))`` (torch ``nearest``: a cell's corner, float32 scale).
* Clusters are visited as the release does (``cluster_visits: most_common``): the ``k`` most common
  values of ``(labels + 1) * A`` including the 0 (not activated) entry, by count, ties in order of
  first occurrence (``collections.Counter.most_common``); or every activated cluster (``all``).
* Output order: instances sorted by their first cell in raster (row-major) order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ...errors import ValidationError
from .config import DiscoveryConfig

__all__ = [
    "GridInstance",
    "activation_mask",
    "class_map_to_grid",
    "discover_instances",
    "grid_boxes_to_image",
    "grow_grid_boxes",
    "min_instance_cells",
    "release_image_map",
]

_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
_EIGHT_CONNECTED = ndimage.generate_binary_structure(2, 2)
GRID_STRIDE = 16  # pixels of the resized boundary input per layer3 cell


@dataclass(frozen=True)
class GridInstance:
    """One discovered instance on the feature grid.

    ``cells``: (grid_height, grid_width) bool, read-only. ``box_xyxy_grid``: (x1, y1, x2, y2) grid
    cells, x2/y2 exclusive. ``activated_fraction``: activated cells / ``area_cells``. ``extent``:
    ``area_cells`` / box area. ``cluster_ids``: ascending ids of the clusters whose kept fragments
    form the instance. ``fragment_count``: number of kept fragments in it.
    """

    cells: np.ndarray
    box_xyxy_grid: tuple[int, int, int, int]
    area_cells: int
    activated_fraction: float
    extent: float
    cluster_ids: tuple[int, ...]
    fragment_count: int


def class_map_to_grid(
    class_map: np.ndarray, image_height: int, image_width: int, grid_height: int, grid_width: int
) -> np.ndarray:
    """Resample a class map onto the feature grid: bilinear to the image, then nearest to the grid.

    ``class_map``: (g_h, g_w) float covering the whole image. Returns (grid_height, grid_width)
    float64. See the module docstring for the sampling rules.
    """
    class_map = _checked_map(class_map, image_height, image_width, grid_height, grid_width)
    rows = _bilinear_weights(_cell_centre_pixels(grid_height, image_height), image_height, class_map.shape[0])
    cols = _bilinear_weights(_cell_centre_pixels(grid_width, image_width), image_width, class_map.shape[1])
    values = class_map.astype(np.float64)
    (r0, r1, wr), (c0, c1, wc) = rows, cols
    top = values[r0][:, c0] * (1 - wc) + values[r0][:, c1] * wc
    bottom = values[r1][:, c0] * (1 - wc) + values[r1][:, c1] * wc
    return top * (1 - wr)[:, None] + bottom * wr[:, None]


def _checked_map(class_map: np.ndarray, image_height: int, image_width: int, grid_height: int,
                 grid_width: int) -> np.ndarray:
    class_map = np.asarray(class_map)
    if class_map.ndim != 2 or class_map.size == 0:
        raise ValidationError(f"class_map must be a non-empty 2-D array, got shape {class_map.shape}")
    if not np.issubdtype(class_map.dtype, np.number) or not np.all(np.isfinite(class_map)):
        raise ValidationError("class_map must hold finite numbers; check stage 1 for NaN/inf")
    for name, value in (("image_height", image_height), ("image_width", image_width),
                        ("grid_height", grid_height), ("grid_width", grid_width)):
        if int(value) < 1:
            raise ValidationError(f"{name} must be >= 1, got {value}")
    return class_map


def activation_mask(
    class_map: np.ndarray,
    image_height: int,
    image_width: int,
    grid_height: int,
    grid_width: int,
    ratio: float = 0.7,
    fidelity: str = "fast",
    image_map: np.ndarray | None = None,
) -> np.ndarray:
    """Activated cells ``A = map > ratio * mean(map)`` on the feature grid, (grid_h, grid_w) bool.

    ``class_map``: (g_h, g_w) float in [0, 1] (stage 1's min-max normalised map of one class).
    ``fidelity``: ``"fast"`` samples cell centres and averages the grid-sized map; ``"release"``
    averages the image-sized map and samples ``floor(i * H / h)`` (module docstring).
    ``image_map``: ``"release"`` only, the (image_height, image_width) float32 upsampled map when the
    caller has it from torch itself (``semantic.upsample_maps``: bit for bit the release's);
    default :func:`release_image_map` (numpy, within ~1e-6 of torch's).
    """
    if fidelity == "release":
        if image_map is None:
            image_map = release_image_map(class_map, image_height, image_width)
        elif np.shape(image_map) != (image_height, image_width):
            raise ValidationError(f"image_map must be ({image_height}, {image_width}), got {np.shape(image_map)}")
        image_map = np.ascontiguousarray(image_map, dtype=np.float32)
        threshold = np.mean(image_map) * ratio  # numpy's float32 mean and scalar rules, as the release
        rows = _nearest_source_pixels(grid_height, image_height)
        cols = _nearest_source_pixels(grid_width, image_width)
        return image_map[rows][:, cols] > np.asarray(threshold)
    if fidelity != "fast":
        raise ValidationError(f"fidelity must be 'release' or 'fast', got {fidelity!r}")
    grid_map = class_map_to_grid(class_map, image_height, image_width, grid_height, grid_width)
    return grid_map > ratio * grid_map.mean()


def release_image_map(class_map: np.ndarray, image_height: int, image_width: int) -> np.ndarray:
    """(image_height, image_width) float32: ``class_map`` (g_h, g_w) upsampled bilinearly in float32
    with torch's rule (``interpolate(mode="bilinear", align_corners=False)``: source
    ``max(0, scale * (i + 0.5) - 0.5)`` with ``scale = float32(in) / out``, weights in float32).
    torch's kernels order the float32 products differently, so values agree to ~1e-6, not bit for
    bit; the generator passes torch's own map instead (``activation_mask(image_map=...)``)."""
    values = _checked_map(class_map, image_height, image_width, 1, 1).astype(np.float32)
    r0, r1, wr = _float32_linear(image_height, values.shape[0])
    c0, c1, wc = _float32_linear(image_width, values.shape[1])
    one = np.float32(1.0)
    top = values[r0][:, c0] * (one - wc) + values[r0][:, c1] * wc
    bottom = values[r1][:, c0] * (one - wc) + values[r1][:, c1] * wc
    return (top * (one - wr)[:, None] + bottom * wr[:, None]).astype(np.float32)


def _float32_linear(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = np.float32(in_size) / np.float32(out_size)
    source = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    source = np.maximum(source, np.float32(0.0))
    lower = source.astype(np.int64)
    upper = np.where(lower < in_size - 1, lower + 1, lower)
    weight = np.clip(source - lower.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
    return lower, upper, weight


def _nearest_source_pixels(cells: int, pixels: int) -> np.ndarray:
    """torch ``nearest`` source index of each of ``cells`` outputs from ``pixels`` inputs:
    ``min(floor(i * float32(pixels / cells)), pixels - 1)`` in float32 (identity when equal, ``i >> 1``
    when ``cells == 2 * pixels``, as torch special-cases them)."""
    index = np.arange(cells, dtype=np.int64)
    if cells == pixels:
        return index
    if cells == 2 * pixels:
        return index >> 1
    scale = np.float32(pixels) / np.float32(cells)
    return np.minimum(np.floor(index.astype(np.float32) * scale).astype(np.int64), pixels - 1)


def min_instance_cells(grid_height: int, grid_width: int, config: DiscoveryConfig) -> int:
    """Smallest instance kept, in grid cells.

    ``config.min_cells`` as released when ``min_cells_reference_short_side`` is 0; otherwise
    ``round(min_cells * (min(grid_h, grid_w) * 16 / reference) ** 2)``.
    """
    reference = config.min_cells_reference_short_side
    if reference <= 0:
        return int(config.min_cells)
    scale = min(grid_height, grid_width) * GRID_STRIDE / reference
    return int(round(config.min_cells * scale * scale))


def discover_instances(labels: np.ndarray, activated: np.ndarray, config: DiscoveryConfig,
                       num_clusters: int | None = None) -> list[GridInstance]:
    """Instances from a k-means label grid and an activation mask (Stage 3).

    ``labels``: (h, w) non-negative integer cluster ids. ``activated``: (h, w) bool.
    ``num_clusters``: k of the clustering (default ``labels.max() + 1``), the length of the
    release's ``most_common`` list. Steps: visit the clusters with activated cells
    (``config.cluster_visits``, module docstring); keep each 4-connected fragment of the cluster's
    full mask (with ``fragment_connectivity: 8``, not its thin ring pieces) whose activated fraction is
    ``> min_activated_fraction`` and whose ``bbox_area / area < max_box_to_area``; instances are the
    4-connected components of the union of kept fragments with at least :func:`min_instance_cells`
    cells (with ``recover_small``, a smaller one counts its one-cell ring and becomes the grown
    region when that reaches the minimum), in raster order of their first cell.
    """
    labels, activated = _check_grids(labels, activated)
    k = int(labels.max()) + 1 if num_clusters is None else int(num_clusters)
    if config.cluster_visits == "most_common":
        visits = _clusters_most_common(labels, activated, k)
    else:
        visits = _clusters_by_activation(labels, activated)
    fragment_ids = np.zeros(labels.shape, dtype=np.int64)  # 0 = not kept; else a global fragment id
    next_id = 1
    for cluster in visits:
        next_id = _keep_fragments(labels == cluster, activated, config, fragment_ids, next_id)
    components, _ = ndimage.label(fragment_ids > 0, structure=_FOUR_CONNECTED)
    areas = np.bincount(components.ravel())
    minimum = min_instance_cells(*labels.shape, config)
    instances = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        cells, area = components == index, int(areas[index])
        if area < minimum:
            if not config.recover_small:
                continue
            cells = ndimage.binary_dilation(cells, structure=_EIGHT_CONNECTED)  # the object's boundary ring
            area = int(cells.sum())
            if area < minimum:
                continue
            box = ndimage.find_objects(cells.astype(np.int8))[0]
        instances.append(_make_instance(cells, box, area, labels, activated, fragment_ids))
    instances.sort(key=lambda inst: int(np.flatnonzero(inst.cells.ravel())[0]))
    return instances


def grow_grid_boxes(boxes_xyxy_grid: np.ndarray, cells: int, grid_height: int, grid_width: int) -> np.ndarray:
    """(N, 4) XYXY grid boxes grown by ``cells`` on every side, clipped to the grid (float64)."""
    boxes = np.asarray(boxes_xyxy_grid, dtype=np.float64).reshape(-1, 4)
    if cells <= 0:
        return boxes
    grown = boxes + np.array([-cells, -cells, cells, cells], dtype=np.float64)
    return np.clip(grown, 0.0, np.array([grid_width, grid_height] * 2, dtype=np.float64))


def grid_boxes_to_image(
    boxes_xyxy_grid: np.ndarray, grid_height: int, grid_width: int, image_height: int, image_width: int
) -> np.ndarray:
    """Grid boxes (N, 4) XYXY cells -> (N, 4) float32 XYXY absolute image pixels.

    x is scaled by ``image_width / grid_width`` and y by ``image_height / grid_height`` (the release
    swaps the two factors), then clipped to ``[0, W] x [0, H]``.
    """
    boxes = np.asarray(boxes_xyxy_grid, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValidationError(f"boxes_xyxy_grid must be (N, 4), got shape {boxes.shape}")
    if min(grid_height, grid_width, image_height, image_width) < 1:
        raise ValidationError(
            f"grid and image sizes must be >= 1, got grid {grid_height}x{grid_width}, "
            f"image {image_height}x{image_width}"
        )
    scale = np.array([image_width / grid_width, image_height / grid_height] * 2)
    limit = np.array([image_width, image_height] * 2, dtype=np.float64)
    return np.clip(boxes * scale, 0.0, limit).astype(np.float32)


def _cell_centre_pixels(cells: int, pixels: int) -> np.ndarray:
    """Pixel index under each cell centre: ``floor((i + 0.5) * pixels / cells)``, exactly."""
    index = np.arange(cells, dtype=np.int64)
    return np.minimum(((2 * index + 1) * pixels) // (2 * cells), pixels - 1)


def _bilinear_weights(pixels: np.ndarray, out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 for half-pixel-centre bilinear sampling."""
    source = np.clip((pixels + 0.5) * (in_size / out_size) - 0.5, 0.0, in_size - 1.0)
    lower = np.floor(source).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    return lower, upper, source - lower


def _check_grids(labels: np.ndarray, activated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    activated = np.asarray(activated)
    if labels.ndim != 2 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValidationError(f"labels must be a non-empty (h, w) integer grid, got {labels.dtype} {labels.shape}")
    if activated.shape != labels.shape or activated.dtype != np.bool_:
        raise ValidationError(
            f"activated must be a bool grid of the labels' shape {labels.shape}, got {activated.dtype} {activated.shape}"
        )
    if labels.min() < 0:
        raise ValidationError(f"labels must be non-negative cluster ids, got minimum {labels.min()}")
    return labels.astype(np.int64, copy=False), activated


def _clusters_by_activation(labels: np.ndarray, activated: np.ndarray) -> list[int]:
    """Cluster ids with >= 1 activated cell, most activated cells first, ties by ascending id."""
    counts = np.bincount(labels[activated], minlength=int(labels.max()) + 1)
    ids = np.flatnonzero(counts)
    order = np.lexsort((ids, -counts[ids]))
    return [int(cluster) for cluster in ids[order]]


def _clusters_most_common(labels: np.ndarray, activated: np.ndarray, k: int) -> list[int]:
    """The release's visits: of ``Counter(((labels + 1) * A).ravel()).most_common(k)`` (by count,
    ties in order of first occurrence; the 0 entry counts), the cluster ids, 0 (not activated) left out."""
    values = ((labels + 1) * activated).ravel()
    entries, first, counts = np.unique(values, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))[:k]
    return [int(value) - 1 for value in entries[order] if value != 0]


def _keep_fragments(
    cluster_mask: np.ndarray,
    activated: np.ndarray,
    config: DiscoveryConfig,
    fragment_ids: np.ndarray,
    next_id: int,
) -> int:
    """Write the cluster's kept 4-connected fragments into ``fragment_ids``; return the next free id.

    ``fragment_connectivity: 8``: a fragment that is *thin* (no cell whose four neighbours are all
    in it) and joins others of its cluster diagonally is a piece of a ring or a bridge, and is not
    kept whatever its own extent (a one-cell step of a diagonal boundary ring passes the extent test
    on its own and would join two instances).
    """
    fragments, _ = ndimage.label(cluster_mask, structure=_FOUR_CONNECTED)
    rings = _ring_pieces(cluster_mask, fragments) if config.fragment_connectivity == 8 else None
    for index, box in enumerate(ndimage.find_objects(fragments), start=1):
        if box is None or (rings is not None and index in rings):
            continue
        fragment = fragments[box] == index
        area = int(fragment.sum())
        activated_fraction = int(activated[box][fragment].sum()) / area
        box_area = (box[0].stop - box[0].start) * (box[1].stop - box[1].start)
        if activated_fraction > config.min_activated_fraction and box_area / area < config.max_box_to_area:
            fragment_ids[box][fragment] = next_id
            next_id += 1
    return next_id


def _ring_pieces(cluster_mask: np.ndarray, fragments: np.ndarray) -> set[int]:
    """Ids of the 4-connected ``fragments`` that are thin (4-erosion empty) and share an 8-connected
    component of ``cluster_mask`` with another fragment."""
    groups, _ = ndimage.label(cluster_mask, structure=_EIGHT_CONNECTED)
    ids = fragments.ravel()
    inside = ids > 0
    group_of = np.zeros(int(fragments.max()) + 1, np.int64)
    group_of[ids[inside]] = groups.ravel()[inside]
    per_group = np.bincount(group_of[1:], minlength=int(groups.max()) + 1)
    # a 4-neighbour in the cluster is in the same 4-connected fragment, so erosion finds each one's core
    solid = ndimage.binary_erosion(fragments > 0, structure=_FOUR_CONNECTED, border_value=1)
    has_core = np.zeros(len(group_of), bool)
    has_core[fragments[solid]] = True
    return {i for i in range(1, len(group_of)) if not has_core[i] and per_group[group_of[i]] > 1}


def _make_instance(
    cells: np.ndarray,
    box: tuple[slice, slice],
    area: int,
    labels: np.ndarray,
    activated: np.ndarray,
    fragment_ids: np.ndarray,
) -> GridInstance:
    y1, y2, x1, x2 = box[0].start, box[0].stop, box[1].start, box[1].stop
    cells.setflags(write=False)
    return GridInstance(
        cells=cells,
        box_xyxy_grid=(int(x1), int(y1), int(x2), int(y2)),
        area_cells=area,
        activated_fraction=int(activated[cells].sum()) / area,
        extent=area / ((x2 - x1) * (y2 - y1)),
        cluster_ids=tuple(int(c) for c in np.unique(labels[cells])),
        fragment_count=int(np.count_nonzero(np.unique(fragment_ids[cells]))),
    )
