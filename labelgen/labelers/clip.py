"""The CLIP region labeler: names the instances of any generator (config: ``labelgen.labelers.config``).

``ClipLabeler.label(image_rgb, instances)`` runs these steps:

1. crop every instance (``labeling.instance_crops``: padded box, or box with the outside
   of the mask filled);
2. squash each crop to ``input_size``² (PIL bicubic) and apply the model's mean/std;
3. encode the crops in batches of ``batch_size`` (``encode_crops``: (N, D) unit rows);
4. softmax over the classes of ``logit_scale`` x cosine(crop, class text embedding);
5. write ``class_ids``, ``clip_label_prob``, ``clip_label_margin``, ``clip_label_name``.

A class's text embedding is the re-normalised mean of its prompts' embeddings, each prompt
being the 85-template ensemble of ``zipmethod.semantic.text_embeddings`` (or the raw prompt
when ``use_templates`` is false). They are computed once per labeler, on first use.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, GeneratorError, ValidationError
from ..structures.instances import Instances
from .config import LabelerConfig, class_names, class_prompts, instance_crops, with_labels
from .config import preflight as preflight_weights
from ..models.loading import autocast, resolve_precision
from ..models.prompts import PROMPT_TEMPLATES
from ..generators.zip.semantic import (
    _clip_mean_std,
    _vit_blocks,
    class_probabilities,
    preprocess_square,
    surgery_forward,
)
from ..generators.zip.semantic import text_embeddings as ensemble_text_embeddings

log = logging.getLogger(__name__)

RAW_TEMPLATE = ("{}",)


class ClipLabeler:
    """Names instances with an open_clip model.

    ``model``: an open_clip CLIP on ``device``; ``tokenizer``: its tokenizer; ``facts``: JSON
    provenance of the weights (from ``load_clip``). ``text_embeddings``: optional (C, D)
    class embeddings to use instead of encoding the config's prompts (tests, custom
    vocabularies); C must equal the number of classes. When ``input_size`` is not the
    model's native size, a ViT runs with its positional embedding interpolated to the new
    token grid; other towers need their native size.
    """

    name = "clip"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: LabelerConfig,
        *,
        device: str | torch.device = "cpu",
        facts: dict[str, Any] | None = None,
        text_embeddings: torch.Tensor | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(device)
        self.precision = resolve_precision(config.precision, self.device)  # "auto" -> native bf16 or fp32
        self.facts = dict(facts or {"model": config.model, "pretrained": config.pretrained})
        self.class_names = class_names(config)
        self.mean, self.std = _clip_mean_std(model.visual)
        # the batch-first token path (surgery_forward at depth 0) when the tower allows it: same
        # embeddings, and bf16 batches run ~3.5x faster than through nn.MultiheadAttention
        self._token_path = _needs_token_resize(model.visual, config) or _is_token_vit(model.visual)
        self._logit_scale = float(model.logit_scale.detach().exp())
        self._text_lock = threading.Lock()
        self._text = None if text_embeddings is None else self._checked_text(text_embeddings)

    # -- building -----------------------------------------------------------------------
    @classmethod
    def preflight(cls, config: LabelerConfig) -> None:
        """Fail at once, before any worker starts, when the CLIP weights are missing."""
        if config.random_weights:
            log.warning("labeler: RANDOM WEIGHTS requested; class names will be MEANINGLESS (smoke test only)")
        preflight_weights(config)

    @classmethod
    def from_config(cls, config: LabelerConfig, *, device: str = "cpu") -> "ClipLabeler":
        """Load the CLIP model (or build it with seeded random weights) on ``device``."""
        from ..models.loading import check_device, load_clip

        dev = check_device(device)
        if config.random_weights:
            log.warning("labeler: building %s with RANDOM WEIGHTS; the class names it gives are MEANINGLESS",
                        config.model)
        model, tokenizer, facts = load_clip(config.model, config.pretrained, random_weights=config.random_weights,
                                            allow_download=config.allow_download, device=dev)
        return cls(model, tokenizer, config, device=dev, facts=facts)

    def provenance(self) -> dict[str, Any]:
        """JSON facts: labeler, model, weights (a path or ``RANDOM``), crop settings, classes."""
        cfg = self.config
        return {
            "labeler": self.name, **self.facts, "random_weights": cfg.random_weights, "device": str(self.device),
            "precision": self.precision, "precision_requested": cfg.precision, "crop": cfg.crop,
            "padding": cfg.padding, "input_size": cfg.input_size, "use_templates": cfg.use_templates,
            "classes": list(self.class_names),
        }

    # -- text side ------------------------------------------------------------------------
    def text_embeddings(self) -> torch.Tensor:
        """(C, D) float32 unit rows on the device, one per class; encoded once, then cached."""
        with self._text_lock:
            if self._text is None:
                self._text = self._encode_classes()
            return self._text

    def _encode_classes(self) -> torch.Tensor:
        prompts = class_prompts(self.config)
        flat = [prompt for group in prompts for prompt in group]
        templates = PROMPT_TEMPLATES if self.config.use_templates else RAW_TEMPLATE
        log.debug("labeler: encoding %d prompts x %d templates", len(flat), len(templates))
        per_prompt = ensemble_text_embeddings(self.model, self.tokenizer, flat, self.device, templates=templates)
        rows, start = [], 0
        for group in prompts:
            rows.append(per_prompt[start:start + len(group)].mean(dim=0))
            start += len(group)
        return F.normalize(torch.stack(rows), dim=-1)

    def _checked_text(self, text: torch.Tensor) -> torch.Tensor:
        text = torch.as_tensor(text)
        if text.ndim != 2 or text.shape[0] != len(self.class_names):
            raise ValidationError(
                f"text_embeddings must be (C, D) with C = {len(self.class_names)} classes; got {tuple(text.shape)}"
            )
        return F.normalize(text.detach().float(), dim=-1).to(self.device)

    # -- image side ----------------------------------------------------------------------
    def crops(self, image_rgb: np.ndarray, instances: Instances) -> list[np.ndarray]:
        """The (h, w, 3) uint8 crop of every instance, as the config asks (step 1)."""
        return instance_crops(image_rgb, instances, self.config.crop, self.config.padding)

    def encode_crops(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, D) float32 unit image embeddings of (h, w, 3) uint8 crops (steps 2-3)."""
        size, parts = self.config.input_size, []
        for start in range(0, len(crops), self.config.batch_size):
            batch = [preprocess_square(c, size, self.mean, self.std) for c in crops[start:start + self.config.batch_size]]
            parts.append(self._encode_pixels(torch.cat(batch).to(self.device)))
        if not parts:
            return torch.zeros((0, self.text_embeddings().shape[1]), dtype=torch.float32, device=self.device)
        return F.normalize(torch.cat(parts), dim=-1)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            if self._token_path:
                features = surgery_forward(self.model.visual, pixels, 0)[:, 0]  # depth 0 = the plain ViT
            else:
                features = self.model.encode_image(pixels)
        return features.float()

    def _autocast(self):
        return autocast(self.device, self.precision)

    # -- labelling -------------------------------------------------------------------------
    def classify(self, image_features: torch.Tensor) -> np.ndarray:
        """(N, C) float32 class probabilities of (N, D) image embeddings (step 4)."""
        with torch.inference_mode():
            probs = class_probabilities(image_features, self.text_embeddings(), self._logit_scale)
        return probs.cpu().numpy().astype(np.float32)

    def label(self, image_rgb: np.ndarray, instances: Instances) -> Instances:
        """``instances`` named: class ids, ``clip_label_prob``, ``clip_label_margin`` scores and
        the ``clip_label_name`` attribute; every existing column is kept (``class_ids`` replaced).

        ``image_rgb``: (H, W, 3) uint8 RGB in the instances' frame.
        """
        crops = self.crops(image_rgb, instances)
        if not crops:
            return with_labels(instances, np.zeros((0, len(self.class_names)), np.float32), self.class_names)
        probs = self.classify(self.encode_crops(crops))
        return with_labels(instances, probs, self.class_names)


def _is_token_vit(visual: Any) -> bool:
    """True for an open_clip ViT with CLS-token pooling (what ``surgery_forward`` runs)."""
    try:
        _vit_blocks(visual)
    except GeneratorError:
        return False
    return True


def _needs_token_resize(visual: Any, config: LabelerConfig) -> bool:
    """False when ``input_size`` is the tower's native size; True for a ViT that can run at
    ``input_size`` with an interpolated positional embedding; ConfigError otherwise."""
    native = getattr(visual, "image_size", None)
    if native is None:  # a tower that does not say (e.g. timm): trust the config
        return False
    native = tuple(native) if isinstance(native, (tuple, list)) else (native, native)
    if native == (config.input_size, config.input_size):
        return False
    try:
        _vit_blocks(visual)
    except GeneratorError:  # not a ViT with CLS pooling: its size is fixed
        raise ConfigError(
            f"labeler.input_size: {config.model} only runs at its native size {native[0]}; got {config.input_size}"
        ) from None
    patch = visual.patch_size[0]
    if config.input_size % patch:
        raise ConfigError(
            f"labeler.input_size: expected a multiple of {config.model}'s patch size {patch}"
            f" (native: {native[0]}); got {config.input_size}"
        )
    return True
