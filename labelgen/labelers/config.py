"""Naming instances with CLIP: the labeler's typed config and its pure helpers. No torch here.

A *labeler* runs after any generator and gives each instance a class from the recipe's
vocabulary: it crops every instance out of the image (its box with some context, or the
box with the pixels outside the mask filled), and CLIP picks the class whose text embedding
is closest. The model side is ``labelgen.labelers.clip.ClipLabeler``; this module holds the
config and everything that is plain numpy, so it can be tested and imported without torch.

Columns a labeler writes (see ``with_labels``):

* ``class_ids``: ``(N,)`` int32, the chosen class (index into ``class_names(config)``);
* score ``clip_label_prob``: ``(N,)`` float32, softmax probability of the chosen class;
* score ``clip_label_margin``: ``(N,)`` float32, top-1 minus top-2 probability (0 with one class);
* attribute ``clip_label_name``: the chosen class name per instance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from ..checks import check_vocabulary
from ..errors import ConfigError, ValidationError
from ..structures.instances import Instances
from ..structures.masks import rles_to_masks
from ..generators.zip.config import PRECISION_CHOICES

LABEL_PROB = "clip_label_prob"
LABEL_MARGIN = "clip_label_margin"
LABEL_NAME = "clip_label_name"

_MAX_PADDING = 5.0


@dataclass(frozen=True)
class LabelerConfig:
    """How instances are named. Loaded strictly from the recipe's ``labeler`` section.

    ``classes`` maps each class name to the prompts (synonyms) that describe it, in class-id
    order: ``{person: [person, pedestrian], dog: []}``. An empty list (or no value in YAML,
    ``dog:``) means "the class name itself is the prompt". A class's text embedding is the
    re-normalised mean of its prompts' embeddings; a prompt may appear under one class only.
    """

    classes: Mapping[str, tuple[str, ...] | None]  # class name -> prompts; [] or none = the name itself;
    # order = class ids. After validation every value is a tuple (None becomes ()).
    model: str = "ViT-B-16"  # open_clip architecture
    pretrained: str = "openai"  # open_clip pretrained tag, or a local weights file
    crop: Literal["box", "masked"] = "box"  # box: the padded box as is; masked: pixels outside the
    # instance's mask (padding included) replaced by the crop's mean colour
    padding: float = 0.1  # context added on each side, as a fraction of the box's width / height (0..5)
    input_size: int = 224  # each crop is squashed to input_size^2 (bicubic) before CLIP
    batch_size: int = 32  # crops per image-encoder call (1..4096); does not change the result
    use_templates: bool = True  # True: 85-template prompt ensemble per prompt; False: the raw prompt
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"  # bf16/fp16 = torch.autocast on the image
    # encoder; auto = bf16 where the device runs it natively, else fp32
    random_weights: bool = False  # real architecture, random weights: smoke tests only, said loudly
    allow_download: bool = True  # fetch missing official weights when the network allows

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", _check_classes(self.classes))
        for name in ("model", "pretrained"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"labeler.{name}: expected a non-empty string; got {value!r}")
        _check_choice("crop", self.crop, ("box", "masked"))
        _check_choice("precision", self.precision, PRECISION_CHOICES)
        if isinstance(self.padding, bool) or not isinstance(self.padding, (int, float)) \
                or not math.isfinite(self.padding) or not 0.0 <= self.padding <= _MAX_PADDING:
            raise ConfigError(f"labeler.padding: expected a number in [0, {_MAX_PADDING}]; got {self.padding!r}")
        _check_int("input_size", self.input_size, 16, 4096)
        _check_int("batch_size", self.batch_size, 1, 4096)
        for name in ("use_templates", "random_weights", "allow_download"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"labeler.{name}: expected true/false; got {getattr(self, name)!r}")

    # ``classes`` is a read-only mapping proxy, which neither pickles nor hashes: workers
    # receive the config pickled, so the state carries a plain dict and is frozen again.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["classes"] = dict(self.classes)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        object.__setattr__(self, "classes", MappingProxyType(dict(state["classes"])))

    def __hash__(self) -> int:
        fields = tuple((k, v) for k, v in self.__dict__.items() if k != "classes")
        return hash((tuple(self.classes.items()), fields))


def _check_classes(classes: Any) -> Mapping[str, tuple[str, ...]]:
    """A read-only ``{name: prompts}`` copy; ``None`` prompts become ``()`` (``checks.check_vocabulary``)."""
    return check_vocabulary(classes, "labeler.classes")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"labeler.{name}: expected one of {list(allowed)}; got {value!r}")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"labeler.{name}: expected an integer in [{low}, {high}]; got {value!r}")


# -------------------------------------------------------------------------- vocabulary
def class_names(config: LabelerConfig) -> tuple[str, ...]:
    """The names ``class_ids`` index into, in id order."""
    return tuple(config.classes)


def class_prompts(config: LabelerConfig) -> tuple[tuple[str, ...], ...]:
    """The prompts of every class in id order (the class name when its list is empty)."""
    return tuple(prompts or (name,) for name, prompts in config.classes.items())


def preflight(config: LabelerConfig) -> None:
    """Fail early, before models load, when the CLIP weights (or the `models` extra) cannot be found."""
    import open_clip  # noqa: F401  a core install stops here, before a run directory exists

    if config.random_weights:
        return
    from ..models.weights import resolve_clip_weights

    resolve_clip_weights(config.model, config.pretrained, allow_download=config.allow_download,
                         config_key="labeler.pretrained")


# ------------------------------------------------------------------------------- crops
def crop_boxes_xyxy(boxes_xyxy: np.ndarray, height: int, width: int, padding: float) -> np.ndarray:
    """Integer crop windows around boxes: ``(N, 4)`` int64 XYXY, ``x2``/``y2`` exclusive.

    Each box (``(N, 4)`` float XYXY, absolute pixels) grows by ``padding`` x its width on
    the left and on the right, and ``padding`` x its height on top and at the bottom; then
    it is rounded outwards (floor / ceil), clipped to the ``width`` x ``height`` image, and
    widened to at least one pixel (a degenerate or out-of-frame box gets the nearest pixel).
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    if height < 1 or width < 1:
        raise ValidationError(f"image frame must be at least 1x1; got height={height}, width={width}")
    if padding < 0:
        raise ValidationError(f"padding must be >= 0; got {padding}")
    pad_x = padding * (boxes[:, 2] - boxes[:, 0])
    pad_y = padding * (boxes[:, 3] - boxes[:, 1])
    grown = np.stack([boxes[:, 0] - pad_x, boxes[:, 1] - pad_y, boxes[:, 2] + pad_x, boxes[:, 3] + pad_y], axis=1)
    grown = np.round(grown, 6)  # 30.000000001 must not become 31
    out = np.concatenate([np.floor(grown[:, :2]), np.ceil(grown[:, 2:])], axis=1).astype(np.int64)
    for lo, hi, size in ((0, 2, width), (1, 3, height)):
        out[:, lo] = np.clip(out[:, lo], 0, size - 1)
        out[:, hi] = np.clip(out[:, hi], out[:, lo] + 1, size)
    return out


def fill_outside_mask(crop_rgb: np.ndarray, crop_mask: np.ndarray) -> np.ndarray:
    """A copy of ``crop_rgb`` ((h, w, 3) uint8) whose pixels outside ``crop_mask`` ((h, w) bool)
    are the crop's mean colour (per channel, over every pixel of the crop, rounded)."""
    crop_rgb = np.asarray(crop_rgb)
    crop_mask = np.asarray(crop_mask, dtype=bool)
    if crop_rgb.ndim != 3 or crop_rgb.shape[2] != 3 or crop_mask.shape != crop_rgb.shape[:2]:
        raise ValidationError(f"expected an (h, w, 3) crop and an (h, w) mask; got {crop_rgb.shape} and {crop_mask.shape}")
    mean = np.rint(crop_rgb.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    filled = crop_rgb.copy()
    filled[~crop_mask] = mean
    return filled


def instance_crops(image_rgb: np.ndarray, instances: Instances, crop: str, padding: float) -> list[np.ndarray]:
    """One ``(h, w, 3)`` uint8 crop per instance, in instance order.

    ``crop="box"``: the padded box window (``crop_boxes_xyxy``) of the image.
    ``crop="masked"``: the same window with ``fill_outside_mask`` applied (masks are
    decoded one at a time, never all at once).
    """
    check_image_for(image_rgb, instances)
    if crop not in ("box", "masked"):
        raise ValidationError(f"crop must be 'box' or 'masked'; got {crop!r}")
    windows = crop_boxes_xyxy(instances.boxes_xyxy, instances.height, instances.width, padding)
    crops = []
    for i, (x1, y1, x2, y2) in enumerate(windows):
        window = image_rgb[y1:y2, x1:x2]
        if crop == "masked":
            mask = rles_to_masks([instances.masks_rle[i]], instances.height, instances.width)[0]
            window = fill_outside_mask(window, mask[y1:y2, x1:x2])
        crops.append(np.ascontiguousarray(window))
    return crops


def check_image_for(image_rgb: Any, instances: Instances) -> None:
    """Raise unless ``image_rgb`` is (H, W, 3) uint8 in the instances' frame."""
    expected = (instances.height, instances.width, 3)
    if not isinstance(image_rgb, np.ndarray) or image_rgb.dtype != np.uint8 or image_rgb.shape != expected:
        got = f"{image_rgb.dtype} {image_rgb.shape}" if isinstance(image_rgb, np.ndarray) else type(image_rgb).__name__
        raise ValidationError(f"expected a uint8 RGB image of shape {expected} (the instances' frame); got {got}")


# ------------------------------------------------------------------------------ labels
def top_two(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From ``(N, C)`` class probabilities: (class ids ``(N,)`` int32 argmax, lowest id on
    ties; their probabilities ``(N,)`` float32; margins top-1 minus top-2 ``(N,)`` float32,
    0 when ``C == 1``)."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ValidationError(f"expected class probabilities of shape (N, C) with C >= 1; got {probs.shape}")
    ids = np.argmax(probs, axis=1).astype(np.int32)
    best = probs[np.arange(len(probs)), ids] if len(probs) else np.zeros((0,), np.float32)
    if probs.shape[1] == 1:
        return ids, best, np.zeros_like(best)
    second = np.sort(probs, axis=1)[:, -2] if len(probs) else np.zeros((0,), np.float32)
    return ids, best, np.maximum(best - second, 0.0).astype(np.float32)


def with_labels(instances: Instances, probs: np.ndarray, names: Sequence[str]) -> Instances:
    """``instances`` with class ids, ``clip_label_prob`` / ``clip_label_margin`` scores and the
    ``clip_label_name`` attribute from ``probs`` ((N, C), C = ``len(names)``). Every other
    column is kept; an existing ``class_ids`` column is replaced."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape != (len(instances), len(names)):
        raise ValidationError(
            f"expected probabilities of shape ({len(instances)}, {len(names)}) (instances, classes); got {probs.shape}"
        )
    ids, best, margin = top_two(probs)
    return Instances(
        height=instances.height,
        width=instances.width,
        masks_rle=instances.masks_rle,
        boxes_xyxy=instances.boxes_xyxy,
        scores={**instances.scores, LABEL_PROB: best, LABEL_MARGIN: margin},
        class_ids=ids,
        attributes={**instances.attributes, LABEL_NAME: tuple(names[i] for i in ids)},
        provenance={**instances.provenance, "labeler": "clip"},
    )
