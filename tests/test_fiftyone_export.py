"""FiftyOne export on the real embedded MongoDB: samples, labels, scores, masks (in the database and
as PNG files), suppressed duplicates, saved views, re-export, real COCO images."""
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import make_recipe
from labelgen.atomic import read_jsonl_gz
from labelgen.errors import ExportError
from labelgen.exports.fiftyone import FAILED_TAG, FIELD, SUPPRESSED_FIELD, box_pixels, export_fiftyone
from labelgen.exports.source import open_export_source
from labelgen.postprocess.filter_config import FilterConfig
from labelgen.postprocess.filter_store import save_filtered
from labelgen.structures.instances import Instances
from labelgen.structures.masks import rles_to_masks
from labelgen.engine.runner import run
from labelgen.engine.sources import FolderSource
from labelgen.store.run_store import RunStore
from labelgen.testing import write_synthetic_run

CLASSES = ["cat", "dog", "bird"]



def fake_run(tmp_path, image_dir, **generator):
    generator.setdefault("class_names", CLASSES)
    run(make_recipe(**generator), FolderSource(image_dir), tmp_path / "run")
    return tmp_path / "run"


def samples_by_id(dataset):
    return {s["labelgen_image_id"]: s for s in dataset}


def assert_detection_matches(detection, instances, i, class_names):
    """One Detection against instance ``i``: class, box, every score and attribute, the mask."""
    width, height = instances.width, instances.height
    x1, y1, x2, y2 = instances.boxes_xyxy[i].tolist()
    assert detection.bounding_box == pytest.approx([x1 / width, y1 / height, (x2 - x1) / width, (y2 - y1) / height])
    if instances.class_ids is not None:
        assert detection.label == class_names[instances.class_ids[i]]
        assert detection["labelgen_class_id"] == instances.class_ids[i]
    for name, column in instances.scores.items():
        value = detection.confidence if name == "confidence" else detection[name]
        assert np.float32(value) == column[i], name  # float32 values survive exactly
    for name, column in instances.attributes.items():
        assert detection[name] == column[i], name
    c0, r0, c1, r1 = box_pixels(instances.boxes_xyxy[i], width, height)
    expected = rles_to_masks([instances.masks_rle[i]], height, width)[0][r0:r1, c0:c1]
    assert np.array_equal(np.asarray(detection.get_mask()) > 0, expected)


def test_real_database_starts_and_answers(fiftyone_db):
    fo = fiftyone_db
    from fiftyone.core.odm import database

    assert database.get_db_conn().command("ping")["ok"] == 1.0
    name = f"labelgen-test-{uuid.uuid4().hex[:10]}"
    dataset = fo.Dataset(name)
    try:
        dataset.add_sample(fo.Sample(filepath="/nowhere/a.png", x=1))
        assert fo.load_dataset(name).first()["x"] == 1
    finally:
        fo.delete_dataset(name)
    if not os.environ.get("FIFTYONE_DATABASE_URI"):  # the embedded mongod, not a user's server
        commands = [Path(p, "cmdline").read_bytes() for p in Path("/proc").glob("[0-9]*") if _readable(p)]
        assert any(b"mongod" in c and os.environ["FIFTYONE_DATABASE_DIR"].encode() in c for c in commands)


def _readable(proc):
    try:
        (proc / "cmdline").read_bytes()
    except OSError:
        return False
    return True


def test_fake_run_round_trip_every_label_score_and_mask(tmp_path, image_dir, dataset_name, fiftyone_db):
    root = fake_run(tmp_path, image_dir, fail_image_ids=["img_00004.png"])
    report = export_fiftyone(open_export_source(root), dataset_name)
    dataset = fiftyone_db.load_dataset(dataset_name)
    rows = list(RunStore(root).iter_rows())
    assert len(dataset) == len(rows) == report.images == report.samples_added == 10
    assert report.failed_images == 1 and report.masks_on_disk == 0  # 32x24 images: every mask fits the database
    assert dataset.info["labelgen_run_id"] == RunStore(root).manifest()["run_id"]
    assert dataset.info["labelgen_class_names"] == CLASSES and dataset.info["labelgen_version"]
    samples = samples_by_id(dataset)
    labels = 0
    for row in rows:
        sample = samples[row["image"]["image_id"]]
        assert sample.filepath == row["image"]["uri"] and sample["labelgen_shard"] in (0, 1, 2)
        if row["status"] != "ok":
            assert FAILED_TAG in sample.tags and sample["labelgen_failure"] == "generator_error"
            assert sample[FIELD].detections == []
            continue
        assert (sample.metadata.width, sample.metadata.height) == (row["image"]["width"], row["image"]["height"])
        instances = Instances.from_dict(row["instances"])
        detections = sample[FIELD].detections
        assert len(detections) == len(instances) > 0
        for i, detection in enumerate(detections):
            assert detection["labelgen_index"] == detection["labelgen_position"] == i
            assert detection.mask is not None and detection.mask_path is None
            assert_detection_matches(detection, instances, i, CLASSES)
        assert sample[SUPPRESSED_FIELD].detections == []
        labels += len(detections)
    assert labels == report.labels


def test_large_masks_are_png_files_with_the_same_pixels(tmp_path, image_dir, dataset_name, fiftyone_db):
    root = fake_run(tmp_path, image_dir)
    source = {item.image.image_id: item.instances for item in open_export_source(root)}
    areas = sorted(int(np.prod(np.diff(np.reshape(box_pixels(box, 32, 24), (2, 2)), axis=0)))
                   for instances in source.values() for box in instances.boxes_xyxy)
    threshold = areas[-1] - 1  # the largest boxes go to files, the rest stays in the database
    report = export_fiftyone(open_export_source(root), dataset_name, large_mask_pixels=threshold)
    dataset = fiftyone_db.load_dataset(dataset_name)
    assert report.masks_on_disk == sum(a > threshold for a in areas) > 0
    assert report.masks_in_database == sum(a <= threshold for a in areas) > 0
    mask_root = (root / "fiftyone" / "masks" / dataset.slug).resolve()
    assert report.mask_dir == str(mask_root)
    on_disk = 0
    for sample in dataset:
        for i, detection in enumerate(sample[FIELD].detections):
            if detection.mask_path is not None:
                on_disk += 1
                assert Path(detection.mask_path).is_file() and mask_root in Path(detection.mask_path).parents
                assert detection.mask is None
            assert_detection_matches(detection, source[sample["labelgen_image_id"]], i, CLASSES)
    assert on_disk == report.masks_on_disk


def test_saved_views_lowest_confidence_classes_and_failures(tmp_path, image_dir, dataset_name, fiftyone_db):
    root = fake_run(tmp_path, image_dir, fail_image_ids=["img_00001.png"])
    report = export_fiftyone(open_export_source(root), dataset_name)
    dataset = fiftyone_db.load_dataset(dataset_name)
    assert set(dataset.list_saved_views()) == set(report.saved_views) == {
        "lowest_confidence", "suppressed_duplicates", "failed", "class_cat", "class_dog", "class_bird"}
    confidences = dataset.values(f"{FIELD}.detections.confidence", unwind=True)
    lowest = dataset.load_saved_view("lowest_confidence")
    first = lowest.first()[FIELD].detections
    assert first[0].confidence == min(confidences)
    assert [d.confidence for d in first] == sorted(d.confidence for d in first)
    assert len(lowest) == 9  # the failed image has no labels
    for name in CLASSES:
        view = dataset.load_saved_view(f"class_{name}")
        assert set(view.distinct(f"{FIELD}.detections.label")) == {name}
        assert view.count(f"{FIELD}.detections") == dataset.count_values(f"{FIELD}.detections.label")[name]
    assert len(dataset.load_saved_view("suppressed_duplicates")) == 0  # the raw run suppresses nothing
    assert dataset.load_saved_view("failed").distinct("labelgen_image_id") == ["img_00001.png"]


def test_reexport_updates_in_place_and_keeps_review_tags(tmp_path, image_dir, dataset_name, fiftyone_db):
    root = fake_run(tmp_path, image_dir)
    export_fiftyone(open_export_source(root), dataset_name)
    dataset = fiftyone_db.load_dataset(dataset_name)
    sample = dataset.match(fiftyone_db.ViewField("labelgen_image_id") == "img_00003.png").first()
    sample.tags.append("approved")
    sample[FIELD].detections[1].tags.append("rejected")
    sample.save()
    ids_before = set(dataset.values("id"))
    report = export_fiftyone(open_export_source(root), dataset_name)
    assert (report.samples_added, report.samples_updated, report.samples_removed) == (0, 10, 0)
    dataset.reload()
    assert len(dataset) == 10 and set(dataset.values("id")) == ids_before
    sample = dataset.match(fiftyone_db.ViewField("labelgen_image_id") == "img_00003.png").first()
    assert sample.tags == ["approved"]
    assert [d.tags for d in sample[FIELD].detections] == [[], ["rejected"], []]
    assert dataset.count_label_tags() == {"rejected": 1} and dataset.count_sample_tags() == {"approved": 1}


def test_another_run_into_the_same_dataset_is_refused(tmp_path, image_dir, dataset_name):
    export_fiftyone(open_export_source(fake_run(tmp_path / "a", image_dir)), dataset_name)
    with pytest.raises(ExportError, match="holds run"):
        export_fiftyone(open_export_source(fake_run(tmp_path / "b", image_dir)), dataset_name)


def test_filtered_copy_exports_suppressed_duplicates_for_review(tmp_path, dataset_name, fiftyone_db):
    root = tmp_path / "run"
    names = ("cat", "dog")
    write_synthetic_run(root, images=6, per_image=9, width=48, height=40, shard_size=4, class_names=names)
    store = RunStore(root)
    save_filtered(store, FilterConfig(nms_ios=0.8, nms_iou=0.5), "dedup", list(names))
    report = export_fiftyone(open_export_source(root, filtered="dedup"), dataset_name, large_mask_pixels=200)
    dataset = fiftyone_db.load_dataset(dataset_name)
    samples = samples_by_id(dataset)
    filtered = {row["image"]["image_id"]: row for row in _rows(root / "filtered" / "dedup")}
    suppressed_total = 0
    for row in store.iter_rows():
        original = Instances.from_dict(row["instances"])
        copy = filtered[row["image"]["image_id"]]
        sample = samples[row["image"]["image_id"]]
        duplicates = [r for r in copy["rejected"] if r["reason"] in ("duplicate_iou", "duplicate_ios")]
        suppressed = sample[SUPPRESSED_FIELD].detections
        assert [d["labelgen_index"] for d in suppressed] == [r["index"] for r in duplicates]
        for detection, rejection in zip(suppressed, duplicates):
            assert detection["labelgen_reason"] == rejection["reason"]
            assert detection["labelgen_suppressed_by"] == rejection["suppressed_by"]
            assert_detection_matches(detection, original, rejection["index"], names)
        kept = [i for i in range(len(original)) if i not in {r["index"] for r in copy["rejected"]}]
        detections = sample[FIELD].detections
        assert [d["labelgen_index"] for d in detections] == kept
        for detection, index in zip(detections, kept):
            assert_detection_matches(detection, original, index, names)  # clip/sam scores included
        suppressed_total += len(suppressed)
    assert suppressed_total == report.suppressed_labels > 0
    with_duplicates = dataset.load_saved_view("suppressed_duplicates")
    assert 0 < len(with_duplicates) == sum(1 for s in dataset if s[SUPPRESSED_FIELD].detections)
    assert dataset.info["labelgen_source"]["kind"] == "filtered"


def _rows(folder):
    for path in sorted(Path(folder).glob("*.jsonl.gz")):
        yield from read_jsonl_gz(path)


def test_real_coco_images_every_attribute_intact(tmp_path, coco128_images, dataset_name, fiftyone_db):
    folder = tmp_path / "coco5"
    folder.mkdir()
    for path in sorted(coco128_images.glob("*.jpg"))[:5]:
        (folder / path.name).symlink_to(path)
    run(make_recipe(class_names=CLASSES, instances_per_image=4), FolderSource(folder), tmp_path / "run")
    report = export_fiftyone(open_export_source(tmp_path / "run"), dataset_name)
    dataset = fiftyone_db.load_dataset(dataset_name)
    assert len(dataset) == 5 and report.failed_images == 0 and report.masks_on_disk > 0
    for item in open_export_source(tmp_path / "run"):
        sample = dataset.match(fiftyone_db.ViewField("labelgen_image_id") == item.image.image_id).first()
        assert sample.filepath == str(folder / item.image.image_id)
        assert (sample.metadata.width, sample.metadata.height) == (item.image.width, item.image.height)
        detections = sample[FIELD].detections
        assert len(detections) == len(item.instances) == 4
        for i, detection in enumerate(detections):
            assert_detection_matches(detection, item.instances, i, CLASSES)
