"""Review queue: errors found in the first K images vs random order (known errors), diversity, the terms,
FiftyOne field and saved view (real MongoDB), the CLI."""
import numpy as np
import pytest

from conftest import COCO128
from labelgen.cli import main
from labelgen.exports.importers import ImportedDataset, import_yolo, write_imported_run
from labelgen.exports.source import open_export_source
from labelgen.postprocess.filter_config import FilterConfig
from labelgen.review.queue import QUEUE_VIEW, build_queue, queue_source, write_queue_fiftyone
from labelgen.structures.instances import ImageRecord, Instances
from labelgen.structures.rows import Row
from labelgen.testing.perturbed import perturb_instances, write_perturbed_run

CLASSES = ("cat", "dog", "bird")
SIZE = 48


def _rects(boxes, classes, conf=None, **scores):
    masks = np.zeros((len(boxes), SIZE, SIZE), bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        masks[k, y0:y1, x0:x1] = True
    conf = np.full(len(boxes), 0.9) if conf is None else np.asarray(conf)
    return Instances.from_masks(masks, class_ids=np.asarray(classes, np.int32),
                                scores={"confidence": conf.astype(np.float32),
                                        **{k: np.asarray(v, np.float32) for k, v in scores.items()}})


def _ground_truth(images=60, seed=0):
    """Random rectangles, 1 to 8 per image, as an ImportedDataset."""
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(images):
        n = int(rng.integers(1, 9))
        boxes = []
        for _ in range(n):
            x, y = rng.integers(0, SIZE - 12, 2)
            boxes.append((int(x), int(y), int(x) + 10, int(y) + 10))
        truth[f"img{i:03d}"] = _rects(boxes, rng.integers(0, 3, n))
    records = tuple(ImageRecord(i, f"/nowhere/{i}.png", SIZE, SIZE) for i in sorted(truth))
    return ImportedDataset(CLASSES, {"kind": "hand-built", "import": {"format": "test"}}, records,
                           lambda r: Row(r, truth[r.image_id]))


def _found(queue, errors, k):
    return sum(errors[q.image_id] for q in queue[:k])


def test_queue_finds_more_errors_first_than_random_order(tmp_path):
    run, errors = write_perturbed_run(_ground_truth(), tmp_path / "run", seed=1)
    assert sum(errors.values()) > 0
    queue = queue_source(open_export_source(run))
    assert [q.rank for q in queue] == list(range(1, 61))
    priorities = [q.review_priority for q in queue]
    assert priorities == sorted(priorities, reverse=True)
    k = 10
    random_expected = k * np.mean(list(errors.values()))
    assert _found(queue, errors, k) >= 1.5 * random_expected
    # and a random order really is worse: the mean over 200 shuffles is close to the expectation
    rng = np.random.default_rng(0)
    ids = list(errors)
    shuffled = np.mean([sum(errors[i] for i in rng.permutation(ids)[:k]) for _ in range(200)])
    assert abs(shuffled - random_expected) < 0.25 * random_expected
    assert _found(queue, errors, k) > shuffled


@pytest.mark.skipif(not (COCO128 / "labels" / "train2017").is_dir(), reason=f"coco128-seg not found at {COCO128}")
def test_coco128_queue_finds_twice_the_errors_of_random_in_the_first_20(tmp_path):
    for seed in range(3):
        run, errors = write_perturbed_run(import_yolo(COCO128, split="train2017"), tmp_path / f"r{seed}", seed=seed)
        queue = queue_source(open_export_source(run))
        assert _found(queue, errors, 20) >= 2 * 20 * np.mean(list(errors.values()))


def _rows(spec):
    return [Row(ImageRecord(name, f"/x/{name}", SIZE, SIZE), inst) for name, inst in spec]


def test_diversity_spreads_near_duplicates():
    dup = _rects([(0, 0, 10, 10), (20, 20, 30, 30), (5, 30, 15, 40)], [0, 0, 0], [0.5, 0.5, 0.5])
    spec = [(f"dup{i}", dup) for i in range(6)]
    spec += [(f"other{i}", _rects([(0, 0, 10, 10), (20, 20, 30, 30)], [1 + i % 2, 2 - i % 2], [0.4, 0.45]))
             for i in range(6)]
    plain = build_queue(_rows(spec), 3, diversity=0.0)
    assert [q.image_id for q in plain[:6]] == [f"dup{i}" for i in range(6)]  # 1.5 expected errors > 1.15
    diverse = build_queue(_rows(spec), 3, diversity=0.5)
    first = [q.image_id for q in diverse[:6]]
    assert first[0] == "dup0" and sum(i.startswith("dup") for i in first) <= 3
    assert [q.review_priority for q in diverse] == sorted((q.review_priority for q in diverse), reverse=True)
    # a head smaller than the run: the rest follows by expected errors, still in priority order
    small = build_queue(_rows(spec), 3, diversity=0.5, head=4)
    assert len(small) == 12 and [q.review_priority for q in small] == sorted((q.review_priority for q in small),
                                                                            reverse=True)


def test_terms_confidence_margin_calibration_and_missed(tmp_path):
    box = [(0, 0, 10, 10)]
    rows = _rows([("sure", _rects(box, [0], [0.95], clip_label_margin=[0.9])),
                  ("tied", _rects(box, [0], [0.95], clip_label_margin=[0.0])),
                  ("unsure", _rects(box, [0], [0.4], clip_label_margin=[0.9]))])
    by_id = {q.image_id: q for q in build_queue(rows, 3, diversity=0.0)}
    assert by_id["sure"].wrong_labels == pytest.approx(0.05, abs=1e-6)
    assert by_id["tied"].class_confusion == pytest.approx(0.95 / 2, abs=1e-6)
    assert by_id["unsure"].wrong_labels == pytest.approx(0.6)
    assert [q.image_id for q in build_queue(rows, 3, diversity=0.0)] == ["unsure", "tied", "sure"]
    # a calibration replaces the raw confidence as p
    calibrated = build_queue(rows, 3, diversity=0.0, p_correct=lambda inst: np.full(len(inst), 0.2))
    assert all(q.wrong_labels == pytest.approx(0.8) for q in calibrated)
    # a filtered source: labels rejected for low confidence count as possibly missed objects
    records = tuple(ImageRecord(i, f"/x/{i}", SIZE, SIZE) for i in ("a", "b"))
    labels = {"a": _rects([(0, 0, 10, 10), (20, 20, 30, 30)], [0, 1], [0.9, 0.3]), "b": _rects(box, [0], [0.9])}
    run = write_imported_run(ImportedDataset(CLASSES, {"kind": "t", "import": {"format": "test"}}, records,
                                             lambda r: Row(r, labels[r.image_id])), tmp_path / "run")
    queue = queue_source(open_export_source(run, filter_config=FilterConfig(min_confidence=0.5)), diversity=0.0)
    assert {q.image_id: q.missed for q in queue} == pytest.approx({"a": 0.3, "b": 0.0})
    assert queue[0].image_id == "a"


def test_perturbation_counts_its_errors():
    gt = _rects([(0, 0, 10, 10), (20, 20, 30, 30)], [0, 1])
    rng = np.random.default_rng(0)
    total = [perturb_instances(gt, 3, rng) for _ in range(200)]
    # each image: 2 objects with 35% error chance each, plus Poisson(0.5) false positives
    assert np.mean([e for _, e in total]) == pytest.approx(2 * 0.35 + 0.5, abs=0.2)


def test_fiftyone_priority_field_and_saved_view(tmp_path, fiftyone_db, dataset_name):
    run, _ = write_perturbed_run(_ground_truth(images=12), tmp_path / "run", seed=2)
    source = open_export_source(run)
    queue = queue_source(source)
    done = write_queue_fiftyone(source, dataset_name, queue)
    assert done["images"] == 12 and done["view"] == QUEUE_VIEW
    dataset = fiftyone_db.load_dataset(dataset_name)
    view = dataset.load_saved_view(QUEUE_VIEW)
    assert view.values("labelgen_image_id") == [q.image_id for q in queue]
    assert view.values("review_rank") == list(range(1, 13))
    assert view.values("review_priority") == pytest.approx([q.review_priority for q in queue])


def test_cli_review_queue(tmp_path, fiftyone_db, dataset_name, capsys):
    run, _ = write_perturbed_run(_ground_truth(images=8), tmp_path / "run", seed=3)
    assert main(["review", str(run), "--queue", "--no-app", "--dataset", dataset_name]) == 0
    out = capsys.readouterr().out
    assert "review_priority" in out and QUEUE_VIEW in out
    dataset = fiftyone_db.load_dataset(dataset_name)
    assert len(dataset.exists("review_priority")) == 8
    assert main(["review", str(run), "--queue", "--no-app", "--dataset", dataset_name, "--calibration", "nope"]) == 2


def test_a_calibration_moves_the_queue_to_where_the_errors_are(tmp_path, capsys):
    """Raw confidence is uniform and says nothing; the truth is per class ('dog' labels are wrong 90% of
    the time, 'cat' and 'bird' labels 10%). Calibrated per class on a 40-image review sample, the queue puts the
    images with the most dog labels first; with the raw confidence it cannot."""
    from labelgen.exports.importers import box_to_rle
    from labelgen.review.calibration import calibrate_run
    from labelgen.review.verdicts import ImageVerdicts, LabelVerdict, verdicts_path, write_verdicts

    rng = np.random.default_rng(4)
    records, items, errors, truth = [], {}, {}, {}
    for i in range(80):
        record = ImageRecord(f"img{i:03d}", f"/nowhere/img{i:03d}.png", 32, 32)
        k = int(rng.integers(1, 7))
        classes = rng.integers(0, 3, k).astype(np.int32)
        boxes = np.array([[j, j, j + 10, j + 10] for j in range(k)], np.float32)
        items[record.image_id] = Row(record, Instances(32, 32, tuple(box_to_rle(b, 32, 32) for b in boxes), boxes,
                                                       {"confidence": rng.uniform(0.3, 0.9, k).astype(np.float32)},
                                                       classes))
        wrong = rng.uniform(size=k) < np.where(classes == 1, 0.9, 0.1)
        truth[record.image_id] = wrong
        errors[record.image_id] = int(wrong.sum())
        records.append(record)
    run = write_imported_run(ImportedDataset(CLASSES, {"kind": "t", "import": {"format": "test"}}, tuple(records),
                                             lambda r: items[r.image_id]), tmp_path / "run")
    verdicts = [ImageVerdicts(r.image_id, tuple(
        LabelVerdict(j, int(c), "false_positive" if w else "correct")
        for j, (c, w) in enumerate(zip(items[r.image_id].instances.class_ids, truth[r.image_id]))), missed=0)
        for r in records[:40]]
    path = verdicts_path(run, "s")
    path.parent.mkdir(parents=True)
    (path.parent / "summary.json").write_text("{}")
    write_verdicts(path, verdicts)
    calibrate_run(run, "s", method="isotonic", min_class_labels=10, replicates=20)
    raw = queue_source(open_export_source(run), diversity=0.0)
    calibrated = queue_source(open_export_source(run), calibration="s", diversity=0.0)
    best = sum(sorted(errors.values(), reverse=True)[:10])
    assert _found(calibrated, errors, 10) >= 0.75 * best
    assert _found(calibrated, errors, 10) > _found(raw, errors, 10)
