"""Importers: YOLO (coco128-seg ground truth, tiny det/seg folders), COCO JSON, imported run directories."""
import json

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageDraw

from labelgen.cli import main as cli_main
from labelgen.engine.decode import read_image_rgb
from labelgen.errors import ExportError
from labelgen.exports.coco import export_coco
from labelgen.exports.source import open_export_source
from labelgen.exports.importers import import_coco, import_yolo, write_imported_run
from labelgen.store.status import run_status
from labelgen.store.run_store import RunStore

from conftest import COCO128


@pytest.fixture(scope="module")
def coco128(tmp_path_factory):
    if not (COCO128 / "images" / "train2017").is_dir():
        pytest.skip(f"coco128-seg not found at {COCO128} (set LABELGEN_COCO128)")
    dataset = import_yolo(COCO128, split="train2017")
    run = write_imported_run(dataset, tmp_path_factory.mktemp("imp") / "run", shard_size=50)
    return dataset, run


def _write_image(path, width, height, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 30)).save(path, **save)


def _yolo_tree(root, labels, *, size=(40, 30), split="train"):
    """images/<split>/NAME.png (size) and labels/<split>/NAME.txt for each NAME: text (None = no file)."""
    for name, text in labels.items():
        _write_image(root / "images" / split / f"{name}.png", *size)
        if text is not None:
            label = root / "labels" / split / f"{name}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text(text)
    return root


# -- YOLO on coco128-seg ------------------------------------------------------------------------
def test_coco128_yolo_seg_counts_ids_and_sizes(coco128):
    dataset, _ = coco128
    names = (COCO128 / "classes.txt").read_text().split("\n")
    assert dataset.class_names == tuple(n for n in names if n) and len(dataset.class_names) == 80
    items = list(dataset)
    assert len(items) == 128 and sum(len(i.instances) for i in items) == 929
    assert [i.image.image_id for i in items if len(i.instances) == 0] == ["000000000250.jpg", "000000000508.jpg"]
    ids = [i.image.image_id for i in items]
    assert ids == sorted(ids) and all("/" not in i for i in ids)
    first = items[0]
    assert first.image.uri == str(COCO128 / "images" / "train2017" / first.image.image_id)
    with Image.open(first.image.uri) as image:
        assert (first.image.width, first.image.height) == image.size
    assert np.all(first.instances.scores["confidence"] == 1.0)
    lines = (COCO128 / "labels" / "train2017" / "000000000009.txt").read_text().splitlines()
    nine = next(i for i in items if i.image.image_id == "000000000009.jpg")
    assert nine.instances.class_ids.tolist() == [int(line.split()[0]) for line in lines]


def test_coco128_polygon_rasterised_with_pil(coco128):
    dataset, _ = coco128
    item = next(i for i in dataset if i.image.image_id == "000000000009.jpg")
    values = [float(v) for v in (COCO128 / "labels/train2017/000000000009.txt").read_text().split("\n")[0].split()]
    w, h = item.image.width, item.image.height
    canvas = Image.new("1", (w, h), 0)
    ImageDraw.Draw(canvas).polygon([(x * w, y * h) for x, y in zip(values[1::2], values[2::2])], fill=1, outline=1)
    mask = item.instances.masks()[0]
    assert np.array_equal(mask, np.asarray(canvas, dtype=bool))
    ys, xs = np.nonzero(mask)
    assert item.instances.boxes_xyxy[0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_imported_run_works_with_status_filter_and_export_source(coco128, tmp_path):
    dataset, run = coco128
    status = run_status(run, verify=True)
    assert status["generator"] == "import" and status["instances"] == 929
    assert status["images"] == {"planned": 128, "done": 128, "ok": 128, "failed": 0}
    assert status["shards"]["done"] == status["shards"]["total"] == 3
    manifest = RunStore(run).manifest()
    assert manifest["class_names"] == list(dataset.class_names)
    assert manifest["source"]["import"]["format"] == "yolo" and len(manifest["fingerprint"]) == 64
    assert RunStore(run).stored_config()["generator"] == {"name": "import"}
    source = open_export_source(run)
    assert source.images_root() == str(COCO128 / "images" / "train2017")
    assert [item.image for item in source] == list(dataset.records)
    assert cli_main(["filter", str(run), "--min-area", "500", "--save", "big"]) == 0
    assert sum(len(i.instances) for i in open_export_source(run, filtered="big")) < 929


def test_write_imported_run_refuses_existing_run_and_file(coco128, tmp_path):
    dataset, run = coco128
    with pytest.raises(ExportError, match="already holds a run"):
        write_imported_run(dataset, run)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        write_imported_run(dataset, tmp_path / "file")
    (tmp_path / "full" / "x").mkdir(parents=True)
    with pytest.raises(ExportError, match="is not empty"):
        write_imported_run(dataset, tmp_path / "full")


def test_failed_import_leaves_no_run_directory(tmp_path):
    root = _yolo_tree(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2", "b": "0 0.5 0.5 0.2 0.2", "c": "7 0.5 0.5 0.1 0.1"})
    (tmp_path / "out").mkdir()  # an empty folder is accepted
    with pytest.raises(ExportError, match=r"c\.txt:1: class id"):
        write_imported_run(import_yolo(root, split="train", class_names=["x"]), tmp_path / "out", shard_size=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "out"] and not any((tmp_path / "out").iterdir())
    run = write_imported_run(import_yolo(root, split="train", class_names=[str(i) for i in range(8)]),
                             tmp_path / "out")
    assert run == tmp_path / "out" and run_status(run)["instances"] == 3


# -- COCO JSON -------------------------------------------------------------------------------------
def test_coco_round_trip_export_then_import_gives_same_masks_and_classes(coco128, tmp_path):
    dataset, run = coco128
    export_coco(open_export_source(run), tmp_path / "coco")
    back = import_coco(tmp_path / "coco" / "annotations.json", images_root=COCO128 / "images" / "train2017")
    assert back.class_names == dataset.class_names and back.records == dataset.records
    for original, imported in zip(dataset, back):
        assert imported.instances.masks_rle == original.instances.masks_rle
        assert imported.instances.class_ids.tolist() == original.instances.class_ids.tolist()
        assert np.array_equal(imported.instances.boxes_xyxy, original.instances.boxes_xyxy)
        assert imported.instances.scores.keys() == {"confidence"}
    assert write_imported_run(back, tmp_path / "run2").is_dir()
    assert run_status(tmp_path / "run2")["instances"] == 929


def test_coco_import_polygons_rle_boxes_crowd_and_scores(tmp_path):
    _write_image(tmp_path / "a.png", 20, 10)
    rle_counts = [15, 5, 180]  # uncompressed, column-major: 5 pixels in column 1
    data = {
        "images": [{"id": 7, "file_name": "a.png", "width": 20, "height": 10},
                   {"id": 8, "file_name": "b.png", "width": 20, "height": 10}],
        "categories": [{"id": 9, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 9, "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6], [1, 1]],
             "bbox": [2, 2, 4, 4], "iscrowd": 0, "score": 0.25},
            {"id": 2, "image_id": 7, "category_id": 3, "segmentation": {"size": [10, 20], "counts": rle_counts},
             "iscrowd": 0},
            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [10.2, 1.0, 3.0, 2.0], "iscrowd": 0},
            {"id": 4, "image_id": 8, "category_id": 3, "segmentation": {"size": [10, 20], "counts": [0, 200]},
             "iscrowd": 1},
        ]}
    (tmp_path / "gt.json").write_text(json.dumps(data))
    dataset = import_coco(tmp_path / "gt.json")
    assert dataset.class_names == ("cat", "dog") and dataset.spec["import"]["crowd_annotations_skipped"] == 1
    a, b = list(dataset)
    assert a.image.uri == str(tmp_path / "a.png") and len(b.instances) == 0
    masks = a.instances.masks()
    assert a.instances.class_ids.tolist() == [1, 0, 0]
    assert masks[0].sum() == 16 and masks[0][2:6, 2:6].all()
    assert masks[1].sum() == 5 and masks[1][:, 1].sum() == 5
    assert masks[2].sum() == 6 and masks[2][1:3, 10:13].all()
    assert a.instances.boxes_xyxy[2].tolist() == pytest.approx([10.2, 1.0, 13.2, 3.0])
    assert a.instances.scores["confidence"].tolist() == [0.25, 1.0, 1.0]


@pytest.mark.parametrize("annotation, message", [
    ({"id": 1, "image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1]}, "unknown image_id"),
    ({"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]}, "unknown category_id"),
    ({"id": 1, "image_id": 1, "category_id": 1}, "neither a segmentation nor"),
    ({"id": 1, "image_id": 1, "category_id": 1, "segmentation": {"size": [3, 3], "counts": "0"}}, "bad segmentation"),
])
def test_coco_import_errors(tmp_path, annotation, message):
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 6}],
            "categories": [{"id": 1, "name": "x"}], "annotations": [annotation]}
    (tmp_path / "gt.json").write_text(json.dumps(data))
    with pytest.raises(ExportError, match=message):
        list(import_coco(tmp_path / "gt.json"))


# -- YOLO folders ----------------------------------------------------------------------------------
def test_yolo_detect_folder_with_yaml_list_names_and_missing_label(tmp_path):
    root = _yolo_tree(tmp_path / "ds", {"a": "1 0.5 0.5 0.5 0.4\n\n", "b": None})
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/train\nnames: [cat, dog]\n")
    dataset = import_yolo(root)
    assert dataset.class_names == ("cat", "dog") and [r.image_id for r in dataset.records] == ["a.png", "b.png"]
    a, b = list(dataset)
    assert len(b.instances) == 0 and (b.instances.height, b.instances.width) == (30, 40)
    assert a.instances.class_ids.tolist() == [1]
    assert a.instances.boxes_xyxy[0].tolist() == pytest.approx([10, 9, 30, 21])
    mask = a.instances.masks()[0]
    assert mask.sum() == 20 * 12 and mask[9:21, 10:30].all()
    assert dataset.spec["kind"] == "folder" and dataset.spec["import"]["yaml"] == str(root / "data.yaml")


def test_yolo_dataset_yaml_dict_names_split_and_tasks(tmp_path):
    root = tmp_path / "ds"
    _yolo_tree(root, {"a": "0 0.1 0.1 0.9 0.1 0.9 0.9 0.1 0.9"}, split="train")
    _yolo_tree(root, {"v": "1 0.5 0.5 0.2 0.2"}, split="val")
    (root / "dataset.yaml").write_text("train: images/train\nval: images/val\nnames: {0: cat, 1: dog}\n")
    with pytest.raises(ExportError, match="pass split="):
        import_yolo(root)
    segment = import_yolo(root / "dataset.yaml", split="train", task="segment")
    assert segment.class_names == ("cat", "dog")
    polygon = next(iter(segment)).instances
    assert polygon.masks()[0][3:28, 4:37].all() and polygon.masks()[0].sum() == 33 * 25  # PIL fills the outline
    detect = next(iter(import_yolo(root, split="train", task="detect"))).instances
    assert detect.boxes_xyxy[0].tolist() == pytest.approx([4, 3, 36, 27])
    assert detect.masks()[0].sum() == 32 * 24 and detect.masks()[0][3:27, 4:36].all()
    with pytest.raises(ExportError, match=r"v\.txt:1: a box line in task='segment'"):
        list(import_yolo(root, split="val", task="segment"))


def test_yolo_plain_layout_without_split_keeps_split_folder_in_ids(tmp_path):
    root = _yolo_tree(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2"}, split="train2017")
    (root / "classes.txt").write_text("only\n")
    dataset = import_yolo(root)
    assert [r.image_id for r in dataset.records] == ["train2017/a.png"]
    assert len(next(iter(dataset)).instances) == 1
    with pytest.raises(ExportError, match="does not exist"):
        import_yolo(root, split="val")


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5 0.2", "got 3 values"),
    ("0 0.1 0.1 0.2 0.2 0.3", "got 5 values"),
    ("cat 0.5 0.5 0.2 0.2", "expected numbers"),
    ("2 0.5 0.5 0.2 0.2", r"class id must be an integer in \[0, 2\)"),
    ("0.5 0.5 0.5 0.2 0.2", "class id must be an integer"),
    ("0 1.5 0.5 0.2 0.2", r"normalised to \[0, 1\]"),
    ("0 nan 0.5 0.2 0.2", r"normalised to \[0, 1\]"),
])
def test_yolo_bad_line_names_file_and_line(tmp_path, line, message):
    root = _yolo_tree(tmp_path / "ds", {"a": f"0 0.5 0.5 0.1 0.1\n{line}\n"})
    (root / "classes.txt").write_text("x\ny\n")
    with pytest.raises(ExportError, match=rf"a\.txt:2: .*{message}"):
        list(import_yolo(root, split="train"))


def test_yolo_without_names_or_images_folder_is_an_error(tmp_path):
    root = _yolo_tree(tmp_path / "ds", {"a": ""})
    with pytest.raises(ExportError, match="no class names"):
        import_yolo(root)
    assert import_yolo(root, class_names=["thing"]).class_names == ("thing",)
    with pytest.raises(ExportError, match="not a YOLO dataset"):
        import_yolo(tmp_path / "nothing")


def test_yolo_exif_rotated_image_uses_the_displayed_frame(tmp_path):
    root = tmp_path / "ds"
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    _write_image(root / "images" / "train" / "r.jpg", 40, 20, exif=exif.tobytes())
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "r.txt").write_text("0 0.5 0.25 1.0 0.5\n")  # top half of the displayed image
    dataset = import_yolo(root, class_names=["x"])
    item = next(iter(dataset))
    assert (item.image.width, item.image.height) == (20, 40)
    assert read_image_rgb(item.image.uri)[0].shape[:2] == (40, 20)
    assert item.instances.masks()[0][:20].all() and not item.instances.masks()[0][20:].any()


def test_unreadable_image_becomes_a_failed_row(tmp_path):
    root = _yolo_tree(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2"})
    (root / "images" / "train" / "broken.png").write_bytes(b"not an image at all")
    (root / "images" / "train" / "empty.png").write_bytes(b"")
    dataset = import_yolo(root, split="train", class_names=["x"])
    failures = {i.image.image_id: i.failure["reason"] for i in dataset if i.instances is None}
    assert failures == {"broken.png": "not_an_image", "empty.png": "empty_file"}
    run = write_imported_run(dataset, tmp_path / "run", shard_size=2)
    status = run_status(run)
    assert status["images"]["failed"] == 2 and status["failures_by_reason"] == {"empty_file": 1, "not_an_image": 1}
    assert len((run / "failures.jsonl").read_text().splitlines()) == 2
    out = tmp_path / "coco"
    assert export_coco(open_export_source(run), out).skipped_failed_images == 2
    report = export_coco(open_export_source(run), out, include_failed_images=True)
    assert report.images == 3 and report.included_failed_images == 2
    images = json.loads((out / "annotations.json").read_text())["images"]
    assert [(i["file_name"], i["width"]) for i in images] == [("a.png", 40), ("broken.png", None), ("empty.png", None)]
