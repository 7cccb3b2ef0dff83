"""Typed config of the Zip generator. Every number of the specification is a field here,
with the specification's default and the range it may take (checked when the config is built,
so a recipe with a bad value is refused before a run starts). No torch import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...checks import FieldValueError, bounded, check_fields, check_strings, non_empty, one_of
from ...models.sam2 import SAM2_MODEL_TYPES

SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "tiny")  # tiny: a test model (random weights only)
SAM_BACKENDS = {"sam1": SAM_MODEL_TYPES, "sam2": SAM2_MODEL_TYPES}  # stage 4's model family -> its model types
PRECISION_CHOICES = ("fp32", "bf16", "fp16", "auto")  # auto: bf16 where the device runs it natively, else fp32
FIDELITY_CHOICES = ("release", "fast")  # release: stages 1-3 as the authors' code computes them; fast: our rules


@dataclass(frozen=True)
class SemanticConfig:
    """Stage 1: CLIP Surgery activation maps and "classification first" gating."""

    model: str = non_empty("ViT-B-16")  # open_clip ViT architecture
    pretrained: str = non_empty("openai")  # open_clip pretrained tag, or a local weights file
    input_size: int = bounded(512, 16, 4096)  # image squashed to input_size^2 (bicubic); 512 -> 32x32 tokens
    # at patch 16; a multiple of the model's patch size
    surgery_depth: int = bounded(6, 0, 1000)  # the last N residual blocks get the v-v "new path" (<= blocks)
    new_path_start: Literal["input", "zeros"] = one_of("input", ("input", "zeros"))  # new path before the
    # first surgered block: a copy of that block's input (as the authors' release runs it) or zeros
    vocabulary: tuple[str, ...] = ()  # class names; empty = class-agnostic
    class_agnostic: bool = True  # True: no class ids (union over the vocabulary, or `generic_prompt`)
    generic_prompt: str = non_empty("object")  # the one-word vocabulary used when agnostic and vocabulary is empty
    class_threshold: float = bounded(0.1, 0.0, 1.0)  # [ours] keep classes with CLS-token probability >= this ...
    top_k: int = bounded(3, 0, 10_000)  # [ours] ... and at most this many per image (0 = no limit)
    token_normalisation: Literal["channels", "tokens"] = one_of("channels", ("channels", "tokens"))  # [ours]
    # channels: L2 along each token's channels (the fix); tokens: along the token axis, as the release does
    positional_embedding: Literal["cached", "mutate"] = one_of("cached", ("cached", "mutate"))  # [ours] cached:
    # interpolated per grid, never written back; mutate: written into the model, as the release does

    def __post_init__(self) -> None:
        check_fields(self)
        check_strings("vocabulary", self.vocabulary, what="non-empty class names")


@dataclass(frozen=True)
class BoundaryConfig:
    """Stage 2: CLIP ResNet layer3 features and K-means."""

    model: str = non_empty("RN50x64")  # open_clip ModifiedResNet architecture, truncated after layer3
    pretrained: str = non_empty("openai")
    short_side: int = bounded(2048, 16, 16384)  # resize so the short side is this (bicubic, aspect kept)
    max_long_side: int = bounded(4096, 16, 16384)  # [ours] cap on the long side after resizing (>= short_side)
    num_clusters: int = bounded(20, 1, 10_000)  # k
    max_iterations: int = bounded(100, 1, 100_000)
    tolerance: float = bounded(1e-5, 0.0, None)  # stop when centroids move by less than this (relative)
    init: Literal["even", "semantic"] = one_of("even", ("even", "semantic"))  # evenly spaced raster indices,
    # or seeded from activations

    def __post_init__(self) -> None:
        check_fields(self)
        if self.max_long_side < self.short_side:
            raise FieldValueError("max_long_side", f"expected >= short_side ({self.short_side}); got {self.max_long_side}")


@dataclass(frozen=True)
class DiscoveryConfig:
    """Stage 3: fragment selection and instance discovery on the feature grid."""

    activation_ratio: float = bounded(0.7, 0.0, None)  # activated cell: map > ratio * mean(map)
    min_activated_fraction: float = bounded(0.3, 0.0, 1.0)  # keep fragment: |frag & A| / |frag| > this
    max_box_to_area: float = bounded(3.0, 1.0, None, low_open=True)  # keep fragment: bbox_area / area < this
    # (> 1: the ratio is never below 1)
    min_cells: int = bounded(100, 0, None)  # drop instances smaller than this many grid cells
    min_cells_reference_short_side: int = bounded(0, 0, None)  # [ours] >0: scale min_cells by
    # (grid short side*16 / this)^2
    cluster_visits: Literal["most_common", "all"] = one_of("most_common", ("most_common", "all"))  # most_common:
    # the release's Counter(labels*A).most_common(k), whose 0 entry can push the least activated cluster out;
    # all: every cluster with an activated cell [ours]
    # Method fixes the oracle exposed (docs/oracle-check.md), each off here, as released:
    box_margin_cells: int = bounded(0, 0, 16)  # [ours] grow each prompt box by this many cells per side (1: the
    # boundary ring that stage 3 drops)
    fragment_connectivity: int = bounded(4, 4, 8)  # [ours] 4 (released) or 8: fragments split 8-connected, so a
    # diagonal boundary ring is one thin fragment (fails the extent test) rather than single cells that bridge
    recover_small: bool = False  # [ours] an instance below the minimum is measured with its one-cell ring
    nms_containment: Literal["all", "same_class"] = one_of("all", ("all", "same_class"))  # [ours] which masks
    # intersection-over-smaller NMS compares: all (released) or one class only (keeps food in a bowl)
    duplicate_class: Literal["confidence", "evidence"] = one_of("confidence", ("confidence", "evidence"))  # [ours]
    # of masks that duplicate each other (IoU NMS): keep the most confident, or the best fragment evidence

    def __post_init__(self) -> None:
        check_fields(self)
        if self.fragment_connectivity not in (4, 8):
            raise FieldValueError("fragment_connectivity", f"expected 4 or 8; got {self.fragment_connectivity}")


@dataclass(frozen=True)
class SamConfig:
    """Stage 4: SAM (or SAM 2.1) box-prompted refinement and duplicate removal."""

    backend: Literal["sam1", "sam2"] = one_of("sam1", tuple(SAM_BACKENDS))  # sam1: Segment Anything; sam2: SAM 2.1
    model_type: str = one_of("vit_h", tuple(dict.fromkeys(SAM_MODEL_TYPES + SAM2_MODEL_TYPES)))  # sam1: vit_h |
    # vit_l | vit_b; sam2: sam2.1_hiera_tiny | _small | _base_plus | _large (tiny: either's test model, random weights)
    checkpoint: str = ""  # local file; empty = the official checkpoint in the labelgen cache
    attention: Literal["reference", "sdpa", "fast"] = one_of("reference", ("reference", "sdpa", "fast"))  # sam1's
    # image encoder: reference = segment_anything's attention; sdpa = one fused attention call with the
    # relative-position bias as a mask (models/sam_fast.py); fast = sdpa, except on CPU in bf16/fp16, where
    # blocked attention (models/blocked_attention.py) is 2x faster. Same embedding within rounding. SAM 2: SDPA
    multimask_output: bool = False  # True: 3 masks per box, keep the highest predicted IoU
    nms_iou: float = bounded(0.7, 0.0, 1.0)  # [ours] suppress a mask whose IoU with a better one exceeds this
    nms_ios: float = bounded(0.9, 0.0, 1.0)  # [ours] ... or whose intersection-over-smaller exceeds this

    def __post_init__(self) -> None:
        check_fields(self)
        if self.model_type not in SAM_BACKENDS[self.backend]:
            raise FieldValueError("model_type", f"backend {self.backend} takes one of"
                                                f" {list(SAM_BACKENDS[self.backend])}; got {self.model_type!r}")


@dataclass(frozen=True)
class ZipConfig:
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    boundary: BoundaryConfig = field(default_factory=BoundaryConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    precision: Literal["fp32", "bf16", "fp16", "auto"] = one_of("fp32", PRECISION_CHOICES)  # bf16/fp16 =
    # torch.autocast (bf16: 2-3x faster on CPUs with AVX-512 BF16 / AMX, 10x slower on CPUs without);
    # auto = bf16 where the device runs it natively, else fp32 (the choice is logged and in the provenance)
    random_weights: bool = False  # real architectures, random weights: smoke tests only, said loudly
    allow_download: bool = True  # fetch missing official weights when the network allows
    fidelity: Literal["release", "fast"] = one_of("release", FIDELITY_CHOICES)  # release: stages 1-3 reproduce the
    # authors' code on the same weights (resize, sampling, k-means arithmetic); fast: our faster rules (method.md)

    def __post_init__(self) -> None:
        check_fields(self)
