"""Build SAM 2.1 models (Meta's ``sam2`` package, Apache-2.0): the four official architectures from the
package's own hydra configs, random or from a checkpoint read with ``weights_only=True``, and a tiny
model of the same classes (Hiera trunk, FPN neck, SAM2Base heads) for tests.

``sam2.build_sam.build_sam2`` is not used: it reads checkpoints itself and logs instead of raising on
a mismatch. The configs are composed the same way (with the same post-processing overrides), the
weights go through ``load_sam2_state_dict``. torch, hydra and sam2 are imported inside the
functions, so importing this module costs nothing.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import GeneratorError

if TYPE_CHECKING:
    import torch
    from sam2.modeling.sam2_base import SAM2Base

# model type -> the sam2 package's hydra config (configs/sam2.1/*.yaml inside the installed package)
SAM2_CONFIGS = {
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",  # + TINY_SAM2 overrides
}
SAM2_MODEL_TYPES = tuple(SAM2_CONFIGS)
# Published sizes (sam2 README / model card), millions of parameters of the whole SAM2Base.
SAM2_PUBLISHED_MILLIONS = {"sam2.1_hiera_tiny": 38.9, "sam2.1_hiera_small": 46.0,
                           "sam2.1_hiera_base_plus": 80.8, "sam2.1_hiera_large": 224.4}
# What build_sam2(apply_postprocessing=True) adds: with multimask_output=False, fall back to the best of
# the three multimask outputs when the single mask is unstable (as the official image predictor runs).
POSTPROCESSING_OVERRIDES = (
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
)
# A SAM 2.1 of the real classes, small enough for unit tests (~0.65 M parameters, 128 px input): overrides
# of the tiny config. Constraints of sam2: neck backbone_channel_list == the trunk's stage dims reversed
# (embed_dim * 8, 4, 2, 1); no global-attention block may start a stage (Hiera divides its window by
# the q-stride there); neck d_model == position-encoding feats == memory-attention d_model == memory
# encoder in_dim; RoPE head dims divisible by 4; d_model / 2 divisible by 8 (the SAM heads' 8 heads).
TINY_SAM2 = {
    "image_size": 128,
    "image_encoder.trunk.embed_dim": 8,
    "image_encoder.trunk.num_heads": 1,
    "image_encoder.trunk.stages": [1, 1, 2, 1],
    "image_encoder.trunk.global_att_blocks": [3],
    "image_encoder.trunk.window_spec": [8, 4, 4, 2],
    "image_encoder.trunk.window_pos_embed_bkg_spatial_size": [4, 4],
    "image_encoder.neck.d_model": 32,
    "image_encoder.neck.backbone_channel_list": [64, 32, 16, 8],
    "image_encoder.neck.position_encoding.num_pos_feats": 32,
    "memory_attention.d_model": 32,
    "memory_attention.num_layers": 1,
    "memory_attention.layer.d_model": 32,
    "memory_attention.layer.dim_feedforward": 64,
    "memory_attention.layer.self_attention.embedding_dim": 32,
    "memory_attention.layer.self_attention.feat_sizes": [8, 8],
    "memory_attention.layer.cross_attention.embedding_dim": 32,
    "memory_attention.layer.cross_attention.feat_sizes": [8, 8],
    "memory_attention.layer.cross_attention.kv_in_dim": 16,
    "memory_encoder.out_dim": 16,
    "memory_encoder.in_dim": 32,
    "memory_encoder.position_encoding.num_pos_feats": 16,
    "memory_encoder.mask_downsampler.embed_dim": 32,
    "memory_encoder.fuser.layer.dim": 32,
    "memory_encoder.fuser.num_layers": 1,
}


def build_sam2(model_type: str, checkpoint: Path | None, device: str = "cpu") -> "SAM2Base":
    """SAM 2.1 of ``model_type`` (``SAM2_MODEL_TYPES``; ``tiny`` for tests), eval mode, on ``device``.

    Without ``checkpoint`` the weights are random (seed torch first for a reproducible model). A
    checkpoint is the official file (``{"model": state_dict}``) or a plain state dict, read with
    ``weights_only=True``; its keys and shapes must match the architecture exactly.
    """
    model = _instantiate(model_type)
    if checkpoint is not None:
        state = load_sam2_state_dict(Path(checkpoint), model_type, model)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # same keys, different shapes
            raise GeneratorError(f"SAM 2.1 checkpoint {checkpoint} does not fit the {model_type} architecture:"
                                 f" {str(exc).splitlines()[0]}. Check generator.sam.model_type.") from exc
    use_blocked_hiera_attention(model.image_encoder)
    return model.eval().to(device)


def use_blocked_hiera_attention(module: "torch.nn.Module") -> int:
    """Give every Hiera ``MultiScaleAttention`` of ``module`` a forward that runs blocked attention on CPU
    tensors in bf16 / fp16 (:mod:`labelgen.models.blocked_attention`, ~2x faster there) and sam2's own SDPA
    call everywhere else (bit for bit sam2's forward). Returns the number of attention modules changed."""
    import types

    from sam2.modeling.backbones.hieradet import MultiScaleAttention

    changed = 0
    for block in module.modules():
        if isinstance(block, MultiScaleAttention) and not getattr(block, "_labelgen_blocked", False):
            block.forward = types.MethodType(_hiera_attention_forward, block)
            block._labelgen_blocked = True
            changed += 1
    return changed


def _hiera_attention_forward(self: "torch.nn.Module", x: "torch.Tensor") -> "torch.Tensor":
    """sam2's ``MultiScaleAttention.forward`` with the attention kernel chosen per device and dtype.
    ``x``: (B, H, W, dim) -> (B, H', W', dim_out), H' x W' the pooled query grid."""
    from sam2.modeling.backbones.hieradet import do_pool

    from .blocked_attention import head_attention

    batch, height, width, _ = x.shape
    qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1)
    q, k, v = qkv.unbind(2)  # each (B, H*W, heads, head_dim)
    if self.q_pool:
        q = do_pool(q.reshape(batch, height, width, -1), self.q_pool)
        height, width = q.shape[1:3]
        q = q.reshape(batch, height * width, self.num_heads, -1)
    out = head_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, heads, L, head_dim)
    return self.proj(out.transpose(1, 2).reshape(batch, height, width, -1))


def _instantiate(model_type: str) -> "SAM2Base":
    if model_type not in SAM2_CONFIGS:
        raise GeneratorError(f"unknown SAM 2.1 model type {model_type!r}; expected one of {list(SAM2_MODEL_TYPES)}")
    try:
        import sam2  # noqa: F401  initialises hydra on the package's config module
        from hydra import compose
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
    except ImportError as exc:
        raise GeneratorError(f"SAM 2.1 needs the sam2 package ({exc}); install labelgen[sam2]") from exc
    overrides = list(POSTPROCESSING_OVERRIDES)
    if model_type == "tiny":
        overrides += [f"++model.{key}={_hydra_value(value)}" for key, value in TINY_SAM2.items()]
    config = compose(config_name=SAM2_CONFIGS[model_type], overrides=overrides)
    OmegaConf.resolve(config)
    return instantiate(config.model, _recursive_=True)


def _hydra_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def feature_sizes(model: "SAM2Base") -> list[tuple[int, int]]:
    """``(height, width)`` of the image encoder's outputs the SAM heads read, finest first: the two
    high-resolution levels (strides 4 and 8) and the image embedding (stride 16) at the model's
    ``image_size`` (``SAM2ImagePredictor`` hard-codes them for 1024 px)."""
    side = int(model.image_size)
    strides = (4, 8, 16) if model.use_high_res_features_in_sam else (16,)
    return [(side // s, side // s) for s in strides]


def parameter_count(model: "torch.nn.Module") -> int:
    return sum(p.numel() for p in model.parameters())


def load_sam2_state_dict(path: Path, model_type: str, model: "torch.nn.Module") -> Mapping:
    """The state dict in ``path`` (``weights_only=True``; the official files keep it under ``"model"``),
    checked key for key against ``model``."""
    from .checkpoints import check_state_keys, read_state_dict

    what = f"SAM 2.1 {model_type} checkpoint"
    state = read_state_dict(path, what, f"the official {model_type}.pt file")
    check_state_keys(state, model, path, what, "Check generator.sam.model_type.")
    return state


def load_sam2(model_type: str, checkpoint: str, *, random_weights: bool, allow_download: bool,
              device: "torch.device | str", config_key: str = "generator.sam.checkpoint"
              ) -> tuple["SAM2Base", dict[str, Any]]:
    """A SAM 2.1 model in eval mode on ``device`` and provenance facts (weights path, SHA-256 when known)."""
    import torch

    from .loading import RANDOM_SEED
    from .weights import SAM2_CHECKPOINTS, resolve_sam2_checkpoint

    if random_weights:
        torch.manual_seed(RANDOM_SEED)
        return build_sam2(model_type, None, str(device)), {"model_type": model_type, "weights": "RANDOM"}
    if model_type == "tiny":
        raise GeneratorError("SAM 2.1 model type 'tiny' is a test model: it has random weights only"
                             " (set random_weights: true, or pick a sam2.1_hiera_* model)")
    path = resolve_sam2_checkpoint(model_type, checkpoint, allow_download=allow_download, config_key=config_key)
    facts: dict[str, Any] = {"model_type": model_type, "weights": str(path)}
    official_sha256 = SAM2_CHECKPOINTS[model_type].sha256
    if not checkpoint and official_sha256:  # the official file: its SHA-256 was checked when it was resolved
        facts["sha256"] = official_sha256
    return build_sam2(model_type, path, str(device)), facts
