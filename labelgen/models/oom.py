"""Out-of-memory back-off for batched model calls: halve the batch and retry.

``run_with_backoff(fn, items, batch_size)`` calls ``fn`` on consecutive batches of ``items``;
when a call runs out of memory the same batch is retried at half the size (and later batches
keep the smaller size), down to one item, where the error is raised. Imports no torch: a torch
error is recognised through ``sys.modules`` when torch is already loaded.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Sequence, TypeVar

from ..errors import ValidationError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
OOM_MESSAGE = "out of memory"
_OUT_OF_MEMORY = object()  # what _call returns instead of fn's result after a splittable OOM


def default_is_oom(exc: BaseException) -> bool:
    """True for ``torch.cuda.OutOfMemoryError`` (``torch.OutOfMemoryError``), ``MemoryError``,
    and a ``RuntimeError`` whose message contains "out of memory" (case-insensitive)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                      getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None))
                          if isinstance(t, type))
        if oom_types and isinstance(exc, oom_types):
            return True
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and OOM_MESSAGE in str(exc).lower()


def run_with_backoff(
    fn: Callable[[Sequence[T]], Sequence[R]],
    items: Sequence[T],
    batch_size: int,
    *,
    is_oom: Callable[[BaseException], bool] = default_is_oom,
) -> list[R]:
    """``fn`` over ``items`` in batches of at most ``batch_size``; the results concatenated in order.

    ``fn(batch)`` must return one result per item of ``batch`` (a sequence of the same length).
    When it raises an error for which ``is_oom`` is true, the failed batch's size is halved
    (rounding down, at least 1) and the same items are retried, with a warning; the smaller size is kept
    for the rest of the items. An out-of-memory error on a single item, and any other error,
    propagates unchanged. (One call of :meth:`AdaptiveBatcher.run`.)
    """
    return AdaptiveBatcher(batch_size, is_oom=is_oom).run(fn, items)


class AdaptiveBatcher:
    """Batches of at most ``size`` items, halved for good after an out-of-memory error.

    Keep one per model stage for the life of a worker: once a batch of ``n`` ran out of memory,
    later calls start at ``n // 2`` instead of failing again on every new batch.
    """

    def __init__(self, batch_size: int, *, is_oom: Callable[[BaseException], bool] = default_is_oom):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValidationError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.batch_size = batch_size  # what was asked for
        self.size = batch_size  # what currently fits
        self.is_oom = is_oom

    def run(self, fn: Callable[[Sequence[T]], Sequence[R]], items: Sequence[T]) -> list[R]:
        """``fn`` over ``items`` in batches of at most ``self.size`` (see :func:`run_with_backoff`)."""
        items = list(items)
        results: list[R] = []
        start = 0
        while start < len(items):
            batch = items[start:start + self.size]
            outcome = _call(fn, batch, self.is_oom)
            if outcome is _OUT_OF_MEMORY:  # retried outside the except block: the failed call's
                self.size = max(1, len(batch) // 2)  # frames (and their tensors) are freed by now
                log.warning("out of memory on a batch of %d items; retrying with batches of %d", len(batch), self.size)
                _release_cached_memory()
                continue
            if len(outcome) != len(batch):
                raise ValidationError(f"fn returned {len(outcome)} results for a batch of {len(batch)} items;"
                                      " it must return one per item")
            results.extend(outcome)
            start += len(batch)
        return results


def _call(fn: Callable[[Sequence[Any]], Sequence[Any]], batch: list, is_oom: Callable[[BaseException], bool]
          ) -> Any:
    """``fn(batch)``, or ``_OUT_OF_MEMORY`` when it ran out of memory on a batch that can be split."""
    try:
        return fn(batch)
    except Exception as exc:
        if len(batch) > 1 and is_oom(exc):
            return _OUT_OF_MEMORY
        raise


def _release_cached_memory() -> None:
    """Give the CUDA caching allocator's free blocks back before a retry (when CUDA is in use)."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and cuda.is_available() and cuda.is_initialized():
        cuda.empty_cache()
