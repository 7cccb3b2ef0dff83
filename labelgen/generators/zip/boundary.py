"""Stage 2: CLIP ResNet ``layer3`` boundary features and their k-means clusters (torch).

Specification: ``docs/zip-method.md`` (Stage 2). The backbone is an open_clip ``ModifiedResNet``
(``RN50x64`` by default) cut after ``layer3``: stem (3 convs + avgpool), layer1..layer3, stride 16;
``layer4`` and the attention pool are never run.

Memory: :func:`truncate_to_layer3` returns a :class:`Layer3Trunk`, an ``nn.Sequential`` holding the
*same* module objects as the model (no copy, shared parameters). :class:`BoundaryStage` keeps only
that trunk, so once the caller drops its reference to the CLIP model, ``layer4``, ``attnpool`` and
the text tower are freed.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.modified_resnet import ModifiedResNet
from PIL import Image
from torch import nn

from ...errors import GeneratorError, ValidationError
from .config import BoundaryConfig
from .discovery import class_map_to_grid
from .kmeans import even_init_indices, kmeans, kmeans_release, release_init_indices, semantic_init_indices
from ...models.loading import autocast, check_precision, to_memory_format

__all__ = [
    "BoundaryResize",
    "BoundaryResult",
    "BoundaryStage",
    "Layer3Trunk",
    "layer3_features",
    "resize_for_boundary",
    "resized_size",
    "truncate_to_layer3",
]

_STEM = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "act3", "avgpool")
_MIN_INPUT_SIDE = 16  # one layer3 cell


@dataclass(frozen=True)
class BoundaryResize:
    """How an image was resized for the boundary backbone (all sizes in pixels)."""

    image_height: int
    image_width: int
    resized_height: int
    resized_width: int


@dataclass(frozen=True)
class BoundaryResult:
    """K-means clusters of one image's layer3 features.

    ``labels``: (grid_height, grid_width) int32 cluster id per grid cell, in ``[0, num_clusters)``,
    read-only. ``features_shape``: the layer3 tensor's (1, channels, grid_height, grid_width).
    ``num_clusters``: effective k (``min(k, cells)``). ``iterations``: Lloyd updates performed.
    """

    labels: np.ndarray
    grid_height: int
    grid_width: int
    features_shape: tuple[int, int, int, int]
    iterations: int
    num_clusters: int
    resize: BoundaryResize


class Layer3Trunk(nn.Sequential):
    """Stem + layer1..layer3 of a ``ModifiedResNet``, sharing its modules; (B,3,h,w) -> (B,C,h/16,w/16)."""


def truncate_to_layer3(visual: nn.Module) -> Layer3Trunk:
    """A :class:`Layer3Trunk` over ``visual``'s own stem and layer1..layer3 modules (no copy).

    ``visual``: an open_clip ``ModifiedResNet`` (``clip_model.visual``) or an existing trunk
    (returned as is). Raises :class:`GeneratorError` for any other vision tower.
    """
    if isinstance(visual, Layer3Trunk):
        return visual
    if not isinstance(visual, ModifiedResNet):
        raise GeneratorError(
            f"the boundary stage needs a CLIP ResNet vision tower (open_clip ModifiedResNet), got "
            f"{type(visual).__name__}; set boundary.model to an RN* architecture such as RN50x64"
        )
    names = (*_STEM, "layer1", "layer2", "layer3")
    return Layer3Trunk(OrderedDict((name, getattr(visual, name)) for name in names))


def layer3_features(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Layer3 features (B, C, h // 16, w // 16) of normalised images (B, 3, h, w).

    ``visual``: a ``ModifiedResNet`` or a :class:`Layer3Trunk`; ``layer4``/``attnpool`` never run.
    Runs under the caller's grad/autocast context. Exact grid side for an input side ``s``: the
    stride-2 stem conv gives ``ceil(s / 2)``, then the stem, layer2 and layer3 2x2 average pools
    each halve it rounding down (``s = 16 m`` gives ``m``).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValidationError(f"images must be (B, 3, h, w), got {tuple(images.shape)}")
    return truncate_to_layer3(visual)(images)


def resize_for_boundary(
    image_rgb: np.ndarray, short_side: int, max_long_side: int, fidelity: str = "fast"
) -> tuple[torch.Tensor, BoundaryResize]:
    """Resize (bicubic, PIL) and CLIP-normalise an image for the boundary backbone.

    ``image_rgb``: (H, W, 3) uint8. The short side becomes ``short_side`` with the aspect kept; if
    the long side then exceeds ``max_long_side`` the image is instead scaled so its long side equals
    ``max_long_side``. ``fidelity`` says how the other side is made an integer (:func:`resized_size`).
    Returns a (1, 3, h, w) float32 tensor and the sizes.
    """
    _check_image(image_rgb)
    if short_side < 1 or max_long_side < 1:
        raise ValidationError(f"short_side and max_long_side must be >= 1, got {short_side}, {max_long_side}")
    height, width = image_rgb.shape[:2]
    new_height, new_width = resized_size(height, width, short_side, max_long_side, fidelity)
    if min(new_height, new_width) < _MIN_INPUT_SIDE:
        raise ValidationError(
            f"image {height}x{width} resizes to {new_height}x{new_width}, smaller than one 16-px feature "
            f"cell; raise boundary.short_side / boundary.max_long_side"
        )
    resized = Image.fromarray(image_rgb).resize((new_width, new_height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float32)[:, None, None]
    tensor = ((pixels - mean) / std).unsqueeze(0).contiguous()
    return tensor, BoundaryResize(height, width, new_height, new_width)


class BoundaryStage:
    """Layer3 features of one image clustered with k-means on the worker's device.

    Args:
        clip_model: an open_clip CLIP model whose ``.visual`` is a ``ModifiedResNet`` (or the
            ``ModifiedResNet`` itself). Only its layer3 trunk is kept; put it in eval mode here.
        config: :class:`BoundaryConfig` (resolution, k, iterations, tolerance, init).
        device: torch device of the trunk and of k-means.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (``torch.autocast`` for the backbone; k-means
            always runs on float32 features).
        fidelity: ``"release"``: the release's resize size, seeds and k-means arithmetic
            (:func:`resized_size`, :func:`~.kmeans.kmeans_release`); ``"fast"``: ours.
    """

    def __init__(self, clip_model: nn.Module, config: BoundaryConfig, *, device: str | torch.device = "cpu",
                 precision: str = "fp32", fidelity: str = "fast"):
        check_precision(precision)
        if fidelity not in ("release", "fast"):
            raise GeneratorError(f"fidelity must be 'release' or 'fast', got {fidelity!r}")
        self.fidelity = fidelity
        if config.init not in ("even", "semantic"):
            raise GeneratorError(f"boundary.init must be 'even' or 'semantic', got {config.init!r}")
        self.config = config
        self.device = torch.device(device)
        self.precision = precision
        self.trunk = truncate_to_layer3(getattr(clip_model, "visual", clip_model)).to(self.device).eval()
        # channels-last convolutions: oneDNN's and cuDNN's fast layout (bf16 on CPU: ~1.4x). Not for
        # ``release`` in fp32, whose features should come from the same kernels as the release's NCHW fp32
        # run; in bf16 / fp16 they cannot be the release's bits anyway.
        faithful_fp32 = fidelity == "release" and precision == "fp32"
        self.memory_format = torch.contiguous_format if faithful_fp32 else torch.channels_last
        to_memory_format(self.trunk, self.memory_format)

    def __call__(self, image_rgb: np.ndarray, activation_map: np.ndarray | None = None) -> BoundaryResult:
        """Cluster one (H, W, 3) uint8 image.

        ``activation_map``: (g_h, g_w) float covering the whole image (e.g. stage 1's class maps,
        maximum over the kept classes); required when ``config.init == "semantic"``, else ignored.
        It is resampled onto the feature grid like :func:`~.discovery.activation_mask` does.
        """
        images, resize = resize_for_boundary(image_rgb, self.config.short_side, self.config.max_long_side,
                                             self.fidelity)
        return self._cluster(self._features(images), resize, activation_map)

    def encode(self, image_rgb: np.ndarray) -> np.ndarray:
        """The backbone's part: (1, C, grid_height, grid_width) float32 layer3 features of one
        (H, W, 3) uint8 image, on the host. :meth:`cluster` does the rest."""
        return self.encode_batch([image_rgb])[0].cpu().numpy()

    def encode_batch(self, images_rgb: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """:meth:`encode` for several images: one forward pass per resized size (images that
        resize alike share one). B tensors (1, C, grid_height, grid_width) float32 on ``self.device``,
        in input order."""
        resized = [resize_for_boundary(image, self.config.short_side, self.config.max_long_side, self.fidelity)[0]
                   for image in images_rgb]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, tensor in enumerate(resized):
            groups.setdefault(tuple(tensor.shape[2:]), []).append(index)
        features: list[torch.Tensor | None] = [None] * len(resized)
        for indices in groups.values():
            batch = self._features(torch.cat([resized[i] for i in indices]))
            for row, index in enumerate(indices):
                features[index] = batch[row:row + 1]
        return features  # type: ignore[return-value]

    def cluster(self, features: np.ndarray | torch.Tensor, image_height: int, image_width: int,
                activation_map: np.ndarray | None = None) -> BoundaryResult:
        """K-means on :meth:`encode`'s features (host array, or a tensor from :meth:`encode_batch`)
        of an ``image_height`` x ``image_width`` image.

        ``stage.cluster(stage.encode(image), H, W, act)`` equals ``stage(image, act)`` exactly
        (same float32 features, same k-means on ``self.device``).
        """
        if isinstance(features, torch.Tensor):
            shape, ok = tuple(features.shape), features.dtype == torch.float32
        else:
            features = np.asarray(features)
            shape, ok = features.shape, features.dtype == np.float32
            features = torch.from_numpy(features)
        if len(shape) != 4 or shape[0] != 1 or not ok:
            raise ValidationError(f"expected (1, C, h, w) float32 layer3 features, got {features.dtype} {shape}")
        resized_height, resized_width = resized_size(image_height, image_width, self.config.short_side,
                                                     self.config.max_long_side, self.fidelity)
        resize = BoundaryResize(image_height, image_width, resized_height, resized_width)
        return self._cluster(features.to(self.device), resize, activation_map)

    def _cluster(self, features: torch.Tensor, resize: BoundaryResize,
                 activation_map: np.ndarray | None) -> BoundaryResult:
        """K-means of (1, C, h, w) float32 features on ``self.device``."""
        _, channels, grid_height, grid_width = features.shape
        vectors = features[0].permute(1, 2, 0).reshape(grid_height * grid_width, channels)
        seeds = self._init_indices(resize, grid_height, grid_width, activation_map)
        cluster = kmeans_release if self.fidelity == "release" else kmeans
        with torch.inference_mode():
            labels, centroids, iterations = cluster(
                vectors, self.config.num_clusters, self.config.max_iterations, self.config.tolerance, seeds
            )
        grid = labels.reshape(grid_height, grid_width).cpu().numpy().astype(np.int32)
        grid.setflags(write=False)
        return BoundaryResult(
            labels=grid,
            grid_height=grid_height,
            grid_width=grid_width,
            features_shape=tuple(int(s) for s in features.shape),
            iterations=iterations,
            num_clusters=int(centroids.shape[0]),
            resize=resize,
        )

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) float32 layer3 features of (B, 3, h, w) images, on ``self.device``, in
        ``self.memory_format`` (channels-last makes the (h*w, C) k-means view free)."""
        with torch.inference_mode(), autocast(self.device, self.precision):
            features = layer3_features(self.trunk, images.to(self.device).contiguous(memory_format=self.memory_format))
        if min(features.shape[2:]) < 1:
            raise ValidationError(f"layer3 feature grid is empty ({tuple(features.shape)}); use a larger short_side")
        return features.float()

    def _init_indices(self, resize: BoundaryResize, grid_height: int, grid_width: int,
                      activation_map: np.ndarray | None) -> torch.Tensor:
        cells = grid_height * grid_width
        if self.config.init == "even":
            even = release_init_indices if self.fidelity == "release" else even_init_indices
            return torch.from_numpy(even(cells, self.config.num_clusters))
        if activation_map is None:
            raise GeneratorError("boundary.init='semantic' needs an activation_map from stage 1; none was given")
        grid_map = class_map_to_grid(activation_map, resize.image_height, resize.image_width, grid_height, grid_width)
        return torch.from_numpy(semantic_init_indices(grid_map, self.config.num_clusters))


def resized_size(height: int, width: int, short_side: int, max_long_side: int,
                 fidelity: str = "fast") -> tuple[int, int]:
    """(new_height, new_width): short side = ``short_side``, long side capped at ``max_long_side``.

    ``fidelity="release"``: the other side is truncated, as torchvision's ``Resize(short_side,
    max_size=...)`` computes it (``int(short_side * long / short)``: 640x480 -> 2730x2048; over the
    cap, ``int(max_long_side * short_side / new_long)``). ``"fast"``: rounded (640x480 -> 2731x2048).
    """
    short, long = min(height, width), max(height, width)
    if fidelity == "release":
        new_short, new_long = short_side, int(short_side * long / short)
        if new_long > max_long_side:
            new_short, new_long = int(max_long_side * new_short / new_long), max_long_side
        new_short, new_long = max(1, new_short), max(1, new_long)
    else:
        new_short, new_long = short_side, max(1, round(long * short_side / short))
        if new_long > max_long_side:
            new_short, new_long = max(1, round(short * max_long_side / long)), max_long_side
    return (new_short, new_long) if height <= width else (new_long, new_short)


def _check_image(image_rgb: np.ndarray) -> None:
    if not isinstance(image_rgb, np.ndarray) or image_rgb.dtype != np.uint8:
        kind = image_rgb.dtype if isinstance(image_rgb, np.ndarray) else type(image_rgb).__name__
        raise ValidationError(f"image_rgb must be a uint8 numpy array, got {kind}")
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or min(image_rgb.shape[:2]) < 1:
        raise ValidationError(f"image_rgb must be (H, W, 3), got {image_rgb.shape}")
