"""YOLO export: exact label lines, multi-part policies, report, confidence side files, re-export,
path safety, and round trips through FiftyOne's own YOLOv5 importer and the coco128-seg ground truth."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from conftest import COCO128, make_recipe
from labelgen.errors import ExportError
from labelgen.exports.source import open_export_source
from labelgen.exports.yolo import export_yolo, mask_parts, merge_parts
from labelgen.structures.instances import ImageRecord, Instances
from labelgen.structures.rows import Row
from labelgen.engine.runner import run
from labelgen.engine.sources import FolderSource
from labelgen.store.run_store import RunStore

H, W = 20, 30  # frame of the hand-made images


def rect(x1, y1, x2, y2):
    mask = np.zeros((H, W), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def make(masks, confidence=None, class_ids=None):
    scores = {} if confidence is None else {"confidence": confidence}
    return Instances.from_masks(np.stack(masks) if masks else np.zeros((0, H, W), bool), scores=scores,
                                class_ids=None if class_ids is None else np.asarray(class_ids))


def write_run(root, images, class_names=("cat", "dog"), folder=None):
    """A run directory with ``{image_id: Instances | None}`` (None = a failed image), shards of 4.
    Image uris are ``folder/image_id`` (files need not exist unless images are copied)."""
    recipe = make_recipe(class_names=list(class_names)) if class_names else make_recipe()
    folder = Path(folder or Path(root).parent / "pics")
    records = [ImageRecord(image_id, str(folder / image_id), W, H) for image_id in sorted(images)]
    store = RunStore(root)
    store.initialize(recipe, {"kind": "folder", "root": str(folder), "options": {}}, records)
    for shard in store.iter_plan():
        rows = []
        for record in shard.images:
            instances = images[record.image_id]
            rows.append(Row.failed(record, "generator_error", "x") if instances is None else Row(record, instances))
        store.commit_shard(shard, rows, {"fingerprint": recipe.fingerprint()}, level=1)
    return open_export_source(root)


def export(tmp_path, image_rows, out="out", class_names=("cat", "dog"), **options):
    source = write_run(tmp_path / f"run-{out}", image_rows, class_names)
    return export_yolo(source, tmp_path / out, **options), tmp_path / out


def lines(path):
    return Path(path).read_text().splitlines()


def fill(line, height=H, width=W):
    """Rasterise one ``cls x1 y1 ...`` label line on the pixel grid (boundary included)."""
    xy = np.asarray(line.split()[1:], dtype=np.float64).reshape(-1, 2) * [width, height]
    canvas = np.zeros((height, width), np.uint8)
    cv2.fillPoly(canvas, [np.round(xy).astype(np.int32)], 1)
    return canvas.astype(bool)


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


A = rect(5, 5, 10, 10)
BIG, SMALL = rect(2, 2, 12, 12), rect(18, 4, 24, 10)  # 100 px and 36 px, 6 px apart

# name: (mask, task, expected line without the class id)
LINES = {
    "segment: rectangle -> its 4 boundary-pixel corners": (
        A, "segment", "0.166667 0.250000 0.166667 0.450000 0.300000 0.450000 0.300000 0.250000"),
    "segment: mask on the far edge stays inside [0, 1]": (
        rect(25, 15, 30, 20), "segment", "0.833333 0.750000 0.833333 0.950000 0.966667 0.950000 0.966667 0.750000"),
    "detect: centre and size from boxes_xyxy (x2 exclusive)": (A, "detect", "0.250000 0.375000 0.166667 0.250000"),
    "detect: whole frame": (rect(0, 0, W, H), "detect", "0.500000 0.500000 1.000000 1.000000"),
}


@pytest.mark.parametrize("case", list(LINES), ids=list(LINES))
def test_label_lines_are_exact(tmp_path, case):
    mask, task, expected = LINES[case]
    report, out = export(tmp_path, {"a.png": make([mask, mask], [0.5, 0.25], [1, 0])}, task=task)
    assert lines(out / "labels/train/a.txt") == [f"1 {expected}", f"0 {expected}"]
    assert lines(out / "confidence/train/a.txt") == ["0.500000", "0.250000"]
    assert (report.instances, report.lines, report.label_files) == (2, 2, 1)


def test_layout_data_yaml_and_empty_label_files(tmp_path):
    images = {"a.png": make([A], [0.9], [1]), "sub/b.png": make([]), "c.png": None}
    report, out = export(tmp_path, images)
    assert lines(out / "labels/train/sub/b.txt") == [] and lines(out / "confidence/train/sub/b.txt") == []
    assert not (out / "labels/train/c.txt").exists() and report.failed_images_skipped == 1
    assert (report.label_files, report.empty_label_files) == (2, 1)
    link = out / "images/train/sub/b.png"
    assert link.is_symlink() and Path(link.readlink()) == tmp_path / "pics" / "sub" / "b.png"
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data == {"path": str(out.resolve()), "train": "images/train", "val": "images/train", "nc": 2,
                    "names": {0: "cat", 1: "dog"}}
    assert json.loads((out / "export_report.json").read_text())["label_files"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["confidence", "data.yaml", "export_report.json", "images",
                                                     "labels"]  # no staging folders left


def test_failed_images_included_on_request(tmp_path):
    report, out = export(tmp_path, {"a.png": make([A], [0.9]), "c.png": None}, include_failed_images=True)
    assert lines(out / "labels/train/c.txt") == [] and report.failed_images_included == 1


def test_class_agnostic_is_class_0_named_object(tmp_path):
    report, out = export(tmp_path, {"a.png": make([A, BIG], [0.9, 0.8])}, class_names=None)
    assert [line.split()[0] for line in lines(out / "labels/train/a.txt")] == ["0", "0"]
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert (data["names"], data["nc"], report.class_names) == ({0: "object"}, 1, ["object"])


TWO_PARTS = BIG | SMALL


@pytest.mark.parametrize("policy, n_lines, counts", [
    ("largest", 1, {"parts_dropped": 1, "parts_merged": 0, "parts_split": 0}),
    ("split", 2, {"parts_dropped": 0, "parts_merged": 0, "parts_split": 2}),
    ("merge", 1, {"parts_dropped": 0, "parts_merged": 2, "parts_split": 0}),
])
def test_multipart_policies(tmp_path, policy, n_lines, counts):
    report, out = export(tmp_path, {"a.png": make([TWO_PARTS, A], [0.7, 0.6], [1, 0])}, multipart=policy)
    got = lines(out / "labels/train/a.txt")
    assert len(got) == n_lines + 1 and got[-1].startswith("0 ")
    assert lines(out / "confidence/train/a.txt") == ["0.700000"] * n_lines + ["0.600000"]
    assert report.multipart_instances == 1 and report.lines == n_lines + 1
    assert {k: getattr(report, k) for k in counts} == counts
    assert report.area_fraction_lost == pytest.approx(36 / 136 if policy == "largest" else 0.0)
    filled = [fill(line) for line in got[:-1]]
    if policy == "largest":
        assert (filled[0] == BIG).all()
    elif policy == "split":
        assert (filled[0] == BIG).all() and (filled[1] == SMALL).all()
    else:
        assert iou(filled[0], TWO_PARTS) > 0.9 and (filled[0] & TWO_PARTS).sum() == TWO_PARTS.sum()


def test_merge_joins_many_parts_along_a_spanning_tree():
    rng = np.random.default_rng(3)
    mask = rng.random((60, 80)) < 0.35  # noise: dozens of 8-connected parts of every shape
    parts, areas, degenerate = mask_parts(mask)
    assert len(parts) > 20 and areas == sorted(areas, reverse=True)
    polygon = merge_parts(parts)
    covered = sum(len(p) for p in parts)
    assert len(polygon) == covered + 2 * (len(parts) - 1)  # each child: back to its entry, then the parent vertex
    kept = np.zeros_like(mask)
    for part in parts:
        outline = np.zeros(mask.shape, np.uint8)
        cv2.fillPoly(outline, [part.astype(np.int32)], 1)
        kept |= outline.astype(bool)
    merged = np.zeros(mask.shape, np.uint8)
    cv2.fillPoly(merged, [polygon.astype(np.int32)], 1)
    assert (merged.astype(bool) & kept).sum() == kept.sum()  # every part covered
    assert iou(merged.astype(bool), kept) > 0.8  # the rest: bridge pixels between close parts


def test_merge_bridges_cross_the_narrowest_gaps():
    squares = [np.array([[x, 0], [x, 3], [x + 3, 3], [x + 3, 0]]) for x in (0, 20, 8)]  # gaps 5 and 9, 17
    polygon = merge_parts(squares)
    owner = {tuple(v): i for i, part in enumerate(squares) for v in part.tolist()}
    hops = [(a, b) for a, b in zip(polygon.tolist(), polygon[1:].tolist()) if owner[tuple(a)] != owner[tuple(b)]]
    assert len(hops) == 4  # two bridges, each crossed there and back
    assert max(np.hypot(*np.subtract(a, b)) for a, b in hops) == 9  # 0 -> 2 -> 1, never the 17 px gap 0 -> 1


def test_merge_reaches_a_part_hidden_under_another():
    inner, outer = np.array([[4, 4], [4, 6], [6, 6], [6, 4]]), np.array([[0, 0], [0, 10], [10, 10], [10, 0]])
    polygon = merge_parts([inner, outer])  # outer is drawn over inner: no Voronoi neighbours
    assert len(polygon) == 4 + 4 + 2 and {tuple(v) for v in polygon.tolist()} >= {tuple(v) for v in outer.tolist()}


def test_degenerate_parts_dropped_and_empty_masks_give_no_line(tmp_path):
    dot, diagonal = rect(1, 1, 2, 2), np.zeros((H, W), bool)  # 1 and 2 contour vertices
    diagonal[[12, 13, 14], [20, 21, 22]] = True
    report, out = export(tmp_path, {"a.png": make([dot, diagonal | A, np.zeros((H, W), bool)], [0.1, 0.2, 0.3])})
    assert len(lines(out / "labels/train/a.txt")) == 1 == len(lines(out / "confidence/train/a.txt"))
    assert lines(out / "confidence/train/a.txt") == ["0.200000"]
    assert (report.instances_without_shape, report.degenerate_parts_dropped) == (2, 2)
    assert report.multipart_instances == 0  # one usable part left


def test_missing_confidence_is_written_as_1(tmp_path):
    report, out = export(tmp_path, {"a.png": make([A])}, task="detect")
    assert lines(out / "confidence/train/a.txt") == ["1.000000"] and report.instances_without_confidence == 1


@pytest.mark.parametrize("image_id", ["../x.png", "../../etc/x.png"])
def test_path_outside_the_images_root_is_refused(tmp_path, image_id):
    with pytest.raises(ExportError, match="not inside the images root"):
        export(tmp_path, {image_id: make([A]), "a.png": make([A])})
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.txt").exists()
    assert not list((tmp_path / "out" / "labels").rglob("*.txt"))  # nothing swapped in


@pytest.mark.parametrize("images, message", [
    ({"a.png": make([A]), "a.jpg": make([A])}, "share the label file"),
    ({"images/a.png": make([A])}, "folder named 'images'"),
])
def test_ambiguous_label_paths_are_refused(tmp_path, images, message):
    with pytest.raises(ExportError, match=message):
        export(tmp_path, images)


@pytest.mark.parametrize("options, message", [
    ({"task": "pose"}, "task must be"), ({"multipart": "all"}, "multipart must be"),
    ({"images": "move"}, "images must be"), ({"split": "../x"}, "split must be"), ({"split": "images"}, "split"),
])
def test_bad_options_are_refused(tmp_path, options, message):
    with pytest.raises(ExportError, match=message):
        export(tmp_path, {"a.png": make([A])}, **options)


def test_reexport_replaces_the_split_and_removes_stale_files(tmp_path):
    export(tmp_path, {"a.png": make([A]), "b.png": make([A]), "sub/c.png": make([A, BIG])}, out="out")
    source = write_run(tmp_path / "run2", {"a.png": make([BIG, A, SMALL]), "sub/d.png": make([])})
    report = export_yolo(source, tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.relative_to(out / "labels/train").as_posix() for p in (out / "labels/train").rglob("*.txt")) == \
        ["a.txt", "sub/d.txt"]
    assert not (out / "images/train/b.png").exists() and not (out / "confidence/train/sub/c.txt").exists()
    assert len(lines(out / "labels/train/a.txt")) == 3 and report.stale_label_files_removed == 2
    assert not [p for p in (out / "labels").iterdir() if p.name.startswith(".")]
    bad = write_run(tmp_path / "run3", {"a.png": make([A]), "../x.png": make([A])})
    with pytest.raises(ExportError):
        export_yolo(bad, out)
    assert len(lines(out / "labels/train/a.txt")) == 3 and (out / "labels/train/sub/d.txt").is_file()  # intact
    assert not [p for p in (out / "labels").iterdir() if p.name.startswith(".")]


def test_other_splits_survive_and_foreign_folders_are_refused(tmp_path):
    source = write_run(tmp_path / "run", {"a.png": make([A])})
    export_yolo(source, tmp_path / "out", split="val")
    report = export_yolo(source, tmp_path / "out", split="train")
    assert (tmp_path / "out/labels/val/a.txt").is_file()
    kinds, splits = ("confidence", "images", "labels"), ("train", "val")
    assert report.owned_folders == sorted(f"{kind}/{split}" for kind in kinds for split in splits)
    foreign = tmp_path / "ds" / "labels" / "train"
    foreign.mkdir(parents=True)
    (foreign / "gt.txt").write_text("0 0.1 0.1 0.2 0.2\n")
    with pytest.raises(ExportError, match="not written by a labelgen YOLO export"):
        export_yolo(source, tmp_path / "ds")
    assert (foreign / "gt.txt").read_text() == "0 0.1 0.1 0.2 0.2\n"


def test_images_none_points_at_the_original_images(tmp_path):
    dataset = tmp_path / "ds"
    source = write_run(tmp_path / "run", {"a.png": make([A])}, folder=dataset / "images" / "train")
    report = export_yolo(source, dataset, images="none")
    assert report.labels_found_by_trainers and (dataset / "labels/train/a.txt").is_file()
    assert yaml.safe_load((dataset / "data.yaml").read_text())["train"] == str(dataset / "images" / "train")
    elsewhere = export_yolo(source, tmp_path / "elsewhere", images="none")
    assert not elsewhere.labels_found_by_trainers and not (tmp_path / "elsewhere" / "images").exists()
    with pytest.raises(ExportError, match="inside"):  # placing images would replace the originals
        export_yolo(source, tmp_path / "x", images="copy", images_root=tmp_path / "x" / "images" / "train")


def test_copy_mode_copies_the_files(tmp_path, image_dir):
    run(make_recipe(instances_per_image=2), FolderSource(image_dir), tmp_path / "run")
    report = export_yolo(open_export_source(tmp_path / "run"), tmp_path / "out", images="copy")
    copied = sorted((tmp_path / "out/images/train").iterdir())
    assert len(copied) == 10 == report.label_files and not any(p.is_symlink() for p in copied)
    assert copied[0].read_bytes() == (image_dir / copied[0].name).read_bytes()


# -- FiftyOne's own importer ----------------------------------------------------------------------
def _fiftyone_load(fo, out, label_type):
    kwargs = {} if label_type == "detections" else {"label_type": label_type}
    return fo.Dataset.from_dir(dataset_dir=str(out), dataset_type=fo.types.YOLOv5Dataset, yaml_path="data.yaml",
                               split="train", **kwargs)


def test_fiftyone_round_trip_segment_and_detect(tmp_path, image_dir, fiftyone_db):
    fo = fiftyone_db
    names = ["a", "b"]
    run(make_recipe(instances_per_image=4, class_names=names), FolderSource(image_dir), tmp_path / "run")
    source = open_export_source(tmp_path / "run")
    export_yolo(source, tmp_path / "seg", multipart="split")
    export_yolo(source, tmp_path / "det", task="detect")
    run_boxes = {item.image.image_id: item.instances for item in source}
    for out, label_type, field in ((tmp_path / "seg", "polylines", "polylines"),
                                   (tmp_path / "det", "detections", "detections")):
        dataset = _fiftyone_load(fo, out, label_type)
        try:
            assert len(dataset) == 10
            for sample in dataset:
                label_file = out / "labels/train" / (Path(sample.filepath).stem + ".txt")
                rows = [row.split() for row in lines(label_file)]
                labels = sample.ground_truth[field] if sample.ground_truth is not None else []
                assert len(labels) == len(rows)
                assert [label.label for label in labels] == [names[int(row[0])] for row in rows]
                if field == "detections":  # FiftyOne's [x, y, w, h] vs the run's boxes_xyxy
                    instances = run_boxes[Path(sample.filepath).name]
                    boxes = instances.boxes_xyxy / np.float32([instances.width, instances.height] * 2)
                    expected = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
                    np.testing.assert_allclose([label.bounding_box for label in labels], expected, atol=1e-4)
                else:
                    for label, row in zip(labels, rows):
                        np.testing.assert_allclose(label.points[0], np.reshape(np.float64(row[1:]), (-1, 2)),
                                                   atol=1e-6)
        finally:
            dataset.delete()
    assert sum(len(lines(p)) for p in (tmp_path / "seg/labels/train").glob("*.txt")) > 20


# -- real data: coco128-seg ground truth through a run directory -----------------------------------
def test_coco128_ground_truth_round_trip(tmp_path):
    """Source polygon -> imported run (the importer fills it into a mask) -> YOLO-seg export.

    ``merge`` is the policy that keeps one line per object here: Ultralytics joined multi-part COCO
    objects with zero-width bridges, which fill as separate parts (and 1-pixel slivers) again."""
    importers = pytest.importorskip("labelgen.exports.importers")
    if not hasattr(importers, "import_yolo") or not hasattr(importers, "write_imported_run"):
        pytest.skip("labelgen.exports.importers has no import_yolo / write_imported_run yet")
    if not (COCO128 / "labels" / "train2017").is_dir():
        pytest.skip(f"coco128-seg not found at {COCO128}")
    run_dir = importers.write_imported_run(importers.import_yolo(COCO128, split="train2017"), tmp_path / "gt")
    source = open_export_source(run_dir)
    report = export_yolo(source, tmp_path / "out", multipart="merge", images_root=COCO128 / "images" / "train2017")
    assert (report.label_files, report.empty_label_files, report.instances_without_shape) == (128, 2, 0)
    assert report.multipart_instances > 0 and report.parts_merged > report.multipart_instances
    ious = []
    for item in source:
        name = Path(item.image.uri).with_suffix(".txt").name
        ours, theirs = lines(tmp_path / "out/labels/train" / name), []
        if (COCO128 / "labels/train2017" / name).is_file():
            theirs = lines(COCO128 / "labels/train2017" / name)
        assert len(ours) == len(theirs), name
        assert [line.split()[0] for line in ours] == [line.split()[0] for line in theirs], name
        source_masks = item.instances.masks()  # the source polygons as the importer filled them
        ious += [iou(fill(line, item.instances.height, item.instances.width), mask)
                 for line, mask in zip(ours, source_masks)]
    assert len(ious) == 929
    assert np.mean(ious) >= 0.99 and min(ious) >= 0.85  # below 1: holes are filled (outer contours only)
