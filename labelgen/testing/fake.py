"""Test helpers shipped with the package. Nothing user-facing imports this module.

``FakeGenerator`` ("fake") registers only when this module is imported, e.g. by the
tests or by ``labelgen run --plugin labelgen.testing``. It loads no model: it cuts the
image into vertical bands and returns the bright pixels of each band as an instance,
so results depend on image content and are fully deterministic.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checks import bounded, check_fields, check_strings
from ..generators import GENERATORS, Generator
from ..structures.instances import ImageRecord, Instances
from ..structures.rows import Row, summarize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FakeConfig:
    instances_per_image: int = bounded(3, 0, 64)  # vertical bands, one instance each
    seconds_per_image: float = bounded(0.0, 0, 3600)  # sleep per image, to make runs slow enough to interrupt
    fail_image_ids: tuple[str, ...] = ()  # raise on these images (a recorded generator_error)
    class_names: tuple[str, ...] = ()  # empty = class-agnostic

    def __post_init__(self) -> None:
        check_fields(self)
        check_strings("class_names", self.class_names)


@GENERATORS.register("fake")
class FakeGenerator(Generator):
    """Deterministic, model-free generator for tests and store benchmarks."""

    Config = FakeConfig

    def __init__(self, config: FakeConfig):
        self.config = config

    @classmethod
    def from_config(cls, config: FakeConfig, *, device: str = "cpu") -> "FakeGenerator":
        log.warning("using the FAKE generator (labelgen.testing): labels are meaningless, for tests only")
        return cls(config)

    def generate(self, image_rgb: np.ndarray, record: ImageRecord) -> Instances:
        if record.image_id in self.config.fail_image_ids:
            raise RuntimeError(f"fake failure requested for {record.image_id}")
        if self.config.seconds_per_image:
            time.sleep(self.config.seconds_per_image)
        height, width = image_rgb.shape[:2]
        masks = band_masks(image_rgb, self.config.instances_per_image)
        keep = masks.reshape(len(masks), -1).any(axis=1)
        masks = masks[keep]
        gray = image_rgb.mean(axis=2)
        confidence = np.array([gray[m].mean() / 255.0 for m in masks], dtype=np.float32)
        class_ids = None
        if self.config.class_names:
            class_ids = np.nonzero(keep)[0].astype(np.int32) % len(self.config.class_names)
        return Instances.from_masks(
            masks if len(masks) else np.zeros((0, height, width), bool),
            scores={"confidence": confidence},
            class_ids=class_ids,
            attributes={"band": [int(b) for b in np.nonzero(keep)[0]]},
            provenance={"generator": self.name},
        )

    def provenance(self) -> dict[str, Any]:
        return {"generator": self.name, "test_only": True}

    @classmethod
    def vocabulary(cls, config: FakeConfig) -> tuple[str, ...] | None:
        return tuple(config.class_names) or None


def band_masks(image_rgb: np.ndarray, bands: int) -> np.ndarray:
    """``(bands, H, W)`` bool: pixels brighter than their band's mean, one band per mask."""
    height, width = image_rgb.shape[:2]
    gray = image_rgb.mean(axis=2)
    masks = np.zeros((bands, height, width), dtype=bool)
    edges = np.linspace(0, width, bands + 1).round().astype(int)
    for i in range(bands):
        x1, x2 = edges[i], edges[i + 1]
        if x2 > x1:
            band = gray[:, x1:x2]
            masks[i, :, x1:x2] = band > band.mean()
    return masks


def fake_recipe_dict(**generator: Any) -> dict[str, Any]:
    """A minimal recipe mapping using the fake generator (for tests)."""
    return {"generator": {"name": "fake", **generator}, "store": {"shard_size": 4}}


def synthetic_instances(rng: np.random.Generator, count: int, width: int, height: int, num_classes: int) -> Instances:
    """``count`` ellipse instances in a ``height`` x ``width`` frame, with two score components,
    their geometric mean as ``confidence``, and class ids. Every third ellipse is nested in the
    previous one (IoS high, IoU low), so NMS has work."""
    yy, xx = np.mgrid[:height, :width]
    masks = np.zeros((count, height, width), dtype=bool)
    cx = cy = rx = ry = 0.0
    for i in range(count):
        if i % 3 == 2:
            rx, ry = rx * 0.5, ry * 0.5
        else:
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            rx, ry = rng.uniform(2, width / 4), rng.uniform(2, height / 4)
        masks[i] = ((xx - cx) / max(rx, 1)) ** 2 + ((yy - cy) / max(ry, 1)) ** 2 <= 1
    components = rng.uniform(0.05, 1.0, size=(2, count)).astype(np.float32)
    scores = {"clip_class_prob": components[0], "sam_predicted_iou": components[1],
              "confidence": np.sqrt(components[0] * components[1])}
    return Instances.from_masks(masks, scores=scores, class_ids=rng.integers(0, num_classes, count))


def write_synthetic_run(root: Any, images: int, per_image: int, width: int, height: int, shard_size: int,
                        class_names: tuple[str, ...], seed: int = 0) -> None:
    """A complete run directory of synthetic instances, written shard by shard (memory stays flat).
    Image uris point to ``/synthetic/imgNNNNNNN.png``, which need not exist (benchmarks of exports)."""
    from ..config import recipe_from_dict
    from ..store.run_store import RunStore, utc_now

    recipe = recipe_from_dict({"generator": {"name": "fake", "class_names": list(class_names)},
                               "store": {"shard_size": shard_size}})
    store = RunStore(root)
    records = [ImageRecord(f"img{i:07d}.png", f"/synthetic/img{i:07d}.png", width, height) for i in range(images)]
    store.initialize(recipe, {"kind": "synthetic", "images": images}, records)
    rng = np.random.default_rng(seed)
    for shard in store.iter_plan():
        rows = [Row(r, synthetic_instances(rng, per_image, width, height, len(class_names))) for r in shard.images]
        now = utc_now()
        summary = {**summarize(rows), "fingerprint": recipe.fingerprint(), "started": now, "finished": now,
                   "seconds": 0.0, "provenance": {"generator": "synthetic"}}
        store.commit_shard(shard, rows, summary, level=recipe.store.compress_level)


__all__ = ["FakeConfig", "FakeGenerator", "band_masks", "fake_recipe_dict", "synthetic_instances",
           "write_synthetic_run"]
