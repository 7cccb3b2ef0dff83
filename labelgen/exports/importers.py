"""Importers of existing labels (ground truth, or a COCO export read back) as a run directory.

``import_yolo`` / ``import_coco`` return an ``ImportedDataset``: records sorted by ``image_id``, class
names, a JSON ``spec`` and a lazy iterator of ``Row``s (labels parsed one image at a time).
``write_imported_run`` writes it as a complete run directory (generator ``"import"``) shard by shard,
so ``labelgen status``, ``filter`` and every exporter work on ground truth too.

* ``spec`` (the run's ``source``) is what the image source would describe (``folder`` root or
  ``coco`` path + images_root) plus an ``import`` section, so image ids and the default export
  images root are those of a generated run over the same images.
* Sizes come from the image header after EXIF orientation (5..8 swap width and height), the frame
  ``labelgen.engine.decode`` gives. YOLO labels are normalised to that displayed frame, as in Ultralytics
  (its ``exif_size`` swaps for orientations 6 and 8 of JPEGs only; 5 and 7 are rare mirrors).
* Every instance has a ``confidence`` column (1.0 for ground truth, a COCO ``score`` when present)
  so confidence filters and exporters work unchanged. Boxes are the masks' tight boxes, except for
  box-only labels (YOLO ``cls cx cy w h``, COCO bbox without segmentation): their mask is the filled
  box (pixels whose centre is inside, at least one) and ``boxes_xyxy`` the exact box.
* An image that cannot be opened is a failed row (``missing``, ``empty_file``, ``not_an_image``,
  ``unreadable``), as in a generated run; a bad label raises ``ExportError`` naming file and line.
"""
from __future__ import annotations

import dataclasses

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError
from pycocotools import mask as coco_mask

from ..atomic import staged_folder
from ..config import load_yaml
from ..errors import ConfigError, ExportError, ImageDecodeError, ValidationError
from ..structures.instances import ImageRecord, Instances
from ..structures.masks import mask_to_rle, rles_to_boxes_xyxy, validate_rle
from ..structures.rows import Row, summarize
from ..engine.sources import FolderSource
from ..store.run_store import RunStore, utc_now

_ORIENTATION_TAG = 0x0112
_PROVENANCE = "import"


@dataclass(frozen=True)
class ImportedDataset:
    """Records sorted by ``image_id``; iterating loads each image's row lazily, in that order (a failed
    row, ``failure`` ``{"reason", "message"}``, when the image itself could not be opened)."""

    class_names: tuple[str, ...]
    spec: dict  # JSON: becomes the run's ``source`` (image source kind + an ``import`` section)
    records: tuple[ImageRecord, ...]
    load_item: Callable[[ImageRecord], Row]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Row]:
        return (self.load_item(record) for record in self.records)


# -- YOLO -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class YoloImportLayout:
    """Where a YOLO dataset's images and labels are, its class names and its images (sized)."""

    names: tuple[str, ...]
    yaml_path: Any
    labels_dir: Path
    folder: FolderSource
    records: list[ImageRecord]
    failures: dict[str, dict]

    def dataset(self, task: str, split: str | None, spec: dict[str, Any],
                read: Callable[[Path, ImageRecord, str, int], Instances]) -> "ImportedDataset":
        """The ``ImportedDataset`` of this layout: ``read(label_file, record, task, num_classes)`` gives an
        image's instances from ``labels/<image id>.txt``; ``spec`` is added to the run's import spec."""
        names, labels_dir, failures = self.names, self.labels_dir, self.failures
        full_spec = {**self.folder.describe(), "import": {"format": "yolo", "yaml": self.yaml_path, "split": split,
                                                          "task": task, **spec}}

        def load(record: ImageRecord) -> Row:
            if record.image_id in failures:
                return Row(record, failure=failures[record.image_id])
            return Row(record, read((labels_dir / record.image_id).with_suffix(".txt"), record, task, len(names)))

        return ImportedDataset(names, full_spec, tuple(self.records), load)


def yolo_import_layout(root: str | os.PathLike[str], split: str | None, task: str,
                       class_names: Sequence[str] | None) -> YoloImportLayout:
    """Check ``task``, find the layout of the YOLO dataset at ``root`` and list its images (ground truth
    and predictions read the same layouts)."""
    if task not in ("auto", "detect", "segment"):
        raise ExportError(f"task must be 'auto', 'detect' or 'segment'; got {task!r}")
    images_dir, names, yaml_path = _yolo_layout(Path(root), split)
    names = tuple(class_names) if class_names is not None else names
    if not names:
        raise ExportError(f"no class names for YOLO dataset {root}: expected 'names' in data.yaml, a classes.txt"
                          " (one name per line), or class_names=[...]")
    folder = FolderSource(images_dir)
    records, failures = _records_with_sizes(folder.list_records())
    return YoloImportLayout(names, yaml_path, _labels_dir_for(images_dir), folder, records, failures)


def import_yolo(root: str | os.PathLike[str], *, split: str | None = None,
                task: Literal["auto", "detect", "segment"] = "auto",
                class_names: Sequence[str] | None = None) -> ImportedDataset:
    """A YOLO dataset: ``root`` is a ``data.yaml``/``dataset.yaml`` (or a folder holding one) with
    ``path``/``train``/``val``/``names``, or a plain ``root/images/<split>``, ``root/labels/<split>``
    folder with names in ``root/classes.txt``.

    ``split``: a yaml key (``train``, ``val``, ``test``; default: the one folder they name) or, without
    yaml, a folder under ``root/images`` (default: all of ``root/images``, ids keep the split folder).
    ``task``: ``auto`` reads ``cls cx cy w h`` lines as boxes and longer lines as polygons;
    ``detect`` turns polygons into their boxes; ``segment`` refuses box lines.
    Labels of ``images/.../a.jpg`` are in ``labels/.../a.txt`` (the last ``images`` folder of the path
    replaced by ``labels``); an image without a label file has no instances.
    """
    layout = yolo_import_layout(root, split, task, class_names)
    return layout.dataset(task, split, {"labels": str(layout.labels_dir)}, _read_yolo_labels)


def _yolo_layout(root: Path, split: str | None) -> tuple[Path, tuple[str, ...], str | None]:
    """(images folder, class names from the dataset, yaml path or None)."""
    root = Path(os.path.abspath(root))
    candidates = [root] if root.suffix in (".yaml", ".yml") else [root / "data.yaml", root / "dataset.yaml"]
    yaml_path = next((p for p in candidates if p.is_file()), None)
    if yaml_path is not None:
        return (*_yolo_yaml_layout(yaml_path, split), str(yaml_path))
    if not (root / "images").is_dir():
        raise ExportError(f"{root} is not a YOLO dataset: expected data.yaml, dataset.yaml or an images/ folder")
    images_dir = root / "images" / split if split else root / "images"
    if not images_dir.is_dir():
        raise ExportError(f"YOLO split folder {images_dir} does not exist; expected one of "
                          f"{sorted(p.name for p in (root / 'images').iterdir() if p.is_dir())}")
    names_file = root / "classes.txt"
    names = tuple(line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()) \
        if names_file.is_file() else ()
    return images_dir, names, None


def _yolo_yaml_layout(yaml_path: Path, split: str | None) -> tuple[Path, tuple[str, ...]]:
    try:  # bounded and strict like recipes: a dataset file may come from anywhere
        data = load_yaml(yaml_path.read_text(encoding="utf-8"), str(yaml_path), what="YOLO dataset file")
    except (OSError, UnicodeDecodeError, ConfigError) as exc:
        raise ExportError(f"cannot read YOLO dataset file {yaml_path}: {exc}") from None
    if not isinstance(data, dict):
        raise ExportError(f"{yaml_path}: expected a mapping with path/train/val/names")
    base = yaml_path.parent / str(data.get("path") or ".")  # relative `path`: relative to the yaml's folder
    splits = {key: data[key] for key in ("train", "val", "test") if data.get(key)}
    if split is None:
        folders = {json.dumps(value) for value in splits.values()}
        if len(folders) != 1:
            raise ExportError(f"{yaml_path} names {len(folders)} different split folders; pass split= one of "
                              f"{sorted(splits)}")
        split = sorted(splits)[0]
    value = splits.get(split)
    if not isinstance(value, str):
        raise ExportError(f"{yaml_path}: split {split!r} must name one images folder; got {value!r}"
                          f" (list files and lists of folders are not supported; splits: {sorted(splits)})")
    images_dir = Path(os.path.normpath(base / value))
    if not images_dir.is_dir():
        raise ExportError(f"{yaml_path}: split {split!r} folder {images_dir} does not exist")
    return images_dir, _yaml_names(data.get("names"), yaml_path)


def _yaml_names(names: Any, where: Path) -> tuple[str, ...]:
    if names is None:
        return ()
    if isinstance(names, dict):
        by_id = {str(k): str(v) for k, v in names.items()}
        if sorted(by_id) != sorted(str(i) for i in range(len(by_id))):
            raise ExportError(f"{where}: names keys must be 0..{len(by_id) - 1}; got {list(names)}")
        return tuple(by_id[str(i)] for i in range(len(by_id)))
    if isinstance(names, list):
        return tuple(str(name) for name in names)
    raise ExportError(f"{where}: names must be a list or a {{id: name}} mapping; got {type(names).__name__}")


def _labels_dir_for(images_dir: Path) -> Path:
    parts = list(images_dir.parts)
    if "images" not in parts:
        raise ExportError(f"cannot locate YOLO labels for {images_dir}: expected an 'images' folder in its path "
                          "(.../images/<split>) mirrored by .../labels/<split>")
    last = len(parts) - 1 - parts[::-1].index("images")
    parts[last] = "labels"
    return Path(*parts)


def yolo_label_lines(path: Path) -> list[str]:
    """The lines of a YOLO label file; none when it does not exist (an image without labels)."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read YOLO label file {path}: {exc}") from None


def _read_yolo_labels(path: Path, record: ImageRecord, task: str, num_classes: int) -> Instances:
    height, width = int(record.height), int(record.width)
    lines = yolo_label_lines(path)
    rles, boxes, class_ids = [], [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        class_id, coords = _parse_yolo_line(line, f"{path}:{number}", task, num_classes)
        rle, box = yolo_shape_to_rle(coords, height, width)
        rles.append(rle)
        boxes.append(box)
        class_ids.append(class_id)
    return _instances(height, width, rles, boxes, class_ids, {"confidence": [1.0] * len(rles)}, "yolo")


def yolo_shape_to_rle(coords: np.ndarray, height: int, width: int) -> tuple[dict, np.ndarray]:
    """One YOLO shape (normalised ``cx cy w h`` box, or ``x1 y1 ... xn yn`` polygon) as an RLE mask and
    its ``(4,)`` XYXY box in absolute pixels of the ``height`` x ``width`` image."""
    if len(coords) == 4:
        cx, cy, w, h = coords
        box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        return box_to_rle(box, height, width), np.clip(box, 0, [width, height, width, height])
    rle = polygon_to_rle(coords[0::2] * width, coords[1::2] * height, height, width)
    return rle, rles_to_boxes_xyxy([rle])[0]


def _parse_yolo_line(line: str, where: str, task: str, num_classes: int) -> tuple[int, np.ndarray]:
    tokens = line.split()
    try:
        values = [float(token) for token in tokens]
    except ValueError:
        raise ExportError(f"{where}: expected numbers 'class x y ...'; got {line.strip()!r}") from None
    class_value, coords = values[0], np.asarray(values[1:], dtype=np.float64)
    if not class_value.is_integer() or not 0 <= class_value < num_classes:
        raise ExportError(f"{where}: class id must be an integer in [0, {num_classes}); got {tokens[0]!r}")
    if len(coords) != 4 and (len(coords) < 6 or len(coords) % 2):
        raise ExportError(f"{where}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...' (an even number "
                          f">= 6 of coordinates); got {len(coords)} values")
    if not np.all(np.isfinite(coords)) or coords.min() < -1e-3 or coords.max() > 1 + 1e-3:
        raise ExportError(f"{where}: coordinates must be normalised to [0, 1]; got {line.strip()!r}")
    coords = np.clip(coords, 0.0, 1.0)
    if len(coords) == 4 and task == "segment":
        raise ExportError(f"{where}: a box line in task='segment'; use task='auto' or 'detect'")
    if len(coords) > 4 and task == "detect":
        xs, ys = coords[0::2], coords[1::2]
        coords = np.array([(xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2, np.ptp(xs), np.ptp(ys)])
    return int(class_value), coords


def _records_with_sizes(records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], dict[str, dict]]:
    """Records with sizes from the image headers; failures keyed by image id."""
    sized, failures = [], {}
    for record in records:
        try:
            record = record.with_size(*image_size(record.uri))
        except ImageDecodeError as exc:
            failures[record.image_id] = {"reason": exc.reason, "message": str(exc)}
        sized.append(record)
    return sized, failures


def image_size(path: str) -> tuple[int, int]:
    """``(width, height)`` after EXIF orientation, from the header only (as ``labelgen.engine.decode`` sees it).

    Raises ``ImageDecodeError`` with reason ``missing``, ``empty_file``, ``not_an_image`` or ``unreadable``."""
    try:
        if os.path.getsize(path) == 0:
            raise ImageDecodeError("empty_file", f"{path} is an empty file")
        with Image.open(path) as image:
            width, height = image.size
            with contextlib.suppress(Exception):  # corrupt EXIF counts as orientation 1, as in decode.py
                if image.getexif().get(_ORIENTATION_TAG, 1) in (5, 6, 7, 8):
                    width, height = height, width
    except FileNotFoundError:
        raise ImageDecodeError("missing", f"{path} does not exist") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not_an_image", f"{path} is not an image Pillow can read") from None
    except OSError as exc:
        raise ImageDecodeError("unreadable", f"cannot read {path}: {exc}") from None
    return width, height


# -- COCO -----------------------------------------------------------------------------------------
def import_coco(json_path: str | os.PathLike[str], *, images_root: str | os.PathLike[str] | None = None
                ) -> ImportedDataset:
    """A COCO instances JSON. Categories become 0-based class ids in order of category id; image ids are
    ``file_name``; uris are ``images_root / file_name`` (default: the JSON's folder).

    Segmentations (polygons, compressed or uncompressed RLE) become compressed RLE; an annotation with
    only a ``bbox`` becomes a box mask. ``iscrowd`` annotations are skipped (they mark regions to
    ignore, not instances; their count is in the spec). ``confidence`` is the annotation's ``score``
    (or ``attributes.scores.confidence`` from a labelgen export), else 1.0; other numeric
    ``attributes.scores`` columns present on every annotation of an image are restored.
    The JSON is loaded whole; masks are decoded one image at a time.
    """
    path = os.path.abspath(json_path)
    root = os.path.abspath(images_root) if images_root is not None else os.path.dirname(path)
    data = _load_coco_json(path)
    categories = sorted(data.get("categories") or [], key=lambda c: c.get("id", 0))
    if not categories or len({c.get("id") for c in categories}) != len(categories):
        raise ExportError(f"{path}: expected a 'categories' list with unique ids; got {len(categories)} entries")
    class_of = {c["id"]: i for i, c in enumerate(categories)}
    records, coco_ids = _coco_records(data.get("images") or [], root, path)
    by_image: dict[Any, list[dict]] = {coco_id: [] for coco_id in coco_ids.values()}
    crowd = 0
    for ann in data.get("annotations") or []:
        if ann.get("iscrowd"):
            crowd += 1
        elif ann.get("image_id") not in by_image:
            raise ExportError(f"{path}: annotation {ann.get('id')} refers to unknown image_id {ann.get('image_id')!r}")
        elif ann.get("category_id") not in class_of:
            raise ExportError(f"{path}: annotation {ann.get('id')} has unknown category_id {ann.get('category_id')!r}")
        else:
            by_image[ann["image_id"]].append(ann)
    del data
    spec = {"kind": "coco", "path": path, "images_root": root,
            "import": {"format": "coco", "crowd_annotations_skipped": crowd}}

    def load(record: ImageRecord) -> Row:
        anns = by_image[coco_ids[record.image_id]]
        return Row(record, _coco_instances(anns, record, class_of, path))

    return ImportedDataset(tuple(str(c["name"]) for c in categories), spec, tuple(records), load)


def _load_coco_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8-sig") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read COCO JSON {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ExportError(f"{path}: expected a COCO object with 'images', 'annotations' and 'categories' lists")
    return data


def _coco_records(images: list, root: str, path: str) -> tuple[list[ImageRecord], dict[str, Any]]:
    records, coco_ids = [], {}
    for index, entry in enumerate(images):
        file_name, width, height = entry.get("file_name"), entry.get("width"), entry.get("height")
        if not isinstance(file_name, str) or not file_name or file_name in coco_ids:
            raise ExportError(f"{path}: images[{index}] file_name {file_name!r} is missing or repeated")
        uri = os.path.normpath(os.path.join(root, file_name))
        if not width or not height:  # sizes not in the JSON: read the header
            try:
                width, height = image_size(uri)
            except ImageDecodeError as exc:
                raise ExportError(f"{path}: images[{index}] has no width/height and {exc}") from None
        try:
            records.append(ImageRecord(file_name, uri, int(width), int(height)))
        except ValidationError as exc:
            raise ExportError(f"{path}: images[{index}]: {exc}") from None
        if entry.get("id") in coco_ids.values():
            raise ExportError(f"{path}: images[{index}] repeats image id {entry.get('id')!r}")
        coco_ids[file_name] = entry.get("id")
    return sorted(records, key=lambda r: r.image_id), coco_ids


def _coco_instances(anns: list[dict], record: ImageRecord, class_of: dict, path: str) -> Instances:
    height, width = int(record.height), int(record.width)
    rles, boxes = [], []
    for ann in anns:
        where = f"{path}: annotation {ann.get('id')}"
        segmentation = ann.get("segmentation")
        if segmentation:
            rle = _segmentation_to_rle(segmentation, height, width, where)
            rles.append(rle)
            boxes.append(rles_to_boxes_xyxy([rle])[0])
        elif ann.get("bbox") and len(ann["bbox"]) == 4:
            x, y, w, h = (float(v) for v in ann["bbox"])
            rles.append(box_to_rle([x, y, x + w, y + h], height, width))
            boxes.append(np.clip([x, y, x + w, y + h], 0, [width, height, width, height]))
        else:
            raise ExportError(f"{where} has neither a segmentation nor a 4-number bbox")
    return _instances(height, width, rles, boxes, [class_of[a["category_id"]] for a in anns],
                      _coco_scores(anns), "coco")


def _coco_scores(anns: list[dict]) -> dict[str, list[float]]:
    columns = [((a.get("attributes") or {}).get("scores") or {}) for a in anns]
    names = set.intersection(*(set(c) for c in columns)) if columns else set()
    scores = {name: [float(c[name]) for c in columns] for name in sorted(names)
              if all(isinstance(c[name], (int, float)) and math.isfinite(c[name]) for c in columns)}
    if "confidence" not in scores:
        scores["confidence"] = [float(a.get("score", 1.0)) for a in anns]
    return scores


def _segmentation_to_rle(segmentation: Any, height: int, width: int, where: str) -> dict:
    try:
        if isinstance(segmentation, list):  # polygons; a part with < 3 points is dropped
            parts = [[float(v) for v in p] for p in segmentation if isinstance(p, list) and len(p) >= 6]
            if not parts:
                raise ExportError(f"{where}: no polygon with at least 3 points")
            rle = coco_mask.merge(coco_mask.frPyObjects(parts, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            rle = coco_mask.frPyObjects(segmentation, *segmentation["size"])  # uncompressed RLE
        elif isinstance(segmentation, dict):
            rle = segmentation
        else:
            raise ExportError(f"{where}: segmentation must be polygons or an RLE; got {type(segmentation).__name__}")
        return validate_rle({"size": list(rle["size"]), "counts": rle["counts"]}, height, width, where)
    except (ValidationError, TypeError, ValueError, KeyError) as exc:
        raise ExportError(f"{where}: bad segmentation: {exc}") from None


# -- shared helpers -------------------------------------------------------------------------------
def polygon_to_rle(xs: np.ndarray, ys: np.ndarray, height: int, width: int) -> dict:
    """Fill one polygon (absolute pixel coordinates) with ``PIL.ImageDraw.polygon`` (outline included)."""
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(list(zip(xs.tolist(), ys.tolist())), fill=1, outline=1)
    return mask_to_rle(np.asarray(canvas, dtype=bool))


def box_to_rle(box_xyxy: Sequence[float], height: int, width: int) -> dict:
    """The filled box: pixels whose centre lies inside ``[x1, x2) x [y1, y2)``, at least one pixel."""
    x1, y1, x2, y2 = box_xyxy
    left = min(max(math.floor(x1 + 0.5), 0), width - 1)
    top = min(max(math.floor(y1 + 0.5), 0), height - 1)
    right = min(max(math.floor(x2 + 0.5), left + 1), width)
    bottom = min(max(math.floor(y2 + 0.5), top + 1), height)
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask_to_rle(mask)


def _instances(height: int, width: int, rles: list, boxes: list, class_ids: list, scores: dict,
               fmt: str) -> Instances:
    return Instances(height=height, width=width, masks_rle=tuple(rles),
                     boxes_xyxy=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                     scores={k: np.asarray(v, dtype=np.float32) for k, v in scores.items()},
                     class_ids=np.asarray(class_ids, dtype=np.int32),
                     provenance={"generator": _PROVENANCE, "format": fmt})


# -- run directory --------------------------------------------------------------------------------
def write_imported_run(dataset: ImportedDataset, out_dir: str | os.PathLike[str], *,
                       shard_size: int = 256) -> Path:
    """Write ``dataset`` as a new, complete run directory at ``out_dir``, shard by shard; return its path.

    The run is built in a hidden sibling folder and renamed into place at the end, so an import that
    fails (e.g. on a bad label line) leaves nothing behind. ``out_dir`` must not exist or be empty."""
    if not isinstance(shard_size, int) or not 1 <= shard_size <= 100_000:
        raise ExportError(f"shard_size must be an int in [1, 100000]; got {shard_size!r}")
    final = Path(os.path.abspath(out_dir))
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        what = "already holds a run (run.json)" if (final / "run.json").is_file() else \
            "is a file" if not final.is_dir() else "is not empty"
        raise ExportError(f"{final} {what}; expected a new or empty folder for the imported run directory")
    with staged_folder(final, "the imported run directory") as building:
        _write_run(RunStore(building), dataset, shard_size)
    return final


def _write_run(store: RunStore, dataset: ImportedDataset, shard_size: int) -> None:
    with store.locked():
        store.initialize_import(dataset.spec, dataset.class_names, dataset.records, shard_size)
        fingerprint = store.manifest()["fingerprint"]
        items = iter(dataset)
        for shard in store.iter_plan():
            started, t0 = utc_now(), time.perf_counter()
            rows = [_in_plan_order(next(items), record) for record in shard.images]
            summary = summarize(rows)
            summary.update(fingerprint=fingerprint, started=started, finished=utc_now(),
                           seconds=round(time.perf_counter() - t0, 4),
                           provenance={"generator": _PROVENANCE, "format": dataset.spec["import"]["format"]})
            store.commit_shard(shard, rows, summary)
        store.write_failures_ledger()


def _in_plan_order(row: Row, planned: ImageRecord) -> Row:
    if row.image.image_id != planned.image_id:
        raise ExportError(f"imported items out of plan order: got {row.image.image_id!r}, expected "
                          f"{planned.image_id!r}; ImportedDataset must yield its records in order")
    return row


__all__ = ["ImportedDataset", "box_to_rle", "image_size", "import_coco", "import_yolo",
           "polygon_to_rle", "write_imported_run"]
