"""Review in the FiftyOne App: export the run and open the App (``launch_review``), then read the
reviewers' decisions back into ``RUN_DIR/reviewed/NAME/`` (``pull_review``).

``RUN_DIR/reviewed/NAME/`` has the layout of a filtered copy (``labelgen.postprocess.filter_store``): one
``NNNNNN.jsonl.gz`` per done shard (rows in plan order), ``summary.json`` (format
``labelgen-reviewed/1``, counts) and ``review.yaml`` (the rules below). Its rows are the rows of
the exported source (the run, a filtered copy, ...) with the review applied:

* ``rejected`` gains ``{"index", "reason"}`` entries (indices into the run's own row) with reasons
  ``rejected_in_review`` (label tag ``rejected``), ``deleted_in_review`` (label removed in the App) and
  ``image_rejected_in_review`` (sample tag ``rejected``: the image stays, with zero instances);
* ``source_indices``: per kept instance, its index in the run's own row (``null`` for added ones);
* the attribute column ``review``: ``"approved"`` (label or sample tag ``approved``), ``"edited"``,
  ``"added"``, or ``null`` (untouched; an earlier review's value is kept).

Edits: a changed ``label`` changes the class id (it must be one of the run's class names); a
changed box becomes ``boxes_xyxy`` and the mask is clipped to it (mask ∩ box; when nothing of the
mask is left inside, the filled box). A Detection added in the App (no ``labelgen_position``, or a
copy of an exported label: the second Detection with the same position) becomes
an instance with its box, its mask placed in the box (or the filled box), every score column 1.0
(``confidence`` 1.0) and ``review: "added"``. ``rejected`` beats ``approved``. Images that are not in
the dataset (shards committed after the export) are copied unchanged.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

import numpy as np
import yaml
from PIL import Image

from ..atomic import staged_folder, write_bytes_atomic, write_json_atomic, write_jsonl_gz_atomic
from ..config import from_mapping
from ..errors import ConfigError, ExportError
from ..exports.fiftyone import (FIELD, FiftyOneExportReport, box_pixels, detection_label, export_fiftyone,
                                import_fiftyone, recorded_datasets, row_origin)
from ..exports.source import ExportSource, open_export_source
from ..postprocess.filter_config import FilterConfig
from ..postprocess.filter_store import compress_level
from ..structures.instances import Instances
from ..structures.masks import mask_to_rle, rles_to_masks
from ..structures.rows import Row
from ..store.run_store import RunStore, write_checksums
from .sample import VerdictCollector, read_sample, sample_of

REVIEWED_FORMAT = "labelgen-reviewed/1"
APPROVED_TAG, REJECTED_TAG = "approved", "rejected"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_BOX_TOLERANCE_PX = 1e-3
RULES = {
    "label tag 'rejected'": "instance dropped (reason rejected_in_review)",
    "label deleted in the App": "instance dropped (reason deleted_in_review)",
    "sample tag 'rejected'": "every instance dropped (reason image_rejected_in_review); the image stays",
    "label or sample tag 'approved'": "instance kept, review: approved ('rejected' wins over 'approved')",
    "label changed": "class id of the new label (must be a class name of the run), review: edited",
    "box changed": "boxes_xyxy = the new box, mask = mask inside the new box (filled box if nothing is left),"
                   " review: edited",
    "label added": "new instance: its box, its mask (else the filled box), every score 1.0, review: added",
}


@dataclass
class ReviewSession:
    dataset: str
    url: str  # http://ADDRESS:PORT/datasets/NAME
    session: Any  # fiftyone.core.session.Session
    export: FiftyOneExportReport


@dataclass(frozen=True)
class PullReport:
    name: str
    path: str
    dataset: str
    run_id: str
    shards: int
    images: int
    failed_images: int
    images_not_in_dataset: int
    images_approved: int
    images_rejected: int
    approved: int  # instances
    rejected: int
    edited: int
    added: int
    untouched: int


def default_dataset_name(run_dir: str | Path) -> str:
    """The FiftyOne dataset ``labelgen review`` exports a run to when it is given no name."""
    return f"labelgen-{RunStore(run_dir).manifest()['run_id']}"


def launch_review(run_dir: str | Path, dataset_name: str | None = None, *, port: int = 5151,
                  address: str = "127.0.0.1", filtered: str | None = None, wait: bool = True) -> ReviewSession:
    """Export the run (or its filtered copy ``filtered``) to ``dataset_name`` (default
    ``default_dataset_name``; recorded in ``RUN_DIR/fiftyone/datasets.json``) and serve the App on
    ``address:port``, localhost only by default (remote mode: no browser is opened).

    ``wait``: serve until ``KeyboardInterrupt`` (Ctrl-C), which propagates; closing the last browser
    tab does not stop the server. ``wait=False``: return at once; ``session.wait(-1)`` serves on.
    """
    dataset_name = dataset_name or default_dataset_name(run_dir)
    report = export_fiftyone(open_export_source(run_dir, filtered=filtered), dataset_name)
    fo = import_fiftyone()
    session = fo.launch_app(fo.load_dataset(dataset_name), address=address, port=port, remote=True)
    host = "127.0.0.1" if address in ("", "0.0.0.0") else address
    review = ReviewSession(dataset_name, f"http://{host}:{port}/datasets/{quote(dataset_name)}", session, report)
    if wait:
        session.wait(-1)  # FiftyOne's default returns ~3 s after the last tab closes
    return review


def quiet_fiftyone_console() -> None:
    """For command-line programs that configure ``logging`` themselves: FiftyOne's log records
    reach the root logger's handlers only, once each. FiftyOne adds console handlers of its own to
    its loggers at import, so each record is shown twice (by those and by the root's); they are
    removed. Its App banner and remote-session instructions (which name a port of their own) are
    kept out; the caller says where the App is (``ReviewSession.url``)."""
    import_fiftyone()  # FiftyOne adds its handlers when it is imported
    for name in ("fiftyone", "eta"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
    logging.getLogger("fiftyone.core.session.session").setLevel(logging.WARNING)


def run_datasets(run_dir: str | Path) -> list[str]:
    """The FiftyOne datasets that hold this run: those recorded in ``RUN_DIR/fiftyone/datasets.json``
    and the default name, when they exist and hold it; when none do, every dataset whose info names
    this run (exports from before the record)."""
    fo = import_fiftyone()
    run_id = RunStore(run_dir).manifest()["run_id"]
    recorded = list(dict.fromkeys([*recorded_datasets(run_dir), default_dataset_name(run_dir)]))
    names = [n for n in recorded if _holds_run(fo, n, run_id)]
    return names or [n for n in fo.list_datasets() if _holds_run(fo, n, run_id)]


def _holds_run(fo: Any, name: str, run_id: str) -> bool:
    try:
        return fo.dataset_exists(name) and fo.load_dataset(name).info.get("labelgen_run_id") == run_id
    except ValueError:  # deleted meanwhile
        return False


def choose_dataset(run_dir: str | Path) -> str:
    """The dataset to pull when none is named: this run's only FiftyOne dataset (``run_datasets``).
    Several: ``ConfigError`` listing them; none: ``ExportError`` saying to review first."""
    names = run_datasets(run_dir)
    if len(names) == 1:
        return names[0]
    run_id = RunStore(run_dir).manifest()["run_id"]
    if not names:
        raise ExportError(f"no FiftyOne dataset holds run {run_id} of {run_dir}; export it first"
                          f" (labelgen review {run_dir}), or name the dataset (--dataset NAME)")
    raise ConfigError(f"run {run_id} is in {len(names)} FiftyOne datasets: {', '.join(map(repr, names))}; name the"
                      f" one to pull: labelgen pull {run_dir} --dataset NAME")


def pull_review(run_dir: str | Path, dataset_name: str | None = None, name: str = "reviewed") -> PullReport:
    """Write ``RUN_DIR/reviewed/NAME/`` from the review in ``dataset_name`` (rules: module docstring;
    ``None``: the run's only dataset, ``choose_dataset``).

    Built under a temporary name and renamed into place; export it with
    ``open_export_source(run_dir, reviewed=NAME)``.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ExportError(f"reviewed copy name must be a plain folder name (letters, digits, '.', '_', '-');"
                          f" got {name!r}")
    fo = import_fiftyone()
    store = RunStore(run_dir)
    run_id = store.manifest()["run_id"]
    dataset_name = dataset_name or choose_dataset(run_dir)
    if not fo.dataset_exists(dataset_name):
        known = run_datasets(run_dir)
        hint = f"this run's datasets: {', '.join(map(repr, known))}" if known else \
            f"no dataset holds this run yet: labelgen review {run_dir}"
        raise ExportError(f"no FiftyOne dataset {dataset_name!r}; {hint}")
    dataset = fo.load_dataset(dataset_name)
    if dataset.info.get("labelgen_run_id") != run_id:
        raise ExportError(f"FiftyOne dataset {dataset_name!r} holds run {dataset.info.get('labelgen_run_id')},"
                          f" not {run_id} of {store.root}")
    spec = json.loads(json.dumps(dataset.info.get("labelgen_source") or {}))  # FiftyOne's dict types -> plain
    base = _base_source(run_dir, spec)
    final = store.copy_dir("reviewed", name)
    sample = sample_of(dataset)  # a review sample: its verdicts go into verdicts.jsonl, sealed with the copy
    collector = VerdictCollector(read_sample(run_dir, sample), base.class_names) if sample else None
    with staged_folder(final, f"reviewed copy {name!r}", finish=write_checksums) as tmp:
        counts, shards = _write_shards(fo, dataset, base, tmp, compress_level(store), collector)
        if collector is not None:
            counts["sample_images"] = collector.write(tmp)
        write_bytes_atomic(tmp / "review.yaml", yaml.safe_dump(
            {"dataset": dataset_name, "base": spec, "rules": RULES},
            sort_keys=False, allow_unicode=True).encode("utf-8"), "review rules")
        write_json_atomic(tmp / "summary.json", {"format": REVIEWED_FORMAT, "name": name, "run_id": run_id,
                                                 "dataset": dataset_name, "shards": shards, **counts}, "review summary")
    return PullReport(name=name, path=str(final.resolve()), dataset=dataset_name, run_id=run_id, shards=shards,
                      **{key: counts.get(key, 0) for key in _COUNT_KEYS})


_COUNT_KEYS = ("images", "failed_images", "images_not_in_dataset", "images_approved", "images_rejected", "approved",
               "rejected", "edited", "added", "untouched")


def _base_source(run_dir: str | Path, spec: dict) -> ExportSource:
    """The source the dataset was exported from (recorded in its info)."""
    kind = spec.get("kind", "run")
    if kind in ("filtered", "reviewed"):
        return open_export_source(run_dir, **{kind: spec.get("name")})
    if kind == "filter":
        return open_export_source(run_dir, filter_config=from_mapping(FilterConfig, spec.get("filter") or {}, "filter"))
    return open_export_source(run_dir)


def _write_shards(fo: Any, dataset: Any, base: ExportSource, folder: Path, level: int,
                  collector: VerdictCollector | None = None) -> tuple[dict, int]:
    reviewer = _Reviewer(list(base.class_names), base.class_agnostic)
    shards = 0
    for shard, _, rows in base.iter_shards():
        samples = _samples_by_image(fo, dataset, [r.image.image_id for r in rows])
        out = [reviewer.row(r, row_origin(base, r), samples.get(r.image.image_id)).to_dict() for r in rows]
        if collector is not None:
            for r in rows:
                collector.add(r, row_origin(base, r), samples.get(r.image.image_id))
        write_jsonl_gz_atomic(folder / f"{shard.key}.jsonl.gz", out, f"reviewed shard {shard.key}", level=level)
        shards += 1
    return {key: reviewer.counts[key] for key in _COUNT_KEYS}, shards


def _samples_by_image(fo: Any, dataset: Any, image_ids: list[str]) -> dict[str, tuple[list[str], list[Any]]]:
    """``{image_id: (sample tags, detections)}`` for one shard's images (one query)."""
    view = dataset.match(fo.ViewField("labelgen_image_id").is_in(image_ids)).select_fields([FIELD, "labelgen_image_id"])
    return {s["labelgen_image_id"]: (list(s.tags), list(s[FIELD].detections) if s[FIELD] else []) for s in view}


@dataclass
class _Kept:
    position: int
    status: str | None = None  # "approved" | "edited" | None (untouched)
    class_id: int | None = None  # new class id (edited label)
    box_xyxy: list[float] | None = None  # new box (edited box)


class _Reviewer:
    """Applies one sample's review to one source row."""

    def __init__(self, class_names: Sequence[str], agnostic: bool):
        self.class_names, self.agnostic = list(class_names), agnostic
        self.counts: Counter = Counter()

    def row(self, row: Row, origin: tuple[int | None, ...], sample: tuple[list[str], list[Any]] | None) -> Row:
        """The reviewed copy's row of ``row`` (``origin``: ``row_origin``) under ``sample``'s review."""
        self.counts["images"] += 1
        if row.instances is None:
            self.counts["failed_images"] += 1
            return Row(row.image, failure=row.failure, rejected=())
        if sample is None:
            self.counts["images_not_in_dataset"] += 1
            kept, added, rejected = [_Kept(p) for p in range(len(row.instances))], [], []
        else:
            kept, added, rejected = self._decide(row, origin, *sample)
        self.counts["rejected"] += len(rejected)
        rejected = sorted([*(row.rejected or ()), *(r for r in rejected if r["index"] is not None)],
                          key=lambda r: (r["index"], r["reason"]))
        reviewed, source_indices = _assemble(row.instances, list(origin), kept, added, self.agnostic)
        self.counts.update(k.status or "untouched" for k in kept)
        self.counts["added"] += len(added)
        return Row(row.image, reviewed, rejected=rejected, source_indices=source_indices,
                   review={"sample_tags": sample[0] if sample else None})

    def _decide(self, row: Row, origin: tuple[int | None, ...], tags: list[str], detections: list[Any]
                ) -> tuple[list, list, list]:
        instances, image_id = row.instances, row.image.image_id
        image_rejected = REJECTED_TAG in tags
        image_approved = APPROVED_TAG in tags and not image_rejected
        self.counts["images_rejected"] += image_rejected
        self.counts["images_approved"] += image_approved
        kept, added, rejected, seen = [], [], [], set()
        for detection in detections:
            position = getattr(detection, "labelgen_position", None)
            if position is None or position in seen:  # drawn in the App, or a copy of an exported label
                if not (image_rejected or REJECTED_TAG in detection.tags):
                    added.append(self._added(detection, instances, image_id))
                continue
            if not 0 <= position < len(instances) or getattr(detection, "labelgen_index", None) != origin[position]:
                raise ExportError(f"sample {image_id!r}: label at position {position} does not match the exported"
                                  " labels; the source changed since the export. Re-export, review again, then pull")
            seen.add(position)
            if image_rejected or REJECTED_TAG in detection.tags:
                reason = "image_rejected_in_review" if image_rejected else "rejected_in_review"
                rejected.append({"index": origin[position], "reason": reason})
                continue
            kept.append(self._kept(detection, instances, position, image_id,
                                   image_approved or APPROVED_TAG in detection.tags))
        for position in sorted(set(range(len(instances))) - seen):
            reason = "image_rejected_in_review" if image_rejected else "deleted_in_review"
            rejected.append({"index": origin[position], "reason": reason})
        return sorted(kept, key=lambda k: k.position), added, rejected

    def _kept(self, detection: Any, instances: Instances, position: int, image_id: str, approved: bool) -> _Kept:
        decision = _Kept(position, "approved" if approved else None)
        old_id = None if instances.class_ids is None else int(instances.class_ids[position])
        if detection.label != detection_label(old_id, self.class_names):
            decision.class_id, decision.status = self._class_id(detection.label, image_id), "edited"
        box = _box_xyxy(detection, instances.width, instances.height)
        if np.abs(np.asarray(box) - instances.boxes_xyxy[position]).max() > _BOX_TOLERANCE_PX:
            decision.box_xyxy, decision.status = box, "edited"
        return decision

    def _added(self, detection: Any, instances: Instances, image_id: str) -> tuple[int | None, list[float], dict]:
        width, height = instances.width, instances.height
        box = _box_xyxy(detection, width, height)
        c0, r0, c1, r1 = box_pixels(box, width, height)
        if c1 <= c0 or r1 <= r0:
            raise ExportError(f"sample {image_id!r}: an added label {detection.label!r} has an empty box {box};"
                              " fix or delete it in the App, then pull again")
        crop = detection.get_mask() if detection.has_mask else None
        if crop is None or not np.any(crop):
            crop = np.ones((r1 - r0, c1 - c0), dtype=bool)
        return self._class_id(detection.label, image_id), box, mask_to_rle(_box_crop_to_mask(crop, box, width, height))

    def _class_id(self, label: Any, image_id: str) -> int | None:
        if label in self.class_names:
            return None if self.agnostic else self.class_names.index(label)
        raise ExportError(f"sample {image_id!r}: label {label!r} is not a class of this run; expected one of"
                          f" {self.class_names[:20]}{' ...' if len(self.class_names) > 20 else ''}."
                          f" Fix the label in the App, then pull again")


def _box_xyxy(detection: Any, width: int, height: int) -> list[float]:
    """A Detection's relative ``[x, y, w, h]`` as an absolute XYXY box clipped to the frame."""
    x, y, w, h = (float(v) for v in detection.bounding_box)
    x1, y1 = min(max(x * width, 0.0), width), min(max(y * height, 0.0), height)
    return [x1, y1, min(max((x + w) * width, x1), width), min(max((y + h) * height, y1), height)]


def _assemble(base: Instances, origin: list, kept: list[_Kept], added: list[tuple], agnostic: bool
              ) -> tuple[Instances, list]:
    """The reviewed instances: kept ones (edits applied) in source order, then the added ones."""
    data = base.to_dict()
    positions = [k.position for k in kept]
    masks, boxes = [], []
    for k in kept:
        rle, box = data["masks_rle"][k.position], data["boxes_xyxy"][k.position]
        if k.box_xyxy is not None:
            rle, box = _clip_mask(rle, k.box_xyxy, base.width, base.height), k.box_xyxy
        masks.append(rle)
        boxes.append(box)
    ids = None
    if not agnostic:
        old = data["class_ids"] or [0] * len(data["masks_rle"])
        ids = [old[k.position] if k.class_id is None else k.class_id for k in kept] + [a[0] for a in added]
    scores = {name: [column[p] for p in positions] + [1.0] * len(added) for name, column in data["scores"].items()}
    if not scores and not kept and added:
        scores = {"confidence": [1.0] * len(added)}
    previous = data["attributes"].get("review")
    attributes = {name: [column[p] for p in positions] + [None] * len(added)
                  for name, column in data["attributes"].items()}
    attributes["review"] = [k.status or (previous[k.position] if previous else None) for k in kept] \
        + ["added"] * len(added)
    reviewed = Instances.from_dict({
        "height": base.height, "width": base.width, "masks_rle": masks + [a[2] for a in added],
        "boxes_xyxy": boxes + [a[1] for a in added], "scores": scores, "class_ids": ids, "attributes": attributes,
        "provenance": data["provenance"]})
    return reviewed, [origin[p] for p in positions] + [None] * len(added)


def _box_crop_to_mask(crop: np.ndarray, box_xyxy: Sequence[float], width: int, height: int) -> np.ndarray:
    """``(height, width)`` bool frame with ``crop`` (non-zero = inside) placed at the box's pixels;
    a crop of another size (a mask drawn elsewhere) is resized to them, nearest neighbour."""
    c0, r0, c1, r1 = box_pixels(box_xyxy, width, height)
    frame = np.zeros((height, width), dtype=bool)
    if c1 > c0 and r1 > r0:
        crop = np.asarray(crop)
        if crop.ndim == 3:
            crop = crop.any(axis=2)
        if crop.shape != (r1 - r0, c1 - c0):
            crop = np.asarray(Image.fromarray((crop != 0).astype(np.uint8) * 255).resize((c1 - c0, r1 - r0),
                                                                                         Image.NEAREST))
        frame[r0:r1, c0:c1] = crop != 0
    return frame


def _clip_mask(rle: dict, box_xyxy: list[float], width: int, height: int) -> dict:
    """The mask inside the box's pixels; the filled box when nothing of the mask is inside."""
    c0, r0, c1, r1 = box_pixels(box_xyxy, width, height)
    full = rles_to_masks([rle], height, width)[0]
    clipped = np.zeros_like(full)
    clipped[r0:r1, c0:c1] = full[r0:r1, c0:c1]
    if not clipped.any():
        clipped[r0:r1, c0:c1] = True
    return mask_to_rle(clipped)


__all__ = ["APPROVED_TAG", "PullReport", "REJECTED_TAG", "REVIEWED_FORMAT", "ReviewSession", "choose_dataset",
           "default_dataset_name", "launch_review", "pull_review", "quiet_fiftyone_console", "run_datasets"]
