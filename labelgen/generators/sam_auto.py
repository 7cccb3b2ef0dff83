"""The ``sam-auto`` generator: Segment Anything's automatic mask generator (AMG), the
class-agnostic baseline Zip is measured against.

Per image (``segment_anything.SamAutomaticMaskGenerator``): a regular grid of point prompts
(also on overlapping crops when ``crop_n_layers > 0``), three masks per point, filtered by
SAM's predicted IoU and stability score, de-duplicated by box NMS (and across crops). Every
knob of the AMG is a field of ``SamAutoConfig`` with SAM's own default.

What one instance keeps:

* mask: the AMG's COCO RLE; box: its tight box (``rles_to_boxes_xyxy``, ``x2 = x + w``). The
  AMG's own ``bbox`` is not used: it is ``x_max - x_min`` wide, one pixel less than
  labelgen's exclusive-``x2`` convention;
* scores: ``sam_predicted_iou`` (raw IoU head, may leave [0, 1]), ``sam_stability_score``
  and ``confidence`` = the predicted IoU clipped to [0, 1], which is what
  ``ScoringConfig(components=("sam_predicted_iou",))`` recomputes;
* attributes: ``point_xy`` (the prompt point, ``[x, y]`` image pixels) and
  ``crop_box_xyxy`` (the crop it was found in, ``[x1, y1, x2, y2]`` int pixels, ``x2``
  exclusive; the whole image when ``crop_n_layers == 0``).

Instances are class-agnostic (``class_ids`` is ``None``), sorted by predicted IoU
(descending), then by box. Empty masks (possible only when both thresholds are off) are dropped.

Imports no torch at import time: model code loads in ``from_config``.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np

from ..checks import bounded, check_fields
from ..errors import ConfigError, ValidationError
from ..structures.instances import ImageRecord, Instances
from ..structures.masks import rles_to_boxes_xyxy
from ..models.weights import resolve_sam_checkpoint
from .zip.config import PRECISION_CHOICES, SAM_MODEL_TYPES
from .registry import GENERATORS
from .base import Generator

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("confidence", "sam_predicted_iou", "sam_stability_score")
ATTRIBUTE_COLUMNS = ("point_xy", "crop_box_xyxy")


@dataclass(frozen=True)
class SamAutoConfig:
    """The ``generator`` section of a ``sam-auto`` recipe. Defaults are SAM's (tuned for ViT-H)."""

    model_type: str = "vit_h"  # vit_h | vit_l | vit_b (tiny: test model, random weights only)
    checkpoint: str = ""  # local state-dict file; empty = the official checkpoint in the labelgen cache
    attention: Literal["reference", "sdpa", "fast"] = "reference"  # image encoder: segment_anything's attention;
    # sdpa = one fused attention call with the relative-position bias as a mask (models/sam_fast.py); fast = sdpa,
    # or blocked attention on CPU in bf16/fp16 (models/blocked_attention.py). Same within rounding
    points_per_side: int = 32  # >= 1; the prompt grid is points_per_side^2 points (per crop layer 0)
    points_per_batch: int = 64  # >= 1; points decoded at once: speed vs. memory, same masks
    pred_iou_thresh: float = bounded(0.88, None, 1.0)  # keep masks with predicted IoU > this; <= 0 turns the
    # filter off
    stability_score_thresh: float = bounded(0.95, None, 1.0)  # keep masks with stability >= this, in [0, 1];
    # <= 0 turns it off
    stability_score_offset: float = bounded(1.0, None, 1000.0)  # > 0; logit shift of the stability score's two
    # thresholds
    box_nms_thresh: float = 0.7  # (0, 1]; box IoU above which a lower predicted-IoU mask is dropped (per crop)
    crop_n_layers: int = 0  # >= 0; extra crop layers, layer i has (2^i)^2 crops; 0 = whole image only
    crop_nms_thresh: float = 0.7  # (0, 1]; box IoU NMS across crops (smaller crops win)
    crop_overlap_ratio: float = 512 / 1500  # [0, 1); crop overlap as a fraction of the image side (layer 1)
    crop_n_points_downscale_factor: int = 1  # >= 1; layer i uses points_per_side / factor^i points per side
    min_mask_region_area: int = 0  # >= 0; > 0 removes holes and islands smaller than this (pixels, opencv)
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"  # bf16/fp16 = torch.autocast; outputs cast
    # back to fp32; auto = bf16 where the device runs it natively, else fp32
    random_weights: bool = False  # real architecture, random weights: smoke tests only, said loudly
    allow_download: bool = True  # fetch the missing official checkpoint when the network allows

    def __post_init__(self) -> None:
        try:  # NaN / infinite floats, and the ranges declared on the fields
            check_fields(self)
        except ConfigError as exc:
            raise ConfigError(f"generator.{exc}") from None
        if self.model_type not in SAM_MODEL_TYPES:
            raise ConfigError(f"generator.model_type: expected one of {list(SAM_MODEL_TYPES)}; got {self.model_type!r}")
        if self.attention not in ("reference", "sdpa", "fast"):
            raise ConfigError(f"generator.attention: expected reference, sdpa or fast; got {self.attention!r}")
        if self.precision not in PRECISION_CHOICES:
            raise ConfigError(f"generator.precision: expected one of {list(PRECISION_CHOICES)}; got {self.precision!r}")
        for name, high in (("points_per_side", 1024), ("points_per_batch", 65536),
                           ("crop_n_points_downscale_factor", 64)):
            _check_between(name, getattr(self, name), 1, high)
        for name, high in (("crop_n_layers", 8), ("min_mask_region_area", None)):
            _check_between(name, getattr(self, name), 0, high)
        for name in ("box_nms_thresh", "crop_nms_thresh"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"generator.{name}: expected a box IoU in (0, 1]; got {getattr(self, name)}")
        if not 0.0 <= self.crop_overlap_ratio < 1.0:
            raise ConfigError(f"generator.crop_overlap_ratio: expected [0, 1); got {self.crop_overlap_ratio}")
        if self.stability_score_offset <= 0.0:
            raise ConfigError(f"generator.stability_score_offset: expected > 0; got {self.stability_score_offset}")

    def amg_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``SamAutomaticMaskGenerator`` (all but ``model``)."""
        names = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                 "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh",
                 "crop_overlap_ratio", "crop_n_points_downscale_factor", "min_mask_region_area")
        return {name: getattr(self, name) for name in names}


def _check_between(name: str, value: int, low: int, high: int | None) -> None:
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f">= {low} and <= {high}"
        raise ConfigError(f"generator.{name}: expected an integer {bound}; got {value}")


CHECKPOINT_KEY = "generator.checkpoint"  # the recipe key named in missing-checkpoint errors


@GENERATORS.register("sam-auto")
class SamAutoGenerator(Generator):
    Config = SamAutoConfig

    def __init__(self, config: SamAutoConfig, mask_generator: Any, facts: dict[str, Any]):
        self.config = config
        self.mask_generator = mask_generator  # a SamAutomaticMaskGenerator, output_mode "coco_rle"
        self.facts = facts

    # -- building -----------------------------------------------------------------------
    @classmethod
    def preflight(cls, config: SamAutoConfig) -> None:
        """Fail at once, before any worker starts, when the SAM checkpoint (or the `models` extra) is missing."""
        import segment_anything  # noqa: F401  a core install stops here, before a run directory exists

        if config.random_weights:
            log.warning("sam-auto: RANDOM WEIGHTS requested: the real SAM architecture with random weights."
                        " The labels will be MEANINGLESS (smoke test only).")
            return
        resolve_sam_checkpoint(config.model_type, config.checkpoint, allow_download=config.allow_download,
                               config_key=CHECKPOINT_KEY)

    @classmethod
    def from_config(cls, config: SamAutoConfig, *, device: str = "cpu") -> "SamAutoGenerator":
        from segment_anything import SamAutomaticMaskGenerator

        from ..models.loading import check_device, load_sam, resolve_precision

        dev = check_device(device)
        precision = resolve_precision(config.precision, dev)  # "auto" -> what this device runs natively
        if config.random_weights:
            log.warning("sam-auto: building SAM with RANDOM WEIGHTS; labels are meaningless")
        sam, sam_facts = load_sam(config.model_type, config.checkpoint, random_weights=config.random_weights,
                                  allow_download=config.allow_download, device=dev, config_key=CHECKPOINT_KEY)
        if config.attention != "reference":
            from ..models.sam_fast import use_fast_attention

            use_fast_attention(sam.image_encoder, kernel=config.attention)
        mask_generator = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **config.amg_kwargs())
        mask_generator.predictor = _float32_outputs(mask_generator.predictor)
        facts = {"generator": cls.name, "random_weights": config.random_weights, "device": str(dev),
                 "precision": precision, "precision_requested": config.precision, "attention": config.attention,
                 "sam": sam_facts}
        return cls(config, mask_generator, facts)

    def provenance(self) -> dict[str, Any]:
        return dict(self.facts)

    # -- one image ------------------------------------------------------------------------
    def generate(self, image_rgb: np.ndarray, record: ImageRecord) -> Instances:
        height, width = _check_image(image_rgb)
        with self._inference():
            records = self.mask_generator.generate(np.ascontiguousarray(image_rgb))
        return self._to_instances(records, height, width)

    def _to_instances(self, records: list[dict[str, Any]], height: int, width: int) -> Instances:
        """The AMG's mask records -> ``Instances``: empty masks dropped, deterministic order."""
        records = [r for r in records if r["area"] > 0]
        if not records:
            return self._empty(height, width)
        rles = [{"size": [int(s) for s in r["segmentation"]["size"]], "counts": r["segmentation"]["counts"]}
                for r in records]
        boxes_xyxy = rles_to_boxes_xyxy(rles)
        predicted_iou = np.array([r["predicted_iou"] for r in records], dtype=np.float32)
        stability = np.nan_to_num(np.array([r["stability_score"] for r in records], dtype=np.float32), nan=0.0)
        instances = Instances(
            height=height,
            width=width,
            masks_rle=tuple(rles),
            boxes_xyxy=boxes_xyxy,
            scores={
                "confidence": np.clip(predicted_iou, 0.0, 1.0),
                "sam_predicted_iou": predicted_iou,
                "sam_stability_score": stability,
            },
            attributes={
                "point_xy": [[float(v) for v in r["point_coords"][0]] for r in records],
                "crop_box_xyxy": [_crop_box_xywh_to_xyxy(r["crop_box"]) for r in records],
            },
            provenance={"generator": self.name},
        )
        return instances[_output_order(predicted_iou, instances.boxes_xyxy)]

    def _empty(self, height: int, width: int) -> Instances:
        return Instances(
            height=height, width=width,
            scores={name: np.zeros((0,), np.float32) for name in SCORE_COLUMNS},
            attributes={name: () for name in ATTRIBUTE_COLUMNS},
            provenance={"generator": self.name},
        )

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        import torch

        from ..models.loading import autocast

        precision = self.facts.get("precision", self.config.precision)  # resolved in from_config
        with torch.inference_mode(), autocast(self.mask_generator.predictor.device, precision):
            yield


def _float32_outputs(predictor: Any) -> Any:
    """Make ``predictor.predict_torch`` return float32 tensors.

    Under bf16 autocast SAM's mask decoder answers in bf16, and the AMG fails on it
    (``MaskData.to_numpy``: numpy has no bfloat16). The stability score and the filters then
    see float32 too, as in fp32. The cast is a no-op in fp32.
    """
    predict_torch = predictor.predict_torch

    def predict_torch_float32(*args: Any, **kwargs: Any) -> tuple:
        return tuple(t.float() for t in predict_torch(*args, **kwargs))

    predictor.predict_torch = predict_torch_float32
    return predictor


def _output_order(predicted_iou: np.ndarray, boxes_xyxy: np.ndarray) -> np.ndarray:
    """Indices by predicted IoU descending, then box x1, y1, x2, y2 ascending (stable)."""
    return np.lexsort((boxes_xyxy[:, 3], boxes_xyxy[:, 2], boxes_xyxy[:, 1], boxes_xyxy[:, 0], -predicted_iou))


def _crop_box_xywh_to_xyxy(crop_box_xywh: list[float]) -> list[int]:
    x, y, w, h = (int(round(v)) for v in crop_box_xywh)
    return [x, y, x + w, y + h]


def _check_image(image_rgb: np.ndarray) -> tuple[int, int]:
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise ValidationError(f"image_rgb must be (H, W, 3) uint8; got shape {image.shape}, dtype {image.dtype}")
    return int(image.shape[0]), int(image.shape[1])
