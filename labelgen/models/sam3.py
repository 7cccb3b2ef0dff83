"""Build SAM 3's image model ("Segment Anything with Concepts", the ``sam3`` package): the official
architecture or a tiny model of the same classes, random weights or a local checkpoint.

sam3's own ``build_sam3_image_model`` hard-codes every dimension, downloads ``facebook/sam3``
from the Hugging Face hub when no checkpoint is given, and allocates two caches on ``cuda`` while
it builds (``PositionEmbeddingSine(precompute_resolution=...)`` and the decoder's box-bias
coordinates), so it cannot run on a CPU-only machine. :func:`build_sam3_image` constructs the same
classes with the same arguments from a :class:`Sam3Spec` (``SAM3_IMAGE`` is the official one:
its ``state_dict`` keys and shapes are those of the detector in ``sam3.pt``) and leaves both
caches to be filled lazily on the model's own device, which gives the same values.

Checkpoints are local files only (the weights are gated on Hugging Face) read with
``torch.load(weights_only=True)``; :func:`load_sam3_checkpoint` takes the ``detector.*`` part of
the official file (the video tracker's ``tracker.*`` part is not used by the image model).

torch and sam3 are imported inside the functions, so importing this module costs nothing.
"""
from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import GeneratorError, WeightsNotFoundError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SAM3_MODELS = ("sam3", "tiny")
SAM3_PIXEL_MEAN = (0.5, 0.5, 0.5)  # sam3's Sam3Processor: x / 255, then (x - 0.5) / 0.5
SAM3_PIXEL_STD = (0.5, 0.5, 0.5)
BPE_VOCAB = "bpe_simple_vocab_16e6.txt.gz"  # CLIP's byte-pair vocabulary (49408 tokens)


@dataclass(frozen=True)
class Sam3Spec:
    """Every size of a SAM 3 image model. ``SAM3_IMAGE`` holds the official values
    (``sam3.model_builder``); ``TINY_SAM3`` is a model of the same classes for tests.

    Constraints of sam3: ``image_size % patch_size == 0``; the patch grid and the pre-training
    grid (``pretrain_image_size / patch_size``) are multiples of ``window_size``; ``d_model`` is
    divisible by 8 (GroupNorm) and by the head counts; ``text_width`` by ``text_heads``.
    """

    image_size: int  # square input side, pixels (the image is resized to it, not padded)
    patch_size: int
    vit_dim: int
    vit_depth: int
    vit_heads: int
    vit_mlp_ratio: float
    vit_global_blocks: tuple[int, ...]  # the ViT blocks with global attention; the others use windows
    window_size: int
    pretrain_image_size: int  # the grid of the absolute position embedding (tiled to the input grid)
    d_model: int  # width of the neck, the fusion encoder, the decoder and the heads
    heads: int  # attention heads of the fusion encoder, decoder, geometry encoder and mask head
    ffn_dim: int
    encoder_layers: int
    decoder_layers: int
    num_queries: int  # object queries: at most this many instances per prompt
    geometry_layers: int
    scoring_mlp_dim: int
    text_width: int
    text_heads: int
    text_layers: int
    text_context_length: int = 32
    vocab_size: int = 49408


SAM3_IMAGE = Sam3Spec(
    image_size=1008, patch_size=14, vit_dim=1024, vit_depth=32, vit_heads=16, vit_mlp_ratio=4.625,
    vit_global_blocks=(7, 15, 23, 31), window_size=24, pretrain_image_size=336, d_model=256, heads=8,
    ffn_dim=2048, encoder_layers=6, decoder_layers=6, num_queries=200, geometry_layers=3,
    scoring_mlp_dim=2048, text_width=1024, text_heads=16, text_layers=24,
)
# ~1.9 M parameters (1.6 M of them the 49408-token embedding), 112 px input, 32 x 32 masks.
TINY_SAM3 = Sam3Spec(
    image_size=112, patch_size=14, vit_dim=32, vit_depth=2, vit_heads=2, vit_mlp_ratio=4.0,
    vit_global_blocks=(1,), window_size=4, pretrain_image_size=56, d_model=32, heads=2,
    ffn_dim=64, encoder_layers=1, decoder_layers=1, num_queries=16, geometry_layers=1,
    scoring_mlp_dim=64, text_width=32, text_heads=2, text_layers=1,
)
SPECS = {"sam3": SAM3_IMAGE, "tiny": TINY_SAM3}


def import_sam3() -> Any:
    """``import sam3`` without the warnings its video modules print on a machine without CUDA
    (``@torch.autocast(device_type="cuda")`` decorators evaluated at import time); a
    ``GeneratorError`` naming the ``sam3`` extra when it is not installed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
        try:
            import sam3
        except ModuleNotFoundError as exc:
            if exc.name != "sam3":  # torch itself missing: the CLI names the `models` extra
                raise
            raise GeneratorError(
                "the sam3 generator needs the `sam3` package (Meta's SAM 3, SAM License): pip install"
                " \"labelgen[sam3]\", or -e \".[sam3]\" in a checkout"
            ) from exc

    return sam3


def bpe_vocab_path() -> Path:
    """CLIP's BPE vocabulary file for sam3's tokenizer.

    sam3 0.1.4 looks for it in ``site-packages/assets/`` (outside its own package), where its
    wheel does not put it; the same CLIP vocabulary ships inside open_clip (a dependency of the
    ``models`` extra). The first of the two that exists is used.
    """
    sam3 = import_sam3()
    candidates = [Path(sam3.__file__).resolve().parent.parent / "assets" / BPE_VOCAB]
    try:
        import open_clip

        candidates.append(Path(open_clip.__file__).resolve().parent / BPE_VOCAB)
    except ImportError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise WeightsNotFoundError(
        f"SAM 3's tokenizer needs CLIP's {BPE_VOCAB}; looked at {[str(p) for p in candidates]}."
        " Install the `models` extra (open_clip ships the file) or copy it to the first path."
    )


def build_sam3_image(spec: Sam3Spec, device: "str | torch.device" = "cpu") -> Any:
    """A ``sam3.model.sam3_image.Sam3Image`` of ``spec`` with random weights, eval mode, on ``device``.

    The modules and their arguments are those of ``sam3.model_builder.build_sam3_image_model``
    (segmentation head on, no instance-interactivity tracker); the dimensions come from ``spec``.
    The weights are torch's default initialisation: seed torch before calling for a repeatable model.
    """
    import_sam3()
    from sam3.model.model_misc import TransformerWrapper
    from sam3.model.sam3_image import Sam3Image
    from sam3.model.vl_combiner import SAM3VLBackbone

    backbone = SAM3VLBackbone(visual=_vision_neck(spec), text=_text_encoder(spec), scalp=1)
    transformer = TransformerWrapper(encoder=_fusion_encoder(spec), decoder=_decoder(spec), d_model=spec.d_model)
    model = Sam3Image(
        backbone=backbone, transformer=transformer, input_geometry_encoder=_geometry_encoder(spec),
        segmentation_head=_segmentation_head(spec), num_feature_levels=1, o2m_mask_predict=True,
        dot_prod_scoring=_scoring(spec), use_instance_query=False, multimask_output=True,
        inst_interactive_predictor=None, matcher=None,
    )
    _pin_memory_only_for_cuda(model.geometry_encoder)
    return model.eval().to(device)


def _pin_memory_only_for_cuda(geometry_encoder: Any) -> None:
    """Make the geometry encoder's box encoding run without CUDA.

    ``SequenceGeometryEncoder._encode_boxes`` stages a 4-value scale tensor in pinned memory
    before moving it to the boxes' device; pinning needs a CUDA driver, so on a machine without
    one every forward fails (even with no box prompt: the empty box set is encoded too). Pinning
    only speeds up host-to-GPU copies; for boxes that are not on a CUDA device the call is made a
    no-op, which leaves every value unchanged.
    """
    encode_boxes = geometry_encoder._encode_boxes

    def encode_boxes_without_pinning(boxes: Any, *args: Any, **kwargs: Any) -> Any:
        if boxes.device.type == "cuda":
            return encode_boxes(boxes, *args, **kwargs)
        with _no_pin_memory_mode()():
            return encode_boxes(boxes, *args, **kwargs)

    geometry_encoder._encode_boxes = encode_boxes_without_pinning


@functools.lru_cache(maxsize=None)
def _no_pin_memory_mode() -> type:
    """A ``TorchFunctionMode`` in which ``Tensor.pin_memory()`` returns the tensor itself."""
    import torch
    from torch.overrides import TorchFunctionMode

    pin_memory = torch.Tensor.pin_memory

    class NoPinMemory(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            if func is pin_memory:
                return args[0]
            return func(*args, **(kwargs or {}))

    return NoPinMemory


def _attention(spec: Sam3Spec, *, dropout: float = 0.1, batch_first: bool | None = None) -> Any:
    from sam3.model.model_misc import MultiheadAttentionWrapper

    kwargs = {} if batch_first is None else {"batch_first": batch_first}
    return MultiheadAttentionWrapper(num_heads=spec.heads, dropout=dropout, embed_dim=spec.d_model, **kwargs)


def _vision_neck(spec: Sam3Spec) -> Any:
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.vitdet import ViT

    vit = ViT(
        img_size=spec.image_size, pretrain_img_size=spec.pretrain_image_size, patch_size=spec.patch_size,
        embed_dim=spec.vit_dim, depth=spec.vit_depth, num_heads=spec.vit_heads, mlp_ratio=spec.vit_mlp_ratio,
        norm_layer="LayerNorm", drop_path_rate=0.1, qkv_bias=True, use_abs_pos=True, tile_abs_pos=True,
        global_att_blocks=spec.vit_global_blocks, rel_pos_blocks=(), use_rope=True, use_interp_rope=True,
        window_size=spec.window_size, pretrain_use_cls_token=True, retain_cls_token=False, ln_pre=True,
        ln_post=False, return_interm_layers=False, bias_patch_embed=False, compile_mode=None,
    )
    # precompute_resolution=None: the official builder fills this cache on "cuda"; filled lazily instead
    position = PositionEmbeddingSine(num_pos_feats=spec.d_model, normalize=True, temperature=10000)
    return Sam3DualViTDetNeck(position_encoding=position, d_model=spec.d_model,
                              scale_factors=[4.0, 2.0, 1.0, 0.5], trunk=vit, add_sam2_neck=False)


def _text_encoder(spec: Sam3Spec) -> Any:
    import torch
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer

    text = VETextEncoder(
        tokenizer=SimpleTokenizer(bpe_path=str(bpe_vocab_path())), d_model=spec.d_model,
        width=spec.text_width, heads=spec.text_heads, layers=spec.text_layers,
        context_length=spec.text_context_length, vocab_size=spec.vocab_size,
    )
    # sam3 leaves these two as torch.empty (uninitialised memory: NaNs, different in every
    # process); a checkpoint overwrites them, random weights need a value: CLIP's initialisation
    encoder = text.encoder
    with torch.no_grad():
        torch.nn.init.normal_(encoder.positional_embedding, std=0.01)
        if isinstance(encoder.text_projection, torch.nn.Parameter):
            torch.nn.init.normal_(encoder.text_projection, std=encoder.width ** -0.5)
    return text


def _fusion_encoder(spec: Sam3Spec) -> Any:
    from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer

    layer = TransformerEncoderLayer(
        activation="relu", d_model=spec.d_model, dim_feedforward=spec.ffn_dim, dropout=0.1,
        pos_enc_at_attn=True, pos_enc_at_cross_attn_keys=False, pos_enc_at_cross_attn_queries=False,
        pre_norm=True, self_attention=_attention(spec, batch_first=True),
        cross_attention=_attention(spec, batch_first=True),
    )
    return TransformerEncoderFusion(
        layer=layer, num_layers=spec.encoder_layers, d_model=spec.d_model, num_feature_levels=1, frozen=False,
        use_act_checkpoint=True, add_pooled_text_to_img_feat=False, pool_text_with_mask=True,
    )


def _decoder(spec: Sam3Spec) -> Any:
    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer

    layer = TransformerDecoderLayer(
        activation="relu", d_model=spec.d_model, dim_feedforward=spec.ffn_dim, dropout=0.1,
        cross_attention=_attention(spec), n_heads=spec.heads, use_text_cross_attention=True,
    )
    # resolution/stride None: the official builder puts the box-bias coordinates on "cuda"
    # at build time; without them they are computed on the first forward, on the input's device
    return TransformerDecoder(
        layer=layer, num_layers=spec.decoder_layers, num_queries=spec.num_queries, return_intermediate=True,
        box_refine=True, num_o2m_queries=0, dac=True, boxRPB="log", d_model=spec.d_model, frozen=False,
        interaction_layer=None, dac_use_selfatt_ln=True, resolution=None, stride=None,
        use_act_checkpoint=True, presence_token=True,
    )


def _scoring(spec: Sam3Spec) -> Any:
    import torch.nn as nn
    from sam3.model.model_misc import MLP, DotProductScoring

    prompt_mlp = MLP(input_dim=spec.d_model, hidden_dim=spec.scoring_mlp_dim, output_dim=spec.d_model,
                     num_layers=2, dropout=0.1, residual=True, out_norm=nn.LayerNorm(spec.d_model))
    return DotProductScoring(d_model=spec.d_model, d_proj=spec.d_model, prompt_mlp=prompt_mlp)


def _segmentation_head(spec: Sam3Spec) -> Any:
    from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead

    pixel_decoder = PixelDecoder(num_upsampling_stages=3, interpolation_mode="nearest", hidden_dim=spec.d_model)
    return UniversalSegmentationHead(
        hidden_dim=spec.d_model, upsampling_stages=3, aux_masks=False, presence_head=False,
        dot_product_scorer=None, act_ckpt=True, cross_attend_prompt=_attention(spec, dropout=0.0),
        pixel_decoder=pixel_decoder,
    )


def _geometry_encoder(spec: Sam3Spec) -> Any:
    from sam3.model.encoder import TransformerEncoderLayer
    from sam3.model.geometry_encoders import SequenceGeometryEncoder
    from sam3.model.position_encoding import PositionEmbeddingSine

    layer = TransformerEncoderLayer(
        activation="relu", d_model=spec.d_model, dim_feedforward=spec.ffn_dim, dropout=0.1,
        pos_enc_at_attn=False, pre_norm=True, self_attention=_attention(spec, batch_first=False),
        pos_enc_at_cross_attn_queries=False, pos_enc_at_cross_attn_keys=True,
        cross_attention=_attention(spec, batch_first=False),
    )
    return SequenceGeometryEncoder(
        pos_enc=PositionEmbeddingSine(num_pos_feats=spec.d_model, normalize=True, temperature=10000),
        encode_boxes_as_points=False, points_direct_project=True, points_pool=True, points_pos_enc=True,
        boxes_direct_project=True, boxes_pool=True, boxes_pos_enc=True, d_model=spec.d_model,
        num_layers=spec.geometry_layers, layer=layer, use_act_ckpt=True, add_cls=True, add_post_encode_proj=True,
    )


def count_parameters(model: Any) -> int:
    """Number of parameters (every element of every parameter tensor)."""
    return int(sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------- checkpoints
def load_sam3_checkpoint(model: Any, path: Path) -> None:
    """Load the image model's weights from a local SAM 3 checkpoint into ``model`` (in place).

    The file is read with ``torch.load(weights_only=True)``: a state dict, or ``{"model": state
    dict}``; keys ``detector.*`` (the official ``sam3.pt``, whose ``tracker.*`` keys are the video
    tracker and are skipped) or already without that prefix. Every parameter and buffer of the
    model must be present with its shape; anything missing is a ``GeneratorError``.
    """
    state = _read_state_dict(Path(path))
    if any(key.startswith("detector.") for key in state):
        state = {key[len("detector."):]: value for key, value in state.items() if key.startswith("detector.")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or wrong:
        raise GeneratorError(
            f"SAM 3 checkpoint {path} does not fit the image model: {len(missing)} missing keys {missing[:5]},"
            f" {len(wrong)} keys of another shape {wrong[:5]}. Use the official sam3.pt (facebook/sam3)."
        )
    if unexpected:
        log.info("SAM 3 checkpoint %s: %d keys the image model does not use (e.g. %s)", path, len(unexpected),
                 unexpected[:3])
    model.load_state_dict({k: state[k] for k in expected}, strict=True)


def _read_state_dict(path: Path) -> Mapping:
    from .checkpoints import read_state_dict

    return read_state_dict(path, "SAM 3 checkpoint", "the official sam3.pt (facebook/sam3)")


def load_sam3(model: str, checkpoint: Path | None, *, device: "str | torch.device" = "cpu",
              seed: int = 0) -> Any:
    """The SAM 3 image model ``model`` (``sam3`` or ``tiny``) on ``device``, eval mode: weights from
    ``checkpoint`` (a local file), or seeded random weights when ``checkpoint`` is ``None``."""
    import torch

    if model not in SPECS:
        raise GeneratorError(f"unknown SAM 3 model {model!r}; expected one of {list(SAM3_MODELS)}")
    torch.manual_seed(seed)
    built = build_sam3_image(SPECS[model], "cpu")
    if checkpoint is not None:
        load_sam3_checkpoint(built, Path(checkpoint))
    return built.to(device)


# ----------------------------------------------------------------------------- inference
TEXT_BATCH = 16  # prompts per text-encoder call; fixed, so text features never depend on chunking


def preprocess_image(image_rgb: Any, image_size: int, device: "str | torch.device") -> "torch.Tensor":
    """``(H, W, 3)`` uint8 RGB -> ``(3, S, S)`` float32 model input, ``S = image_size``.

    As sam3's ``Sam3Processor``: the uint8 image is resized (squashed, not padded) to ``S x S``
    (bilinear, antialiased), scaled to [0, 1], then normalised to [-1, 1] (mean 0.5, std 0.5).
    """
    import torch
    from torchvision.transforms.v2 import functional as tvf

    if not image_rgb.flags.writeable:  # torch.from_numpy warns on read-only arrays
        image_rgb = image_rgb.copy()
    image = torch.from_numpy(image_rgb).permute(2, 0, 1).to(device)
    image = tvf.resize(image, [image_size, image_size], antialias=True)
    image = image.to(torch.float32) / 255.0
    return tvf.normalize(image, list(SAM3_PIXEL_MEAN), list(SAM3_PIXEL_STD))


def encode_images(model: Any, pixels: "torch.Tensor") -> dict[str, Any]:
    """``model.backbone.forward_image(pixels)`` (``pixels``: ``(B, 3, S, S)`` from :func:`preprocess_image`),
    with values for each image that do not depend on the batch it came in.

    The ViT trunk runs on the whole batch (on a CPU its output for an image is bit-identical to a
    batch of one); the neck's convolutions run image by image, because batched convolution kernels
    round differently (~5e-7). Returns sam3's dict: ``backbone_fpn`` and ``vision_pos_enc`` (the
    neck's levels, the lowest dropped as sam3's ``scalp=1``), ``vision_features`` (the last level).
    """
    import torch

    backbone = model.backbone
    neck = backbone.vision_backbone
    if neck.sam2_convs is not None:
        raise GeneratorError("encode_images supports the image model without the interactive SAM 2 neck")
    trunk = neck.trunk(pixels)[-1]  # (B, C, g, g)
    levels = [torch.cat([conv(trunk[i:i + 1]) for i in range(len(trunk))]) for conv in neck.convs]
    positions = [neck.position_encoding(level).to(level.dtype) for level in levels]
    if backbone.scalp > 0:
        levels, positions = levels[:-backbone.scalp], positions[:-backbone.scalp]
    return {"vision_features": levels[-1], "vision_pos_enc": positions, "backbone_fpn": levels,
            "sam2_backbone_out": None}


def encode_prompts(model: Any, prompts: "list[str]", device: "str | torch.device") -> dict[str, "torch.Tensor"]:
    """Text features of ``prompts``, in ``TEXT_BATCH`` calls of the text encoder:
    ``language_features`` ``(T, P, d_model)`` (sequence first), ``language_mask`` ``(P, T)`` bool
    (True = padding), ``language_embeds`` ``(T, P, text_width)``; ``T`` = the context length."""
    import torch

    parts = [model.backbone.forward_text(prompts[i:i + TEXT_BATCH], device=device)
             for i in range(0, len(prompts), TEXT_BATCH)]
    return {
        "language_features": torch.cat([p["language_features"] for p in parts], dim=1),
        "language_mask": torch.cat([p["language_mask"] for p in parts], dim=0),
        "language_embeds": torch.cat([p["language_embeds"] for p in parts], dim=1),
    }


def ground_prompts(model: Any, image_features: dict[str, Any], image_index: int,
                   text: dict[str, "torch.Tensor"], prompt_indices: "list[int]") -> dict[str, "torch.Tensor"]:
    """SAM 3's detector for one image of ``image_features`` (``backbone.forward_image`` of a batch)
    and the prompts ``prompt_indices`` of ``text`` (:func:`encode_prompts`), one query each.

    Returns float32 tensors on the model's device, ``K = len(prompt_indices)``, ``Q`` object queries:
    ``object_logits`` ``(K, Q)``, ``presence_logits`` ``(K,)``, ``boxes_cxcywh`` ``(K, Q, 4)``
    normalised to [0, 1] of the model input, ``mask_logits`` ``(K, Q, h, w)`` (``h = w`` = a
    quarter of the patch grid's resolution x 4; they cover the whole, squashed, image).
    """
    import torch
    from sam3.model.data_misc import FindStage

    k = len(prompt_indices)
    device = image_features["backbone_fpn"][0].device
    ids = torch.as_tensor(prompt_indices, dtype=torch.long, device=device)
    features = {**image_features,
                "language_features": text["language_features"][:, ids],
                "language_mask": text["language_mask"][ids],
                "language_embeds": text["language_embeds"][:, ids]}
    find = FindStage(img_ids=torch.full((k,), image_index, dtype=torch.long, device=device),
                     text_ids=torch.arange(k, dtype=torch.long, device=device), input_boxes=None,
                     input_boxes_mask=None, input_boxes_label=None, input_points=None, input_points_mask=None)
    out = model.forward_grounding(backbone_out=features, find_input=find, find_target=None,
                                  geometric_prompt=model._get_dummy_prompt(k))
    return {
        "object_logits": out["pred_logits"][..., 0].float(),
        "presence_logits": out["presence_logit_dec"][:, 0].float(),
        "boxes_cxcywh": out["pred_boxes"].float(),
        "mask_logits": out["pred_masks"].float(),
    }
