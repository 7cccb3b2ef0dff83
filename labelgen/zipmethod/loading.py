"""Building the Zip generator's models: real weights through ``labelgen.weights``, or the
real architectures with (seeded) random weights when a recipe asks for it explicitly."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import GeneratorError
from ..weights import resolve_clip_weights, resolve_sam_checkpoint

log = logging.getLogger(__name__)

RANDOM_SEED = 0  # random-weight models are seeded so every worker builds the same one
PRECISIONS = ("fp32", "bf16", "fp16")  # fp32, or torch.autocast to bfloat16 / float16
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, where: str = "precision") -> str:
    """``precision`` when it is one of ``PRECISIONS``; else a ``GeneratorError`` naming them."""
    if precision not in PRECISIONS:
        raise GeneratorError(f"{where} must be one of {list(PRECISIONS)}; got {precision!r}")
    return precision


def autocast(device: str | torch.device, precision: str) -> Any:
    """``torch.autocast`` on ``device``'s type for ``bf16``/``fp16``; disabled for ``fp32``.

    Model outputs under it come in the low precision; the stages cast them back to float32
    where later steps (k-means, thresholds, scores) need it.
    """
    check_precision(precision)
    device_type = torch.device(device).type
    dtype = _AUTOCAST_DTYPES.get(precision, torch.bfloat16)
    return torch.autocast(device_type, dtype=dtype, enabled=precision != "fp32")


def check_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; a CUDA device that is not there is a clear error."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GeneratorError(f"execution.device: expected cpu, cuda or cuda:N; got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GeneratorError(f"execution.device is {device!r} but torch sees no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise GeneratorError(f"execution.device {device!r}: only {torch.cuda.device_count()} CUDA devices exist")
    elif dev.type != "cpu":
        raise GeneratorError(f"execution.device: expected cpu, cuda or cuda:N; got {device!r}")
    return dev


def load_clip(model_name: str, pretrained: str, *, random_weights: bool, allow_download: bool,
              device: torch.device) -> tuple[Any, Any, dict[str, Any]]:
    """An open_clip model in eval mode on ``device``, its tokenizer, and provenance facts."""
    import open_clip

    from .models import register_model_configs

    register_model_configs()
    if model_name not in open_clip.list_models():
        raise GeneratorError(f"unknown open_clip model {model_name!r}; e.g. ViT-B-16, RN50, RN50x64, labelgen-tiny-vit")
    if random_weights:
        torch.manual_seed(RANDOM_SEED)
        model = open_clip.create_model(model_name, pretrained=None)
        facts = {"model": model_name, "weights": "RANDOM"}
    else:
        path = resolve_clip_weights(model_name, pretrained, allow_download=allow_download)
        model = open_clip.create_model(model_name, pretrained=str(path), weights_only=True)
        facts = {"model": model_name, "pretrained": pretrained, "weights": str(path)}
    return model.to(device).eval(), open_clip.get_tokenizer(model_name), facts


def load_sam(model_type: str, checkpoint: str, *, random_weights: bool, allow_download: bool,
             device: torch.device, config_key: str = "generator.sam.checkpoint") -> tuple[Any, dict[str, Any]]:
    """A SAM model in eval mode on ``device`` and provenance facts (checkpoint path and SHA-256)."""
    from ..weights import SAM_CHECKPOINTS
    from .refine import build_sam

    if random_weights:
        torch.manual_seed(RANDOM_SEED)
        return build_sam(model_type, None, str(device)), {"model_type": model_type, "weights": "RANDOM"}
    path = resolve_sam_checkpoint(model_type, checkpoint, allow_download=allow_download, config_key=config_key)
    facts: dict[str, Any] = {"model_type": model_type, "weights": str(path)}
    if not checkpoint:  # the official file: its SHA-256 was checked when it was resolved
        facts["sha256"] = SAM_CHECKPOINTS[model_type].sha256
    return build_sam(model_type, Path(path), str(device)), facts
