"""Stage 4 of the Zip method on SAM 2.1 (``sam.backend: sam2``), and the choice of stage 4's refiner.

``Sam2Refiner`` has ``SamRefiner``'s interface: ``embed_batch`` runs the image encoder on several
images at once, ``set_embedding`` + ``decode_boxes`` put all of an image's prompt boxes through the
mask decoder in one call (halved for good on out-of-memory), and the answer is a ``RefineResult``
(chosen mask, SAM 2.1's predicted IoU, stability score, multimask choice).

SAM 2.1's image "embedding" is three maps: the stride-16 image embedding (no-memory embedding
added, as ``SAM2ImagePredictor`` does for a still image) and the two high-resolution maps (strides
4 and 8, already projected by the decoder's ``conv_s0`` / ``conv_s1``). One embedding is these three
flattened and concatenated into a ``(1, L)`` tensor, so a feature-cache entry holds all of them as
one array; ``set_embedding`` splits it back by the model's shapes.

Images are resized to the model's square input (``SAM2Transforms``: squashed, not letterboxed, as
SAM 2 does), boxes scaled into that frame, masks upsampled back to the image. torch and sam2 are
imported inside the functions.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from ...errors import GeneratorError, ValidationError
from ...models.oom import AdaptiveBatcher
from .config import SamConfig
from .refine import MAX_BOXES_PER_CALL, RefineResult, _check_boxes, _check_image, _stability_score, host_to_tensor

if TYPE_CHECKING:
    import torch
    from sam2.modeling.sam2_base import SAM2Base

MASK_THRESHOLD = 0.0  # SAM 2's logit threshold for a mask pixel
BOX_CORNER_LABELS = (2, 3)  # SAM 2's prompt-encoder labels of a box's top-left and bottom-right corners


class Sam2Refiner:
    """Box-prompted SAM 2.1 refinement, one embedding per image.

    Args:
        model: a ``SAM2Base`` in eval mode (see ``labelgen.models.sam2.build_sam2``); moved to ``device``.
        config: ``SamConfig``; ``multimask_output`` is read here.
        device: torch device string, e.g. ``"cpu"`` or ``"cuda"``.
        precision: ``"fp32"``, or ``"bf16"``/``"fp16"`` for ``torch.autocast`` (outputs are float32 either way).
    """

    def __init__(self, model: "SAM2Base", config: SamConfig, device: str = "cpu", precision: str = "fp32"):
        from sam2.utils.transforms import SAM2Transforms

        from ...models.loading import check_precision
        from ...models.sam2 import feature_sizes

        check_precision(precision)
        self.config = config
        self.device = device
        self.precision = precision
        self.model = model.eval().to(device)
        self.transforms = SAM2Transforms(resolution=model.image_size, mask_threshold=MASK_THRESHOLD)
        self.shapes = _embedding_shapes(model, feature_sizes(model))  # (C, h, w) per map, image embedding last
        self.box_batcher = AdaptiveBatcher(MAX_BOXES_PER_CALL)
        self._maps: list[torch.Tensor] | None = None  # the embedded image's maps, finest first
        self._frame: tuple[int, int] | None = None  # its (height, width)

    # -- embeddings -------------------------------------------------------------------------
    def refine(self, image_rgb: np.ndarray, boxes_xyxy: np.ndarray) -> RefineResult:
        """Masks for ``boxes_xyxy`` (``(N, 4)`` float32 XYXY absolute pixels) on ``image_rgb``
        (``(H, W, 3)`` uint8 RGB). ``N == 0`` runs no model."""
        height, width = _check_image(image_rgb)
        boxes = _check_boxes(boxes_xyxy)
        if len(boxes) == 0:
            return RefineResult.empty(height, width)
        self.embed_image(image_rgb)
        return self.decode_boxes(boxes)

    def embed_image(self, image_rgb: np.ndarray) -> None:
        """Run the image encoder once; ``decode_boxes`` then prompts this embedding."""
        (embedding,) = self.embed_batch([image_rgb])
        self.set_embedding(embedding, *_check_image(image_rgb))

    def image_embedding(self, image_rgb: np.ndarray) -> np.ndarray:
        """Embed ``image_rgb`` (as :meth:`embed_image`) and return the packed ``(1, L)`` embedding on the
        host (bfloat16 as its uint16 bits); :meth:`set_embedding` takes it back."""
        from .refine import tensor_to_host

        (embedding,) = self.embed_batch([image_rgb])
        self.set_embedding(embedding, *_check_image(image_rgb))
        return tensor_to_host(embedding)

    def embed_batch(self, images_rgb: "list[np.ndarray]") -> "list[torch.Tensor]":
        """Packed embeddings of several images in one image-encoder call: B tensors ``(1, L)`` on the
        device, L = the sum of C*h*w over the three maps. Leaves the refiner without an image."""
        import torch

        self._maps, self._frame = None, None
        if not len(images_rgb):
            return []
        with self._inference():
            pixels = torch.stack([self.transforms(np.ascontiguousarray(_checked(image))) for image in images_rgb])
            maps = self._encode(pixels.to(self.device))
            packed = torch.cat([m.flatten(1) for m in maps], dim=1)
        return list(packed.split(1))

    def _encode(self, pixels: "torch.Tensor") -> "list[torch.Tensor]":
        """``(B, 3, S, S)`` normalised pixels -> the maps the SAM heads read, ``(B, C, h, w)`` each,
        finest first (what ``SAM2ImagePredictor.set_image`` keeps, in NCHW)."""
        model = self.model
        levels = model.forward_image(pixels)["backbone_fpn"][-model.num_feature_levels:]
        image_embed = levels[-1]
        if model.directly_add_no_mem_embed:
            image_embed = image_embed + model.no_mem_embed.view(1, -1, 1, 1)
        return [*levels[:-1], image_embed]

    def set_embedding(self, embedding: "np.ndarray | torch.Tensor", image_height: int, image_width: int) -> None:
        """Make ``embedding`` (from :meth:`embed_batch` or :meth:`image_embedding`, or the feature cache)
        of an ``image_height`` x ``image_width`` image the one :meth:`decode_boxes` prompts."""
        import torch

        expected = sum(c * h * w for c, h, w in self.shapes)
        shape = tuple(embedding.shape)
        if shape != (1, expected):
            raise ValidationError(f"expected a packed (1, {expected}) SAM 2.1 embedding for this model, got shape"
                                  f" {shape} (an entry of another model? check the feature cache key)")
        if image_height < 1 or image_width < 1:
            raise ValidationError(f"image size must be positive, got {image_height}x{image_width}")
        with torch.inference_mode():
            tensor = embedding if isinstance(embedding, torch.Tensor) else host_to_tensor(np.asarray(embedding))
            flat = tensor.to(self.device)[0].split([c * h * w for c, h, w in self.shapes])
            self._maps = [part.reshape(1, *shape) for part, shape in zip(flat, self.shapes)]
        self._frame = (int(image_height), int(image_width))

    # -- prompts ----------------------------------------------------------------------------
    def decode_boxes(self, boxes_xyxy: np.ndarray) -> RefineResult:
        """All boxes through the mask decoder in one batched call, on the embedded image (in chunks
        only after a call ran out of memory: see ``box_batcher``)."""
        if self._maps is None or self._frame is None:
            raise GeneratorError("decode_boxes needs an image embedding; call embed_image(image_rgb) first")
        height, width = self._frame
        boxes = _check_boxes(boxes_xyxy)
        if len(boxes) == 0:
            return RefineResult.empty(height, width)
        parts = self.box_batcher.run(lambda chunk: self._decode(np.stack(chunk)).split(), list(boxes))
        return RefineResult.concatenate(parts, height, width)

    def _decode(self, boxes: np.ndarray) -> RefineResult:
        """``(N, 4)`` XYXY image-pixel boxes -> one mask each: SAM 2.1's prompt encoder (a box is two
        corner points) and mask decoder, logits upsampled to the image frame."""
        import torch

        model, maps = self.model, self._maps
        with self._inference():
            corners = self.transforms.transform_boxes(
                torch.as_tensor(boxes, dtype=torch.float32, device=self.device), normalize=True, orig_hw=self._frame)
            labels = torch.tensor([BOX_CORNER_LABELS], dtype=torch.int, device=self.device).repeat(len(boxes), 1)
            sparse, dense = model.sam_prompt_encoder(points=(corners, labels), boxes=None, masks=None)
            low_res, iou_predictions, _, _ = model.sam_mask_decoder(
                image_embeddings=maps[-1], image_pe=model.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=self.config.multimask_output, repeat_image=len(boxes) > 1,
                high_res_features=maps[:-1])
            logits = self.transforms.postprocess_masks(low_res.float(), self._frame)
            return _select_masks(logits.float(), iou_predictions.float())

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        import torch

        from ...models.loading import autocast

        with torch.inference_mode(), autocast(self.device, self.precision):
            yield


def _embedding_shapes(model: "SAM2Base", sizes: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``(channels, height, width)`` of each map of a packed embedding, finest first."""
    decoder = model.sam_mask_decoder
    channels = [decoder.conv_s0.out_channels, decoder.conv_s1.out_channels] if len(sizes) == 3 else []
    channels.append(int(model.hidden_dim))
    return [(c, h, w) for c, (h, w) in zip(channels, sizes)]


def _select_masks(logits: "torch.Tensor", iou_predictions: "torch.Tensor") -> RefineResult:
    """``(N, C, H, W)`` logits and ``(N, C)`` predicted IoUs -> per box the output with the highest
    predicted IoU (the first on ties; C == 1 without multimask output)."""
    import torch

    rows = torch.arange(logits.shape[0], device=logits.device)
    choice = iou_predictions.argmax(dim=1)
    chosen = logits[rows, choice]
    return RefineResult(
        masks=(chosen > MASK_THRESHOLD).cpu().numpy(),
        predicted_iou=iou_predictions[rows, choice].cpu().numpy().astype(np.float32),
        stability_score=_stability_score(chosen, MASK_THRESHOLD).cpu().numpy().astype(np.float32),
        mask_choice=choice.cpu().numpy().astype(np.int64),
    )


def _checked(image_rgb: np.ndarray) -> np.ndarray:
    _check_image(image_rgb)
    return image_rgb


# -- stage 4 for either backend ------------------------------------------------------------------
def refiner_weights_check(sam: SamConfig, *, allow_download: bool) -> Callable[[], Any]:
    """A ``check_all`` entry: resolve stage 4's checkpoint for ``sam.backend`` (nothing is loaded). A
    missing ``sam2`` package on backend sam2 is a ``GeneratorError`` at once."""
    import functools

    from ...models.weights import resolve_sam2_checkpoint, resolve_sam_checkpoint

    if sam.backend == "sam1":
        return functools.partial(resolve_sam_checkpoint, sam.model_type, sam.checkpoint, allow_download=allow_download)
    _require_sam2()
    if sam.model_type == "tiny":
        raise GeneratorError("generator.sam.model_type: 'tiny' is SAM 2.1's test model, random weights only; set"
                             " generator.random_weights: true or pick a sam2.1_hiera_* model")
    return functools.partial(resolve_sam2_checkpoint, sam.model_type, sam.checkpoint, allow_download=allow_download)


def build_refiner(sam: SamConfig, *, random_weights: bool, allow_download: bool, device: Any,
                  precision: str) -> tuple[Any, dict[str, Any]]:
    """Stage 4's refiner for ``sam.backend`` (``SamRefiner`` or ``Sam2Refiner``) and its provenance facts."""
    common = {"random_weights": random_weights, "allow_download": allow_download, "device": device}
    if sam.backend == "sam1":
        from ...models.loading import load_sam
        from .refine import SamRefiner

        model, facts = load_sam(sam.model_type, sam.checkpoint, **common)
        return SamRefiner(model, sam, device=str(device), precision=precision), facts
    from ...models.sam2 import load_sam2

    _require_sam2()
    model, facts = load_sam2(sam.model_type, sam.checkpoint, **common)
    return Sam2Refiner(model, sam, device=str(device), precision=precision), {"backend": "sam2", **facts}


def _require_sam2() -> None:
    import importlib.util

    if importlib.util.find_spec("sam2") is None:
        raise GeneratorError("generator.sam.backend is sam2 but the sam2 package is not installed;"
                             " pip install 'labelgen[sam2]' (or set generator.sam.backend: sam1)")
