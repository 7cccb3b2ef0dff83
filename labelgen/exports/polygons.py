"""Masks as polygons, for COCO polygon and YOLO segment exports.

* COCO: ``mask_to_polygons`` traces every part's outer boundary along pixel edges;
  ``polygons_iou`` measures what the polygons lose against the mask.
* YOLO: ``mask_parts`` gives the outer contour of each 8-connected part; ``merge_parts`` joins
  several parts into one polygon with zero-width bridges across the narrowest gaps (a spanning
  tree over the parts' Voronoi neighbours), so a trainer's single polygon covers their union.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
from pycocotools import mask as coco_mask

from ..structures.masks import rle_to_pycocotools


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer boundaries of an ``(H, W)`` bool mask as COCO polygons ``[x1, y1, x2, y2, ...]``
    (absolute pixels, pixel ``(x, y)`` covering ``[x, x+1) x [y, y+1)``). Holes are filled;
    parts with fewer than 3 points are dropped. Traced on a 2x upsampled crop so that the
    vertices run 1/4 pixel inside the pixel edges: pycocotools fills pixels whose centre is
    inside, so a hole-free mask is reproduced exactly."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return []
    y0, x0 = int(ys.min()), int(xs.min())
    crop = np.ascontiguousarray(mask[y0 : ys.max() + 1, x0 : xs.max() + 1], dtype=np.uint8)
    doubled = np.pad(np.repeat(np.repeat(crop, 2, axis=0), 2, axis=1), 1)
    contours, _ = cv2.findContours(doubled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        points = contour.reshape(-1, 2).astype(np.float64)
        if len(points) < 3:
            continue
        points = (points - 0.5) / 2 + (x0, y0)  # doubled+padded index k -> centre (k - 1 + 0.5) / 2
        polygons.append(points.ravel().tolist())
    return polygons


def polygons_iou(polygons: list[list[float]], rle: dict, height: int, width: int) -> float:
    """IoU between the union of rasterised ``polygons`` (pycocotools) and the mask ``rle``."""
    if not polygons:
        return 0.0
    rasterised = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    return float(coco_mask.iou([rasterised], [rle_to_pycocotools(rle)], [0])[0][0])


def mask_parts(mask: np.ndarray) -> tuple[list[np.ndarray], list[int], int]:
    """Outer contours of an ``(H, W)`` bool mask's 8-connected parts, largest first.

    Returns ``(parts, areas, degenerate)``: ``(k, 2)`` int ``x, y`` pixel-index vertices (k >= 3,
    ``CHAIN_APPROX_SIMPLE``), each part's pixel count, and how many contours had fewer than 3 vertices.
    """
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if not len(ys):
        return [], [], 0
    crop = np.ascontiguousarray(mask[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1], dtype=np.uint8)
    contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(crop, connectivity=8)
    found = []
    for contour in contours:
        points = contour.reshape(-1, 2)
        if len(points) >= 3:
            area = int(stats[labels[points[0, 1], points[0, 0]], cv2.CC_STAT_AREA])
            found.append((area, points + np.array([xs[0], ys[0]])))
    found.sort(key=lambda pair: (-pair[0], pair[1][0, 1], pair[1][0, 0]))
    return [p for _, p in found], [a for a, _ in found], len(contours) - len(found)


def merge_parts(parts: Sequence[np.ndarray]) -> np.ndarray:
    """One ``(m, 2)`` polygon through every part (``(k, 2)`` x, y vertices each), joined by zero-width bridges.

    The bridges form a spanning tree over the parts that crosses the narrowest gaps (see
    ``_spanning_tree``); a bridge joins the closest pair of vertices of its two parts. The polygon walks
    around ``parts[0]``; at a vertex where a bridge leaves, it crosses to the child part, walks all the
    way around it (taking the child's own bridges the same way) back to the bridge's end, and crosses
    back. Each bridge is traversed once each way, so it encloses no area under even-odd or non-zero
    filling: the filled polygon is the union of the parts plus, rasterised with the boundary, the
    bridges' pixels.
    """
    children = _tree_bridges(parts, _spanning_tree(parts)) if len(parts) > 1 else [{}]
    walk: list[np.ndarray] = []
    stack: list[tuple] = [("part", 0, 0, 0)]  # ("part", part, entry vertex, step) | ("point", xy)
    while stack:
        frame = stack.pop()
        if frame[0] == "point":
            walk.append(frame[1])
            continue
        _, part, entry, step = frame
        points = parts[part]
        closing = len(points) if part else len(points) - 1  # a child walks back to its entry vertex
        if step > closing:
            continue
        vertex = (entry + step) % len(points)
        walk.append(points[vertex])
        stack.append(("part", part, entry, step + 1))
        if step < len(points):
            for child, child_vertex in reversed(children[part].get(vertex, [])):
                stack.append(("point", points[vertex]))  # back over the bridge after the child
                stack.append(("part", child, child_vertex, 0))
    return np.asarray(walk)


def _spanning_tree(parts: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """Edges of a spanning tree of the parts, narrowest gaps first (Kruskal).

    Candidate edges join parts whose cells in the discrete Voronoi diagram of the filled parts touch
    (``cv2.distanceTransformWithLabels``), weighted by the gap width there: linear in the pixels of
    the parts' bounding box instead of quadratic in the number of parts.
    """
    low = np.min([p.min(axis=0) for p in parts], axis=0) - 1
    high = np.max([p.max(axis=0) for p in parts], axis=0) + 2
    canvas = np.zeros((high[1] - low[1], high[0] - low[0]), np.int32)
    for index, part in enumerate(parts):
        cv2.fillPoly(canvas, [(part - low).astype(np.int32)], index + 1)
    dist, labels = cv2.distanceTransformWithLabels((canvas == 0).astype(np.uint8), cv2.DIST_L2, 5,
                                                   labelType=cv2.DIST_LABEL_PIXEL)
    nearest = np.concatenate([[0], canvas[canvas > 0]])[labels] - 1  # labels number part pixels row-major
    pairs, gaps = [], []
    for a, b, da, db in ((nearest[:, :-1], nearest[:, 1:], dist[:, :-1], dist[:, 1:]),
                         (nearest[:-1], nearest[1:], dist[:-1], dist[1:])):
        differ = a != b
        pairs.append(np.sort(np.stack([a[differ], b[differ]], axis=1), axis=1))
        gaps.append(da[differ] + db[differ])
    pairs_by_gap = np.concatenate(pairs)[np.argsort(np.concatenate(gaps), kind="stable")]
    _, first = np.unique(pairs_by_gap, axis=0, return_index=True)
    root = list(range(len(parts)))

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    tree = []
    for a, b in pairs_by_gap[np.sort(first)].tolist() + [(0, p) for p in range(1, len(parts))]:
        if find(a) != find(b):  # the (0, p) fallbacks only join parts hidden under others
            root[find(a)] = find(b)
            tree.append((a, b))
    return tree


def _tree_bridges(parts: Sequence[np.ndarray], tree: list[tuple[int, int]]) -> list[dict[int, list[tuple[int, int]]]]:
    """Per part: ``{vertex: [(child part, child vertex), ...]}``, the tree rooted at part 0."""
    neighbours: list[list[int]] = [[] for _ in parts]
    for a, b in tree:
        neighbours[a].append(b)
        neighbours[b].append(a)
    children: list[dict[int, list[tuple[int, int]]]] = [{} for _ in parts]
    queue, seen = [0], {0}
    for parent in queue:  # breadth first; the list grows while it is read
        for child in neighbours[parent]:
            if child not in seen:
                seen.add(child)
                queue.append(child)
                parent_vertex, child_vertex = _closest_vertices(parts[parent], parts[child])
                children[parent].setdefault(parent_vertex, []).append((child, child_vertex))
    return children


def _closest_vertices(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Indices of the closest pair of vertices of ``a`` and ``b``, in blocks of about 1M pairs."""
    best, pair = np.inf, (0, 0)
    step = max(1, 1_000_000 // len(b))
    b = b.astype(np.float64)
    for start in range(0, len(a), step):
        d2 = ((a[start:start + step, None, :] - b[None, :, :]) ** 2).sum(axis=2)
        i, j = np.unravel_index(int(d2.argmin()), d2.shape)
        if d2[i, j] < best:
            best, pair = d2[i, j], (start + int(i), int(j))
    return pair


# -- files and folders ----------------------------------------------------------------------------
