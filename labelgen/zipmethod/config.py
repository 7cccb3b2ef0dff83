"""Typed config of the Zip generator. Every number of the specification is a field here,
with the specification's default. No torch import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class SemanticConfig:
    """Stage 1: CLIP Surgery activation maps and "classification first" gating."""

    model: str = "ViT-B-16"  # open_clip ViT architecture
    pretrained: str = "openai"  # open_clip pretrained tag, or a local weights file
    input_size: int = 512  # image squashed to input_size^2 (bicubic); 512 -> 32x32 tokens at patch 16
    surgery_depth: int = 6  # the last N residual blocks get the v-v "new path"
    new_path_start: Literal["input", "zeros"] = "input"  # new path before the first surgered block:
    # a copy of that block's input (as the authors' release runs it) or zeros
    vocabulary: tuple[str, ...] = ()  # class names; empty = class-agnostic
    class_agnostic: bool = True  # True: no class ids (union over the vocabulary, or `generic_prompt`)
    generic_prompt: str = "object"  # the one-word vocabulary used when agnostic and vocabulary is empty
    class_threshold: float = 0.1  # [ours] keep classes with CLS-token probability >= this ...
    top_k: int = 3  # [ours] ... and at most this many per image (0 = no limit)


@dataclass(frozen=True)
class BoundaryConfig:
    """Stage 2: CLIP ResNet layer3 features and K-means."""

    model: str = "RN50x64"  # open_clip ModifiedResNet architecture, truncated after layer3
    pretrained: str = "openai"
    short_side: int = 2048  # resize so the short side is this (bicubic, aspect kept)
    max_long_side: int = 4096  # [ours] cap on the long side after resizing
    num_clusters: int = 20  # k
    max_iterations: int = 100
    tolerance: float = 1e-5  # stop when centroids move by less than this (relative)
    init: Literal["even", "semantic"] = "even"  # evenly spaced raster indices, or seeded from activations


@dataclass(frozen=True)
class DiscoveryConfig:
    """Stage 3: fragment selection and instance discovery on the feature grid."""

    activation_ratio: float = 0.7  # activated cell: map > ratio * mean(map)
    min_activated_fraction: float = 0.3  # keep fragment: |frag & A| / |frag| > this
    max_box_to_area: float = 3.0  # keep fragment: bbox_area / area < this
    min_cells: int = 100  # drop instances smaller than this many grid cells
    min_cells_reference_short_side: int = 0  # [ours] >0: scale min_cells by (grid short side*16 / this)^2


@dataclass(frozen=True)
class SamConfig:
    """Stage 4: SAM box-prompted refinement and duplicate removal."""

    model_type: str = "vit_h"  # vit_h | vit_l | vit_b
    checkpoint: str = ""  # local file; empty = the official checkpoint in the labelgen cache
    multimask_output: bool = False  # True: 3 masks per box, keep the highest predicted IoU
    nms_iou: float = 0.7  # [ours] suppress a mask whose IoU with a better one exceeds this
    nms_ios: float = 0.9  # [ours] ... or whose intersection-over-smaller exceeds this


@dataclass(frozen=True)
class ZipConfig:
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    boundary: BoundaryConfig = field(default_factory=BoundaryConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16 = torch.autocast (bf16: 2-3x faster on
    # AVX-512 BF16 CPUs; fp16 for GPUs without bf16)
    random_weights: bool = False  # real architectures, random weights: smoke tests only, said loudly
    allow_download: bool = True  # fetch missing official weights when the network allows
