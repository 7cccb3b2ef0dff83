"""A noisy ground-truth generator: a stand-in for a real model in tests of review and calibration.

``NoisyOracleGenerator`` ("noisy-oracle") registers only when this module is imported (the tests, or
``labelgen run --plugin labelgen.testing.noisy``). It loads no model: it reads an image's YOLO-seg
ground truth (``labels_dir/STEM.txt``, e.g. coco128-seg ``labels/train2017``) and corrupts it:

* each object is **dropped** (``drop``), or kept with a mask that is mildly perturbed (a small
  dilation, erosion or shift: it still matches at IoU >= 0.5) or, with ``poor_mask``, badly
  perturbed (shifted by about half its size, or heavily eroded/dilated); kept objects are
  **relabelled** to another class with ``relabel``;
* ``false_positives`` (a mean, Poisson) ellipses of random classes are added per image;
* the score columns mimic a real pipeline: ``class_prob`` (lower when relabelled or false),
  ``predicted_iou`` (lower when the mask is poor or false) and ``confidence``, their geometric mean.
  Both are Beta draws whose distributions for right and wrong labels overlap, so confidence
  correlates with correctness imperfectly (``score_noise`` blends each draw toward a uniform one).

The attribute ``noise`` says what was done to each instance (``kept``, ``poor_mask``, ``relabelled``,
``false_positive``), for tests only. Everything is drawn from a generator seeded by ``seed`` and the
image id, so a run is deterministic whatever the batching, workers or image order.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..checks import bounded, check_fields, check_strings, non_empty
from ..errors import ConfigError
from ..generators import GENERATORS, Generator
from ..exports.importers import _read_yolo_labels
from ..structures.instances import ImageRecord, Instances

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoisyConfig:
    """The ``noisy-oracle`` generator: ground truth, corrupted (module docstring)."""

    labels_dir: str = non_empty("")  # folder of YOLO-seg label files, STEM.txt for image STEM.jpg
    class_names: tuple[str, ...] = ()  # empty: read classes.txt in labels_dir or up to two folders above
    seed: int = 0
    drop: float = bounded(0.15, 0.0, 1.0)  # probability an object is missed
    poor_mask: float = bounded(0.2, 0.0, 1.0)  # probability a kept object gets a bad mask (IoU < 0.5)
    relabel: float = bounded(0.12, 0.0, 1.0)  # probability a kept object gets another class
    false_positives: float = bounded(1.0, 0.0, 100.0)  # mean number of false ellipses per image
    score_noise: float = bounded(0.35, 0.0, 1.0)  # 0: scores as informative as the Beta draws; 1: uniform

    def __post_init__(self) -> None:
        check_fields(self)
        check_strings("class_names", self.class_names)


@GENERATORS.register("noisy-oracle")
class NoisyOracleGenerator(Generator):
    """Ground truth with dropped, perturbed, relabelled and false instances and noisy scores (test only)."""

    Config = NoisyConfig

    def __init__(self, config: NoisyConfig):
        self.config = config
        self.labels_dir = Path(os.path.abspath(config.labels_dir))
        self.names = _class_names(config)

    @classmethod
    def preflight(cls, config: NoisyConfig) -> None:
        _class_names(config)

    @classmethod
    def from_config(cls, config: NoisyConfig, *, device: str = "cpu") -> "NoisyOracleGenerator":
        log.warning("using the noisy-oracle generator (labelgen.testing.noisy): corrupted ground truth, for tests only")
        return cls(config)

    @classmethod
    def vocabulary(cls, config: NoisyConfig) -> tuple[str, ...] | None:
        return _class_names(config)

    def provenance(self) -> dict[str, Any]:
        return {"generator": self.name, "test_only": True, "labels_dir": str(self.labels_dir),
                "seed": self.config.seed}

    def generate(self, image_rgb: np.ndarray, record: ImageRecord) -> Instances:
        height, width = image_rgb.shape[:2]
        label = self.labels_dir / (Path(record.image_id).stem + ".txt")
        # an image without a label file has no objects (as in import_yolo): only false positives
        truth = _read_yolo_labels(label, record.with_size(width, height), "segment", len(self.names))
        return corrupt(truth, len(self.names), self.config, image_rng(self.config.seed, record.image_id))


def _class_names(config: NoisyConfig) -> tuple[str, ...]:
    labels_dir = Path(os.path.abspath(config.labels_dir))
    if not labels_dir.is_dir():
        raise ConfigError(f"generator.labels_dir {labels_dir} is not a folder; expected YOLO-seg label files"
                          " (e.g. coco128-seg/labels/train2017)")
    if next(labels_dir.glob("*.txt"), None) is None:
        raise ConfigError(f"generator.labels_dir {labels_dir} holds no .txt label files; expected YOLO-seg labels"
                          " (e.g. coco128-seg/labels/train2017)")
    if config.class_names:
        return tuple(config.class_names)
    for folder in (labels_dir, labels_dir.parent, labels_dir.parent.parent):
        names_file = folder / "classes.txt"
        if names_file.is_file():
            names = tuple(n.strip() for n in names_file.read_text(encoding="utf-8").splitlines() if n.strip())
            if names:
                return names
    raise ConfigError(f"noisy-oracle: no classes.txt in {labels_dir} or the two folders above it; set"
                      " generator.class_names")


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """A generator seeded by ``seed`` and the image id only (independent of order and batching)."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def corrupt(truth: Instances, num_classes: int, config: NoisyConfig, rng: np.random.Generator) -> Instances:
    """The noisy predictions for one image's ground truth ``truth`` (module docstring)."""
    height, width = truth.height, truth.width
    gt_masks = truth.masks() if len(truth) else np.zeros((0, height, width), bool)
    gt_classes = np.zeros(len(truth), np.int64) if truth.class_ids is None else np.asarray(truth.class_ids)
    masks, classes, kinds = [], [], []
    for mask, class_id in zip(gt_masks, gt_classes):
        drop, poor, relabel = rng.random(3)
        if drop < config.drop or not mask.any():
            continue
        kind = "kept"
        if poor < config.poor_mask:
            mask, kind = _poor_mask(mask, rng), "poor_mask"
        else:
            mask = _mild_perturbation(mask, rng)
        if relabel < config.relabel and num_classes > 1:
            class_id = (int(class_id) + int(rng.integers(1, num_classes))) % num_classes
            kind = "relabelled" if kind == "kept" else kind
        if mask.any():
            masks.append(mask)
            classes.append(int(class_id))
            kinds.append(kind)
    for _ in range(int(rng.poisson(config.false_positives))):
        mask = _ellipse(height, width, rng)
        if mask.any():
            masks.append(mask)
            classes.append(int(rng.integers(0, num_classes)))
            kinds.append("false_positive")
    class_prob = np.array([_score(rng, k not in ("relabelled", "false_positive"), config.score_noise)
                           for k in kinds], np.float32)
    predicted_iou = np.array([_score(rng, k not in ("poor_mask", "false_positive"), config.score_noise)
                              for k in kinds], np.float32)
    stacked = np.stack(masks) if masks else np.zeros((0, height, width), bool)
    return Instances.from_masks(
        stacked, class_ids=np.asarray(classes, np.int32),
        scores={"class_prob": class_prob, "predicted_iou": predicted_iou,
                "confidence": np.sqrt(class_prob * predicted_iou).astype(np.float32)},
        attributes={"noise": kinds}, provenance={"generator": "noisy-oracle"})


def _score(rng: np.random.Generator, right: bool, noise: float) -> float:
    draw = rng.beta(6.0, 2.0) if right else rng.beta(2.0, 3.5)
    return float(np.clip((1.0 - noise) * draw + noise * rng.random(), 1e-3, 1.0))


def _mild_perturbation(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small dilation, erosion or shift (a few percent of the object's size)."""
    size = _object_size(mask)
    step = max(1, int(round(size * rng.uniform(0.01, 0.05))))
    choice = rng.integers(0, 3)
    if choice == 0:
        return _morph(mask, step, dilate=True)
    if choice == 1 and size > 8 * step:
        return _morph(mask, step, dilate=False)
    return _shift(mask, *(rng.choice([-1, 1], 2) * step))


def _poor_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mask that overlaps the object badly: shifted by about half its size, or heavily dilated."""
    ys, xs = np.nonzero(mask)
    h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
    if rng.random() < 0.6:
        dy, dx = (rng.uniform(0.55, 0.9) * h * rng.choice([-1, 1]), rng.uniform(0.55, 0.9) * w * rng.choice([-1, 1]))
        shifted = _shift(mask, int(round(dy)), int(round(dx)))
        return shifted if shifted.any() else _morph(mask, max(2, _object_size(mask) // 2), dilate=True)
    return _morph(mask, max(2, int(round(_object_size(mask) * rng.uniform(0.4, 0.7)))), dilate=True)


def _object_size(mask: np.ndarray) -> int:
    ys, xs = np.nonzero(mask)
    return int(min(np.ptp(ys), np.ptp(xs))) + 1 if len(ys) else 1


def _morph(mask: np.ndarray, step: int, *, dilate: bool) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * step + 1, 2 * step + 1))
    op = cv2.dilate if dilate else cv2.erode
    return op(mask.astype(np.uint8), kernel).astype(bool)


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    height, width = mask.shape
    if abs(dy) >= height or abs(dx) >= width:
        return out
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        mask[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return out


def _ellipse(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
    axes = (int(rng.integers(3, max(4, width // 6))), int(rng.integers(3, max(4, height // 6))))
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


def noisy_recipe_dict(labels_dir: str, **generator: Any) -> dict[str, Any]:
    """A minimal recipe mapping using the noisy-oracle generator (for tests)."""
    return {"generator": {"name": "noisy-oracle", "labels_dir": str(labels_dir), **generator},
            "store": {"shard_size": 32}}


__all__ = ["NoisyConfig", "NoisyOracleGenerator", "corrupt", "image_rng", "noisy_recipe_dict"]
