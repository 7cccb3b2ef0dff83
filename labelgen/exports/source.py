"""What exporters read: a run's committed rows, optionally filtered or reviewed, as ``ExportItem``s.

Sources, streamed shard by shard in plan order:

* the run itself (every committed row);
* the run with filter options applied on the fly (``FilterConfig``, same options as ``labelgen filter``);
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
from ..postprocess.filter_store import filter_row, incomplete_message, read_copy_rows, run_incomplete
from ..structures.instances import ImageRecord, Instances
from ..store.run_store import RunStore

log = logging.getLogger(__name__)

AGNOSTIC_CLASS = "object"  # the one category of class-agnostic runs


@dataclass(frozen=True)
class ExportItem:
    """One image to export. ``instances`` is ``None`` for an image that failed to process."""

    index: int  # 0-based position in plan order: stable image ids derive from it
    image: ImageRecord
    instances: Instances | None
    shard: int


@dataclass(frozen=True)
class ExportSource:
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
        folders = {os.path.dirname(item.image.uri) for item in self}
        return os.path.commonpath(sorted(folders)) if folders else str(self.store.root)

    def __iter__(self) -> Iterator[ExportItem]:
        index = 0
        for shard, row in self._rows():
            record = ImageRecord.from_dict(row["image"])
            instances = Instances.from_dict(row["instances"]) if row.get("status") == "ok" else None
            yield ExportItem(index, record, instances, shard)
            index += 1

    def _rows(self) -> Iterator[tuple[int, dict]]:
        names = self.store.manifest().get("class_names")
        for shard, _, run_rows in self.store.iter_committed():  # verified against the done records
            rows = run_rows if self.copy_kind is None else self._copy_rows(shard.index)
            for row in rows:
                if self.filter_config is not None and row.get("status") == "ok":
                    row = {**row, "instances": filter_row(row, self.filter_config, names).kept.to_dict()}
                yield shard.index, row

    def _copy_rows(self, index: int) -> list[dict]:
        """One shard of the filtered/reviewed copy, verified against the copy's checksums."""
        path = self._shard_path(index)
        return read_copy_rows(path.parent, path.name)

    def _shard_path(self, index: int) -> Path:
        if self.copy_kind is None:
            return self.store.shard_output(index)
        path = self.store.root / self.copy_kind / str(self.copy_name) / f"{index:06d}.jsonl.gz"
        if not path.is_file():
            raise ExportError(f"{self.copy_kind} copy {self.copy_name!r} has no shard {index:06d} ({path});"
                              f" re-create it (it predates shards committed since)")
        return path


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
            folder = store.root / kind / name
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


__all__: Sequence[str] = ["AGNOSTIC_CLASS", "ExportItem", "ExportSource", "log_incomplete", "open_export_source"]
