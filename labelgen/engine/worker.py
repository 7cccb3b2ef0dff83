"""What one worker process does: load the generator once, then label shards (``pipeline``) and commit them."""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable

from ..config import ExecutionConfig, Recipe
from ..generators import GENERATORS, Generator
from ..labelers.protocol import Labeler
from .pipeline import label_images
from ..structures.rows import summarize
from ..store.run_store import RunStore, ShardSpec, utc_now

log = logging.getLogger(__name__)

_GENERATORS: dict[tuple[str, str, str], Generator] = {}  # per process: (fingerprint, device, cache) -> generator
_LABELERS: dict[tuple[str, str], Labeler] = {}  # per process: (fingerprint, device) -> ClipLabeler


def get_generator(recipe: Recipe) -> Generator:
    """The process's generator for this recipe, built on first use (models load once per worker)."""
    key = (recipe.fingerprint(), recipe.execution.device, recipe.execution.cache_dir, recipe.execution.compile)
    if key not in _GENERATORS:
        cls = GENERATORS.get(recipe.generator.name)
        generator = cls.from_config(recipe.generator.params, device=recipe.execution.device)
        _attach_feature_cache(generator, recipe.execution)
        if recipe.execution.compile:
            from ..models.compile import compile_encoders

            compile_encoders(generator)
        _GENERATORS[key] = generator
        _limit_torch_threads(recipe.execution)
    return _GENERATORS[key]


def _attach_feature_cache(generator: Generator, execution: ExecutionConfig) -> None:
    """Give generators that use one (``Generator.uses_feature_cache``) the configured cache."""
    if execution.cache_dir and generator.uses_feature_cache:
        from pathlib import Path

        from ..models.feature_cache import FeatureCache

        generator.feature_cache = FeatureCache(Path(execution.cache_dir), int(execution.cache_max_gb * 2**30))


def get_labeler(recipe: Recipe) -> Labeler | None:
    """The process's CLIP labeler for this recipe, or ``None`` when the recipe has none."""
    if recipe.labeler is None:
        return None
    key = (recipe.fingerprint(), recipe.execution.device)
    if key not in _LABELERS:
        from ..labelers.clip import ClipLabeler  # torch: only when a labeler is asked for

        _LABELERS[key] = ClipLabeler.from_config(recipe.labeler, device=recipe.execution.device)
        _limit_torch_threads(recipe.execution)
    return _LABELERS[key]


def _limit_torch_threads(execution: ExecutionConfig) -> None:
    """Share the CPU cores between workers: oversubscribed torch threads slow everything down."""
    torch = sys.modules.get("torch")  # only generators that use torch have imported it
    if torch is None:
        return
    threads = execution.threads_per_worker or max(1, (os.cpu_count() or 1) // execution.workers)
    torch.set_num_threads(threads)


def process_shard(
    root: str, shard: ShardSpec, recipe: Recipe, on_image: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Label every image of ``shard`` and commit it. Returns the done record."""
    generator, labeler = get_generator(recipe), get_labeler(recipe)
    started, t0 = utc_now(), time.perf_counter()
    rows = label_images(generator, shard.images, recipe.images, scoring=recipe.scoring, labeler=labeler,
                        batch_size=recipe.execution.batch_size, on_image=on_image)
    summary = summarize(rows)
    summary.update(
        fingerprint=recipe.fingerprint(),
        started=started,
        finished=utc_now(),
        seconds=round(time.perf_counter() - t0, 4),
        provenance={**generator.provenance(), **({"labeler": labeler.provenance()} if labeler else {})},
    )
    return RunStore(root).commit_shard(shard, rows, summary, level=recipe.store.compress_level)
