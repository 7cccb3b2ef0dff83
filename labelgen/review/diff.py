"""``labelgen diff RUN_A RUN_B``: which labels two label sources agree on, image by image.

Each side is an ``ExportSource`` (a run, filter options applied on the fly, a saved filtered copy or a
reviewed copy), so the same code compares two generators, two thresholds of one run, or a run and its
reviewed copy. Images are matched by ``image_id``; classes by name (the two sides may have different
vocabularies; a class-agnostic side has the one class ``"object"``).

Matching rule, per image: mask IoU of every A/B pair (``pycocotools.mask.iou`` on the RLEs), then an
optimal one-to-one assignment that maximises the summed IoU over pairs with IoU >= ``iou``
(``scipy.optimize.linear_sum_assignment``; pairs below the threshold cannot be assigned).

* class-aware (default): first the assignment among same-class pairs (**matched**); then, among the
  labels left on both sides, the assignment over pairs of different classes (**class changed**);
  what remains is **only in A** / **only in B**.
* class-agnostic: one assignment ignoring classes; every assigned pair is **matched**, class changed
  is always 0.

An image only one side has counts all its labels as only in that side; a failed image counts as an
image with no labels (and is counted in ``images.failed_a`` / ``failed_b``).

Streaming: both sides are read together in their plan order; a row waits in a buffer only until the
other side reaches the same image, so runs over the same images in the same order use flat memory
(images only one side has are held until the other side ends: their labels, as compressed RLEs).
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..atomic import store_write_error, write_json_atomic
from ..errors import ValidationError
from ..exports.source import ExportSource
from ..structures.instances import Instances
from ..structures.masks import rle_to_pycocotools
from ..structures.rows import Row

DIFF_FORMAT = "labelgen-diff/1"
DIFFS_DIR = "diffs"  # in RUN_A's directory: diffs/<name>.json
MATCHED, ONLY_A, ONLY_B, CLASS_CHANGED = "matched", "only_a", "only_b", "class_changed"
KINDS = (MATCHED, ONLY_A, ONLY_B, CLASS_CHANGED)
TAG_PREFIX = "diff:"


@dataclass(frozen=True)
class ImageDiff:
    """One image's outcome. ``status_a[i]`` / ``status_b[j]``: the kind of A's / B's i-th / j-th label
    (positions in the side's row); ``partner_a[i]``: the B position it was paired with, or ``None``."""

    image_id: str
    in_a: bool
    in_b: bool
    status_a: tuple[str, ...]
    status_b: tuple[str, ...]
    partner_a: tuple[int | None, ...]
    classes_a: tuple[str, ...]
    classes_b: tuple[str, ...]
    ious_a: tuple[float | None, ...] = ()

    @property
    def changes(self) -> int:
        """Labels that differ: only-in-A + only-in-B + class-changed pairs."""
        return sum(s != MATCHED for s in self.status_a) + sum(s == ONLY_B for s in self.status_b)


@dataclass
class DiffSummary:
    """Counts, total and per class (A's class for matched / only-in-A / class-changed, B's for only-in-B)."""

    iou: float
    class_agnostic: bool
    total: Counter = field(default_factory=Counter)
    per_class: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    class_changes: Counter = field(default_factory=Counter)  # "A class -> B class": pairs
    images: Counter = field(default_factory=Counter)
    pair_iou_sum: float = 0.0  # summed mask IoU of the matched and class-changed pairs

    def add(self, item: ImageDiff, failed_a: bool = False, failed_b: bool = False) -> None:
        self.images["both" if item.in_a and item.in_b else "only_a" if item.in_a else "only_b"] += 1
        self.images["failed_a"] += failed_a
        self.images["failed_b"] += failed_b
        self.images["with_changes"] += item.changes > 0
        for i, (status, name) in enumerate(zip(item.status_a, item.classes_a)):
            self.total[status] += 1
            self.per_class[name][status] += 1
            if status in (MATCHED, CLASS_CHANGED) and item.ious_a:
                self.pair_iou_sum += float(item.ious_a[i] or 0.0)
            if status == CLASS_CHANGED:
                self.class_changes[f"{name} -> {item.classes_b[item.partner_a[i]]}"] += 1
        for status, name in zip(item.status_b, item.classes_b):
            if status == ONLY_B:
                self.total[ONLY_B] += 1
                self.per_class[name][ONLY_B] += 1

    def to_dict(self) -> dict[str, Any]:
        row = lambda c: {kind: int(c.get(kind, 0)) for kind in KINDS}  # noqa: E731
        pairs = self.total.get(MATCHED, 0) + self.total.get(CLASS_CHANGED, 0)
        return {"iou": self.iou, "class_agnostic": self.class_agnostic,
                "mean_pair_iou": round(self.pair_iou_sum / pairs, 4) if pairs else None,
                "images": {k: int(self.images.get(k, 0)) for k in
                           ("both", "only_a", "only_b", "failed_a", "failed_b", "with_changes")},
                "total": row(self.total),
                "per_class": {name: row(self.per_class[name]) for name in sorted(self.per_class)},
                "class_changes": dict(sorted(self.class_changes.items()))}

    def table(self) -> str:
        return format_table(self.to_dict())


def format_table(data: dict[str, Any]) -> str:
    """The per-class and total table of a diff (``DiffSummary.to_dict()`` or a saved diff JSON)."""
    names = list(data["per_class"])
    width = max([len(n) for n in names] + [5])
    header = f"{'class':<{width}}  {'matched':>8}  {'only A':>8}  {'only B':>8}  {'class changed':>13}"
    line = lambda name, c: (f"{name:<{width}}  {c[MATCHED]:>8}  {c[ONLY_A]:>8}  {c[ONLY_B]:>8}"  # noqa: E731
                            f"  {c[CLASS_CHANGED]:>13}")
    lines = [header] + [line(n, data["per_class"][n]) for n in names] + [line("total", data["total"])]
    images = data["images"]
    lines.append(f"images: {images['both']} in both, {images['only_a']} only in A, {images['only_b']} only in B;"
                 f" {images['with_changes']} with differences (mask IoU >= {data['iou']:g},"
                 f" {'class-agnostic' if data['class_agnostic'] else 'class-aware'})")
    if data.get("class_changes"):
        lines.append("class changes: " + ", ".join(f"{k} {v}" for k, v in data["class_changes"].items()))
    if data.get("mean_pair_iou") is not None:
        lines.append(f"paired labels: mean mask IoU {data['mean_pair_iou']:.3f}")
    for side in ("a", "b"):
        if isinstance(data.get(side), dict) and data[side].get("generator"):
            side_images = images["both"] + images[f"only_{side}"]
            lines.append(f"{side.upper()}: {side_line(data[side], data['total'], side, side_images)}")
    return "\n".join(lines)


def side_line(desc: dict[str, Any], total: dict[str, int], side: str, images: int) -> str:
    """One line naming a side's generator, its models, its speed and its labels per image (of its ``images``)."""
    labels = total.get(MATCHED, 0) + total.get(CLASS_CHANGED, 0) + total.get(ONLY_A if side == "a" else ONLY_B, 0)
    parts = [f"{desc['generator']} (run {desc.get('run_id')}, {desc.get('kind', 'run')})"]
    if desc.get("models"):
        parts.append(", ".join(desc["models"]))
    if images:
        parts.append(f"{labels / images:.2f} labels per image")
    if desc.get("seconds_per_image") is not None:
        parts.append(f"{desc['seconds_per_image']:.3f} s per image as run")
    return "; ".join(parts)


# -- matching one image --------------------------------------------------------------------------------
def mask_iou(a: Instances, b: Instances) -> np.ndarray:
    """``(len(a), len(b))`` mask IoU (pycocotools on the compressed RLEs; frames must agree)."""
    from pycocotools import mask as mask_utils

    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), dtype=np.float64)
    if (a.height, a.width) != (b.height, b.width):
        raise ValidationError(f"cannot compare masks of a {a.width}x{a.height} and a {b.width}x{b.height} frame:"
                              " the two runs hold different image sizes for the same image id")
    ious = mask_utils.iou([rle_to_pycocotools(r) for r in a.masks_rle], [rle_to_pycocotools(r) for r in b.masks_rle],
                          [0] * len(b))
    return np.asarray(ious, dtype=np.float64).reshape(len(a), len(b))


def _assign(ious: np.ndarray, allowed: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs of an assignment maximising summed IoU over allowed pairs with IoU >= threshold."""
    from scipy.optimize import linear_sum_assignment

    ok = allowed & (ious >= threshold)
    if not ok.any():
        return []
    weights = np.where(ok, ious, 0.0)
    rows, cols = linear_sum_assignment(weights, maximize=True)
    return [(int(i), int(j)) for i, j in zip(rows, cols) if ok[i, j]]


def match_image(image_id: str, a: Instances | None, b: Instances | None, names_a: Sequence[str],
                names_b: Sequence[str], *, iou: float = 0.5, class_agnostic: bool = False,
                in_a: bool = True, in_b: bool = True) -> ImageDiff:
    """Match one image's labels (``None``: the side has no labels there). See the module docstring."""
    classes_a = _classes(a, names_a)
    classes_b = _classes(b, names_b)
    status_a, status_b = [ONLY_A] * len(classes_a), [ONLY_B] * len(classes_b)
    partner: list[int | None] = [None] * len(classes_a)
    ious_a: list[float | None] = [None] * len(classes_a)
    if classes_a and classes_b:
        ious = mask_iou(a, b)
        same = np.array(classes_a, dtype=object)[:, None] == np.array(classes_b, dtype=object)[None, :]
        free_a, free_b = np.ones(len(classes_a), bool), np.ones(len(classes_b), bool)
        rounds = [(np.ones_like(same), MATCHED)] if class_agnostic else [(same, MATCHED), (~same, CLASS_CHANGED)]
        for allowed, kind in rounds:
            for i, j in _assign(ious, allowed & free_a[:, None] & free_b[None, :], iou):
                status_a[i], status_b[j], partner[i], ious_a[i] = kind, kind, j, float(ious[i, j])
                free_a[i] = free_b[j] = False
    return ImageDiff(image_id, in_a, in_b, tuple(status_a), tuple(status_b), tuple(partner), tuple(classes_a),
                     tuple(classes_b), tuple(ious_a))


def _classes(instances: Instances | None, names: Sequence[str]) -> list[str]:
    if instances is None:
        return []
    if instances.class_ids is None:
        return [names[0] if len(names) == 1 else "object"] * len(instances)
    return [names[c] if 0 <= c < len(names) else str(int(c)) for c in instances.class_ids]


# -- streaming both sides ---------------------------------------------------------------------------------
def paired_rows(a: Iterable[Row], b: Iterable[Row]) -> Iterator[tuple[str, Row | None, Row | None]]:
    """``(image_id, row of A or None, row of B or None)`` for every image of either side: pairs as soon as
    both sides have reached the image, then what only one side has (A's first, in its order)."""
    pending_a: dict[str, Row] = {}
    pending_b: dict[str, Row] = {}
    iter_a, iter_b = iter(a), iter(b)
    done_a = done_b = False
    while not (done_a and done_b):
        if not done_a:
            row = next(iter_a, None)
            if row is None:
                done_a = True
            elif row.image.image_id in pending_b:
                yield row.image.image_id, row, pending_b.pop(row.image.image_id)
            else:
                pending_a[row.image.image_id] = row
        if not done_b:
            row = next(iter_b, None)
            if row is None:
                done_b = True
            elif row.image.image_id in pending_a:
                yield row.image.image_id, pending_a.pop(row.image.image_id), row
            else:
                pending_b[row.image.image_id] = row
    for image_id, row in pending_a.items():
        yield image_id, row, None
    for image_id, row in pending_b.items():
        yield image_id, None, row


def iter_diff(source_a: ExportSource, source_b: ExportSource, *, iou: float = 0.5,
              class_agnostic: bool = False) -> Iterator[tuple[ImageDiff, Row | None, Row | None]]:
    """``(ImageDiff, row A, row B)`` per image of either side (see ``paired_rows`` for the order)."""
    _check_iou(iou)
    names_a, names_b = source_a.class_names, source_b.class_names
    for image_id, row_a, row_b in paired_rows(source_a, source_b):
        yield (match_image(image_id, row_a.instances if row_a else None, row_b.instances if row_b else None,
                           names_a, names_b, iou=iou, class_agnostic=class_agnostic,
                           in_a=row_a is not None, in_b=row_b is not None), row_a, row_b)


def diff_sources(source_a: ExportSource, source_b: ExportSource, *, iou: float = 0.5,
                 class_agnostic: bool = False) -> DiffSummary:
    """The counts of ``iter_diff`` (one streaming pass)."""
    summary = DiffSummary(iou=float(iou), class_agnostic=class_agnostic)
    for item, row_a, row_b in iter_diff(source_a, source_b, iou=iou, class_agnostic=class_agnostic):
        summary.add(item, failed_a=row_a is not None and row_a.instances is None,
                    failed_b=row_b is not None and row_b.instances is None)
    return summary


def _check_iou(iou: Any) -> None:
    if isinstance(iou, bool) or not isinstance(iou, (int, float)) or not math.isfinite(iou) or not 0 < iou <= 1:
        raise ValidationError(f"--iou must be a number in (0, 1], e.g. 0.5; got {iou!r}")


# -- saved diffs (read by the run report) ------------------------------------------------------------------
def describe_source(source: ExportSource) -> dict[str, Any]:
    from ..config import config_to_dict

    kind = source.copy_kind or ("filter" if source.filter_config is not None else "run")
    return {"run_id": source.run_id, "run_dir": str(source.store.root.resolve()), "kind": kind,
            "name": source.copy_name,
            "filter": None if source.filter_config is None else config_to_dict(source.filter_config),
            **generator_facts(source)}


def generator_facts(source: ExportSource) -> dict[str, Any]:
    """What made a side's labels, for comparing generators: the generator's name, its class names (``None``:
    class-agnostic), the models it loaded (from the committed shards' provenance) and the seconds per image of
    its committed shards (wall time of the shards / their images; the machine and settings of that run)."""
    manifest = source.store.manifest()
    seconds = images = 0.0
    provenance: dict[str, Any] = {}
    for shard in source.store.iter_plan():
        done = source.store.done_record(shard)
        if done is None:
            continue
        provenance = provenance or dict(done.get("provenance") or {})
        if isinstance(done.get("seconds"), (int, float)):
            seconds += float(done["seconds"])
            images += float(done.get("images", len(shard.images)))
    return {"generator": manifest.get("generator"), "class_names": manifest.get("class_names") or None,
            "models": model_names(provenance), "random_weights": _random_weights(provenance),
            "seconds_per_image": round(seconds / images, 4) if images else None}


def model_names(provenance: dict[str, Any]) -> list[str]:
    """``["sam: vit_h", "semantic: ViT-B-16/openai", ...]``: the model facts of a shard's provenance, each a
    nested dict naming a model (keys ``model``/``model_type``/``model_name``, ``pretrained``/``checkpoint``)."""
    names = []
    if isinstance(provenance.get("model"), str):  # a one-model generator names it at the top level
        names.append(f"{provenance.get('generator', 'model')}: {provenance['model']}")
    for key, value in sorted(provenance.items()):
        if not isinstance(value, dict):
            continue
        model = next((value[k] for k in ("model", "model_type", "model_name", "config") if value.get(k)), None)
        if model is None:
            continue
        weights = next((value[k] for k in ("pretrained", "checkpoint") if value.get(k)), None)
        names.append(f"{key}: {model}" + (f"/{Path(str(weights)).name}" if weights else ""))
    return names


def _random_weights(provenance: dict[str, Any]) -> bool:
    return bool(provenance.get("random_weights")) or any(
        isinstance(v, dict) and bool(v.get("random_weights")) for v in provenance.values())


def resolve_class_agnostic(source_a: ExportSource, source_b: ExportSource, requested: bool) -> tuple[bool, str]:
    """Whether to match ignoring classes, and why: as requested, or forced when either side is class-agnostic
    (a class-agnostic generator such as ``sam-auto`` has no classes to agree on)."""
    if requested:
        return True, "--class-agnostic"
    agnostic = [side for side, source in (("A", source_a), ("B", source_b)) if source.class_agnostic]
    if agnostic:
        return True, f"{' and '.join(agnostic)} class-agnostic"
    return False, ""


def diff_name(source_a: ExportSource, source_b: ExportSource) -> str:
    """File name stem of the saved diff in RUN_A: B's run id, plus which copy / filter of it."""
    desc = describe_source(source_b)
    parts = [desc["run_id"]]
    if desc["kind"] in ("filtered", "reviewed"):
        parts.append(f"{desc['kind']}-{desc['name']}")
    elif desc["kind"] == "filter":
        parts.append("filter")
    desc_a = describe_source(source_a)
    if desc_a["kind"] != "run":
        parts.insert(0, f"from-{desc_a['kind']}" + (f"-{desc_a['name']}" if desc_a["name"] else ""))
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in "--".join(parts))


def save_diff(source_a: ExportSource, source_b: ExportSource, summary: DiffSummary,
              name: str | None = None) -> Path:
    """Write ``RUN_A/diffs/NAME.json`` (atomically): both sides, the rule and the counts."""
    name = name or diff_name(source_a, source_b)
    folder = source_a.store.root / DIFFS_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise store_write_error(exc, folder, "run diff") from exc
    path = folder / f"{name}.json"
    write_json_atomic(path, {"format": DIFF_FORMAT, "a": describe_source(source_a), "b": describe_source(source_b),
                             "rule": "mask IoU (pycocotools) >= iou, optimal one-to-one assignment"
                                     " (scipy linear_sum_assignment); class-aware: same class first, then"
                                     " other classes as class_changed",
                             **summary.to_dict()}, "run diff")
    return path


def read_diffs(run_dir: str | Path) -> list[tuple[str, dict]]:
    """``(name, diff JSON)`` of every saved diff of the run, by name; unreadable files are skipped."""
    import json

    folder = Path(run_dir) / DIFFS_DIR
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == DIFF_FORMAT:
            found.append((path.stem, data))
    return found


# -- FiftyOne: tag the labels of A's dataset ------------------------------------------------------------------
B_FIELD = "labelgen_diff_b"  # B's labels that A lacks (only in B) or labels differently (class changed)
DIFF_VIEWS = {"diff_only_a": ONLY_A, "diff_only_b": ONLY_B, "diff_class_changed": CLASS_CHANGED}


def tag_fiftyone(source_a: ExportSource, source_b: ExportSource, dataset_name: str, *, iou: float = 0.5,
                 class_agnostic: bool = False, batch_size: int = 500) -> DiffSummary:
    """Export A to FiftyOne dataset ``dataset_name`` (created or updated, ``export_fiftyone``) and tag
    each of its labels ``diff:matched`` / ``diff:only_a`` / ``diff:class_changed``; B's labels that are
    only in B or of another class go in the field ``labelgen_diff_b`` (tagged ``diff:only_b`` /
    ``diff:class_changed``); each sample gets ``diff_changes`` (int). Saved views: ``diff_changes``
    (samples with differences, most first) and ``diff_only_a`` / ``diff_only_b`` / ``diff_class_changed``.
    Old ``diff:`` tags are replaced. Returns the counts."""
    from ..exports.fiftyone import FIELD, export_fiftyone, import_fiftyone

    fo = import_fiftyone()
    export_fiftyone(source_a, dataset_name)
    dataset = fo.load_dataset(dataset_name)
    if B_FIELD not in dataset.get_field_schema():
        dataset.add_sample_field(B_FIELD, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    if "diff_changes" not in dataset.get_field_schema():
        dataset.add_sample_field("diff_changes", fo.IntField)
    summary = DiffSummary(iou=float(iou), class_agnostic=class_agnostic)
    batch: dict[str, tuple[ImageDiff, Row | None]] = {}
    for item, row_a, row_b in iter_diff(source_a, source_b, iou=iou, class_agnostic=class_agnostic):
        summary.add(item, failed_a=row_a is not None and row_a.instances is None,
                    failed_b=row_b is not None and row_b.instances is None)
        if item.in_a:
            batch[item.image_id] = (item, row_b)
        if len(batch) >= batch_size:
            _tag_batch(fo, dataset, batch, FIELD)
            batch = {}
    if batch:
        _tag_batch(fo, dataset, batch, FIELD)
    F = fo.ViewField
    dataset.save_view("diff_changes", dataset.match(F("diff_changes") > 0).sort_by("diff_changes", reverse=True),
                      overwrite=True)
    for view, kind in DIFF_VIEWS.items():
        field_name = B_FIELD if kind == ONLY_B else FIELD
        dataset.save_view(view, dataset.match_labels(tags=TAG_PREFIX + kind, fields=field_name), overwrite=True)
    dataset.info = {**dataset.info, "labelgen_diff": {"a": describe_source(source_a), "b": describe_source(source_b),
                                                      **summary.to_dict()}}
    dataset.save()
    return summary


def _tag_batch(fo: Any, dataset: Any, batch: dict[str, tuple[ImageDiff, Row | None]], field_a: str) -> None:
    F = fo.ViewField
    view = dataset.match(F("labelgen_image_id").is_in(list(batch)))
    for sample in view.iter_samples(autosave=True, batch_size=len(batch)):
        item, row_b = batch[sample["labelgen_image_id"]]
        detections = sample[field_a].detections if sample[field_a] else []
        for detection in detections:
            tags = [t for t in detection.tags if not t.startswith(TAG_PREFIX)]
            position = detection["labelgen_position"]
            if position is not None and 0 <= position < len(item.status_a):
                tags.append(TAG_PREFIX + item.status_a[position])
            detection.tags = tags
        sample[B_FIELD] = fo.Detections(detections=list(_b_detections(fo, item, row_b)))
        sample["diff_changes"] = item.changes


def _b_detections(fo: Any, item: ImageDiff, row_b: Row | None) -> Iterator[Any]:
    from ..exports.fiftyone import box_pixels
    from ..structures.masks import rles_to_masks

    if row_b is None or row_b.instances is None:
        return
    inst = row_b.instances
    for j, status in enumerate(item.status_b):
        if status == MATCHED:
            continue
        x1, y1, x2, y2 = (float(v) for v in inst.boxes_xyxy[j])
        detection = fo.Detection(label=item.classes_b[j], tags=[TAG_PREFIX + status],
                                 bounding_box=[x1 / inst.width, y1 / inst.height, (x2 - x1) / inst.width,
                                               (y2 - y1) / inst.height])
        if "confidence" in inst.scores:
            detection.confidence = float(inst.scores["confidence"][j])
        detection["labelgen_position"] = j
        c0, r0, c1, r1 = box_pixels(inst.boxes_xyxy[j], inst.width, inst.height)
        if c1 > c0 and r1 > r0:
            detection.mask = rles_to_masks([inst.masks_rle[j]], inst.height, inst.width)[0][r0:r1, c0:c1]
        yield detection


__all__ = ["B_FIELD", "CLASS_CHANGED", "DIFF_FORMAT", "DiffSummary", "ImageDiff", "KINDS", "MATCHED", "ONLY_A",
           "ONLY_B", "diff_sources", "format_table", "iter_diff", "mask_iou", "match_image", "paired_rows",
           "read_diffs", "save_diff", "tag_fiftyone"]
