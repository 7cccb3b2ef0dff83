"""Review samples: a seeded, stratified random sample of a run's images, exported to FiftyOne for
reviewers to give a verdict on each label; ``labelgen pull`` turns the verdicts into
``RUN_DIR/reviewed/NAME/verdicts.jsonl`` (``labelgen.review.verdicts``).

**Strata**: each labelled image falls in one stratum ``BAND|CLASS``: ``BAND`` is the confidence band
of the median ``confidence`` of its labels (edges ``bands``, default 0.25 / 0.5 / 0.75; 1.0 without a
``confidence`` column), ``CLASS`` the class name most of its labels have (ties: the lower class id).
Images without labels form the stratum ``none|none`` (they tell about missed objects). Failed images
are not sampled.

**Sampling**: every image gets a key, a hash of ``(seed, image_id)``; a stratum's sample is its images
with the smallest keys, so the same seed gives the same sample whatever the order or number of shards,
and memory is bounded by N per stratum (not by the run). Allocation: each stratum gets one image
(when N is smaller than the number of strata, the N strata whose smallest key is smallest), the rest
proportionally to stratum size (largest remainder). The record keeps each stratum's size and how many
were sampled, so estimates for the whole run can weight images by ``images / sampled``.

**Record**: ``RUN_DIR/review/samples/NAME.json`` (NAME: the FiftyOne dataset), written atomically::

    {"format": "labelgen-review-sample/1", "name", "run_id", "seed", "n", "size", "bands",
     "source": {"kind", "name"}, "strata": {KEY: {"band", "class", "images", "sampled"}},
     "image_ids": [...], "image_strata": [KEY per image id]}

``image_ids`` is the sample order (by key). **Reviewer conventions** in the App: accept a label (no
tag, or ``accepted``) or tag it ``false_positive``, ``wrong_class`` or ``poor_mask``; draw a missed
object as a new label, or tag the sample ``missing_object``. At pull (``VerdictCollector``): the
first of those tags on a label is its verdict; a label tagged ``rejected``, deleted in the App, or on a
sample tagged ``rejected`` is a ``false_positive``; an untagged label whose class was changed is a
``wrong_class``, whose box was changed a ``poor_mask``; drawn labels (not tagged ``rejected``) count
as ``missed``.
"""
from __future__ import annotations

import hashlib
import heapq
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..atomic import store_write_error, write_json_atomic
from ..errors import ConfigError, ExportError
from ..exports.fiftyone import FiftyOneExportReport, detection_label, export_fiftyone, import_fiftyone
from ..exports.source import ExportSource, open_export_source
from ..structures.rows import Row
from .verdicts import ERROR_VERDICTS, ImageVerdicts, LabelVerdict, write_verdicts, VERDICTS_FILE

SAMPLE_FORMAT = "labelgen-review-sample/1"
SAMPLES_DIR = Path("review") / "samples"  # in the run directory
DEFAULT_BANDS = (0.25, 0.5, 0.75)
ACCEPTED_TAG, MISSING_OBJECT_TAG = "accepted", "missing_object"
INFO_KEY = "labelgen_review_sample"  # dataset info: {"name", "seed", "n"}
EMPTY_STRATUM = "none|none"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_BOX_TOLERANCE = 1e-3  # pixels


@dataclass(frozen=True)
class SampleExport:
    record: dict
    path: str  # the record file
    export: FiftyOneExportReport


def sample_path(run_dir: str | os.PathLike[str], name: str) -> Path:
    return Path(run_dir) / SAMPLES_DIR / f"{name}.json"


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"a review sample's dataset name must be a plain name (letters, digits, '.', '_', '-',"
                          f" at most 128); got {name!r}")
    return name


def _check_bands(bands: Sequence[float]) -> tuple[float, ...]:
    edges = tuple(float(b) for b in bands)
    if any(not 0.0 < b < 1.0 for b in edges) or list(edges) != sorted(set(edges)):
        raise ConfigError(f"confidence band edges must be increasing numbers in (0, 1); got {bands!r}")
    return edges


def _band_label(value: float, edges: tuple[float, ...]) -> str:
    bounds = (0.0, *edges, 1.0)
    i = int(np.searchsorted(np.asarray(edges), value, side="right"))
    return f"{bounds[i]:g}-{bounds[i + 1]:g}"


def stratum_of(row: Row, class_names: Sequence[str], edges: tuple[float, ...] = DEFAULT_BANDS) -> str | None:
    """The row's stratum key ``BAND|CLASS`` (module doc); ``None`` for a failed image."""
    instances = row.instances
    if instances is None:
        return None
    if len(instances) == 0:
        return EMPTY_STRATUM
    confidence = instances.scores.get("confidence")
    median = 1.0 if confidence is None else float(np.median(np.asarray(confidence, dtype=np.float64)))
    if instances.class_ids is None or not len(class_names):
        name = class_names[0] if class_names else "object"
    else:
        ids, counts = np.unique(np.asarray(instances.class_ids), return_counts=True)
        top = int(ids[int(np.argmax(counts))])  # np.unique sorts: ties go to the lower id
        name = class_names[top] if 0 <= top < len(class_names) else f"class{top}"
    return f"{_band_label(median, edges)}|{name}"


def _key(seed: int, image_id: str) -> int:
    data = f"{seed}\0{image_id}".encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _allocate(sizes: dict[str, int], first_key: dict[str, int], n: int) -> dict[str, int]:
    """Images per stratum: one each (or the N strata with the smallest keys), the rest by size."""
    order = sorted(sizes, key=lambda s: (first_key[s], s))
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    if n <= len(order):
        return {s: 1 for s in order[:n]}
    alloc = {s: 1 for s in order}
    spare = {s: sizes[s] - 1 for s in order}
    left, room = n - len(order), sum(spare.values())
    ideal = {s: left * spare[s] / room for s in order}
    for s in order:
        alloc[s] += int(ideal[s])
    left -= sum(int(ideal[s]) for s in order)
    for s in sorted(order, key=lambda s: (-(ideal[s] - int(ideal[s])), first_key[s], s)):
        if left <= 0:
            break
        if alloc[s] < sizes[s]:
            alloc[s] += 1
            left -= 1
    return alloc


def choose_sample(source: ExportSource, n: int, *, seed: int = 0,
                  bands: Sequence[float] = DEFAULT_BANDS) -> dict:
    """The sample record (module doc) without ``name``: ``n`` images of ``source``, stratified, seeded.
    Streams the source once; memory grows with ``n`` and the number of strata, not the run."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"the sample size must be an int >= 1; got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"the sample seed must be an int; got {seed!r}")
    edges = _check_bands(bands)
    names = list(source.class_names)
    sizes: Counter = Counter()
    smallest: dict[str, list[tuple[int, str]]] = {}  # stratum -> max-heap (negated keys) of its n smallest
    for row in source:
        stratum = stratum_of(row, names, edges)
        if stratum is None:
            continue
        sizes[stratum] += 1
        item = (-_key(seed, row.image.image_id), row.image.image_id)
        heap = smallest.setdefault(stratum, [])
        if len(heap) < n:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    if not sizes:
        raise ExportError("the run has no labelled or empty images to sample (every committed image failed, or"
                          " nothing is committed yet)")
    ranked = {s: sorted((-k, image_id) for k, image_id in heap) for s, heap in smallest.items()}
    alloc = _allocate(dict(sizes), {s: ranked[s][0][0] for s in ranked}, n)
    picked = sorted((key, image_id, s) for s, count in alloc.items() for key, image_id in ranked[s][:count])
    strata = {s: {"band": s.split("|", 1)[0], "class": None if s == EMPTY_STRATUM else s.split("|", 1)[1],
                  "images": sizes[s], "sampled": alloc.get(s, 0)} for s in sorted(sizes)}
    return {"format": SAMPLE_FORMAT, "run_id": source.run_id, "seed": seed, "n": n, "size": len(picked),
            "bands": list(edges), "source": {"kind": source.copy_kind or "run", "name": source.copy_name},
            "strata": strata, "image_ids": [p[1] for p in picked], "image_strata": [p[2] for p in picked]}


def write_sample(run_dir: str | os.PathLike[str], name: str, record: dict) -> Path:
    path = sample_path(run_dir, _check_name(name))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise store_write_error(exc, path.parent, "review sample record") from exc
    write_json_atomic(path, {**record, "name": name}, "review sample record")
    return path


def read_sample(run_dir: str | os.PathLike[str], name: str) -> dict:
    import json

    path = sample_path(run_dir, _check_name(name))
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"no review sample {name!r} at {path}; make one with"
                          f" `labelgen review {run_dir} --sample N --dataset {name}`") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read the review sample record {path}: {exc}; make it again with"
                          " `labelgen review RUN --sample N`") from None
    if not isinstance(record, dict) or record.get("format") != SAMPLE_FORMAT:
        raise ExportError(f"{path} is not a {SAMPLE_FORMAT} record; make it again with `labelgen review RUN --sample N`")
    return record


def default_sample_name(run_dir: str | os.PathLike[str], seed: int) -> str:
    from ..store.run_store import RunStore

    return f"labelgen-{RunStore(run_dir).manifest()['run_id']}-sample-{seed}"


def export_sample(run_dir: str | os.PathLike[str], n: int, *, seed: int = 0, dataset_name: str | None = None,
                  filtered: str | None = None, bands: Sequence[float] = DEFAULT_BANDS) -> SampleExport:
    """Choose a sample (``choose_sample``), record it in ``RUN_DIR/review/samples/NAME.json`` and export
    exactly those images to the FiftyOne dataset NAME (default ``labelgen-RUN_ID-sample-SEED``)."""
    name = _check_name(dataset_name or default_sample_name(run_dir, seed))
    source = open_export_source(run_dir, filtered=filtered)
    record = choose_sample(source, n, seed=seed, bands=bands)
    path = write_sample(run_dir, name, record)
    report = export_fiftyone(source, name, image_ids=frozenset(record["image_ids"]))
    dataset = import_fiftyone().load_dataset(name)
    dataset.info = {**dataset.info, INFO_KEY: {"name": name, "seed": seed, "n": n}}
    dataset.save()
    return SampleExport({**record, "name": name}, str(path.resolve()), report)


def sample_of(dataset: Any) -> str | None:
    """The sample name of a dataset made by ``export_sample``, else ``None``."""
    info = dataset.info.get(INFO_KEY)
    return str(info["name"]) if isinstance(info, dict) and info.get("name") else None


class VerdictCollector:
    """Collects the verdicts of a sample's images while ``pull_review`` walks the source (rules: module
    doc), then writes them in sample order."""

    def __init__(self, record: dict, class_names: Sequence[str]):
        self.order = list(record["image_ids"])
        self.wanted = set(self.order)
        self.class_names = list(class_names)
        self.found: dict[str, ImageVerdicts] = {}

    def add(self, row: Row, origin: Sequence[int | None], sample: tuple[list[str], list[Any]] | None) -> None:
        image_id = row.image.image_id
        if image_id not in self.wanted or row.instances is None:
            return
        if sample is None:
            raise ExportError(f"sampled image {image_id!r} is not in the FiftyOne dataset (deleted in the App?);"
                              " export the sample again (labelgen review RUN --sample N --dataset NAME), review,"
                              " then pull")
        tags, detections = sample
        instances = row.instances
        image_rejected = "rejected" in tags
        verdicts: dict[int, str] = {}
        missed = 0
        for detection in detections:
            position = getattr(detection, "labelgen_position", None)
            label_tags = list(detection.tags or ())
            if position is None or position in verdicts or not 0 <= position < len(instances):
                missed += "rejected" not in label_tags
                continue
            verdicts[position] = self._verdict(detection, label_tags, image_rejected, instances, position)
        labels = []
        for position in range(len(instances)):
            if origin[position] is None:  # added in an earlier review: not the run's label
                continue
            class_id = None if instances.class_ids is None else int(instances.class_ids[position])
            labels.append(LabelVerdict(int(origin[position]), class_id, verdicts.get(position, "false_positive")))
        self.found[image_id] = ImageVerdicts(image_id, tuple(labels), missed, MISSING_OBJECT_TAG in tags)

    def _verdict(self, detection: Any, tags: list[str], image_rejected: bool, instances: Any, position: int) -> str:
        if image_rejected or "rejected" in tags:
            return "false_positive"
        for tag in tags:
            if tag in ERROR_VERDICTS:
                return tag
        class_id = None if instances.class_ids is None else int(instances.class_ids[position])
        if detection.label != detection_label(class_id, self.class_names):
            return "wrong_class"
        x, y, w, h = (float(v) for v in detection.bounding_box)
        width, height = instances.width, instances.height
        box = np.array([x * width, y * height, (x + w) * width, (y + h) * height])
        if np.abs(box - instances.boxes_xyxy[position]).max() > max(_BOX_TOLERANCE, 1e-6 * max(width, height)):
            return "poor_mask"
        return "correct"

    def write(self, folder: Path) -> int:
        missing = [i for i in self.order if i not in self.found]
        if missing:
            raise ExportError(f"{len(missing)} sampled image(s) are not in the run's committed rows (first:"
                              f" {missing[0]!r}); the sample does not belong to this source. Sample again")
        return write_verdicts(folder / VERDICTS_FILE, (self.found[i] for i in self.order))


__all__ = ["ACCEPTED_TAG", "DEFAULT_BANDS", "MISSING_OBJECT_TAG", "SAMPLE_FORMAT", "SampleExport", "VerdictCollector",
           "choose_sample", "default_sample_name", "export_sample", "read_sample", "sample_of", "sample_path",
           "stratum_of", "write_sample"]
