"""labelgen's own open_clip model presets (tiny configs for fast tests).

The presets are JSON files in ``labelgen/model_configs/`` in open_clip's format.
``register_model_configs()`` adds that whole folder to open_clip's registry, after
which ``open_clip.create_model("labelgen-tiny-vit", pretrained=None)`` and
``open_clip.get_tokenizer("labelgen-tiny-vit")`` work. Nothing is registered at
import time; open_clip is imported only when the function is called.
"""
from __future__ import annotations

import threading
from pathlib import Path

MODEL_CONFIG_DIR: Path = Path(__file__).resolve().parents[1] / "model_configs"

_lock = threading.Lock()
_registered = False


def register_model_configs() -> Path:
    """Register every ``*.json`` preset of ``MODEL_CONFIG_DIR`` with open_clip, once.

    Idempotent and thread-safe: later calls do nothing. Presets added to the folder
    before the first call are all picked up (open_clip scans the whole folder).
    Returns the folder.
    """
    global _registered
    with _lock:
        if not _registered:
            import open_clip  # lazy: heavy

            open_clip.add_model_config(MODEL_CONFIG_DIR)
            _registered = True
    return MODEL_CONFIG_DIR
