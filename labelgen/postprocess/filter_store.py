"""Filtering a finished run: stream its rows, count what was kept, sweep thresholds, save a copy.

Nothing here loads a model. Every function streams the run shard by shard
(``RunStore.iter_rows``), so memory does not grow with the dataset.

``save_filtered`` writes::

    RUN_DIR/filtered/NAME/
      filter.yaml        the FilterConfig as a plain mapping (``load_filter_config`` reads it back)
      NNNNNN.jsonl.gz    one per done shard of the run: its rows in the same format, where
                         ``instances`` holds only the kept ones and every row has
                         ``"rejected": [{"index": i, "reason": r, ...detail}]``
      summary.json       ``FilterSummary.to_dict()`` plus image counts, the run id, and ``incomplete``
                         (``{"pending_shards", "failed_shards", "images_not_filtered"}``, or null)

A run with pending or failed shards is filtered as far as it is committed, with one logged warning
(``warn_if_incomplete``). A per-class threshold on labels without class ids (a class-agnostic run)
can never apply, so it is a ``ConfigError`` rather than silently ignored.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import yaml

from ..atomic import staged_folder, write_bytes_atomic, write_json_atomic, write_jsonl_gz_atomic
from ..config import config_to_dict
from ..errors import ConfigError, ValidationError
from .filtering import REASONS, FilterConfig, FilterResult, class_label, count_kept, filter_instances
from ..structures.instances import Instances
from ..structures.rows import Row
from ..store.run_store import RunStore, write_checksums

log = logging.getLogger(__name__)

FILTERED_FORMAT = "labelgen-filtered/1"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


# -- streaming ----------------------------------------------------------------------------------
def filter_run(
    store: RunStore, config: FilterConfig, class_names: Sequence[str] | None = None
) -> Iterator[tuple[Row, FilterResult | None]]:
    """``(row, result)`` for every committed image row, in plan order; failed rows give ``None``."""
    for row in store.iter_rows():
        yield row, filter_row(row, config, class_names)


def filter_row(row: Row, config: FilterConfig, class_names: Sequence[str] | None = None) -> FilterResult | None:
    """Filter one shard row (``None`` for a failed image). Errors name the image."""
    if row.instances is None:
        return None
    return _for_image(row, config, lambda instances: filter_instances(instances, config, class_names))


def filtered_row(row: Row, result: FilterResult | None) -> Row:
    """``row`` as a filtered copy holds it: the kept instances, and ``rejected`` (``()`` for a failed image)."""
    if result is None:
        return dataclasses.replace(row, rejected=())
    rejected = tuple({"index": index, "reason": reason, **detail} for index, reason, detail in result.rejected)
    return row.with_instances(result.kept, rejected=rejected)


def _for_image(row: Row, config: FilterConfig, action: Callable[[Instances], Any]) -> Any:
    try:
        _check_class_minimums_apply(row.instances, config, row)
        return action(row.instances)
    except ValidationError as exc:
        raise ValidationError(f"image {row.image.image_id!r}: {exc}") from None


def _check_class_minimums_apply(instances: Instances, config: FilterConfig, row: Row) -> None:
    """A per-class threshold on labels without class ids would be silently ignored: refuse it."""
    if config.min_confidence_per_class and len(instances) and instances.class_ids is None:
        raise ConfigError(
            f"filter.min_confidence_per_class ({dict(config.min_confidence_per_class)}) can never apply: the labels"
            f" have no classes (a class-agnostic run; image {row.image.image_id!r} has no class"
            " ids), so every label would pass it unchecked. Use min_confidence to threshold every label, and drop"
            " min_confidence_per_class")


# -- completeness -------------------------------------------------------------------------------
def run_incomplete(store: RunStore, images_key: str = "images_not_included") -> dict[str, int] | None:
    """``{"pending_shards", "failed_shards", images_key}`` for a run whose plan has shards that are not
    committed (their images are in no filter or export), ``None`` when every shard is done.

    A shard is failed when it has an error record and no valid done record, pending otherwise."""
    pending = failed = images = 0
    for shard in store.iter_plan():
        if store.done_record(shard) is not None:
            continue
        if store.shard_error_record(shard.index) is not None:
            failed += 1
        else:
            pending += 1
        images += len(shard.images)
    if not (pending or failed):
        return None
    return {"pending_shards": pending, "failed_shards": failed, images_key: images}


def incomplete_message(store: RunStore, gap: dict[str, int], images: int, what: str) -> str:
    """The one-line warning about ``run_incomplete``'s result."""
    return (f"{what}: run {store.root} is incomplete ({gap['pending_shards']} pending and {gap['failed_shards']}"
            f" failed shards, {images} images), so those images are left out; rerun the same `labelgen run`"
            " command to finish the run (failed shards are retried), then this command")


def warn_if_incomplete(store: RunStore, what: str, images_key: str = "images_not_filtered") -> dict | None:
    """Log ``incomplete_message`` once if the run is incomplete; return ``run_incomplete``'s result."""
    gap = run_incomplete(store, images_key)
    if gap is not None:
        log.warning(incomplete_message(store, gap, gap[images_key], what))
    return gap


# -- summary ------------------------------------------------------------------------------------
class FilterSummary:
    """Counts of kept and rejected instances, per class and per reason, over many images."""

    def __init__(self) -> None:
        self.images = 0
        self._counts: dict[int | None, Counter] = {}
        self._labels: dict[int | None, str] = {}

    def add(self, result: FilterResult, class_names: Sequence[str] | None = None) -> None:
        """Count one image's result."""
        self.images += 1
        ids = result.input_class_ids
        outcomes = [(i, "kept") for i in result.kept_indices] + [(i, reason) for i, reason, _ in result.rejected]
        for index, outcome in outcomes:
            class_id = None if ids is None else ids[index]
            if class_id not in self._counts:
                self._counts[class_id] = Counter()
                self._labels[class_id] = class_label(class_id, class_names)
            self._counts[class_id][outcome] += 1

    def reasons(self) -> list[str]:
        """The reasons that occurred, in ``REASONS`` order."""
        total = self._total()
        return [r for r in REASONS if total[r]]

    def to_dict(self) -> dict[str, Any]:
        """``{"images", "reasons", "classes": {label: {"kept", reason..., "total"}}, "total": {...}}``."""
        columns = ["kept", *self.reasons()]
        return {
            "images": self.images,
            "reasons": columns[1:],
            "classes": {self._labels[k]: _count_row(self._counts[k], columns) for k in self._ordered_keys()},
            "total": _count_row(self._total(), columns),
        }

    def table(self) -> str:
        """A fixed-width table: one row per class, columns kept, each reason that occurred, total."""
        data = self.to_dict()
        header = ["class", "kept", *data["reasons"], "total"]
        body = [[label, *(str(v) for v in counts.values())] for label, counts in data["classes"].items()]
        body.append(["total", *(str(v) for v in data["total"].values())])
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
        return "\n".join(_render_line(line, widths) for line in [header, *body])

    def _ordered_keys(self) -> list[int | None]:
        return sorted(self._counts, key=lambda k: (k is None, -1 if k is None else k))

    def _total(self) -> Counter:
        total: Counter = Counter()
        for counts in self._counts.values():
            total.update(counts)
        return total


def _count_row(counts: Counter, columns: list[str]) -> dict[str, int]:
    return {**{c: counts[c] for c in columns}, "total": sum(counts.values())}


def _render_line(cells: list[str], widths: list[int]) -> str:
    """First cell left-aligned (the class), numbers right-aligned, two spaces apart."""
    padded = [cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]
    return "  ".join(padded).rstrip()


# -- threshold sweep ----------------------------------------------------------------------------
def sweep(
    store: RunStore,
    config: FilterConfig,
    column: str,
    values: Sequence[float],
    class_names: Sequence[str] | None = None,
) -> list[tuple[float, int]]:
    """``[(value, kept)]``: labels kept over the run with ``min_confidence = value`` on ``column``.

    Every other option of ``config`` applies. Exact: equal to running the filter once per value,
    but each image is decoded, cleaned and measured once; see ``labelgen.postprocess.filtering.count_kept``
    for how NMS and ``max_instances`` are evaluated per value.
    """
    thresholds = [_check_threshold(v) for v in values]
    config = dataclasses.replace(config, confidence_column=column)
    totals = np.zeros(len(thresholds), dtype=np.int64)
    for row in store.iter_rows():
        if row.instances is not None:
            totals += _for_image(row, config,
                                 lambda instances: count_kept(instances, config, thresholds, class_names))
    return [(value, int(total)) for value, total in zip(thresholds, totals)]


def _check_threshold(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value):
        raise ConfigError(f"sweep values must be finite numbers; got {value!r}")
    return float(value)


# -- saving -------------------------------------------------------------------------------------
def save_filtered(
    store: RunStore, config: FilterConfig, name: str, class_names: Sequence[str] | None = None
) -> Path:
    """Write the filtered copy ``RUN_DIR/filtered/NAME/`` (layout in the module docstring).

    The folder is built under a temporary name and renamed into place, so an existing NAME is
    replaced completely and a reader never sees half of it. Returns its path.
    """
    _check_name(name)
    run_id = store.manifest().get("run_id")
    final = store.copy_dir("filtered", name)
    incomplete = warn_if_incomplete(store, f"filtered copy {name!r}")
    with staged_folder(final, f"filtered copy {name!r}", finish=write_checksums) as tmp:
        yaml_text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
        write_bytes_atomic(tmp / "filter.yaml", yaml_text.encode("utf-8"), "filter options")
        counts = _write_shards(store, config, class_names, tmp)
        write_json_atomic(tmp / "summary.json", {"format": FILTERED_FORMAT, "name": name, "run_id": run_id, **counts,
                                                 "incomplete": incomplete}, "filter summary")
    return final


def _write_shards(store: RunStore, config: FilterConfig, class_names: Sequence[str] | None, folder: Path) -> dict:
    """One filtered output per done shard; returns image counts and the summary."""
    summary, shards, failed = FilterSummary(), 0, 0
    level = compress_level(store)
    for shard, _, committed in store.iter_committed():  # verified against the done records
        rows = []
        for row in committed:
            result = filter_row(row, config, class_names)
            if result is None:
                failed += 1
            else:
                summary.add(result, class_names)
            rows.append(filtered_row(row, result))
        write_jsonl_gz_atomic(folder / f"{shard.key}.jsonl.gz", [row.to_dict() for row in rows],
                              f"filtered shard {shard.key}", level=level)
        shards += 1
    return {"shards": shards, "failed_images": failed, **summary.to_dict()}


def compress_level(store: RunStore) -> int:
    try:
        level = (store.stored_config() or {}).get("store", {}).get("compress_level", 6)
    except (OSError, yaml.YAMLError, AttributeError):
        return 6
    return level if isinstance(level, int) and 1 <= level <= 9 else 6


def _check_name(name: Any) -> None:
    """Exports never write outside their folder: a plain name, no separators, no '..'."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"filtered copy name must be a plain folder name (letters, digits, '.', '_', '-';"
                          f" no path separators or '..'; at most 128 characters); got {name!r}")
