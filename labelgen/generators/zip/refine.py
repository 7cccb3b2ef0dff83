"""Stage 4 of the Zip method: box-prompted SAM refinement, and the Zip confidence.

One SAM image embedding per image; all prompt boxes of that image go through the mask
decoder in one batched call. Per box we keep one mask (with ``multimask_output`` the one
with the highest predicted IoU), SAM's predicted IoU and its stability score.

torch and segment_anything are imported inside the functions that need them, so
``zip_confidence`` (plain numpy) can be used without them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ...errors import GeneratorError, ValidationError
from ...models.oom import AdaptiveBatcher
from ...structures.masks import column_major_masks
from .config import SamConfig

if TYPE_CHECKING:
    import torch
    from segment_anything.modeling import Sam

STABILITY_OFFSET = 1.0  # logit offset of SAM's stability score
MAX_BOXES_PER_CALL = 4096  # prompt boxes per mask-decoder call until one runs out of memory


@dataclass(frozen=True, eq=False)
class RefineResult:
    """SAM's answer for ``N`` prompt boxes of one image.

    Attributes:
        masks: ``(N, H, W)`` bool, image pixel frame; stored column by column (``column_major_masks``).
        predicted_iou: ``(N,)`` float32, SAM's IoU head for the chosen mask (not clipped).
        stability_score: ``(N,)`` float32 in [0, 1]; 0 for an empty mask.
        mask_choice: ``(N,)`` int64, index of the chosen multimask output (0 when single).
    """

    masks: np.ndarray
    predicted_iou: np.ndarray
    stability_score: np.ndarray
    mask_choice: np.ndarray

    @classmethod
    def empty(cls, height: int, width: int) -> "RefineResult":
        return cls(
            masks=np.zeros((0, height, width), dtype=bool),
            predicted_iou=np.zeros((0,), dtype=np.float32),
            stability_score=np.zeros((0,), dtype=np.float32),
            mask_choice=np.zeros((0,), dtype=np.int64),
        )

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def split(self) -> list["RefineResult"]:
        """One single-box ``RefineResult`` per box."""
        return [RefineResult(self.masks[i:i + 1], self.predicted_iou[i:i + 1], self.stability_score[i:i + 1],
                             self.mask_choice[i:i + 1]) for i in range(len(self))]

    @classmethod
    def concatenate(cls, parts: "list[RefineResult]", height: int, width: int) -> "RefineResult":
        """The boxes of ``parts`` in order, as one result."""
        if not parts:
            return cls.empty(height, width)
        # concatenated column by column, so the RLE encoder reads the stack without another copy
        return cls(masks=column_major_masks(np.concatenate([p.masks.transpose(0, 2, 1) for p in parts])),
                   predicted_iou=np.concatenate([p.predicted_iou for p in parts]),
                   stability_score=np.concatenate([p.stability_score for p in parts]),
                   mask_choice=np.concatenate([p.mask_choice for p in parts]))


def zip_confidence(clip_class_prob: np.ndarray, sam_predicted_iou: np.ndarray) -> np.ndarray:
    """Zip's instance confidence ``sqrt(clip_class_prob * sam_predicted_iou)``, float32.

    Both inputs are clipped to [0, 1] first (SAM's IoU head can leave that range) and NaN
    counts as 0, so the result is always in [0, 1]. Inputs broadcast like numpy arrays.
    """
    prob = _clip_unit(clip_class_prob)
    iou = _clip_unit(sam_predicted_iou)
    return np.sqrt(prob * iou).astype(np.float32)


def _clip_unit(values: np.ndarray) -> np.ndarray:
    return np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)


class SamRefiner:
    """Box-prompted SAM refinement, one image embedding per image.

    Args:
        sam: a SAM in eval mode (see ``build_sam``); moved to ``device``.
        config: ``SamConfig``; ``multimask_output`` is read here.
        device: torch device string, e.g. ``"cpu"`` or ``"cuda"``.
        precision: ``"fp32"``, or ``"bf16"``/``"fp16"`` for ``torch.autocast`` (outputs are float32 either way).
    """

    def __init__(self, sam: "Sam", config: SamConfig, device: str = "cpu", precision: str = "fp32"):
        from segment_anything import SamPredictor

        from ...models.loading import check_precision

        check_precision(precision)
        self.config = config
        self.device = device
        self.precision = precision
        self.predictor = SamPredictor(sam.eval().to(device))
        attention = getattr(config, "attention", "reference")
        if attention != "reference":
            from ...models.sam_fast import use_fast_attention

            use_fast_attention(self.predictor.model.image_encoder, kernel=attention)
        # boxes per decoder call: all of an image's at once, halved for good on out-of-memory
        self.box_batcher = AdaptiveBatcher(MAX_BOXES_PER_CALL)

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
        _check_image(image_rgb)
        with self._inference():
            self.predictor.set_image(np.ascontiguousarray(image_rgb), image_format="RGB")

    def image_embedding(self, image_rgb: np.ndarray) -> np.ndarray:
        """Embed ``image_rgb`` (as :meth:`embed_image`) and return SAM's image embedding on the
        host: ``(1, C, h, w)`` in the encoder's output dtype; a bfloat16 embedding comes as its
        uint16 bit pattern (numpy has no bfloat16). :meth:`set_embedding` takes it back."""
        self.embed_image(image_rgb)
        return tensor_to_host(self.predictor.features)

    def embed_batch(self, images_rgb: "list[np.ndarray]") -> "list[torch.Tensor]":
        """SAM image embeddings of several images in one image-encoder call: B tensors
        ``(1, C, h, w)`` on the device, each as :meth:`embed_image` would compute it (resized so
        the long side is the encoder's input size, normalised, zero-padded to a square).
        :meth:`set_embedding` takes one back. Leaves the predictor without an image."""
        import torch

        if not len(images_rgb):
            return []
        predictor = self.predictor
        predictor.reset_image()
        with self._inference():
            inputs = []
            for image in images_rgb:
                _check_image(image)
                resized = predictor.transform.apply_image(np.ascontiguousarray(image))
                pixels = torch.as_tensor(resized, device=predictor.device).permute(2, 0, 1).contiguous()[None]
                inputs.append(predictor.model.preprocess(pixels))
            embeddings = _encode_images(predictor.model.image_encoder, torch.cat(inputs))
        return list(embeddings.split(1))

    def set_embedding(self, embedding: "np.ndarray | torch.Tensor", image_height: int, image_width: int) -> None:
        """Put the predictor in the state :meth:`embed_image` leaves for an ``image_height`` x
        ``image_width`` image whose embedding is ``embedding`` (from :meth:`image_embedding` or
        :meth:`embed_batch`), without running the image encoder. ``decode_boxes`` then gives the
        same answer."""
        import torch

        shape = tuple(embedding.shape)
        if len(shape) != 4 or shape[0] != 1:
            raise ValidationError(f"expected a (1, C, h, w) SAM image embedding, got shape {shape}")
        if image_height < 1 or image_width < 1:
            raise ValidationError(f"image size must be positive, got {image_height}x{image_width}")
        predictor = self.predictor
        predictor.reset_image()
        predictor.original_size = (int(image_height), int(image_width))
        predictor.input_size = predictor.transform.get_preprocess_shape(
            image_height, image_width, predictor.transform.target_length)
        with torch.inference_mode():
            tensor = embedding if isinstance(embedding, torch.Tensor) else host_to_tensor(np.asarray(embedding))
            predictor.features = tensor.to(predictor.device)
        predictor.is_image_set = True

    def decode_boxes(self, boxes_xyxy: np.ndarray) -> RefineResult:
        """All boxes through the mask decoder in one batched call, on the embedded image (in chunks
        only after a call ran out of memory: see ``box_batcher``)."""
        if not self.predictor.is_image_set:
            raise GeneratorError("decode_boxes needs an image embedding; call embed_image(image_rgb) first")
        height, width = self.predictor.original_size
        boxes = _check_boxes(boxes_xyxy)
        if len(boxes) == 0:
            return RefineResult.empty(height, width)
        parts = self.box_batcher.run(lambda chunk: self._decode(np.stack(chunk)).split(), list(boxes))
        return RefineResult.concatenate(parts, height, width)

    def _decode(self, boxes: np.ndarray) -> RefineResult:
        import torch

        height, width = self.predictor.original_size
        with self._inference():
            boxes_t = torch.as_tensor(boxes, dtype=torch.float32, device=self.predictor.device)
            logits, iou_predictions, _ = self.predictor.predict_torch(
                point_coords=None,
                point_labels=None,
                boxes=self.predictor.transform.apply_boxes_torch(boxes_t, (height, width)),
                multimask_output=self.config.multimask_output,
                return_logits=True,
            )
            return self._select_masks(logits.float(), iou_predictions.float())

    def _select_masks(self, logits: "torch.Tensor", iou_predictions: "torch.Tensor") -> RefineResult:
        """(N, C, H, W) logits and (N, C) predicted IoUs -> one mask per box (highest predicted IoU)."""
        import torch

        rows = torch.arange(logits.shape[0], device=logits.device)
        choice = iou_predictions.argmax(dim=1)  # first maximum on ties
        chosen = logits[rows, choice]
        threshold = float(self.predictor.model.mask_threshold)
        return RefineResult(
            masks=column_major_masks((chosen > threshold).transpose(1, 2).contiguous().cpu().numpy()),
            predicted_iou=iou_predictions[rows, choice].cpu().numpy().astype(np.float32),
            stability_score=_stability_score(chosen, threshold).cpu().numpy().astype(np.float32),
            mask_choice=choice.cpu().numpy().astype(np.int64),
        )

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        import torch

        from ...models.loading import autocast

        with torch.inference_mode(), autocast(self.device, self.precision):
            yield


def _encode_images(encoder: "torch.nn.Module", images: "torch.Tensor") -> "torch.Tensor":
    """SAM's ``ImageEncoderViT`` on a batch, its transformer batched and its neck run per image.

    oneDNN can pick another kernel for a batched 3x3 convolution with few channels (the tiny test
    SAM's neck), which changes results in the last bits; the neck is a negligible share of the
    encoder's work, so running it per image keeps a batched embedding bit-identical to a single one.
    """
    import torch

    if not all(hasattr(encoder, name) for name in ("patch_embed", "pos_embed", "blocks", "neck")):
        return encoder(images)  # not segment_anything's ImageEncoderViT layout: run it whole
    tokens = encoder.patch_embed(images)
    if encoder.pos_embed is not None:
        tokens = tokens + encoder.pos_embed
    for block in encoder.blocks:
        tokens = block(tokens)
    return torch.cat([encoder.neck(one) for one in tokens.permute(0, 3, 1, 2).split(1)])


def tensor_to_host(tensor: "torch.Tensor") -> np.ndarray:
    """Host copy of a tensor; bfloat16 as its uint16 bit pattern (lossless; numpy has no bfloat16)."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def host_to_tensor(array: np.ndarray) -> "torch.Tensor":
    """Inverse of :func:`tensor_to_host`: uint16 is read back as bfloat16 bits."""
    import torch

    if array.dtype == np.uint16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _stability_score(logits: "torch.Tensor", threshold: float) -> "torch.Tensor":
    """IoU of the masks at ``threshold + 1`` and ``threshold - 1`` (the first lies inside the
    second); 0 where both are empty. int64 sums: no overflow on large images."""
    import torch

    inner = (logits > threshold + STABILITY_OFFSET).sum(dim=(-2, -1))
    outer = (logits > threshold - STABILITY_OFFSET).sum(dim=(-2, -1))
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.zeros_like(inner, dtype=torch.float32))


def _check_image(image_rgb: np.ndarray) -> tuple[int, int]:
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise ValidationError(f"image_rgb must be (H, W, 3) uint8; got shape {image.shape}, dtype {image.dtype}")
    return int(image.shape[0]), int(image.shape[1])


def _check_boxes(boxes_xyxy: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes_xyxy, dtype=np.float32)
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValidationError(f"boxes_xyxy must be (N, 4) XYXY pixels; got shape {boxes.shape}")
    if not np.all(np.isfinite(boxes)):
        raise ValidationError("boxes_xyxy must be finite; got NaN or inf")
    return boxes
