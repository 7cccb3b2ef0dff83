"""The ``zip`` generator (ICLR 2024 "Zip"): CLIP boundary clustering + SAM refinement.

Specification and every knob: ``docs/method.md``. Per image:

1. semantic: CLIP Surgery activation maps + CLS class probabilities; gate classes;
2. boundary: CLIP ResNet layer3 features, K-means into fragments;
3. discovery: per kept class, activated fragments -> instances -> prompt boxes;
4. refine: one SAM embedding, all boxes decoded in one call; confidence; mask NMS.

With a ``feature_cache`` set, the three image encoders' outputs (CLIP Surgery tokens, layer3
features, SAM's image embedding) are read from / written to it, keyed by the image's content and
the encoder settings only, so a re-run with another vocabulary or other thresholds skips the
encoders and gives the same output as without the cache.

Imports no torch at import time: model code loads in ``from_config``.
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ...models.feature_cache import FeatureCache
from ...errors import ConfigError, GeneratorError
from ...structures.instances import ImageRecord, Instances
from ...structures.masks import masks_to_rles, rles_to_boxes_xyxy
from ...structures.nms import mask_nms
from ...models.oom import AdaptiveBatcher, default_is_oom
from ...models.weights import check_all, resolve_clip_weights
from .config import ZipConfig
from .discovery import activation_mask, discover_instances, grid_boxes_to_image, grow_grid_boxes
from .refine import tensor_to_host, zip_confidence
from .refine_sam2 import build_refiner, refiner_weights_check
from ..registry import GENERATORS
from ..base import Generator, failed

log = logging.getLogger(__name__)

CACHE_FORMAT = 3  # bump when what an encoder entry holds changes (2: batch-first ViT blocks; 3: QuickGELU
# for OpenAI weights)
SEMANTIC_TOKENS, LAYER3, SAM_EMBEDDING = "clip_surgery_tokens", "clip_layer3", "sam_embedding"
SCORE_COLUMNS = ("confidence", "clip_class_prob", "sam_predicted_iou", "sam_stability_score",
                 "activated_fraction", "extent")


@dataclass(frozen=True)
class Proposals:
    """Stage 3 output: prompt boxes of one image with what each came from (N rows)."""

    boxes_xyxy: np.ndarray  # (N, 4) float32 XYXY image pixels
    class_ids: np.ndarray  # (N,) int32 index into the stage-1 class names
    class_probs: np.ndarray  # (N,) float32 CLS-token probability of that class
    activated_fraction: np.ndarray  # (N,) float32
    extent: np.ndarray  # (N,) float32 area / box area on the grid
    cluster_ids: tuple  # N tuples of int
    area_cells: tuple  # N ints


@GENERATORS.register("zip")
class ZipGenerator(Generator):
    Config = ZipConfig
    uses_feature_cache = True  # the three image encoders' outputs, keyed by image content

    def __init__(self, config: ZipConfig, semantic: Any, boundary: Any, refiner: Any, facts: dict[str, Any],
                 feature_cache: FeatureCache | None = None):
        self.config = config
        self.semantic = semantic
        self.boundary = boundary
        self.refiner = refiner
        self.facts = facts
        # An execution concern, not part of the run identity: settable after construction.
        self.feature_cache = feature_cache
        self.last_timings: dict[str, float] = {}  # seconds per stage of the last image / batch
        self.batch_size = 1  # images per encoder call (an execution setting, like the cache)
        self._weights_ids: dict[str, dict[str, Any]] = {}

    # -- building -----------------------------------------------------------------------
    @classmethod
    def preflight(cls, config: ZipConfig) -> None:
        """Fail at once, before any worker starts (and before a new run directory is created): the
        open_clip architectures must exist and fit the settings, and every weight file must be there
        (all missing files are named in one error)."""
        check_architectures(config)
        if config.random_weights:
            log.warning("zip: RANDOM WEIGHTS requested: the real architectures with random weights."
                        " The labels will be MEANINGLESS (smoke test only).")
            return
        download = config.allow_download
        check_all([  # every missing file in one error, not one per attempt
            functools.partial(resolve_clip_weights, config.semantic.model, config.semantic.pretrained,
                              allow_download=download, config_key="generator.semantic.pretrained"),
            functools.partial(resolve_clip_weights, config.boundary.model, config.boundary.pretrained,
                              allow_download=download, config_key="generator.boundary.pretrained"),
            refiner_weights_check(config.sam, allow_download=download),  # sam.backend's checkpoint
        ])

    @classmethod
    def from_config(cls, config: ZipConfig, *, device: str = "cpu") -> "ZipGenerator":
        from .boundary import BoundaryStage
        from ...models.loading import check_device, load_clip, resolve_precision
        from .semantic import SemanticStage

        dev = check_device(device)
        precision = resolve_precision(config.precision, dev)  # "auto" -> what this device runs natively
        if config.random_weights:
            log.warning("zip: building models with RANDOM WEIGHTS; labels are meaningless")
        common = {"random_weights": config.random_weights, "allow_download": config.allow_download, "device": dev}
        clip_vit, tokenizer, vit_facts = load_clip(config.semantic.model, config.semantic.pretrained, **common)
        clip_rn, _, rn_facts = load_clip(config.boundary.model, config.boundary.pretrained, **common)
        refiner, sam_facts = build_refiner(config.sam, precision=precision, **common)  # sam.backend: sam1 | sam2
        facts = {"generator": cls.name, "random_weights": config.random_weights, "device": str(dev),
                 "precision": precision, "precision_requested": config.precision,
                 "semantic": vit_facts, "boundary": rn_facts, "sam": sam_facts}
        return cls(
            config,
            SemanticStage(clip_vit, tokenizer, config.semantic, device=dev, precision=precision,
                          fidelity=config.fidelity),
            BoundaryStage(clip_rn, config.boundary, device=dev, precision=precision, fidelity=config.fidelity),
            refiner,
            facts,
        )

    def provenance(self) -> dict[str, Any]:
        return dict(self.facts)

    @classmethod
    def vocabulary(cls, config: ZipConfig) -> tuple[str, ...] | None:
        if config.semantic.class_agnostic:
            return None
        return tuple(config.semantic.vocabulary) or (config.semantic.generic_prompt,)

    # -- images ---------------------------------------------------------------------------
    def generate(self, image_rgb: np.ndarray, record: ImageRecord) -> Instances:
        """One image: :meth:`generate_batch` of one, finished at once."""
        (finish,) = self.generate_batch([image_rgb], [record])
        t0 = time.perf_counter()
        instances = finish()
        self.last_timings["refine"] = round(self.last_timings.get("refine", 0.0) + _lap(t0), 6)
        return instances

    def generate_batch(self, images_rgb: Sequence[np.ndarray],
                       records: Sequence[ImageRecord]) -> list[Callable[[], Instances]]:
        """The four stages for a batch of images, each image encoder called on up to
        ``batch_size`` images at once (halved on out-of-memory); per image a ``finish()`` that
        does the CPU-only rest (RLE encoding, boxes, mask NMS). An image whose stage fails gets
        a ``finish()`` raising that error; the other images go on. ``last_timings`` holds
        the seconds of each stage for the whole batch (finishing not included).
        """
        images = list(images_rgb)
        if len(images) != len(records):
            raise GeneratorError(f"generate_batch: {len(images)} images but {len(records)} records")
        errors: dict[int, BaseException] = {}
        keys = self._each(range(len(images)), errors, self._keys_of(images))
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        tokens = self._encode(SEMANTIC_TOKENS, list(keys), images, keys, self.semantic.encode_batch, errors)
        semantic = self._each(tokens, errors, lambda i: self.semantic.from_tokens(tokens[i]))
        timings["semantic"] = _lap(t0)
        t0 = time.perf_counter()
        active = [i for i in semantic if len(semantic[i].kept)]
        features = self._encode(LAYER3, active, images, keys, self.boundary.encode_batch, errors)
        boundary = self._each(features, errors, lambda i: self.boundary.cluster(
            features[i], *images[i].shape[:2], self._activation(semantic[i])))
        features.clear()  # layer3 maps are large (~90 MB per image at the paper's 2048 px): free them before SAM
        timings["boundary"] = _lap(t0)
        t0 = time.perf_counter()
        proposals = self._each(boundary, errors, lambda i: self.propose(semantic[i], boundary[i], *images[i].shape[:2]))
        timings["discovery"] = _lap(t0)
        t0 = time.perf_counter()
        prompted = [i for i in proposals if len(proposals[i].boxes_xyxy)]
        embeddings = self._encode(SAM_EMBEDDING, prompted, images, keys, self.refiner.embed_batch, errors)
        refined = self._each(embeddings, errors, lambda i: self._decode(embeddings[i], images[i].shape[:2],
                                                                        proposals[i].boxes_xyxy))
        timings["refine"] = _lap(t0)
        self.last_timings = timings
        return [self._finisher(i, images[i].shape[:2], errors, proposals, refined) for i in range(len(images))]

    def _finisher(self, index: int, frame: tuple[int, int], errors: dict, proposals: dict,
                  refined: dict) -> Callable[[], Instances]:
        height, width = frame
        if index in errors:
            return failed(errors[index])
        if index in refined:
            return functools.partial(self._finish, height, width, proposals[index], refined[index])
        return functools.partial(self._empty, height, width)  # no class kept, or no instance found

    @staticmethod
    def _each(indices: Iterable[int], errors: dict[int, BaseException], fn: Callable[[int], Any]) -> dict[int, Any]:
        """``{i: fn(i)}`` over ``indices``; an image whose ``fn`` raises goes to ``errors`` instead."""
        out: dict[int, Any] = {}
        for index in indices:
            try:
                out[index] = fn(index)
            except Exception as exc:
                errors[index] = exc
        return out

    def _keys_of(self, images: list[np.ndarray]) -> Callable[[int], dict | None]:
        if self.feature_cache is None:
            return lambda i: None
        return lambda i: self.cache_keys(images[i])

    def _activation(self, semantic: Any) -> np.ndarray | None:
        """Boundary k-means seeds from the kept classes' maps (``boundary.init: semantic``)."""
        return semantic.maps[semantic.kept].max(axis=0) if self.config.boundary.init == "semantic" else None

    def _decode(self, embedding: Any, frame: tuple[int, int], boxes_xyxy: np.ndarray) -> Any:
        self.refiner.set_embedding(embedding, *frame)
        return self.refiner.decode_boxes(boxes_xyxy)

    # -- the encoders: batched, out-of-memory back-off, feature cache ------------------------
    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        """Images per encoder call; a new value starts each encoder's back-off afresh."""
        self._batchers = {kind: AdaptiveBatcher(value) for kind in (SEMANTIC_TOKENS, LAYER3, SAM_EMBEDDING)}
        self._batch_size = value

    def _encode(self, kind: str, indices: list[int], images: list[np.ndarray], keys: dict[int, Any],
                encode_batch: Callable[[list[np.ndarray]], list[Any]], errors: dict[int, BaseException]
                ) -> dict[int, Any]:
        """Encoder ``kind``'s output for each image of ``indices``: from the feature cache when it
        has it, else computed in batches (one failing image is retried alone, so only it fails)."""
        out: dict[int, Any] = {}
        missing = []
        for index in indices:
            hit = self.feature_cache.get(kind, keys[index][kind]) if keys[index] is not None else None
            if hit is None:
                missing.append(index)
            else:
                out[index] = hit
        results = self._batchers[kind].run(_isolating(encode_batch), [images[i] for i in missing])
        for index, result in zip(missing, results):
            if isinstance(result, BaseException):
                errors[index] = result
                continue
            out[index] = result
            if keys[index] is not None:
                self.feature_cache.put(kind, keys[index][kind], tensor_to_host(result))
        return out

    def cache_keys(self, image_rgb: np.ndarray) -> dict[str, dict[str, Any]]:
        """Feature-cache key dict of each encoder output of this image (kind -> key).

        Each names the image content (SHA-256 of its shape and uint8 pixels), the encoder's model
        and weights identity, every setting its output depends on, the precision and the device
        type; never the vocabulary, the thresholds or anything downstream of the encoder.
        """
        from ...models.blocked_attention import blocked_for

        cfg = self.config
        precision = self.facts.get("precision", cfg.precision)  # resolved: "auto" differs between machines
        common = {"format": CACHE_FORMAT, "image_sha256": image_sha256(image_rgb), "precision": precision,
                  "device_type": str(self.facts.get("device", "cpu")).split(":")[0]}
        # CLIP Surgery's and SAM 2's attention runs blocked here (models/blocked_attention.py) since issue 16
        blocked = {"attention_kernel": "blocked"} if blocked_for(common["device_type"], precision) else {}
        return {
            SEMANTIC_TOKENS: {**common, "model": cfg.semantic.model, "weights": self._weights_id("semantic"),
                              "input_size": cfg.semantic.input_size, "surgery_depth": cfg.semantic.surgery_depth,
                              "new_path_start": cfg.semantic.new_path_start, **blocked},
            LAYER3: {**common, "model": cfg.boundary.model, "weights": self._weights_id("boundary"),
                     "short_side": cfg.boundary.short_side, "max_long_side": cfg.boundary.max_long_side,
                     "resize_rule": "truncate" if cfg.fidelity == "release" else "round"},
            # backend and attention only when not the SAM 1 reference: earlier SAM 1 cache entries stay valid
            SAM_EMBEDDING: {**common, **({"backend": cfg.sam.backend} if cfg.sam.backend != "sam1" else {}),
                            "model": cfg.sam.model_type,
                            "weights": self._weights_id("sam"),
                            **({"attention": cfg.sam.attention} if cfg.sam.attention != "reference" else {}),
                            **(blocked if cfg.sam.backend == "sam2" else {})},
        }

    def _weights_id(self, stage: str) -> dict[str, Any]:
        """What identifies a stage's weights: RANDOM + seed, a known SHA-256, or path + size + mtime."""
        if stage not in self._weights_ids:
            self._weights_ids[stage] = weights_identity(self.facts.get(stage, {}), stage)
        return self._weights_ids[stage]

    # -- stages 3 and 4 ---------------------------------------------------------------------
    def propose(self, semantic: Any, boundary: Any, height: int, width: int) -> Proposals:
        """Stage 3 for every kept class: activated fragments -> instances -> image-pixel boxes."""
        rows: list[tuple] = []
        discovery = self.config.discovery
        image_maps = self._release_image_maps(semantic, height, width)
        for index, class_id in enumerate(semantic.kept):
            activated = activation_mask(semantic.maps[class_id], height, width, boundary.grid_height,
                                        boundary.grid_width, discovery.activation_ratio, self.config.fidelity,
                                        None if image_maps is None else image_maps[index])
            for inst in discover_instances(boundary.labels, activated, discovery, boundary.num_clusters):
                rows.append((inst, int(class_id), float(semantic.class_probs[class_id])))
        grid_boxes = grow_grid_boxes(np.array([r[0].box_xyxy_grid for r in rows], dtype=np.float64),
                                     discovery.box_margin_cells, boundary.grid_height, boundary.grid_width)
        return Proposals(
            boxes_xyxy=grid_boxes_to_image(grid_boxes, boundary.grid_height, boundary.grid_width, height, width),
            class_ids=np.array([r[1] for r in rows], dtype=np.int32),
            class_probs=np.array([r[2] for r in rows], dtype=np.float32),
            activated_fraction=np.array([r[0].activated_fraction for r in rows], dtype=np.float32),
            extent=np.array([r[0].extent for r in rows], dtype=np.float32),
            cluster_ids=tuple(tuple(int(c) for c in r[0].cluster_ids) for r in rows),
            area_cells=tuple(int(r[0].area_cells) for r in rows),
        )

    def _release_image_maps(self, semantic: Any, height: int, width: int) -> np.ndarray | None:
        """``fidelity: release``: the kept classes' maps upsampled to the image by torch on the stage-1
        device, as the release does (its mean and nearest sampling then follow in stage 3)."""
        if self.config.fidelity != "release" or not len(semantic.kept):
            return None
        from .semantic import upsample_maps

        return upsample_maps(semantic.maps[semantic.kept], height, width, getattr(self.semantic, "device", "cpu"))

    def _finish(self, height: int, width: int, proposals: Proposals, refined: Any) -> Instances:
        """Stage 4's CPU part: RLE-encode SAM's masks, scores, drop empty masks, mask NMS."""
        nonempty = refined.masks.any(axis=(1, 2))  # no reshape: the stack is column-major (no copy)
        rles = masks_to_rles(refined.masks)
        scores = {
            "confidence": zip_confidence(proposals.class_probs, refined.predicted_iou),
            "clip_class_prob": proposals.class_probs,
            "sam_predicted_iou": refined.predicted_iou,
            "sam_stability_score": refined.stability_score,
            "activated_fraction": proposals.activated_fraction,
            "extent": proposals.extent,
        }
        instances = Instances(
            height=height,
            width=width,
            masks_rle=tuple(rles),
            boxes_xyxy=rles_to_boxes_xyxy(rles),
            scores=scores,
            class_ids=None if self.config.semantic.class_agnostic else proposals.class_ids,
            attributes={
                "prompt_box_xyxy": [[float(v) for v in box] for box in proposals.boxes_xyxy],
                "semantic_class_id": [int(c) for c in proposals.class_ids],
                "cluster_ids": [list(c) for c in proposals.cluster_ids],
                "area_cells": list(proposals.area_cells),
                "sam_mask_choice": [int(c) for c in refined.mask_choice],
            },
            provenance={"generator": self.name},
        )[nonempty]
        return self._suppress_duplicates(instances)

    def _suppress_duplicates(self, instances: Instances) -> Instances:
        """Mask NMS across classes and overlapping prompts (IoU and intersection-over-smaller).

        As released (``discovery.nms_containment: all``, ``duplicate_class: confidence``): one greedy
        pass by confidence, both criteria across classes. With either option: IoU NMS across classes
        first, then intersection-over-smaller NMS, across classes (``all``) or among masks of one
        stage-1 class only (``same_class``: a part of an object goes, food in a bowl stays).
        ``duplicate_class: evidence``: of a mask and the masks its IoU suppressed, the one with the
        highest ``activated_fraction`` is kept (its class, mask and scores; ties: the most confident).
        """
        if len(instances) < 2:
            return instances
        cfg, discovery = self.config.sam, self.config.discovery
        if discovery.nms_containment == "all" and discovery.duplicate_class == "confidence":
            keep, _ = mask_nms(list(instances.masks_rle), instances.scores["confidence"], cfg.nms_iou, cfg.nms_ios)
            return instances[np.sort(keep)]
        keep, suppressed_by = mask_nms(list(instances.masks_rle), instances.scores["confidence"], cfg.nms_iou, 1.0)
        if discovery.duplicate_class == "evidence":
            keep = _best_evidence(keep, suppressed_by, instances.scores["activated_fraction"])
        instances = instances[np.sort(keep)]
        if cfg.nms_ios < 1.0 and len(instances) > 1:  # then containment: across classes, or within one
            same_class = discovery.nms_containment == "same_class"
            classes = np.asarray(instances.attributes["semantic_class_id"], np.int64) if same_class else None
            keep, _ = mask_nms(list(instances.masks_rle), instances.scores["confidence"], 1.0, cfg.nms_ios,
                               class_ids=classes, across_classes=not same_class)
            instances = instances[np.sort(keep)]
        return instances

    def _empty(self, height: int, width: int) -> Instances:
        return Instances(
            height=height, width=width,
            scores={name: np.zeros((0,), np.float32) for name in SCORE_COLUMNS},
            class_ids=None if self.config.semantic.class_agnostic else np.zeros((0,), np.int32),
            attributes={name: () for name in ("prompt_box_xyxy", "semantic_class_id", "cluster_ids",
                                               "area_cells", "sam_mask_choice")},
            provenance={"generator": self.name},
        )


def _best_evidence(keep: np.ndarray, suppressed_by: np.ndarray, evidence: np.ndarray) -> np.ndarray:
    """For each kept index, the member of its duplicate group (itself and what it suppressed) with the
    highest ``evidence``; ties go to the kept one (the most confident), then the lower index."""
    chosen = []
    for kept in keep:
        group = [int(kept), *np.flatnonzero(suppressed_by == kept).tolist()]
        best = max(group, key=lambda i: (float(evidence[i]), i == kept, -i))
        chosen.append(best)
    return np.asarray(chosen, dtype=np.int64)


def check_architectures(config: ZipConfig) -> None:
    """The settings that depend on the model, checked on open_clip's model configs (no model is built):
    stage 1 needs a known ViT whose patch size divides ``input_size`` and that has at least
    ``surgery_depth`` blocks; stage 2 needs a known ResNet. Raises ``ConfigError`` naming the key."""
    import open_clip

    from ...models.presets import register_model_configs

    register_model_configs()
    known = open_clip.list_models()
    for key, name in (("generator.semantic.model", config.semantic.model),
                      ("generator.boundary.model", config.boundary.model)):
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(close)}?" if close else " `open_clip.list_models()` lists them."
            raise ConfigError(f"{key}: unknown open_clip model {name!r}.{hint}")
    vision = (open_clip.get_model_config(config.semantic.model) or {}).get("vision_cfg", {})
    layers, patch = vision.get("layers"), vision.get("patch_size")
    if isinstance(layers, (list, tuple)):
        raise ConfigError(f"generator.semantic.model: {config.semantic.model!r} is a ResNet; CLIP Surgery needs a ViT"
                          " (e.g. ViT-B-16)")
    if isinstance(layers, int) and config.semantic.surgery_depth > layers:
        raise ConfigError(f"generator.semantic.surgery_depth: expected 0..{layers} ({config.semantic.model} has"
                          f" {layers} blocks); got {config.semantic.surgery_depth}")
    if isinstance(patch, int) and patch > 0 and config.semantic.input_size % patch:
        raise ConfigError(f"generator.semantic.input_size: expected a multiple of {config.semantic.model}'s patch size"
                          f" {patch}; got {config.semantic.input_size}")
    boundary = (open_clip.get_model_config(config.boundary.model) or {}).get("vision_cfg", {})
    if isinstance(boundary.get("layers"), int):
        raise ConfigError(f"generator.boundary.model: {config.boundary.model!r} is a ViT; the boundary stage needs a"
                          " CLIP ResNet (e.g. RN50x64, RN50x4)")


def image_sha256(image_rgb: np.ndarray) -> str:
    """Hex SHA-256 of an image's content: its shape, dtype and pixel bytes (C order)."""
    pixels = np.ascontiguousarray(image_rgb)
    digest = hashlib.sha256(f"{pixels.dtype.str}{pixels.shape}".encode("ascii"))
    digest.update(memoryview(pixels).cast("B"))
    return digest.hexdigest()


def weights_identity(facts: dict[str, Any], stage: str) -> dict[str, Any]:
    """Feature-cache identity of a stage's weights from its provenance ``facts``.

    RANDOM weights: the seed they were built with. A known SHA-256 (official SAM checkpoints):
    that hash. Otherwise the weights file's path, size and modification time (hashing a
    multi-GB file in every worker would cost seconds; a replaced file changes size or mtime).
    Raises ``GeneratorError`` when the weights cannot be identified (caching would be unsafe).
    """
    weights = str(facts.get("weights", ""))
    if weights == "RANDOM":
        from ...models.loading import RANDOM_SEED

        return {"random_seed": RANDOM_SEED}
    if facts.get("sha256"):
        return {"sha256": str(facts["sha256"])}
    try:
        st = os.stat(weights) if weights else None
    except OSError:
        st = None
    if st is None:
        raise GeneratorError(
            f"zip feature cache: cannot identify the {stage} weights (provenance says {facts!r}); the file must"
            " exist to key the cache on it. Run without the feature cache, or restore the weights file."
        )
    return {"pretrained": str(facts.get("pretrained", "")), "path": weights, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}


def _isolating(encode_batch: Callable[[list[np.ndarray]], list[Any]]) -> Callable[[list[np.ndarray]], list[Any]]:
    """``encode_batch`` that answers an error in place of a result for an image that fails.

    Out of memory on several images propagates (the batcher halves the batch and retries). Any
    other error on a batch retries its images one by one, so only the image at fault fails.
    """
    def run(batch: list[np.ndarray]) -> list[Any]:
        try:
            return list(encode_batch(batch))
        except Exception as exc:
            if len(batch) > 1 and default_is_oom(exc):
                raise
            if len(batch) == 1:
                return [exc]
            log.warning("an encoder failed on a batch of %d images (%s: %s); retrying them one by one",
                        len(batch), type(exc).__name__, exc)
        return [item for image in batch for item in run([image])]

    return run


def _lap(t0: float) -> float:
    return round(time.perf_counter() - t0, 6)
