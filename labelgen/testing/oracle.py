"""Oracle check of the ``zip`` pipeline: test helper shipped with the package, never user-facing.

``ZipOracleGenerator`` ("zip-oracle") registers only when this module is imported (the tests, or
``labelgen run --plugin labelgen.testing.oracle``). It is the real :class:`ZipGenerator` with its
three model stages replaced by oracles read from a YOLO-seg ground truth (e.g. coco128-seg, found by
the image's file name). Ground-truth masks may overlap (COCO draws a bowl around its food), so the
oracles share an *owner image*: instances painted largest first, so the smaller one owns the pixels
where two overlap (:func:`paint_owners`).

* **Semantic oracle** (stage 1). ``class_probs`` is 1/K over the K classes present in the image and 0
  elsewhere, so the real gate (``gate_classes``) keeps exactly the present classes. ``maps`` (C, g, g),
  with g = ``map_size``, hold for each present class the fraction of each map cell that the class
  owns (``map_coverage: visible``) or that its full masks cover (``polygon``); absent classes get 0.
* **Boundary oracle** (stage 2). A grid of cells of about ``grid_stride`` image pixels; each cell
  takes the owner of its centre pixel. Instance cells with an 8-neighbour of another owner are
  *edge* cells: a 4-connected ring, one cell thick, like the boundary cluster of CLIP's layer3.
  An instance's interior is cut into a checkerboard of ``part_size``-cell parts (two clusters per
  instance), because stage 3 keeps only fragments that fill a third of their box: Zip assumes that
  k-means splits objects into compact parts, and a one-fragment airplane or giraffe would fail that
  test. The features are the owner one-hot, the part colour, and an edge channel. The real
  :func:`~labelgen.generators.zip.kmeans.kmeans` clusters them with k = number of regions. **The oracle
  chooses the seeds** (the first cell of each region): the even seeds put several seeds in one
  large region and none in small ones, and Lloyd's algorithm cannot recover from that on one-hot
  features. The oracle then checks that k-means returned exactly the designed partition.
* **SAM oracle** (stage 4). Each prompt box gets the ground-truth mask (any class) whose tight box
  has the highest IoU with it. Its predicted IoU is that box IoU (``predicted_iou: box_iou``, how
  well the prompt frames the object) or 1 (``one``); its stability is 1. A box that overlaps no
  ground-truth box gets an empty mask, which the generator drops.

What stays real: the class gate, the activation mask, fragment selection and instance discovery
(``labelgen.generators.zip.discovery``, with every ``discovery`` option: the method fixes of
``docs/oracle-check.md`` are measured here), k-means, the grid-to-image box scaling, the confidence,
dropping empty masks, mask NMS, and everything after the generator (store, filter, export, eval).
``fidelity`` defaults to ``fast``: the oracle grid takes each cell's centre pixel, the fast rule.
See ``docs/oracle-check.md`` for the measured AP and for what each oracle choice changes.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError, GeneratorError, LabelgenError, ValidationError
from ..generators import GENERATORS
from ..generators.base import failed
from ..generators.zip.generator import ZipGenerator
from ..exports.importers import ImportedDataset, import_yolo
from ..structures.instances import ImageRecord, Instances
from ..generators.zip.boundary import BoundaryResize, BoundaryResult
from ..generators.zip.config import BoundaryConfig, DiscoveryConfig, SamConfig, SemanticConfig, ZipConfig
from ..generators.zip.refine import RefineResult

log = logging.getLogger(__name__)

EDGE_WEIGHT = 4.0  # edge channel weight; > 1 puts every edge cell in the edge cluster (oracle_features)


@dataclass(frozen=True)
class OracleConfig:
    """The ``zip-oracle`` generator: ground truth in place of CLIP and SAM, the rest of zip real."""

    gt_root: str  # YOLO-seg dataset root (data.yaml, or images/<split> + labels/<split> + classes.txt)
    split: str = "train2017"  # the split folder the images come from
    grid_stride: int = 4  # oracle feature cell side in image pixels (>= 1); 4 on 640x480 = 160x120 cells
    part_size: int = 8  # instances split into a checkerboard of part_size-cell parts (0 = one part)
    map_size: int = 128  # side g of the oracle class maps (g x g over the whole image, >= 1)
    map_coverage: Literal["visible", "polygon"] = "visible"  # class maps cover visible pixels / full masks
    max_iterations: int = 100  # k-means (labelgen.generators.zip.kmeans), as BoundaryConfig
    tolerance: float = 1e-5
    predicted_iou: Literal["box_iou", "one"] = "box_iou"  # SAM oracle's IoU head: prompt/GT box IoU, or 1
    class_agnostic: bool = False  # True: instances carry no class ids
    fidelity: Literal["release", "fast"] = "fast"  # stage 3's activation-mask sampling (ZipConfig.fidelity); the
    # oracle grid takes cell centres, which is the fast rule
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)  # stage 3, real
    sam: SamConfig = field(default_factory=SamConfig)  # only nms_iou / nms_ios are used

    def __post_init__(self) -> None:
        for name in ("grid_stride", "map_size", "max_iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"generator.{name} must be >= 1; got {getattr(self, name)}")
        if self.part_size < 0:
            raise ConfigError(f"generator.part_size must be >= 0 (0 = one part); got {self.part_size}")
        if not self.gt_root:
            raise ConfigError("generator.gt_root must name a YOLO-seg dataset root; got ''")
        if self.fidelity not in ("release", "fast"):
            raise ConfigError(f"generator.fidelity must be release or fast; got {self.fidelity!r}")


@dataclass(frozen=True)
class OracleImage:
    """Ground truth of the image being generated: N instances in its (H, W) pixel frame."""

    masks: np.ndarray  # (N, H, W) bool, the full ground-truth masks (they may overlap)
    class_ids: np.ndarray  # (N,) int64
    boxes_xyxy: np.ndarray  # (N, 4) float64 tight boxes, absolute pixels, x2/y2 exclusive
    owner: np.ndarray  # (H, W) int32: 0 = background, i + 1 = instance i visible there (painter's order)

    @classmethod
    def from_instances(cls, instances: Instances) -> "OracleImage":
        height, width = instances.height, instances.width
        masks = instances.masks() if len(instances) else np.zeros((0, height, width), bool)
        class_ids = np.zeros(len(instances), np.int64) if instances.class_ids is None else instances.class_ids
        return cls(masks, np.asarray(class_ids, np.int64), np.asarray(instances.boxes_xyxy, np.float64),
                   paint_owners(masks))


def paint_owners(masks: np.ndarray) -> np.ndarray:
    """(H, W) int32 owner image of (N, H, W) masks: the largest is painted first, so where masks
    overlap the smaller one (the object in front, or inside: a person in a bus, food in a bowl) owns
    the pixel. 0 = background."""
    owner = np.zeros(masks.shape[1:], np.int32)
    areas = masks.reshape(len(masks), owner.size).sum(axis=1)
    for index in np.argsort(-areas, kind="stable"):
        owner[masks[index]] = index + 1
    return owner


class _Binding:
    """The image the three oracle stages answer for; set by ``ZipOracleGenerator.generate_batch``."""

    image: OracleImage | None = None

    def require(self) -> OracleImage:
        if self.image is None:
            raise GeneratorError("an oracle stage was called outside ZipOracleGenerator.generate_batch")
        return self.image


# -- stage 1 -----------------------------------------------------------------------------------------
class OracleSemantic:
    """``stage(image_rgb) -> SemanticResult`` from the bound ground truth (module docstring).

    ``coverage``: ``visible`` maps cover the pixels each class owns (:func:`paint_owners`);
    ``polygon`` maps cover the classes' full masks, including what lies in front of or inside them.
    """

    def __init__(self, num_classes: int, map_size: int, coverage: str, binding: _Binding):
        self.num_classes, self.map_size, self.coverage, self.binding = num_classes, map_size, coverage, binding

    def __call__(self, image_rgb: np.ndarray):
        from ..generators.zip.semantic import SemanticResult, gate_classes

        truth = self.binding.require()
        maps = np.zeros((self.num_classes, self.map_size, self.map_size), np.float32)
        present = [c for c in np.unique(truth.class_ids) if truth.masks[truth.class_ids == c].any()]
        probs = np.zeros(self.num_classes, np.float32)
        for class_id in present:
            probs[class_id] = 1.0 / len(present)
            maps[class_id] = coverage_map(self._class_mask(truth, class_id), self.map_size)
        kept = gate_classes(probs, 0.5 / max(len(present), 1), 0)  # exactly the present classes
        return SemanticResult(class_probs=probs, maps=maps, kept=kept)

    def encode_batch(self, images_rgb: list[np.ndarray]) -> list[np.ndarray]:
        """The encoder interface ``ZipGenerator`` calls: the oracle's "features" are the images."""
        return list(images_rgb)

    def from_tokens(self, image_rgb: np.ndarray):
        return self(image_rgb)

    def _class_mask(self, truth: OracleImage, class_id: int) -> np.ndarray:
        members = truth.class_ids == class_id
        if self.coverage == "polygon":
            return truth.masks[members].any(axis=0)
        return np.isin(truth.owner, np.flatnonzero(members) + 1)


def coverage_map(mask: np.ndarray, size: int) -> np.ndarray:
    """(size, size) float32 in [0, 1]: the fraction of each map cell that ``mask`` (H, W) covers."""
    image = Image.fromarray(mask.astype(np.float32), mode="F")
    return np.clip(np.asarray(image.resize((size, size), Image.Resampling.BOX), np.float32), 0.0, 1.0)


# -- stage 2 -----------------------------------------------------------------------------------------
class OracleBoundary:
    """``stage(image_rgb, activation) -> BoundaryResult``: oracle features, the real k-means."""

    def __init__(self, grid_stride: int, part_size: int, max_iterations: int, tolerance: float, binding: _Binding):
        self.grid_stride, self.part_size, self.binding = grid_stride, part_size, binding
        self.max_iterations, self.tolerance = max_iterations, tolerance

    def __call__(self, image_rgb: np.ndarray, activation_map: np.ndarray | None = None) -> BoundaryResult:
        import torch

        from ..generators.zip.kmeans import kmeans

        height, width = image_rgb.shape[:2]
        owner = owner_grid(self.binding.require(), self.grid_stride)
        features, seeds, expected = oracle_features(owner, self.part_size)
        with torch.inference_mode():
            labels, centroids, iterations = kmeans(torch.from_numpy(features), len(seeds), self.max_iterations,
                                                   self.tolerance, torch.from_numpy(seeds))
        grid = labels.reshape(owner.shape).numpy().astype(np.int32)
        if not np.array_equal(grid, expected):
            raise GeneratorError(f"k-means did not return the oracle partition ({int((grid != expected).sum())}"
                                 f" of {grid.size} cells differ); a bug in labelgen.generators.zip.kmeans")
        grid.setflags(write=False)
        return BoundaryResult(labels=grid, grid_height=owner.shape[0], grid_width=owner.shape[1],
                              features_shape=(1, features.shape[1], *owner.shape), iterations=iterations,
                              num_clusters=int(centroids.shape[0]),
                              resize=BoundaryResize(height, width, height, width))

    def encode_batch(self, images_rgb: list[np.ndarray]) -> list[np.ndarray]:
        return list(images_rgb)

    def cluster(self, image_rgb: np.ndarray, height: int, width: int,
                activation_map: np.ndarray | None = None) -> BoundaryResult:
        return self(image_rgb, activation_map)


def owner_grid(truth: OracleImage, grid_stride: int) -> np.ndarray:
    """(gh, gw) int64: the owner (:func:`paint_owners`) of each cell's centre pixel.

    gh = max(1, round(H / stride)) cells of H / gh pixels each tile the image exactly, as the
    generator's box scaling assumes; the centre pixel of cell i is ``floor((i + 0.5) * H / gh)``,
    the rule stage 3 samples class maps with.
    """
    height, width = truth.owner.shape
    rows = _centre_pixels(max(1, round(height / grid_stride)), height)
    cols = _centre_pixels(max(1, round(width / grid_stride)), width)
    return truth.owner[rows][:, cols].astype(np.int64)


def _centre_pixels(cells: int, pixels: int) -> np.ndarray:
    index = np.arange(cells, dtype=np.int64)
    return np.minimum(((2 * index + 1) * pixels) // (2 * cells), pixels - 1)


def edge_cells(owner: np.ndarray) -> np.ndarray:
    """(gh, gw) bool: instance cells with an 8-neighbour of another owner (the image border is not one).

    The 8-neighbourhood makes each instance's edge a 4-connected ring, so its interior touches no
    other region: with 4-neighbours a diagonal border would leave single, compact edge cells that
    stage 3 keeps and that bridge touching instances of one class.
    """
    padded = np.pad(owner, 1, mode="edge")
    height, width = owner.shape
    edges = np.zeros(owner.shape, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                edges |= padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width] != owner
    return edges & (owner > 0)


def part_colours(shape: tuple[int, int], part_size: int) -> np.ndarray:
    """(gh, gw) int64 in {0, 1}: checkerboard of ``part_size``-cell blocks (all 0 when part_size is 0)."""
    if part_size <= 0:
        return np.zeros(shape, np.int64)
    rows = np.arange(shape[0]) // part_size
    cols = np.arange(shape[1]) // part_size
    return (rows[:, None] + cols[None, :]) % 2


def oracle_features(owner: np.ndarray, part_size: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, seeds and the partition k-means must return, for an owner grid.

    Regions: the background; per instance, its interior (non-edge) cells of each checkerboard colour
    (:func:`part_colours`; one region per instance when ``part_size`` is 0); all edge cells.
    Returns ``features`` (gh*gw, owners + 3) float32: one-hot owner, one-hot colour (instances only),
    ``EDGE_WEIGHT`` in the last column for edge cells; ``seeds`` (k,) int64 raster indices (the first
    cell of each region); ``expected`` (gh, gw) int32 cluster ids in region order (background, then
    instances by index and colour, then edges).

    Why Lloyd's algorithm returns ``expected`` from these seeds: every non-edge cell equals its
    region's seed, so its distance there is 0. An edge cell is ``e_owner + w * e_edge``; its distance
    to the edge centroid (``w * e_edge`` + a mix of owner one-hots) is at most sqrt(2), and to any
    other centroid at least sqrt(w**2 + 1) > sqrt(2) when ``w = EDGE_WEIGHT > 1``.
    """
    edges = edge_cells(owner)
    interior = (owner > 0) & ~edges
    owners, column = np.unique(owner, return_inverse=True)
    column = column.reshape(owner.shape)
    colour = np.where(interior, part_colours(owner.shape, part_size), 0)
    cells = np.arange(owner.size)
    features = np.zeros((owner.size, owners.size + 3), np.float32)
    features[cells, column.ravel()] = 1.0  # owner one-hot
    features[cells[interior.ravel()], owners.size + colour.ravel()[interior.ravel()]] = 1.0  # part colour
    features[edges.ravel(), -1] = EDGE_WEIGHT  # edge channel
    region = np.where(edges, 2 * owners.size, 2 * column + colour)
    values, first = np.unique(region.ravel(), return_index=True)
    expected = np.searchsorted(values, region).astype(np.int32)
    return features, first.astype(np.int64), expected


# -- stage 4 -----------------------------------------------------------------------------------------
class OracleRefiner:
    """``refine(image_rgb, boxes_xyxy) -> RefineResult``: the best-matching ground-truth masks."""

    def __init__(self, predicted_iou: str, binding: _Binding):
        self.predicted_iou, self.binding = predicted_iou, binding
        self._image: np.ndarray | None = None

    def embed_batch(self, images_rgb: list[np.ndarray]) -> list[np.ndarray]:
        return list(images_rgb)

    def set_embedding(self, image_rgb: np.ndarray, height: int, width: int) -> None:
        self._image = image_rgb

    def decode_boxes(self, boxes_xyxy: np.ndarray) -> RefineResult:
        return self.refine(self._image, boxes_xyxy)

    def refine(self, image_rgb: np.ndarray, boxes_xyxy: np.ndarray) -> RefineResult:
        truth = self.binding.require()
        height, width = image_rgb.shape[:2]
        boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
        if not len(boxes):
            return RefineResult.empty(height, width)
        iou = box_iou_xyxy(boxes, truth.boxes_xyxy)  # (P, N)
        if not iou.shape[1]:
            iou = np.zeros((len(boxes), 1))
        best = iou.argmax(axis=1)
        hit = iou[np.arange(len(boxes)), best] > 0
        masks = np.zeros((len(boxes), height, width), bool)
        masks[hit] = truth.masks[best[hit]]
        score = iou[np.arange(len(boxes)), best] if self.predicted_iou == "box_iou" else hit
        return RefineResult(masks=masks, predicted_iou=np.where(hit, score, 0).astype(np.float32),
                            stability_score=hit.astype(np.float32), mask_choice=np.zeros(len(boxes), np.int64))


def box_iou_xyxy(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """(P, N) IoU of XYXY boxes (x2/y2 exclusive); 0 where the union is empty."""
    a, b = np.asarray(boxes_a, np.float64)[:, None], np.asarray(boxes_b, np.float64)[None]
    inter = (np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
             * np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None))
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


# -- the generator -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _ground_truth(gt_root: str, split: str) -> ImportedDataset:
    try:
        return import_yolo(gt_root, split=split, task="segment")
    except LabelgenError as exc:
        raise GeneratorError(f"zip-oracle: cannot read the ground truth {gt_root!r} (split {split!r}): {exc}") from None


@GENERATORS.register("zip-oracle")
class ZipOracleGenerator(ZipGenerator):
    """The real ``zip`` generator with ground-truth oracles for CLIP and SAM (test only)."""

    Config = OracleConfig

    def __init__(self, config: OracleConfig):
        self.oracle_config = config
        self.truth = _ground_truth(os.path.abspath(config.gt_root), config.split)
        self._records = _records_by_file_name(self.truth)
        self._binding = _Binding()
        names = self.truth.class_names
        super().__init__(
            _zip_config(config, names),
            OracleSemantic(len(names), config.map_size, config.map_coverage, self._binding),
            OracleBoundary(config.grid_stride, config.part_size, config.max_iterations, config.tolerance, self._binding),
            OracleRefiner(config.predicted_iou, self._binding),
            {"generator": self.name, "test_only": True, "oracle": "ground truth for CLIP and SAM",
             "gt_root": os.path.abspath(config.gt_root), "split": config.split},
        )

    @classmethod
    def preflight(cls, config: OracleConfig) -> None:
        _ground_truth(os.path.abspath(config.gt_root), config.split)

    @classmethod
    def from_config(cls, config: OracleConfig, *, device: str = "cpu") -> "ZipOracleGenerator":
        log.warning("using the zip-oracle generator (labelgen.testing.oracle): ground truth stands in for"
                    " CLIP and SAM; for tests only")
        return cls(config)

    @classmethod
    def vocabulary(cls, config: Any) -> tuple[str, ...] | None:
        if isinstance(config, ZipConfig):  # Generator.class_names() passes self.config
            return ZipGenerator.vocabulary(config)
        if config.class_agnostic:
            return None
        return _ground_truth(os.path.abspath(config.gt_root), config.split).class_names

    def generate_batch(self, images_rgb: Sequence[np.ndarray],
                       records: Sequence[ImageRecord]) -> list[Callable[[], Instances]]:
        """One image at a time: the oracle stages answer for the image bound to them."""
        finishers: list[Callable[[], Instances]] = []
        for image_rgb, record in zip(images_rgb, records, strict=True):
            try:
                self._binding.image = self._image_truth(record, image_rgb.shape[:2])
                finishers.extend(super().generate_batch([image_rgb], [record]))
            except Exception as exc:
                finishers.append(failed(exc))
            finally:
                self._binding.image = None
        return finishers

    def _image_truth(self, record: ImageRecord, frame: tuple[int, int]) -> OracleImage:
        name = Path(record.image_id).name
        gt_record = self._records.get(name)
        if gt_record is None:
            raise ValidationError(f"zip-oracle: image {record.image_id!r} has no ground truth in"
                                  f" {self.oracle_config.gt_root} (split {self.oracle_config.split!r})")
        item = self.truth.load_item(gt_record)
        if item.instances is None:
            raise ValidationError(f"zip-oracle: ground truth of {name!r} unreadable: {item.failure}")
        if (item.instances.height, item.instances.width) != tuple(frame):
            raise ValidationError(f"zip-oracle: {name!r} is {frame[0]}x{frame[1]} but its ground truth is"
                                  f" {item.instances.height}x{item.instances.width}")
        return OracleImage.from_instances(item.instances)


def _records_by_file_name(dataset: ImportedDataset) -> dict[str, ImageRecord]:
    records: dict[str, ImageRecord] = {}
    for record in dataset.records:
        name = Path(record.image_id).name
        if name in records:
            raise GeneratorError(f"zip-oracle: two ground-truth images are named {name!r}; use a split folder")
        records[name] = record
    return records


def _zip_config(config: OracleConfig, class_names: tuple[str, ...]) -> ZipConfig:
    """The ``ZipConfig`` the inherited ``ZipGenerator`` code reads (the model fields are unused)."""
    return ZipConfig(
        semantic=SemanticConfig(vocabulary=tuple(class_names), class_agnostic=config.class_agnostic,
                                class_threshold=0.0, top_k=0),
        boundary=BoundaryConfig(max_iterations=config.max_iterations, tolerance=config.tolerance, init="even"),
        discovery=config.discovery,
        sam=config.sam,
        allow_download=False,
        fidelity=config.fidelity,
    )
