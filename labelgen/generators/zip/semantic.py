"""Stage 1 of Zip: CLIP Surgery activation maps and "classification first" gating.

Specification: ``/work/shared/docs/zip-method.md``, "Stage 1". The pieces, in the order the
stage uses them:

1. ``preprocess_square``: image squashed to ``input_size``² (PIL bicubic), CLIP mean/std.
2. ``TextEmbeddingCache`` / ``text_embeddings``: 85-template prompt ensemble per class
   name plus the "redundant" ensemble of the empty string, computed once per vocabulary.
3. ``surgery_forward``: the ViT with CLIP Surgery's dual path in its last blocks and a
   positional embedding interpolated to the input's token grid (never written back).
4. ``class_probabilities`` (CLS token) and ``activation_maps`` (patch tokens).
5. ``gate_classes``: which classes go on to instance discovery.

``SemanticStage`` strings them together for one image. Model code: imported lazily.
"""
from __future__ import annotations

import logging
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...errors import ConfigError, GeneratorError, ValidationError
from .config import SemanticConfig
from ...models.blocked_attention import head_attention
from ...models.loading import PRECISIONS, autocast
from ...models.prompts import PROMPT_TEMPLATES

log = logging.getLogger(__name__)

PROMPT_CHUNK = 256  # prompts per encode_text call
NewPathStart = Literal["input", "zeros"]


# --------------------------------------------------------------------------- text side
def text_embeddings(
    model: Any,
    tokenizer: Any,
    names: Sequence[str],
    device: str | torch.device,
    *,
    templates: Sequence[str] = PROMPT_TEMPLATES,
    chunk_size: int = PROMPT_CHUNK,
) -> torch.Tensor:
    """Prompt-ensemble text embeddings: (C, D) float32 on ``device``, unit rows.

    For each of the C names, every template is filled in and encoded; each prompt
    embedding is L2-normalised, the mean over templates is L2-normalised again.
    All C * len(templates) prompts go through ``model.encode_text`` in chunks of
    ``chunk_size``. ``tokenizer`` is an open_clip tokenizer (list[str] -> (n, ctx) ints).
    """
    names = _check_names(names)
    prompts = [template.format(name) for name in names for template in templates]
    with torch.inference_mode():
        parts = []
        for start in range(0, len(prompts), chunk_size):
            tokens = tokenizer(prompts[start:start + chunk_size]).to(device)
            parts.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
        per_prompt = torch.cat(parts).reshape(len(names), len(templates), -1)
        return F.normalize(per_prompt.mean(dim=1), dim=-1)


def _check_names(names: Sequence[str]) -> list[str]:
    names = list(names)
    if not names or not all(isinstance(name, str) for name in names):
        raise ValidationError(f"expected a non-empty sequence of class names (str), got {names!r}")
    return names


class TextEmbeddingCache:
    """Bounded LRU cache of (text (C, D), redundant (D,)) per (model key, vocabulary, device).

    ``model_key`` must identify the model *and its weights* (e.g. architecture, pretrained
    tag and the model object's id); the cache cannot tell two models apart otherwise.
    Thread-safe; a miss encodes the vocabulary and ``''`` in one ``text_embeddings`` call.
    """

    def __init__(self, max_entries: int = 8):
        if max_entries < 1:
            raise ValidationError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self, model_key: str, model: Any, tokenizer: Any, names: Sequence[str], device: str | torch.device,
        chunk_size: int = PROMPT_CHUNK,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(text (C, D) float32 unit rows, redundant (D,) float32 unit) for ``names``, encoded
        ``chunk_size`` prompts per call (``len(PROMPT_TEMPLATES)``: one name per call, as the release)."""
        key = (model_key, tuple(names), str(torch.device(device)), int(chunk_size))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        log.debug("encoding %d class names for %s", len(key[1]), model_key)
        both = text_embeddings(model, tokenizer, [*_check_names(names), ""], device, chunk_size=chunk_size)
        entry = (both[:-1], both[-1])
        with self._lock:
            self._entries[key] = entry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return entry


# ------------------------------------------------------------------ positional embedding
_POS_CACHE: OrderedDict[tuple, tuple[weakref.ref, weakref.ref, int, torch.Tensor]] = OrderedDict()
_POS_CACHE_MAX = 32
_POS_LOCK = threading.Lock()


def positional_embedding_for_grid(
    visual: Any, grid: int, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> torch.Tensor:
    """The ViT's positional embedding for a ``grid`` x ``grid`` token grid: (1 + grid², width).

    Row 0 (CLS) is kept as is; the patch rows are bilinearly interpolated
    (``align_corners=False``) from the native square grid (14 x 14 for 224 / 16), in
    float32, then cast to ``dtype`` (default: the parameter's) on ``device``. At the native
    grid the values are the parameter's own. Cached per (id(visual), grid, dtype, device);
    an entry is dropped when the model is gone or the parameter was replaced or changed
    in place. The model is never modified.
    """
    param = visual.positional_embedding
    dtype = dtype or param.dtype
    device = torch.device(device) if device is not None else param.device
    key = (id(visual), int(grid), dtype, device)
    with _POS_LOCK:
        entry = _POS_CACHE.get(key)
        if entry and entry[0]() is visual and entry[1]() is param and entry[2] == param._version:
            return entry[3]
    with torch.inference_mode(False), torch.no_grad():
        value = _interpolate_positional(param, int(grid)).to(device=device, dtype=dtype)
    with _POS_LOCK:
        _POS_CACHE[key] = (weakref.ref(visual), weakref.ref(param), param._version, value)
        while len(_POS_CACHE) > _POS_CACHE_MAX:
            _POS_CACHE.popitem(last=False)
    return value


def _interpolate_positional(param: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + n², W) -> (1 + grid², W), a new tensor in the parameter's dtype."""
    if grid < 1:
        raise ValidationError(f"token grid must be >= 1, got {grid}")
    side = math.isqrt(param.shape[0] - 1)
    if param.ndim != 2 or side * side != param.shape[0] - 1:
        raise ValidationError(f"expected a (1 + n*n, width) positional embedding, got {tuple(param.shape)}")
    if grid == side:
        return param.detach().clone()
    width = param.shape[1]
    patches = param[1:].float().reshape(1, side, side, width).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bilinear", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, width)
    return torch.cat([param[:1].float(), patches]).to(param.dtype)


# ---------------------------------------------------------------------------- surgery
def surgery_forward(
    visual: Any, images: torch.Tensor, depth: int, *, new_path_start: NewPathStart = "input"
) -> torch.Tensor:
    """CLIP Surgery forward of an open_clip ``VisionTransformer``: (B, 1 + N, D_out).

    ``images``: (B, 3, S, S) normalised pixels, S a multiple of the patch size; N = (S/patch)².
    The first ``len(blocks) - depth`` blocks run unchanged. From the first surgered block
    on, two residual streams run side by side:

    - original path: the normal block (q·k attention + MLP) on the original stream;
    - new path: v·v self-attention (queries, keys and values all = the value projection,
      same heads, scale head_dim^-0.5, same in/out projection weights) of
      ``ln_1(original-path input)``, added to the new stream; no MLP. A block's LayerScale
      ``ls_1`` (identity in OpenAI CLIP) scales both attention outputs.

    ``new_path_start`` says what the new stream holds before the first surgered block.
    ``"input"`` (default) = the original stream's value there: this is what the released
    code does (Zip imports xmed-lab/CLIP_Surgery, whose first dual-path block computes
    ``x += x_res`` on the block input). ``"zeros"`` = only the sum of the v·v outputs.
    Output: CLS token of the original path, patch tokens of the new path, then ``ln_post``
    and ``proj`` on every token. ``depth=0`` is the unmodified model. Inference only
    (patch dropout, a training-time regulariser, is not applied). The model is not modified.
    """
    blocks = _check_surgery_model(visual, images, depth)
    if new_path_start not in ("input", "zeros"):
        raise ValidationError(f"new_path_start must be 'input' or 'zeros', got {new_path_start!r}")
    x = _embed_tokens(visual, images)
    first_dual = len(blocks) - depth
    for block in blocks[:first_dual]:
        x = _plain_block(block, x)
    original, new = x, (x if new_path_start == "input" else torch.zeros_like(x))
    for block in blocks[first_dual:]:
        original, new = _dual_path_block(block, original, new)
    tokens = torch.cat([original[:, :1], new[:, 1:]], dim=1)
    tokens = visual.ln_post(tokens)
    return tokens @ visual.proj if visual.proj is not None else tokens


def _check_surgery_model(visual: Any, images: torch.Tensor, depth: int) -> list:
    """The residual blocks, after checking model, input and depth."""
    blocks = _vit_blocks(visual)
    if not isinstance(depth, int) or not 0 <= depth <= len(blocks):
        raise ValidationError(f"surgery depth must be an int in [0, {len(blocks)}], got {depth!r}")
    patch = visual.patch_size[0]
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3] or images.shape[2] % patch:
        raise ValidationError(
            f"expected images (B, 3, S, S) with S a multiple of {patch}, got {tuple(images.shape)}"
        )
    return blocks


def _vit_blocks(visual: Any) -> list:
    """The residual blocks of an open_clip ViT that CLIP Surgery can run; GeneratorError otherwise."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.pool_type != "tok":
        raise GeneratorError(
            f"CLIP Surgery needs an open_clip VisionTransformer with CLS-token pooling, got {type(visual).__name__};"
            " use a ViT architecture such as ViT-B-16"
        )
    blocks = list(visual.transformer.resblocks)
    if not visual.transformer.batch_first or not all(type(b) is ResidualAttentionBlock for b in blocks):
        raise GeneratorError("CLIP Surgery supports batch-first open_clip ResidualAttentionBlocks only")
    return blocks


def _embed_tokens(visual: Any, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding + CLS + interpolated positional embedding + ln_pre: (B, 1 + N, W)."""
    x = visual.conv1(images)  # (B, W, g, g)
    batch, width, grid = x.shape[0], x.shape[1], x.shape[2]
    x = x.flatten(2).transpose(1, 2)  # (B, g*g, W), raster order
    cls = visual.class_embedding.to(x.dtype).view(1, 1, width).expand(batch, 1, width)
    x = torch.cat([cls, x], dim=1)
    x = x + positional_embedding_for_grid(visual, grid, dtype=x.dtype, device=x.device)
    return visual.ln_pre(x)


def _plain_block(block: Any, x: torch.Tensor) -> torch.Tensor:
    """An unmodified block on (B, T, W) tokens: what ``block(x)`` computes (pre-LN attention, then MLP).

    Not ``block(x)`` itself: its ``nn.MultiheadAttention`` works on a transposed (T, B, W) view, and
    for B > 1 ``torch.matmul`` then copies the input projection's weight once per token (10x slower
    batches in bf16 on CPU). Here every projection sees a contiguous batch-first tensor.
    """
    attn = block.attn
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    context = _multi_head_attention(q, k, v, attn.num_heads)
    x = x + block.ls_1(F.linear(context, attn.out_proj.weight, attn.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _dual_path_block(block: Any, original: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One surgered block: (original, new) streams (B, T, W) -> updated streams."""
    attn = block.attn
    q, k, v = F.linear(block.ln_1(original), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    qk_context = _multi_head_attention(q, k, v, attn.num_heads)
    vv_context = _multi_head_attention(v, v, v, attn.num_heads)
    original = original + block.ls_1(F.linear(qk_context, attn.out_proj.weight, attn.out_proj.bias))
    original = original + block.ls_2(block.mlp(block.ln_2(original)))
    new = new + block.ls_1(F.linear(vv_context, attn.out_proj.weight, attn.out_proj.bias))
    return original, new


def _multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(head_dim)) v per head; (B, T, W) in, (B, T, W) out (heads concatenated).

    The fused SDPA kernel, except for CPU tensors in bf16 / fp16, where blocked attention is ~2x faster
    (:mod:`labelgen.models.blocked_attention`; the same function within bf16 rounding)."""
    batch, tokens, width = q.shape
    head_dim = width // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, tokens, heads, head_dim).transpose(1, 2)

    context = head_attention(split(q), split(k), split(v))
    return context.transpose(1, 2).reshape(batch, tokens, width)


# ------------------------------------------------------------------- maps and gating
def activation_maps(patch_features: torch.Tensor, text: torch.Tensor, redundant: torch.Tensor, *,
                    normalise: bool = True) -> torch.Tensor:
    """Per-class activation maps: (B, C, g, g) float32 in [0, 1], g = sqrt(N).

    ``patch_features``: (B, N, D) projected patch tokens in raster order (CLS removed);
    ``text``: (C, D); ``redundant``: (D,). Tokens are L2-normalised along channels (unless
    ``normalise`` is false: the caller normalised them, see :func:`normalise_tokens`), the
    similarity is ``tokens @ (text - redundant)ᵀ``, then min-max normalised per class over
    the N tokens (a class whose similarities are all equal gets zeros).
    """
    if patch_features.ndim != 3 or text.ndim != 2 or redundant.shape != text.shape[1:]:
        raise ValidationError(
            f"expected patch features (B, N, D), text (C, D), redundant (D,), got {tuple(patch_features.shape)},"
            f" {tuple(text.shape)}, {tuple(redundant.shape)}"
        )
    batch, n_tokens, _ = patch_features.shape
    grid = math.isqrt(n_tokens)
    if grid * grid != n_tokens:
        raise ValidationError(f"expected a square number of patch tokens, got {n_tokens}")
    tokens = F.normalize(patch_features.float(), dim=-1) if normalise else patch_features.float()
    similarity = tokens @ (text.float() - redundant.float()).T  # (B, N, C)
    low = similarity.amin(dim=1, keepdim=True)
    span = similarity.amax(dim=1, keepdim=True) - low
    maps = (similarity - low) / torch.where(span > 0, span, torch.ones_like(span))
    return maps.transpose(1, 2).reshape(batch, text.shape[0], grid, grid)


def normalise_tokens(tokens: torch.Tensor, axis: str = "channels") -> torch.Tensor:
    """(B, 1 + N, D) projected tokens divided by their L2 norm along ``axis``: ``"channels"`` (each
    token a unit vector, the fix) or ``"tokens"`` (each channel over the 1 + N tokens, CLS included:
    ``x / x.norm(dim=1)`` as the release computes it)."""
    if axis not in ("channels", "tokens"):
        raise ValidationError(f"token normalisation must be 'channels' or 'tokens', got {axis!r}")
    tokens = tokens.float()
    return tokens / tokens.norm(dim=-1 if axis == "channels" else 1, keepdim=True)


def upsample_maps(maps: np.ndarray, image_height: int, image_width: int,
                  device: str | torch.device = "cpu") -> np.ndarray:
    """(K, image_height, image_width) float32: (K, g, g) class maps upsampled with torch's
    ``interpolate(mode="bilinear", align_corners=False)`` on ``device``, as the release's
    ``get_similarity_map`` does (``fidelity: release``, stage 3's activation mask)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or min(maps.shape) < 1 or min(image_height, image_width) < 1:
        raise ValidationError(f"expected maps (K, g, g) and a positive image size, got {maps.shape},"
                              f" {image_height}x{image_width}")
    with torch.inference_mode():
        tensor = torch.from_numpy(np.ascontiguousarray(maps)).to(device)[None]
        upsampled = F.interpolate(tensor, (int(image_height), int(image_width)), mode="bilinear",
                                  align_corners=False)
    return upsampled[0].cpu().numpy()


def class_probabilities(cls_feature: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """softmax over classes of ``logit_scale`` x cosine(CLS, text): (B, C) float32.

    ``cls_feature``: (B, D) projected CLS tokens; ``text``: (C, D); ``logit_scale``: the
    model's ``logit_scale.exp()`` (100 for OpenAI CLIP).
    """
    image = F.normalize(cls_feature.float(), dim=-1)
    return (logit_scale * image @ F.normalize(text.float(), dim=-1).T).softmax(dim=-1)


def gate_classes(probs: np.ndarray, threshold: float, top_k: int) -> np.ndarray:
    """Indices (int64) of classes with ``probs >= threshold``, most probable first.

    Equal probabilities keep the lower index first; at most ``top_k`` are returned when
    ``top_k > 0`` (0 = no limit). ``probs``: (C,) float.
    """
    probs = np.asarray(probs)
    if probs.ndim != 1:
        raise ValidationError(f"expected class probabilities of shape (C,), got {probs.shape}")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValidationError(f"top_k must be an int >= 0 (0 = no limit), got {top_k!r}")
    order = np.argsort(-probs, kind="stable")
    kept = order[probs[order] >= threshold]
    return (kept[:top_k] if top_k > 0 else kept).astype(np.int64)


# ------------------------------------------------------------------------ image input
def preprocess_square(
    image_rgb: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, size, size) float32: squashed (PIL bicubic), (x/255 - mean)/std."""
    if not isinstance(image_rgb, np.ndarray) or image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 \
            or image_rgb.shape[2] != 3 or image_rgb.shape[0] < 1 or image_rgb.shape[1] < 1:
        got = f"{image_rgb.dtype} {image_rgb.shape}" if isinstance(image_rgb, np.ndarray) else type(image_rgb).__name__
        raise ValidationError(f"expected an (H, W, 3) uint8 RGB image, got {got}")
    resized = Image.fromarray(np.ascontiguousarray(image_rgb)).resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((pixels - mean_t) / std_t).unsqueeze(0).contiguous()


# ------------------------------------------------------------------------------ stage
@dataclass(frozen=True)
class SemanticResult:
    """Stage 1 output for one image (C = number of class names of the stage).

    class_probs: (C,) float32, CLS-token softmax over the classes (sums to 1).
    maps: (C, g, g) float32 in [0, 1], min-max normalised activation map of every class,
        on the token grid (g = input_size / patch), raster order, rows = image y.
    kept: (K,) int64 class indices that passed the gate, most probable first.
    """

    class_probs: np.ndarray
    maps: np.ndarray
    kept: np.ndarray

    def __post_init__(self) -> None:
        n_classes = self.class_probs.shape[0] if self.class_probs.ndim == 1 else -1
        if self.maps.ndim != 3 or self.maps.shape[0] != n_classes:
            raise ValidationError(
                f"expected class_probs (C,) and maps (C, g, g), got {self.class_probs.shape} and {self.maps.shape}"
            )


class SemanticStage:
    """Stage 1 for one image at a time: ``stage(image_rgb) -> SemanticResult``.

    ``model``: an open_clip CLIP with a ViT tower, already on ``device`` (put in eval mode
    here); ``tokenizer``: its open_clip tokenizer; ``precision``: "fp32", or "bf16"/"fp16" for the
    image tower under ``torch.autocast`` (text embeddings and the maps stay float32).
    Mean/std come from ``model.visual.preprocess_cfg`` (OpenAI CLIP's when absent). Text
    embeddings are computed once per vocabulary in ``text_cache`` (shareable between stages).
    ``fidelity``: ``"release"`` encodes each class name's prompts in a call of their own, as the
    release does; ``"fast"``: 256 prompts per call.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: SemanticConfig,
        *,
        device: str | torch.device = "cpu",
        precision: Literal["fp32", "bf16", "fp16"] = "fp32",
        text_cache: TextEmbeddingCache | None = None,
        fidelity: Literal["release", "fast"] = "fast",
    ):
        _check_stage_config(model.visual, config, precision)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(device)
        self.precision = precision
        self.text_cache = text_cache if text_cache is not None else TextEmbeddingCache()
        self.model_key = f"{config.model}:{config.pretrained}#{id(model):x}"
        # release: each class name's 85 prompts in one encode_text call, as the release encodes them (other
        # batchings change the float32 sums); fast: 256 prompts per call
        self.text_chunk = len(PROMPT_TEMPLATES) if fidelity == "release" else PROMPT_CHUNK
        self.mean, self.std = _clip_mean_std(model.visual)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The names the class indices refer to: the vocabulary, or ``(generic_prompt,)``."""
        return self.config.vocabulary or (self.config.generic_prompt,)

    def __call__(self, image_rgb: np.ndarray) -> SemanticResult:
        """Maps, probabilities and gated classes of one (H, W, 3) uint8 RGB image."""
        return self.from_tokens(self.encode_batch([image_rgb])[0])

    def encode(self, image_rgb: np.ndarray) -> np.ndarray:
        """The image tower's part: (1 + N, D) float32 projected tokens (CLS first, then the N
        patch tokens in raster order) of one (H, W, 3) uint8 RGB image. Vocabulary-independent."""
        return self.encode_batch([image_rgb])[0].cpu().numpy()

    def encode_batch(self, images_rgb: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """:meth:`encode` for B images in one forward pass (all are squashed to the same square):
        B tensors (1 + N, D) float32 on ``self.device``."""
        if not len(images_rgb):
            return []
        pixels = torch.cat([preprocess_square(image, self.config.input_size, self.mean, self.std)
                            for image in images_rgb]).to(self.device)
        if self.config.positional_embedding == "mutate":
            self._write_positional_embedding(pixels.shape[-1] // self.model.visual.patch_size[0])
        with torch.inference_mode():
            with autocast(self.device, self.precision):
                tokens = surgery_forward(self.model.visual, pixels, self.config.surgery_depth,
                                         new_path_start=self.config.new_path_start)
            tokens = tokens.float()
        return list(tokens.unbind(0))

    def _write_positional_embedding(self, grid: int) -> None:
        """``positional_embedding: mutate``: the interpolated embedding written into the model, as the
        release's CLIP Surgery does; later calls at this grid use it as is (same values as ``cached``
        at one input size; another size then interpolates from the written one)."""
        visual = self.model.visual
        if visual.positional_embedding.shape[0] != 1 + grid * grid:
            value = positional_embedding_for_grid(visual, grid)
            with torch.no_grad():
                visual.positional_embedding.data = value.clone()
            with _POS_LOCK:  # entries computed from the former parameter no longer describe the model
                for key in [key for key, entry in _POS_CACHE.items() if entry[0]() is visual]:
                    del _POS_CACHE[key]

    def from_tokens(self, tokens: np.ndarray | torch.Tensor) -> SemanticResult:
        """The vocabulary's part: ``SemanticResult`` from :meth:`encode`'s (1 + N, D) float32 tokens
        (a host array or a tensor from :meth:`encode_batch`).

        ``stage.from_tokens(stage.encode(image))`` equals ``stage(image)`` exactly.
        """
        if not isinstance(tokens, torch.Tensor):
            tokens = np.asarray(tokens)
            if tokens.ndim != 2 or tokens.dtype != np.float32:
                raise ValidationError(f"expected (1 + N, D) float32 tokens, got {tokens.dtype} {tokens.shape}")
            tokens = torch.from_numpy(tokens)
        elif tokens.ndim != 2 or tokens.dtype != torch.float32:
            raise ValidationError(f"expected (1 + N, D) float32 tokens, got {tokens.dtype} {tuple(tokens.shape)}")
        return self._from_token_tensor(tokens.unsqueeze(0).to(self.device))

    def _from_token_tensor(self, tokens: torch.Tensor) -> SemanticResult:
        text, redundant = self.text_cache.get(self.model_key, self.model, self.tokenizer, self.class_names, self.device,
                                              self.text_chunk)
        with torch.inference_mode():
            probs = class_probabilities(tokens[:, 0], text, float(self.model.logit_scale.exp()))[0]
            if self.config.token_normalisation == "channels":
                maps = activation_maps(tokens[:, 1:], text, redundant)[0]
            else:  # the release's axis: over the tokens, CLS included
                normed = normalise_tokens(tokens, "tokens")
                maps = activation_maps(normed[:, 1:], text, redundant, normalise=False)[0]
        probs_np = probs.cpu().numpy().astype(np.float32)
        kept = gate_classes(probs_np, self.config.class_threshold, self.config.top_k)
        return SemanticResult(class_probs=probs_np, maps=maps.cpu().numpy().astype(np.float32), kept=kept)


def _check_stage_config(visual: Any, config: SemanticConfig, precision: str) -> None:
    """Raise ConfigError when the config cannot work with this model."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    layers = len(_vit_blocks(visual))
    if not 0 <= config.surgery_depth <= layers:
        raise ConfigError(f"semantic.surgery_depth must be in [0, {layers}] for {config.model}, got {config.surgery_depth}")
    patch = visual.patch_size[0]
    if config.input_size < patch or config.input_size % patch:
        raise ConfigError(f"semantic.input_size must be a positive multiple of the patch size {patch}, got {config.input_size}")
    if not 0.0 <= config.class_threshold <= 1.0:
        raise ConfigError(f"semantic.class_threshold must be in [0, 1], got {config.class_threshold}")
    if config.top_k < 0:
        raise ConfigError(f"semantic.top_k must be >= 0 (0 = no limit), got {config.top_k}")
    if not (config.vocabulary or config.generic_prompt):
        raise ConfigError("semantic.vocabulary is empty and semantic.generic_prompt is '': give one of them")


def _clip_mean_std(visual: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel from open_clip's preprocess config, else OpenAI CLIP's."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = getattr(visual, "preprocess_cfg", None) or {}
    return tuple(cfg.get("mean", OPENAI_DATASET_MEAN)), tuple(cfg.get("std", OPENAI_DATASET_STD))
