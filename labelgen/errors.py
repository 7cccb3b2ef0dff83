"""Typed errors. Every message says what was expected, what came, and what to do.

The CLI shows ``LabelgenError`` subclasses as one-line messages (exit status 2);
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class LabelgenError(Exception):
    """Base class of every error labelgen raises on purpose."""


class ValidationError(LabelgenError, ValueError):
    """A value has the wrong shape, type or range (e.g. a result column)."""


class ConfigError(LabelgenError, ValueError):
    """A recipe or ``--set`` override is not valid for the typed config."""


class RegistryError(LabelgenError, KeyError):
    """A plugin name (generator, source) is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; we don't want that
        return str(self.args[0]) if self.args else ""


class ImageSourceError(LabelgenError):
    """An image source (folder, list file, COCO JSON) cannot be listed at all."""


class ImageDecodeError(LabelgenError):
    """One image could not be read. ``reason`` is a stable code for the failure ledger.

    Reason codes: ``missing`` (also a dangling symlink), ``unreadable``, ``symlink_loop``,
    ``not_a_regular_file`` (FIFO, socket, device), ``too_large_file`` (over the byte cap),
    ``empty_file``, ``not_an_image``, ``truncated``, ``too_large`` (pixels), ``bad_dimensions``.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class RunStoreError(LabelgenError):
    """The run directory cannot be used as asked (unwritable, corrupt, wrong layout)."""


class CorruptRunError(RunStoreError):
    """A committed file of the run (run.json, config.yaml, plan.jsonl, a shard) does not verify
    against its checksum. The message names the file; nothing that verifies is dropped."""


class StoreWriteError(RunStoreError):
    """A write into the run directory failed (disk full, permissions). Committed shards are intact."""


class ConfigMismatchError(RunStoreError):
    """Resuming a run with a different configuration or image source."""


class RunLockedError(RunStoreError):
    """Another process holds the run directory's lock."""


class WeightsNotFoundError(LabelgenError, FileNotFoundError):
    """Model weights are not available locally and cannot be downloaded."""


class GeneratorError(LabelgenError):
    """A generator cannot be built or used with the given config."""


class ExportError(LabelgenError):
    """An export or import cannot be done as asked (bad target, path outside the folder, bad input)."""
