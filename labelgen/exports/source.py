"""What exporters read: a run's committed rows (``Row``), optionally filtered or reviewed.

Sources, streamed shard by shard in plan order (``RunStore.iter_committed``, verified):

* the run itself (every committed row);
* the run with filter options applied on the fly (``FilterConfig``, same options as ``labelgen filter``;
  the rows are those a filtered copy would hold: kept instances and ``rejected``);
* a saved filtered copy ``RUN_DIR/filtered/NAME/`` (``labelgen filter --save NAME``);
* a reviewed copy ``RUN_DIR/reviewed/NAME/`` (written by the review pull step; same row format).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import ExportError
from ..postprocess.filter_config import FilterConfig
from ..postprocess.filter_store import filter_row, filtered_row, incomplete_message, run_incomplete
from ..structures.rows import Row
from ..store.run_store import RunStore, ShardSpec

log = logging.getLogger(__name__)

AGNOSTIC_CLASS = "object"  # the one category of class-agnostic runs


@dataclass(frozen=True)
class ExportSource:
    """Iterating gives the rows to export in plan order (``row.instances`` is ``None`` for an image
    that failed to process); a row's position in that order is what stable export ids derive from."""

    store: RunStore
    filter_config: FilterConfig | None = None
    copy_kind: str | None = None  # "filtered" | "reviewed" | None
    copy_name: str | None = None

    @property
    def class_names(self) -> list[str]:
        """Category names in class-id order; class-agnostic runs have the single ``"object"``."""
        names = self.store.manifest().get("class_names")
        return list(names) if names else [AGNOSTIC_CLASS]

    @property
    def class_agnostic(self) -> bool:
        return not self.store.manifest().get("class_names")

    @property
    def run_id(self) -> str:
        return self.store.manifest()["run_id"]

    def images_root(self) -> str:
        """Default root that exported file names are relative to: the folder source's root,
        else the common folder of all images."""
        source = self.store.manifest().get("source", {})
        if source.get("kind") == "folder":
            return source["root"]
        if source.get("kind") == "coco" and source.get("images_root"):
            return source["images_root"]
        folders = {os.path.dirname(row.image.uri) for row in self}
        return os.path.commonpath(sorted(folders)) if folders else str(self.store.root)

    def __iter__(self) -> Iterator[Row]:
        for _, _, rows in self.iter_shards():
            yield from rows

    def iter_shards(self) -> Iterator[tuple[ShardSpec, dict, list[Row]]]:
        """``(shard, done record, rows to export)`` per committed shard that verifies, in plan order."""
        copy = None if self.copy_kind is None else self.store.copy_dir(self.copy_kind, str(self.copy_name))
        names = self.store.manifest().get("class_names")
        for shard, done, rows in self.store.iter_committed(copy=copy):
            if self.filter_config is not None:
                rows = [filtered_row(row, filter_row(row, self.filter_config, names)) for row in rows]
            yield shard, done, rows


def open_export_source(run_dir: str | Path, *, filter_config: FilterConfig | None = None,
                       filtered: str | None = None, reviewed: str | None = None) -> ExportSource:
    """The run's labels to export: raw, filtered on the fly, or a saved filtered/reviewed copy."""
    store = RunStore(run_dir)
    store.manifest()  # a clear error if RUN_DIR is not a run directory
    chosen = [name for name in (filtered, reviewed) if name]
    if len(chosen) > 1 or (chosen and filter_config is not None):
        raise ExportError("choose one of --filtered NAME, --reviewed NAME, or filter options")
    for kind, name in (("filtered", filtered), ("reviewed", reviewed)):
        if name:
            folder = store.copy_dir(kind, name)
            if not (folder / "summary.json").is_file():
                raise ExportError(f"no {kind} copy {name!r} in {store.root} (expected {folder}/summary.json)")
            return ExportSource(store, None, kind, name)
    return ExportSource(store, filter_config)


def log_incomplete(source: ExportSource, what: str) -> dict | None:
    """``{"pending_shards", "failed_shards", "images_not_exported"}`` when the run has shards that are not
    committed (their images are not exported), with one logged warning; ``None`` for a complete run."""
    gap = run_incomplete(source.store, "images_not_exported")
    if gap is not None:
        log.warning(incomplete_message(source.store, gap, gap["images_not_exported"], what))
    return gap


def read_summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text(encoding="utf-8"))


__all__: Sequence[str] = ["AGNOSTIC_CLASS", "ExportSource", "log_incomplete", "open_export_source"]
