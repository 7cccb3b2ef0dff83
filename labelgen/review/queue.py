"""Review queue: which images a reviewer should open first (``labelgen review RUN --queue``).

Each image's **expected errors** (what a reviewer would fix there), from its stored labels only:

* wrong labels: ``sum(1 - p)`` over its labels, ``p`` the probability a label is correct: the calibrated
  ``p_correct`` when a calibration is given (``labelgen.review.calibration.load_calibration``), else the
  raw ``confidence`` clipped to [0, 1] (0.5 for a run without one). Labels near the threshold
  (p about 0.5) are the uncertain ones; labels with p near 1 add almost nothing;
* class confusion: ``sum(p * (1 - margin) / 2)`` over labels with a class margin column
  (``clip_label_margin``: top-1 minus top-2 class probability): a correct object whose class is
  nearly tied is wrong-class about half the time;
* missed objects: for a filtered source (``--filtered`` or filter options), ``sum(confidence)`` of the
  labels the filter rejected for low confidence: the objects among them that a reviewer would draw back.

Diversity: images are taken greedily by ``expected * prod(1 - diversity * similarity)``, the product over
the images already queued that are near-duplicates of it (cosine ``similarity`` >= ``near_duplicate``,
default 0.9, of the images' descriptors: class histogram and histogram of the labels' ``p``, each
normalised): each near-duplicate already queued halves (``diversity`` 0.5) an image's priority, so
near-duplicates (same classes, same score profile) are spread out instead of all sent first. The greedy pass runs over the ``head``
images of highest expected errors (kept in a heap while streaming: memory is ``head`` descriptors plus
one float per image); the rest follow by expected errors, each below the head's last priority.

``review_priority`` (the sort key, higher first) is the greedy gain at the moment the image was taken;
it never increases along the queue.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import ValidationError
from ..exports.source import ExportSource
from ..structures.instances import Instances
from ..structures.rows import Row

MARGIN_COLUMNS = ("clip_label_margin", "label_margin", "class_margin")
P_BINS = 5
QUEUE_VIEW = "review_queue"


@dataclass(frozen=True)
class QueueItem:
    image_id: str
    rank: int  # 1 = first to review
    review_priority: float
    expected_errors: float
    wrong_labels: float
    class_confusion: float
    missed: float


def label_probabilities(instances: Instances, p_correct: Callable[[Instances], np.ndarray] | None = None
                        ) -> np.ndarray:
    """``p`` per label (see the module docstring)."""
    if p_correct is not None:
        p = np.asarray(p_correct(instances), dtype=np.float64)
    elif "confidence" in instances.scores:
        p = np.asarray(instances.scores["confidence"], dtype=np.float64)
    else:
        p = np.full(len(instances), 0.5)
    return np.clip(np.nan_to_num(p, nan=0.5), 0.0, 1.0)


def image_terms(row: Row, p_correct: Callable[[Instances], np.ndarray] | None = None
                ) -> tuple[float, float, float, np.ndarray]:
    """``(wrong labels, class confusion, missed, p)`` of one row; a failed row has none."""
    missed = sum(float(r.get("confidence", 0.0) or 0.0) for r in (row.rejected or ())
                 if str(r.get("reason", "")).startswith("low_confidence"))
    if row.instances is None or not len(row.instances):
        return 0.0, 0.0, missed, np.zeros(0)
    p = label_probabilities(row.instances, p_correct)
    confusion = 0.0
    for column in MARGIN_COLUMNS:
        if column in row.instances.scores:
            margin = np.clip(np.asarray(row.instances.scores[column], dtype=np.float64), 0.0, 1.0)
            confusion = float(np.sum(p * (1.0 - margin) / 2.0))
            break
    return float(np.sum(1.0 - p)), confusion, missed, p


def descriptor(row: Row, p: np.ndarray, num_classes: int) -> np.ndarray:
    """Class histogram and ``p`` histogram, each L2-normalised, concatenated (for cosine similarity)."""
    classes = np.zeros(max(num_classes, 1))
    if row.instances is not None and len(row.instances):
        ids = row.instances.class_ids
        ids = np.zeros(len(row.instances), int) if ids is None else np.clip(ids, 0, len(classes) - 1)
        np.add.at(classes, ids, 1.0)
    profile = np.histogram(p, bins=P_BINS, range=(0.0, 1.0))[0].astype(np.float64)
    parts = [v / n if (n := np.linalg.norm(v)) > 0 else v for v in (classes, profile)]
    return np.concatenate(parts) / np.sqrt(2.0)


def build_queue(rows: Iterable[Row], num_classes: int, *, p_correct: Callable[[Instances], np.ndarray] | None = None,
                diversity: float = 0.5, near_duplicate: float = 0.9, head: int = 2000) -> list[QueueItem]:
    """The review queue of ``rows`` (one streaming pass), first to review first."""
    if isinstance(diversity, bool) or not isinstance(diversity, (int, float)) or not 0 <= diversity < 1:
        raise ValidationError(f"diversity must be a number in [0, 1) (0: no diversity term); got {diversity!r}")
    if isinstance(near_duplicate, bool) or not isinstance(near_duplicate, (int, float)) or not 0 < near_duplicate <= 1:
        raise ValidationError(f"near_duplicate must be a cosine similarity in (0, 1]; got {near_duplicate!r}")
    if isinstance(head, bool) or not isinstance(head, int) or head < 1:
        raise ValidationError(f"head must be an int >= 1 (images ranked with the diversity term); got {head!r}")
    heap: list[tuple[float, int, tuple, np.ndarray]] = []  # min-heap of the head candidates by (expected, -order)
    tail: list[tuple[float, int, tuple]] = []
    for order, row in enumerate(rows):
        wrong, confusion, missed, p = image_terms(row, p_correct)
        expected = wrong + confusion + missed
        entry = (expected, -order, (row.image.image_id, wrong, confusion, missed))  # ties: earlier first
        item = (*entry, descriptor(row, p, num_classes))
        if len(heap) < head:
            heapq.heappush(heap, item)
        elif entry[:2] > heap[0][:2]:
            out = heapq.heapreplace(heap, item)
            tail.append(out[:3])
        else:
            tail.append(entry)
    return _rank(heap, tail, diversity, near_duplicate)


def _rank(heap: list, tail: list, diversity: float, near_duplicate: float) -> list[QueueItem]:
    queue: list[QueueItem] = []
    if heap:
        heap.sort(key=lambda e: (-e[0], -e[1]))
        expected = np.array([e[0] for e in heap])
        vectors = np.stack([e[3] for e in heap])
        penalty = np.zeros(len(heap))  # log of the diversity factor, per candidate
        free = np.ones(len(heap), bool)
        for _ in range(len(heap)):
            gain = np.where(free, expected * np.exp(penalty), -np.inf)
            k = int(np.argmax(gain))  # ties: the earlier (higher expected, then plan order)
            free[k] = False
            similarity = vectors @ vectors[k]
            near = similarity >= near_duplicate
            penalty[near] += np.log1p(-diversity * np.minimum(similarity[near], 1.0))
            queue.append(_item(heap[k], len(queue) + 1, float(gain[k])))
    floor = queue[-1].review_priority if queue else float("inf")
    for entry in sorted(tail, key=lambda e: (-e[0], -e[1])):
        queue.append(_item(entry, len(queue) + 1, min(entry[0], floor)))
    return queue


def _item(entry: tuple, rank: int, priority: float) -> QueueItem:
    expected, _, (image_id, wrong, confusion, missed) = entry[:3]
    return QueueItem(image_id, rank, round(priority, 6), round(expected, 6), round(wrong, 6), round(confusion, 6),
                     round(missed, 6))


def queue_source(source: ExportSource, *, calibration: str | None = None, diversity: float = 0.5,
                 head: int = 2000) -> list[QueueItem]:
    """The review queue of an export source; ``calibration``: ``RUN_DIR/calibration/NAME`` supplies ``p``."""
    p_correct = None
    if calibration:
        from .calibration import load_calibration

        p_correct = load_calibration(source.store.root, calibration).p_correct
    return build_queue(source, len(source.class_names), p_correct=p_correct, diversity=diversity, head=head)


def write_queue_fiftyone(source: ExportSource, dataset_name: str, queue: Sequence[QueueItem]) -> dict[str, Any]:
    """Export ``source`` to ``dataset_name`` (``export_fiftyone``) and set on each sample ``review_priority``,
    ``review_rank`` and ``review_expected_errors``; save the view ``review_queue`` sorted by priority."""
    from ..exports.fiftyone import export_fiftyone, import_fiftyone

    fo = import_fiftyone()
    report = export_fiftyone(source, dataset_name)
    dataset = fo.load_dataset(dataset_name)
    for name, kind in (("review_priority", fo.FloatField), ("review_rank", fo.IntField),
                       ("review_expected_errors", fo.FloatField)):
        if name not in dataset.get_field_schema():
            dataset.add_sample_field(name, kind)
    present = set(dataset.values("labelgen_image_id"))
    items = [q for q in queue if q.image_id in present]
    for name, attr in (("review_priority", "review_priority"), ("review_rank", "rank"),
                       ("review_expected_errors", "expected_errors")):
        dataset.set_values(name, {q.image_id: getattr(q, attr) for q in items}, key_field="labelgen_image_id")
    dataset.save_view(QUEUE_VIEW, dataset.sort_by("review_priority", reverse=True), overwrite=True)
    return {"dataset": dataset_name, "images": len(items), "view": QUEUE_VIEW, "labels": report.labels}


__all__ = ["QUEUE_VIEW", "QueueItem", "build_queue", "descriptor", "image_terms", "label_probabilities",
           "queue_source", "write_queue_fiftyone"]
