"""Building the Zip generator's models: real weights through ``labelgen.models.weights``, or the
real architectures with (seeded) random weights when a recipe asks for it explicitly."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import GeneratorError
from .weights import resolve_clip_weights, resolve_sam_checkpoint

log = logging.getLogger(__name__)

RANDOM_SEED = 0  # random-weight models are seeded so every worker builds the same one
PRECISIONS = ("fp32", "bf16", "fp16")  # fp32, or torch.autocast to bfloat16 / float16
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CPUINFO = "/proc/cpuinfo"
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that run bf16 matmuls natively
_LOGGED_CHOICES: set[tuple[str, str]] = set()  # (device type, resolved precision) already logged by this process


def cpu_flags(cpuinfo_text: str) -> set[str]:
    """The CPU feature flags of a ``/proc/cpuinfo`` text (the ``flags`` line of its first processor)."""
    for line in cpuinfo_text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def native_bf16_cpu_flag(cpuinfo_text: str | None = None) -> str | None:
    """The first of ``NATIVE_BF16_CPU_FLAGS`` this CPU has (``cpuinfo_text``: ``/proc/cpuinfo`` as text,
    read when ``None``), or ``None`` when it has none, or when ``/proc/cpuinfo`` cannot be read."""
    if cpuinfo_text is None:
        try:
            with open(CPUINFO, encoding="utf-8", errors="replace") as handle:
                cpuinfo_text = handle.read()
        except OSError:
            return None
    flags = cpu_flags(cpuinfo_text)
    return next((flag for flag in NATIVE_BF16_CPU_FLAGS if flag in flags), None)


def resolve_precision(precision: str, device: str | torch.device, *, cpuinfo_text: str | None = None) -> str:
    """The precision a model runs in: ``precision`` itself, or for ``auto`` bf16 where ``device`` runs it
    natively, else fp32.

    CPU: bf16 when the CPU has AVX-512 BF16 or AMX (``/proc/cpuinfo`` flags ``avx512_bf16`` /
    ``amx_bf16``, or ``cpuinfo_text`` when given) and torch has oneDNN; without them torch emulates
    bf16, about 10x slower than fp32. CUDA: bf16 when the GPU supports it natively (Ampere and
    later). The choice is logged once per process at INFO. The recipe keeps ``auto`` (its
    fingerprint does not depend on the machine); generators record the resolved value in the
    provenance of every shard.
    """
    if precision != "auto":
        return check_precision(precision)
    dev = torch.device(device)
    if dev.type == "cpu":
        flag = native_bf16_cpu_flag(cpuinfo_text)
        if flag is not None and torch.backends.mkldnn.is_available():
            resolved, why = "bf16", f"cpu has {flag}"
        elif flag is not None:
            resolved, why = "fp32", f"cpu has {flag} but this torch has no oneDNN (mkldnn)"
        else:
            resolved, why = "fp32", f"cpu has none of {', '.join(NATIVE_BF16_CPU_FLAGS)}: bf16 would be emulated"
    elif dev.type == "cuda":
        if _cuda_native_bf16(dev):
            resolved, why = "bf16", "the GPU supports bf16 natively"
        else:
            resolved, why = "fp32", "this GPU has no native bf16"
    else:
        resolved, why = "fp32", f"no native bf16 check for device type {dev.type!r}"
    if (dev.type, resolved) not in _LOGGED_CHOICES:
        _LOGGED_CHOICES.add((dev.type, resolved))
        log.info("precision auto -> %s (%s)", resolved, why)
    return resolved


def _cuda_native_bf16(device: torch.device) -> bool:
    """Whether the GPU runs bf16 natively (not emulated). The current CUDA device is asked: every
    worker uses one GPU, and the GPUs of one machine are of one kind."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch without the keyword: it reports native support only
        return bool(torch.cuda.is_bf16_supported())


def check_precision(precision: str, where: str = "precision") -> str:
    """``precision`` when it is one of ``PRECISIONS``; else a ``GeneratorError`` naming them."""
    if precision not in PRECISIONS:
        hint = " (resolve 'auto' with resolve_precision first)" if precision == "auto" else ""
        raise GeneratorError(f"{where} must be one of {list(PRECISIONS)}; got {precision!r}{hint}")
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


def return_freed_host_memory() -> bool:
    """Give the C allocator's freed pages back to the OS (glibc ``malloc_trim``); False where there is none.

    Re-laying a model's weights out (``module.to(memory_format=...)``) frees the old copies into glibc's heap,
    which keeps them: ~340 MiB of resident memory for RN50x64's trunk until trimmed.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0)) if name else False
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return False


def to_memory_format(module: torch.nn.Module, memory_format: torch.memory_format) -> torch.nn.Module:
    """``module.to(memory_format=...)`` one convolution at a time, handing each freed old copy back to the OS,
    so that re-laying RN50x64's trunk out raises peak host memory by one layer's weights (~24 MiB), not by all
    of them (~340 MiB). Only 4-D tensors (convolution weights) change layout. Returns ``module``."""
    convolutions = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)
                    and not m.weight.is_contiguous(memory_format=memory_format)]  # already laid out: no copy
    for conv in convolutions:
        on_host = conv.weight.device.type == "cpu"
        conv.to(memory_format=memory_format)
        if on_host:
            return_freed_host_memory()
    return module


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


def uses_quick_gelu(model_name: str, pretrained: str) -> bool:
    """Whether a CLIP built as ``model_name`` for ``pretrained`` must use QuickGELU: OpenAI's weights
    were trained with ``x * sigmoid(1.702 x)``, while open_clip's plain configs (``ViT-B-16``, ...)
    use ``nn.GELU``. True for the ``openai`` tag (any case) and for the ``-quickgelu`` configs."""
    return pretrained.strip().lower() == "openai" or model_name.endswith("-quickgelu")


def load_clip(model_name: str, pretrained: str, *, random_weights: bool, allow_download: bool,
              device: torch.device) -> tuple[Any, Any, dict[str, Any]]:
    """An open_clip model in eval mode on ``device``, its tokenizer, and provenance facts.

    OpenAI weights (:func:`uses_quick_gelu`) get QuickGELU activations (``force_quick_gelu``), also
    when ``random_weights`` builds the architecture for them, so the network is the one they were
    trained as; the facts record ``activation``.
    """
    import open_clip

    from .presets import register_model_configs

    register_model_configs()
    if model_name not in open_clip.list_models():
        raise GeneratorError(f"unknown open_clip model {model_name!r}; e.g. ViT-B-16, RN50, RN50x64, labelgen-tiny-vit")
    quick_gelu = uses_quick_gelu(model_name, pretrained)
    options = {"force_quick_gelu": True} if quick_gelu else {}
    if random_weights:
        torch.manual_seed(RANDOM_SEED)
        model = open_clip.create_model(model_name, pretrained=None, **options)
        facts = {"model": model_name, "weights": "RANDOM"}
    else:
        path = resolve_clip_weights(model_name, pretrained, allow_download=allow_download)
        model = open_clip.create_model(model_name, pretrained=str(path), weights_only=True, **options)
        facts = {"model": model_name, "pretrained": pretrained, "weights": str(path)}
    facts["activation"] = "quick_gelu" if quick_gelu else "model_config"
    return model.to(device).eval(), open_clip.get_tokenizer(model_name), facts


def load_sam(model_type: str, checkpoint: str, *, random_weights: bool, allow_download: bool,
             device: torch.device, config_key: str = "generator.sam.checkpoint") -> tuple[Any, dict[str, Any]]:
    """A SAM model in eval mode on ``device`` and provenance facts (checkpoint path and SHA-256)."""
    from .weights import SAM_CHECKPOINTS
    from .sam import build_sam

    if random_weights:
        torch.manual_seed(RANDOM_SEED)
        return build_sam(model_type, None, str(device)), {"model_type": model_type, "weights": "RANDOM"}
    path = resolve_sam_checkpoint(model_type, checkpoint, allow_download=allow_download, config_key=config_key)
    facts: dict[str, Any] = {"model_type": model_type, "weights": str(path)}
    if not checkpoint:  # the official file: its SHA-256 was checked when it was resolved
        facts["sha256"] = SAM_CHECKPOINTS[model_type].sha256
    return build_sam(model_type, Path(path), str(device)), facts
