"""What one worker process does: load the generator once, then label shards."""
from __future__ import annotations

import collections
import logging
import os
import sys
import time
from typing import Any, Callable

from .config import ExecutionConfig, ImagesConfig, Recipe
from .decode import read_image_rgb
from .errors import ImageDecodeError, LabelgenError, ValidationError
from .generators import GENERATORS, Generator
from .instances import ImageRecord, Instances
from .scoring import ScoringConfig, with_combined_score
from .store import RunStore, ShardSpec, utc_now

log = logging.getLogger(__name__)

_GENERATORS: dict[tuple[str, str, str], Generator] = {}  # per process: (fingerprint, device, cache) -> generator
_LABELERS: dict[tuple[str, str], Any] = {}  # per process: (fingerprint, device) -> ClipLabeler


def get_generator(recipe: Recipe) -> Generator:
    """The process's generator for this recipe, built on first use (models load once per worker)."""
    key = (recipe.fingerprint(), recipe.execution.device, recipe.execution.cache_dir)
    if key not in _GENERATORS:
        cls = GENERATORS.get(recipe.generator.name)
        generator = cls.from_config(recipe.generator.params, device=recipe.execution.device)
        _attach_feature_cache(generator, recipe.execution)
        _GENERATORS[key] = generator
        _limit_torch_threads(recipe.execution)
    return _GENERATORS[key]


def _attach_feature_cache(generator: Generator, execution: ExecutionConfig) -> None:
    """Give generators that support it (``feature_cache`` attribute) the configured cache."""
    if execution.cache_dir and hasattr(generator, "feature_cache"):
        from pathlib import Path

        from .feature_cache import FeatureCache

        generator.feature_cache = FeatureCache(Path(execution.cache_dir), int(execution.cache_max_gb * 2**30))


def get_labeler(recipe: Recipe) -> Any:
    """The process's CLIP labeler for this recipe, or ``None`` when the recipe has none."""
    if recipe.labeler is None:
        return None
    key = (recipe.fingerprint(), recipe.execution.device)
    if key not in _LABELERS:
        from .clip_labeler import ClipLabeler  # torch: only when a labeler is asked for

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


def process_image(generator: Generator, record: ImageRecord, images: ImagesConfig,
                  scoring: ScoringConfig | None = None, labeler: Any = None) -> dict[str, Any]:
    """One image -> one shard row. Never raises for a bad image or a generator failure."""
    try:
        image, info = read_image_rgb(record.uri, max_pixels=images.max_pixels, compute_sha256=images.compute_sha256)
    except ImageDecodeError as exc:
        return _failed_row(record, exc.reason, str(exc))
    record = record.with_size(info["width"], info["height"], info.get("sha256"))
    try:
        instances = generator.generate(image, record)
        _check_frame(instances, record)
        if labeler is not None:
            instances = labeler.label(image, instances)
        if scoring is not None:
            instances = with_combined_score(instances, scoring)
    except LabelgenError as exc:
        return _failed_row(record, "generator_error", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a model bug or OOM on one image must not abort the run
        log.exception("generator failed on %s", record.image_id)
        return _failed_row(record, "generator_error", f"{type(exc).__name__}: {exc}")
    return {"image": record.to_dict(), "status": "ok", "instances": instances.to_dict()}


def process_shard(
    root: str, shard: ShardSpec, recipe: Recipe, on_image: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Label every image of ``shard`` and commit it. Returns the done record."""
    generator, labeler = get_generator(recipe), get_labeler(recipe)
    started, t0 = utc_now(), time.perf_counter()
    rows = []
    for record in shard.images:
        rows.append(process_image(generator, record, recipe.images, recipe.scoring, labeler))
        if on_image is not None:
            on_image(1)
    summary = _summarize(rows)
    summary.update(
        fingerprint=recipe.fingerprint(),
        started=started,
        finished=utc_now(),
        seconds=round(time.perf_counter() - t0, 4),
        provenance={**generator.provenance(), **({"labeler": labeler.provenance()} if labeler else {})},
    )
    return RunStore(root).commit_shard(shard, rows, summary, level=recipe.store.compress_level)


def _summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    failures = [
        {"image_id": r["image"]["image_id"], "uri": r["image"]["uri"], **r["failure"]}
        for r in rows
        if r["status"] == "failed"
    ]
    instances = sum(len(r["instances"]["masks_rle"]) for r in rows if r["status"] == "ok")
    reasons = collections.Counter(f["reason"] for f in failures)
    return {"images": len(rows), "ok": len(rows) - len(failures), "failed": len(failures),
            "instances": instances, "failures": failures, "failure_reasons": dict(sorted(reasons.items()))}


def _failed_row(record: ImageRecord, reason: str, message: str) -> dict[str, Any]:
    return {"image": record.to_dict(), "status": "failed", "failure": {"reason": reason, "message": message}}


def _check_frame(instances: Instances, record: ImageRecord) -> None:
    if not isinstance(instances, Instances):
        raise ValidationError(f"generator must return Instances; got {type(instances).__name__}")
    if (instances.height, instances.width) != (record.height, record.width):
        raise ValidationError(
            f"generator returned a {instances.width}x{instances.height} frame for a "
            f"{record.width}x{record.height} image"
        )
