"""Build Segment Anything models: the official architectures (random or from a checkpoint read with
``weights_only=True``) and a tiny model of the same classes for tests. torch and segment_anything
are imported inside the functions, so importing this module costs nothing."""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import GeneratorError

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

# A SAM of the real classes, small enough for unit tests (~0.1 M parameters, 128 px input).
# Constraints of segment_anything: prompt_embed_dim == encoder out_chans == decoder
# transformer_dim; (transformer_dim / 2) % decoder_num_heads == 0 (attention downsample 2);
# transformer_dim divisible by 8 (mask upscaling); (img_size / patch_size) % window_size == 0.
TINY_SAM = {
    "img_size": 128,
    "patch_size": 16,
    "encoder_embed_dim": 32,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": (1,),
    "window_size": 4,
    "prompt_embed_dim": 32,
    "mask_in_chans": 16,
    "decoder_depth": 2,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
}
SAM_MODEL_TYPES = ("tiny", "vit_b", "vit_h", "vit_l")
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def build_sam(model_type: str, checkpoint: Path | None, device: str = "cpu") -> "Sam":
    """SAM of ``model_type`` (``vit_h``/``vit_l``/``vit_b``, or ``tiny`` for tests), eval mode, on ``device``.

    Without ``checkpoint`` the weights are random. A checkpoint must be a plain state dict
    (as the official ``sam_vit_*.pth`` files are); it is read with ``weights_only=True``
    (no arbitrary pickled objects) and must match the architecture exactly.
    """
    if model_type not in SAM_MODEL_TYPES:
        raise GeneratorError(f"unknown SAM model type {model_type!r}; expected one of {list(SAM_MODEL_TYPES)}")
    if model_type == "tiny":
        sam = _build_tiny_sam()
    else:
        from segment_anything import sam_model_registry

        sam = sam_model_registry[model_type](checkpoint=None)
    if checkpoint is not None:
        state = _load_sam_state_dict(Path(checkpoint), model_type, sam)
        try:
            sam.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # same keys, different shapes
            raise GeneratorError(
                f"SAM checkpoint {checkpoint} does not fit the {model_type} architecture: {exc}"
            ) from exc
    return sam.eval().to(device)


def _build_tiny_sam() -> "Sam":
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    t = TINY_SAM
    grid = t["img_size"] // t["patch_size"]
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=t["img_size"], patch_size=t["patch_size"], embed_dim=t["encoder_embed_dim"],
            depth=t["encoder_depth"], num_heads=t["encoder_num_heads"], mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=t["encoder_global_attn_indexes"], window_size=t["window_size"],
            out_chans=t["prompt_embed_dim"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=t["prompt_embed_dim"], image_embedding_size=(grid, grid),
            input_image_size=(t["img_size"], t["img_size"]), mask_in_chans=t["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=t["decoder_depth"], embedding_dim=t["prompt_embed_dim"],
                mlp_dim=t["decoder_mlp_dim"], num_heads=t["decoder_num_heads"],
            ),
            transformer_dim=t["prompt_embed_dim"], iou_head_depth=3,
            iou_head_hidden_dim=t["iou_head_hidden_dim"],
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )


def _load_sam_state_dict(path: Path, model_type: str, sam: "Sam") -> Mapping:
    from .checkpoints import check_state_keys, read_state_dict

    what = f"SAM {model_type} checkpoint"
    state = read_state_dict(path, what, f"the official sam_{model_type} checkpoint")
    check_state_keys(state, sam, path, what, "Check generator.sam.model_type.")
    return state
