"""Reading model checkpoints safely: ``torch.load(weights_only=True)``, a state dict or nothing, and the
key-for-key check against the architecture. One place for SAM, SAM 2.1 and SAM 3 (torch imported lazily)."""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import GeneratorError, WeightsNotFoundError


def read_state_dict(path: Path, what: str, official: str) -> Mapping:
    """The tensors of the checkpoint at ``path``: a state dict, or one nested under ``"model"`` (as the
    official SAM 2.1 and SAM 3 files keep it).

    Args:
        what: names the checkpoint in errors, e.g. ``"SAM 2.1 sam2.1_hiera_large checkpoint"``.
        official: what to use instead, e.g. ``"the official sam3.pt"``.
    Raises:
        WeightsNotFoundError: no file there. GeneratorError: pickled objects other than tensors and plain
        containers (refused by ``weights_only``), an unreadable or truncated file, or no state dict.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{what} not found: {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise GeneratorError(
            f"refusing {what} {path}: it holds objects other than tensors and plain containers"
            f" (weights_only loading failed: {str(exc).splitlines()[0]}). Use {official} or re-save a plain"
            " state_dict."
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise GeneratorError(f"cannot read {what} {path}: {exc}. Is the file complete?") from exc
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping):
        raise GeneratorError(f"{what} {path} must hold a state dict; got {type(loaded).__name__}")
    return loaded


def check_state_keys(state: Mapping, model: Any, path: Path, what: str, fix: str, *,
                     allow_unexpected: bool = False) -> list[str]:
    """Refuse a state dict whose keys are not ``model``'s (``fix`` says what to check, e.g. the recipe key).
    Returns the unexpected keys (empty unless ``allow_unexpected``)."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or (unexpected and not allow_unexpected):
        raise GeneratorError(
            f"{what} {path} does not match the architecture: {len(missing)} missing keys {missing[:5]},"
            f" {len(unexpected)} unexpected keys {unexpected[:5]}. {fix}"
        )
    return unexpected
