"""The ``zip`` generator (ICLR 2024 "Zip"): CLIP boundary clustering + SAM refinement.

Specification: ``docs/method.md``. This module holds the generator's typed config and
its weight pre-flight; the four model stages are being built (issue 3) and until then
``from_config`` refuses with a clear message rather than producing anything.
Imports no torch at import time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..errors import GeneratorError
from ..weights import resolve_clip_weights, resolve_sam_checkpoint
from . import GENERATORS
from .base import Generator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipModelConfig:
    model: str  # open_clip architecture name
    pretrained: str = "openai"  # open_clip pretrained tag, or a local weights file


@dataclass(frozen=True)
class SamConfig:
    model_type: str = "vit_h"  # vit_h | vit_l | vit_b
    checkpoint: str = ""  # local file; empty = the official checkpoint in the labelgen cache


@dataclass(frozen=True)
class ZipConfig:
    semantic: ClipModelConfig = field(default_factory=lambda: ClipModelConfig("ViT-B-16"))  # stage 1
    boundary: ClipModelConfig = field(default_factory=lambda: ClipModelConfig("RN50x64"))  # stage 2
    sam: SamConfig = field(default_factory=SamConfig)  # stage 4
    random_weights: bool = False  # build the real architectures with random weights (smoke tests only)
    allow_download: bool = True  # fetch missing official weights when the network allows


@GENERATORS.register("zip")
class ZipGenerator(Generator):
    name = "zip"
    Config = ZipConfig

    @classmethod
    def preflight(cls, config: ZipConfig) -> None:
        """Fail at once, before any worker starts, when a weight file is missing."""
        if config.random_weights:
            log.warning("zip: RANDOM WEIGHTS requested; the labels will be meaningless (smoke test only)")
            return
        resolve_clip_weights(config.semantic.model, config.semantic.pretrained, allow_download=config.allow_download)
        resolve_clip_weights(config.boundary.model, config.boundary.pretrained, allow_download=config.allow_download)
        resolve_sam_checkpoint(config.sam.model_type, config.sam.checkpoint, allow_download=config.allow_download)

    @classmethod
    def from_config(cls, config: ZipConfig, *, device: str = "cpu") -> "ZipGenerator":
        raise GeneratorError(
            "the zip generator's model stages are not in this version of labelgen yet (tracked as issue 3);"
            " its config and weight checks are. Use another generator for now."
        )

    def generate(self, image_rgb: Any, record: Any) -> Any:  # pragma: no cover - unreachable until issue 3
        raise GeneratorError("zip generator is not available in this version")
