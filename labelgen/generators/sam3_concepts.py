"""The ``sam3`` generator: SAM 3 ("Segment Anything with Concepts") prompted with the recipe's
vocabulary. Each prompt is one SAM 3 *concept prompt*; SAM 3 returns every instance of it.

Per worker: the model is built once (``labelgen.models.sam3``) and every prompt of the vocabulary
is run through the text encoder once; its features are reused for every image.

Per batch of images (the model thread):

1. encode the images (resized to the model's square input) in one backbone call (halved for
   good on out-of-memory); an image's features, hence its instances, are bit-identical whatever
   the batch size (``models.sam3.encode_images``);
2. per image, the prompts in chunks of ``prompts_per_batch`` (one detector call each, the image
   features reused; halved on out-of-memory), in vocabulary order. Another chunk size changes
   the scores by float rounding only (~1e-7: small matrix products round differently); it is
   part of the recipe, so a run never mixes two;
3. per prompt, keep the object queries whose ``confidence`` (below) is at least ``min_confidence``:
   their scores, predicted box and low-resolution mask logits go to the CPU, so an
   image holds only what it keeps, never the dense masks of every query.

``finish()`` (CPU only, another thread): upsample each kept mask's logits bilinearly to the
image (as sam3's ``Sam3Processor``), threshold them at ``mask_threshold``, COCO RLE; drop empty
masks; tight boxes from the masks (``rles_to_boxes_xyxy``); mask NMS by IoU and intersection over
the smaller mask (``structures.nms``, within a class unless ``nms_across_classes``), which removes
the same object found by two prompts of a class and a part found nested inside its whole.

What one instance keeps:

* ``class_ids``: the class whose prompt found it (several prompts may map to one class);
* scores: ``sam3_object_score`` (sigmoid of the query's logit), ``sam3_presence_score`` (sigmoid
  of the image-level presence logit of its prompt: is the concept in the image at all) and
  ``confidence = sam3_object_score * sam3_presence_score``, SAM 3's own final score (what
  ``Sam3Processor`` thresholds at 0.5); ``scoring: {formula: product, components:
  [sam3_object_score, sam3_presence_score]}`` recomputes it;
* attributes: ``sam3_prompt`` (the prompt text) and ``sam3_box_xyxy`` (SAM 3's own box, image
  pixels, ``[x1, y1, x2, y2]`` floats).

Order: confidence descending, then class id, then box ``x1, y1, x2, y2`` (stable).
Imports no torch at import time.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np

from ..atomic import sha256_file
from ..checks import bounded, check_fields, check_vocabulary, one_of
from ..errors import ConfigError, ValidationError
from ..models.weights import resolve_sam3_checkpoint
from ..structures.instances import ImageRecord, Instances
from ..structures.masks import masks_to_rles, rle_areas, rles_to_boxes_xyxy
from ..structures.nms import mask_nms
from .base import Generator, failed
from .registry import GENERATORS
from .zip.config import PRECISION_CHOICES

log = logging.getLogger(__name__)

OBJECT_SCORE = "sam3_object_score"
PRESENCE_SCORE = "sam3_presence_score"
SCORE_COLUMNS = ("confidence", OBJECT_SCORE, PRESENCE_SCORE)
PROMPT = "sam3_prompt"
MODEL_BOX = "sam3_box_xyxy"
ATTRIBUTE_COLUMNS = (PROMPT, MODEL_BOX)
CHECKPOINT_KEY = "generator.checkpoint"
MASKS_PER_UPSAMPLE = 16  # masks upsampled to the image at once in finish() (bounds its memory)


@dataclass(frozen=True)
class Sam3Config:
    """The ``generator`` section of a ``sam3`` recipe."""

    classes: Mapping[str, tuple[str, ...] | None]  # class name -> its concept prompts, in class-id order;
    # [] or none = the class name itself. A prompt may belong to one class only.
    model: str = one_of("sam3", ("sam3", "tiny"))  # sam3: the official image model; tiny: tests (random
    # weights or a test checkpoint)
    checkpoint: str = ""  # local sam3.pt; empty = $LABELGEN_CACHE/sam3/sam3.pt (gated: never downloaded)
    prompts_per_batch: int = bounded(8, 1, 4096)  # prompts per detector call; image features are reused
    min_confidence: float = bounded(0.1, 0.0, 1.0)  # keep queries with confidence >= this (filter later)
    mask_threshold: float = bounded(0.5, 0.0, 1.0, low_open=True, high_open=True)  # mask pixel probability
    nms_iou: float = bounded(0.7, 0.0, 1.0)  # drop a mask whose IoU with a better one is > this; 1 = off
    nms_ios: float = bounded(0.9, 0.0, 1.0)  # ... or whose intersection over the smaller mask is > this; 1 = off
    nms_across_classes: bool = False  # False: only masks of one class suppress each other
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"  # bf16/fp16 = torch.autocast; auto = bf16
    # where the device runs it natively, else fp32
    random_weights: bool = False  # real architecture, random weights: smoke tests only, said loudly

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", _check_classes(self.classes))
        try:
            check_fields(self)
        except ConfigError as exc:
            raise ConfigError(f"generator.{exc}") from None
        if self.precision not in PRECISION_CHOICES:
            raise ConfigError(f"generator.precision: expected one of {list(PRECISION_CHOICES)}; got {self.precision!r}")
        if self.model == "tiny" and not (self.random_weights or self.checkpoint):
            raise ConfigError("generator.model: 'tiny' is a test model with no official checkpoint; set"
                              " generator.random_weights=true, a test generator.checkpoint, or use model: sam3")

    # ``classes`` is a read-only mapping proxy, which does not pickle: workers get the config
    # pickled, so the state carries a plain dict and is frozen again.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "classes": dict(self.classes)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        object.__setattr__(self, "classes", MappingProxyType(dict(state["classes"])))

    def __hash__(self) -> int:
        return hash((tuple(self.classes.items()), tuple((k, v) for k, v in self.__dict__.items() if k != "classes")))

    def prompts(self) -> tuple[tuple[str, int], ...]:
        """Every concept prompt with its class id, in class order then prompt order."""
        return tuple((prompt, class_id) for class_id, (name, prompts) in enumerate(self.classes.items())
                     for prompt in (prompts or (name,)))


def _check_classes(classes: Any) -> Mapping[str, tuple[str, ...]]:
    """A read-only ``{name: prompts}`` copy (``None`` -> ``()``); names and prompts non-empty, no prompt twice."""
    return check_vocabulary(classes, "generator.classes")


@dataclass(frozen=True)
class KeptQueries:
    """What the model thread keeps of one image: ``N`` queries over all its prompts, on the CPU.

    ``prompt_indices`` ``(N,)`` int64 (into ``Sam3Config.prompts()``), ``object_scores`` and
    ``presence_scores`` ``(N,)`` float32, ``boxes_xyxy`` ``(N, 4)`` float32 image pixels,
    ``mask_logits`` ``(N, h, w)`` float32 over the whole (squashed) image.
    """

    prompt_indices: np.ndarray
    object_scores: np.ndarray
    presence_scores: np.ndarray
    boxes_xyxy: np.ndarray
    mask_logits: np.ndarray


@GENERATORS.register("sam3")
class Sam3Generator(Generator):
    Config = Sam3Config

    def __init__(self, config: Sam3Config, model: Any, text: dict[str, Any], facts: dict[str, Any]):
        from ..models.oom import AdaptiveBatcher

        self.config = config
        self.model = model
        self.text = text  # encode_prompts() of config.prompts(), on the model's device
        self.facts = facts
        self._image_batcher = AdaptiveBatcher(1 << 16)  # capped by generate_batch's batch; halves on OOM
        self._prompt_batcher = AdaptiveBatcher(config.prompts_per_batch)

    # -- building -------------------------------------------------------------------------
    @classmethod
    def vocabulary(cls, config: Sam3Config) -> tuple[str, ...]:
        return tuple(config.classes)

    @classmethod
    def preflight(cls, config: Sam3Config) -> None:
        """Fail at once, before any worker starts, when sam3 or the checkpoint is missing."""
        from ..models.sam3 import bpe_vocab_path, import_sam3

        import_sam3()  # a core install (or one without the sam3 extra) stops here
        bpe_vocab_path()
        if config.random_weights:
            log.warning("sam3: RANDOM WEIGHTS requested: the real SAM 3 classes with random weights."
                        " The labels will be MEANINGLESS (smoke test only).")
            return
        resolve_sam3_checkpoint(config.checkpoint, config_key=CHECKPOINT_KEY)

    @classmethod
    def from_config(cls, config: Sam3Config, *, device: str = "cpu") -> "Sam3Generator":
        import torch

        from ..models.loading import check_device, resolve_precision
        from ..models.sam3 import SPECS, encode_prompts, load_sam3

        dev = check_device(device)
        precision = resolve_precision(config.precision, dev)
        facts: dict[str, Any] = {"generator": cls.name, "model": config.model, "device": str(dev),
                                 "precision": precision, "precision_requested": config.precision,
                                 "random_weights": config.random_weights,
                                 "image_size": SPECS[config.model].image_size, "sam3_version": _sam3_version()}
        if config.random_weights:
            log.warning("sam3: building SAM 3 (%s) with RANDOM WEIGHTS; labels are meaningless", config.model)
            checkpoint = None
            facts["weights"] = "RANDOM"
        else:
            checkpoint = resolve_sam3_checkpoint(config.checkpoint, config_key=CHECKPOINT_KEY)
            facts.update(weights=str(checkpoint), sha256=sha256_file(checkpoint))
        model = load_sam3(config.model, checkpoint, device=dev)
        with torch.inference_mode(), _autocast(dev, precision):
            text = encode_prompts(model, [p for p, _ in config.prompts()], dev)
        return cls(config, model, text, facts)

    def provenance(self) -> dict[str, Any]:
        return dict(self.facts)

    # -- images ---------------------------------------------------------------------------
    def generate(self, image_rgb: np.ndarray, record: ImageRecord) -> Instances:
        (finish,) = self.generate_batch([image_rgb], [record])
        return finish()

    def generate_batch(self, images_rgb: Sequence[np.ndarray],
                       records: Sequence[ImageRecord]) -> list[Callable[[], Instances]]:
        """Model work for the batch (one backbone call, halved on OOM); per image a CPU ``finish()``."""
        finishers: list[Callable[[], Instances] | None] = [None] * len(images_rgb)
        valid: list[int] = []
        for i, image_rgb in enumerate(images_rgb):
            try:
                _check_image(image_rgb)
                valid.append(i)
            except ValidationError as exc:
                finishers[i] = failed(exc)
        try:
            kept = self._image_batcher.run(lambda ids: self._keep_batch([images_rgb[j] for j in ids]), valid)
            outcomes: dict[int, Any] = dict(zip(valid, kept))
        except Exception:  # one bad image must not fail the others: retry them one by one
            outcomes = {j: self._keep_one(images_rgb[j]) for j in valid}
        for j, outcome in outcomes.items():
            height, width = np.asarray(images_rgb[j]).shape[:2]
            finishers[j] = failed(outcome) if isinstance(outcome, BaseException) else \
                functools.partial(self._finish, outcome, int(height), int(width))
        return finishers  # type: ignore[return-value]

    def _keep_one(self, image_rgb: np.ndarray) -> "KeptQueries | BaseException":
        try:
            return self._keep_batch([image_rgb])[0]
        except Exception as exc:  # this image's error, raised by its finisher
            return exc

    def _keep_batch(self, images_rgb: Sequence[np.ndarray]) -> list[KeptQueries]:
        """Backbone on the whole batch, then every prompt chunk per image (see the module doc)."""
        import torch

        from ..models.sam3 import encode_images, preprocess_image

        device = self.facts["device"]
        size = self.facts["image_size"]
        with self._inference():
            pixels = torch.stack([preprocess_image(np.ascontiguousarray(im), size, device) for im in images_rgb])
            features = encode_images(self.model, pixels)
            del pixels
            return [self._keep_image(features, i, *np.asarray(im).shape[:2]) for i, im in enumerate(images_rgb)]

    def _keep_image(self, features: dict[str, Any], index: int, height: int, width: int) -> KeptQueries:
        prompt_ids = list(range(len(self.config.prompts())))
        parts = self._prompt_batcher.run(lambda ids: self._keep_prompts(features, index, list(ids), height, width),
                                         prompt_ids)
        return KeptQueries(*(np.concatenate([part[f] for part in parts]) for f in range(5)))

    def _keep_prompts(self, features: dict[str, Any], index: int, prompt_ids: list[int], height: int,
                      width: int) -> list[tuple[np.ndarray, ...]]:
        """One detector call for ``prompt_ids``; per prompt the queries it keeps, as CPU arrays."""
        import torch

        from ..models.sam3 import ground_prompts

        out = ground_prompts(self.model, features, index, self.text, prompt_ids)
        object_scores = out["object_logits"].sigmoid()  # (K, Q)
        presence = out["presence_logits"].sigmoid()[:, None].expand_as(object_scores)  # (K, Q)
        keep = (object_scores * presence) >= self.config.min_confidence
        cx, cy, w, h = out["boxes_cxcywh"].unbind(-1)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=cx.device)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1) * scale
        ids = torch.as_tensor(prompt_ids, device=cx.device)[:, None].expand_as(object_scores)
        columns = (ids[keep], object_scores[keep], presence[keep], boxes[keep], out["mask_logits"][keep])
        arrays = tuple(c.cpu().numpy() for c in columns)
        return [tuple(a[arrays[0] == p] for a in arrays) for p in prompt_ids]

    # -- finishing (CPU only) -------------------------------------------------------------
    def _finish(self, kept: KeptQueries, height: int, width: int) -> Instances:
        rles = _upsampled_rles(kept.mask_logits, height, width, self.config.mask_threshold)
        index = np.flatnonzero(rle_areas(rles) > 0) if rles else np.zeros((0,), np.int64)  # empty masks dropped
        rles = [rles[i] for i in index]
        prompts = self.config.prompts()
        class_ids = np.array([prompts[p][1] for p in kept.prompt_indices[index]], dtype=np.int32)
        object_scores = kept.object_scores[index].astype(np.float32)
        presence = kept.presence_scores[index].astype(np.float32)
        confidence = (object_scores * presence).astype(np.float32)
        instances = Instances(
            height=height, width=width, masks_rle=tuple(rles),
            boxes_xyxy=rles_to_boxes_xyxy(rles) if rles else np.zeros((0, 4), np.float32),
            scores={"confidence": confidence, OBJECT_SCORE: object_scores, PRESENCE_SCORE: presence},
            class_ids=class_ids,
            attributes={PROMPT: tuple(prompts[p][0] for p in kept.prompt_indices[index]),
                        MODEL_BOX: tuple([float(v) for v in box] for box in kept.boxes_xyxy[index])},
            provenance={"generator": self.name},
        )
        keep, _ = mask_nms(instances.masks_rle, confidence, self.config.nms_iou, self.config.nms_ios,
                           class_ids=class_ids, across_classes=self.config.nms_across_classes)
        instances = instances[np.sort(keep)]
        return instances[_output_order(instances.scores["confidence"], instances.class_ids, instances.boxes_xyxy)]

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        import torch

        with torch.inference_mode(), _autocast(self.facts["device"], self.facts["precision"]):
            yield


def _sam3_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("sam3")
    except metadata.PackageNotFoundError:
        return None


def _autocast(device: Any, precision: str) -> Any:
    from ..models.loading import autocast

    return autocast(device, precision)


def _upsampled_rles(mask_logits: np.ndarray, height: int, width: int, threshold: float) -> list[dict]:
    """``(N, h, w)`` mask logits over the whole image -> ``N`` COCO RLEs of ``height x width``:
    bilinear upsampling of the logits (``align_corners=False``, as sam3), pixel on where
    ``sigmoid(logit) > threshold``. ``MASKS_PER_UPSAMPLE`` masks at a time."""
    import torch
    import torch.nn.functional as F

    logit_threshold = float(np.log(threshold / (1.0 - threshold)))
    rles: list[dict] = []
    for start in range(0, len(mask_logits), MASKS_PER_UPSAMPLE):
        chunk = torch.from_numpy(mask_logits[start:start + MASKS_PER_UPSAMPLE].astype(np.float32))
        dense = F.interpolate(chunk[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        rles.extend(masks_to_rles((dense > logit_threshold).numpy()))
    return rles


def _output_order(confidence: np.ndarray, class_ids: np.ndarray, boxes_xyxy: np.ndarray) -> np.ndarray:
    """Indices by confidence descending, then class id, then box x1, y1, x2, y2 ascending (stable)."""
    return np.lexsort((boxes_xyxy[:, 3], boxes_xyxy[:, 2], boxes_xyxy[:, 1], boxes_xyxy[:, 0], class_ids,
                       -confidence))


def _check_image(image_rgb: np.ndarray) -> tuple[int, int]:
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise ValidationError(f"image_rgb must be (H, W, 3) uint8; got shape {image.shape}, dtype {image.dtype}")
    return int(image.shape[0]), int(image.shape[1])
