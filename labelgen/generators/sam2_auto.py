"""The ``sam2-auto`` generator: SAM 2.1's automatic mask generator (``sam2.SAM2AutomaticMaskGenerator``),
the class-agnostic baseline of ``sam-auto`` on SAM 2.1.

Per image: a regular grid of point prompts (also on overlapping crops when ``crop_n_layers > 0``),
three masks per point (``multimask_output``), optionally one mask-to-mask refinement step
(``use_m2m``), filtered by SAM 2.1's predicted IoU and stability score, de-duplicated by box NMS
(and across crops). Every knob of SAM 2's generator is a field of ``Sam2AutoConfig`` with SAM 2's
own default (tuned for Hiera-L: note ``pred_iou_thresh`` 0.8, not SAM 1's 0.88).

What one instance keeps is what ``sam-auto`` keeps (the conversion is ``SamAutoGenerator``'s):
the COCO RLE mask and its tight box; scores ``sam_predicted_iou`` (SAM 2.1's IoU head ends in a
sigmoid, so it lies in [0, 1]), ``sam_stability_score`` and ``confidence`` (the predicted IoU
clipped to [0, 1]); attributes ``point_xy`` and ``crop_box_xyxy``. Class-agnostic, sorted by predicted
IoU (descending) then by box; empty masks dropped.

Imports no torch at import time: model code loads in ``from_config``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Literal

from ..checks import bounded, check_fields, one_of
from ..models.sam2 import SAM2_MODEL_TYPES
from ..models.weights import resolve_sam2_checkpoint
from ..errors import GeneratorError
from .sam_auto import CHECKPOINT_KEY, SamAutoGenerator
from .zip.config import PRECISION_CHOICES
from .registry import GENERATORS

log = logging.getLogger(__name__)

# Sam2AutoConfig fields that are SAM2AutomaticMaskGenerator keyword arguments (the rest build the model)
AMG_KNOBS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
             "stability_score_offset", "mask_threshold", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh",
             "crop_overlap_ratio", "crop_n_points_downscale_factor", "min_mask_region_area", "use_m2m",
             "multimask_output")


@dataclass(frozen=True)
class Sam2AutoConfig:
    """The ``generator`` section of a ``sam2-auto`` recipe. Defaults are SAM 2's (tuned for Hiera-L)."""

    model_type: str = one_of("sam2.1_hiera_large", SAM2_MODEL_TYPES)  # sam2.1_hiera_tiny | _small | _base_plus
    # | _large (tiny: a test model, random weights only)
    checkpoint: str = ""  # local file; empty = the official checkpoint in $LABELGEN_CACHE/sam2
    points_per_side: int = bounded(32, 1, 1024)  # the prompt grid is points_per_side^2 points (crop layer 0)
    points_per_batch: int = bounded(64, 1, 65536)  # points decoded at once: speed vs. memory, same masks
    pred_iou_thresh: float = bounded(0.8, None, 1.0)  # keep masks with predicted IoU > this; <= 0 turns it off
    stability_score_thresh: float = bounded(0.95, None, 1.0)  # keep masks with stability >= this; <= 0: off
    stability_score_offset: float = bounded(1.0, 0.0, 1000.0, low_open=True)  # logit shift of the stability
    # score's two thresholds
    mask_threshold: float = bounded(0.0, -100.0, 100.0)  # logit above which a pixel is in the mask
    box_nms_thresh: float = bounded(0.7, 0.0, 1.0, low_open=True)  # box IoU NMS within a crop, by predicted IoU
    crop_n_layers: int = bounded(0, 0, 8)  # extra crop layers, layer i has (2^i)^2 crops; 0 = whole image only
    crop_nms_thresh: float = bounded(0.7, 0.0, 1.0, low_open=True)  # box IoU NMS across crops (smaller crops win)
    crop_overlap_ratio: float = bounded(512 / 1500, 0.0, 1.0, high_open=True)  # crop overlap, fraction of the side
    crop_n_points_downscale_factor: int = bounded(1, 1, 64)  # layer i uses points_per_side / factor^i per side
    min_mask_region_area: int = bounded(0, 0, None)  # > 0: remove holes and islands smaller than this (pixels,
    # opencv, after generation; SAM 2's low-resolution hole filling needs its CUDA extension and is skipped without)
    use_m2m: bool = False  # one mask-to-mask refinement step: each kept mask's logits prompt the decoder again
    multimask_output: bool = True  # three masks per point (False: one)
    precision: Literal["fp32", "bf16", "fp16", "auto"] = one_of("fp32", PRECISION_CHOICES)  # bf16/fp16 =
    # torch.autocast, outputs cast back to fp32; auto = bf16 where the device runs it natively, else fp32
    random_weights: bool = False  # real architecture, random weights: smoke tests only, said loudly
    allow_download: bool = True  # fetch the missing official checkpoint when the network allows

    def __post_init__(self) -> None:
        check_fields(self)

    def amg_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``SAM2AutomaticMaskGenerator`` (all but ``model`` and ``output_mode``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in AMG_KNOBS}


@GENERATORS.register("sam2-auto")
class Sam2AutoGenerator(SamAutoGenerator):
    """``sam-auto`` on SAM 2.1: the same instances, scores and order; another model and mask generator."""

    Config = Sam2AutoConfig

    @classmethod
    def preflight(cls, config: Sam2AutoConfig) -> None:
        """Fail at once, before any worker starts, when the sam2 package or the checkpoint is missing."""
        try:
            import sam2  # noqa: F401  a core install stops here, before a run directory exists
        except ImportError as exc:
            raise GeneratorError(f"sam2-auto needs the sam2 package ({exc}); pip install 'labelgen[sam2]'") from None
        if config.random_weights:
            log.warning("sam2-auto: RANDOM WEIGHTS requested: the real SAM 2.1 architecture with random weights."
                        " The labels will be MEANINGLESS (smoke test only).")
            return
        if config.model_type == "tiny":
            raise GeneratorError("generator.model_type: 'tiny' is a test model with random weights only; set"
                                 " generator.random_weights: true or pick a sam2.1_hiera_* model")
        resolve_sam2_checkpoint(config.model_type, config.checkpoint, allow_download=config.allow_download,
                                config_key=CHECKPOINT_KEY)

    @classmethod
    def from_config(cls, config: Sam2AutoConfig, *, device: str = "cpu") -> "Sam2AutoGenerator":
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        from ..models.loading import check_device, resolve_precision
        from ..models.sam2 import feature_sizes, load_sam2

        dev = check_device(device)
        precision = resolve_precision(config.precision, dev)  # "auto" -> what this device runs natively
        if config.random_weights:
            log.warning("sam2-auto: building SAM 2.1 with RANDOM WEIGHTS; labels are meaningless")
        model, sam_facts = load_sam2(config.model_type, config.checkpoint, random_weights=config.random_weights,
                                     allow_download=config.allow_download, device=dev, config_key=CHECKPOINT_KEY)
        mask_generator = SAM2AutomaticMaskGenerator(model, output_mode="coco_rle", **config.amg_kwargs())
        mask_generator.predictor._bb_feat_sizes = feature_sizes(model)  # the predictor assumes 1024 px inputs
        _predict_in_float32(mask_generator.predictor)
        facts = {"generator": cls.name, "random_weights": config.random_weights, "device": str(dev),
                 "precision": precision, "precision_requested": config.precision, "sam2": sam_facts}
        return cls(config, mask_generator, facts)


def _predict_in_float32(predictor: Any) -> None:
    """Make ``predictor._predict`` (what SAM 2's generator calls per point batch) answer float32 tensors:
    under bf16 autocast its IoUs and low-resolution logits come in bf16, which ``MaskData.to_numpy``
    cannot hold. A no-op in fp32."""
    predict = predictor._predict

    def predict_float32(*args: Any, **kwargs: Any) -> tuple:
        return tuple(t.float() for t in predict(*args, **kwargs))

    predictor._predict = predict_float32
