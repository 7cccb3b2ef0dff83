"""COCO export on real data (coco128-seg ground truth imported as a run) and on synthetic edge cases."""
import contextlib
import io
import json
from dataclasses import asdict

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from labelgen.errors import ExportError
from labelgen.cli import main as cli_main
from labelgen.exports.coco import WORST_KEPT, export_coco, mask_to_polygons, polygons_iou
from labelgen.exports.source import open_export_source
from labelgen.exports.importers import ImportedDataset, import_yolo, write_imported_run
from labelgen.structures.instances import ImageRecord, Instances
from labelgen.structures.masks import mask_to_rle
from labelgen.structures.rows import Row
from labelgen.engine.runner import run
from labelgen.engine.sources import FolderSource

from conftest import COCO128, make_recipe

IMAGES = COCO128 / "images" / "train2017"


@pytest.fixture(scope="module")
def coco128(tmp_path_factory):
    if not IMAGES.is_dir():
        pytest.skip(f"coco128-seg not found at {COCO128} (set LABELGEN_COCO128)")
    folder = tmp_path_factory.mktemp("coco-export")
    dataset = import_yolo(COCO128, split="train2017")
    run_dir = write_imported_run(dataset, folder / "run", shard_size=64)
    report = export_coco(open_export_source(run_dir), folder / "rle")
    return dataset, run_dir, folder / "rle", report


def _quiet(call, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return call(*args)


def _source_masks(dataset):
    """(image index + 1, class id + 1, mask) of every instance, in export order."""
    for index, item in enumerate(dataset):
        for class_id, mask in zip(item.instances.class_ids, item.instances.masks()):
            yield index + 1, int(class_id) + 1, mask


def _filled(mask):
    filled = np.zeros(mask.shape, np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(filled, contours, -1, 1, thickness=-1)
    return filled.astype(bool)


def _imported_run(tmp_path, masks, name="run"):
    """A one-image run holding ``masks`` ((N, H, W) bool) with class 0 and confidence 0.5."""
    record = ImageRecord("m.png", str(tmp_path / "m.png"), masks.shape[2], masks.shape[1])
    instances = Instances.from_masks(masks, scores={"confidence": np.full(len(masks), 0.5)},
                                     class_ids=np.zeros(len(masks), np.int32))
    dataset = ImportedDataset(("shape",), {"kind": "folder", "root": str(tmp_path), "import": {"format": "test"}},
                              (record,), lambda r: Row(r, instances))
    return write_imported_run(dataset, tmp_path / name)


# -- RLE mode on coco128 -------------------------------------------------------------------------
def test_rle_export_masks_equal_the_source_masks(coco128):
    dataset, _, out, report = coco128
    assert (report.images, report.annotations, report.skipped_failed_images) == (128, 929, 0)
    coco = _quiet(COCO, str(out / "annotations.json"))
    anns = coco.loadAnns(sorted(coco.getAnnIds()))
    assert [a["id"] for a in anns] == list(range(1, 930))
    for ann, (image_id, category_id, mask) in zip(anns, _source_masks(dataset), strict=True):
        assert (ann["image_id"], ann["category_id"], ann["iscrowd"]) == (image_id, category_id, 0)
        assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
        assert ann["area"] == int(mask.sum()) and ann["score"] == 1.0
        assert ann["attributes"] == {"scores": {"confidence": 1.0}, "instance": {}}
        assert isinstance(ann["segmentation"]["counts"], str)


def test_ground_truth_against_itself_scores_ap_one(coco128):
    _, _, out, _ = coco128
    gt = _quiet(COCO, str(out / "annotations.json"))
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
                   "score": 1.0} for a in gt.dataset["annotations"]]
    dt = _quiet(gt.loadRes, detections)
    for iou_type in ("segm", "bbox"):
        evaluator = COCOeval(gt, dt, iou_type)
        _quiet(evaluator.evaluate)
        _quiet(evaluator.accumulate)
        _quiet(evaluator.summarize)
        assert evaluator.stats[0] == pytest.approx(1.0) and evaluator.stats[1] == pytest.approx(1.0)


def test_images_categories_and_ids_are_stable(coco128, tmp_path):
    dataset, run_dir, out, _ = coco128
    again = export_coco(open_export_source(run_dir), tmp_path / "again")
    assert (tmp_path / "again" / "annotations.json").read_bytes() == (out / "annotations.json").read_bytes()
    saved = json.loads((out / "export_report.json").read_text())
    assert saved == {**asdict(again), "annotations_json": str(out / "annotations.json")}
    data = json.loads((out / "annotations.json").read_text())
    assert list(data) == ["info", "licenses", "categories", "images", "annotations"]
    assert "created" not in json.dumps(data["info"]) and data["info"]["run_id"]
    names = [n for n in (COCO128 / "classes.txt").read_text().split("\n") if n]
    assert data["categories"] == [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(names)]
    assert [i["id"] for i in data["images"]] == list(range(1, 129))
    assert [i["file_name"] for i in data["images"]] == [r.image_id for r in dataset.records]
    assert all((IMAGES / i["file_name"]).is_file() for i in data["images"])
    assert [(i["width"], i["height"]) for i in data["images"]] == [(r.width, r.height) for r in dataset.records]
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_images_root_changes_file_names_and_must_contain_the_images(coco128, tmp_path):
    _, run_dir, _, _ = coco128
    export_coco(open_export_source(run_dir), tmp_path / "up", images_root=str(COCO128 / "images"))
    first = json.loads((tmp_path / "up" / "annotations.json").read_text())["images"][0]
    assert first["file_name"].startswith("train2017/")
    with pytest.raises(ExportError, match="not inside the images root"):
        export_coco(open_export_source(run_dir), tmp_path / "bad", images_root=str(COCO128 / "labels"))
    assert not (tmp_path / "bad" / "annotations.json").exists() and not list((tmp_path / "bad").iterdir())


def test_out_dir_that_is_a_file_is_refused(coco128, tmp_path):
    _, run_dir, _, _ = coco128
    (tmp_path / "file").write_text("keep")
    with pytest.raises(ExportError, match="is a file"):
        export_coco(open_export_source(run_dir), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep"


# -- polygon mode ---------------------------------------------------------------------------------
def test_polygon_export_on_coco128_reproduces_hole_filled_masks(coco128, tmp_path):
    dataset, run_dir, _, _ = coco128
    report = export_coco(open_export_source(run_dir), tmp_path / "poly", mask_format="polygon")
    assert report.annotations == 929 and report.polygons_below_tolerance == 0
    assert report.polygon_iou_min >= 0.9 and report.polygon_iou_mean > 0.999
    assert len(report.polygon_worst) == WORST_KEPT and report.polygon_worst[0]["iou"] == round(report.polygon_iou_min, 6)
    assert [w["iou"] for w in report.polygon_worst] == sorted(w["iou"] for w in report.polygon_worst)
    coco = _quiet(COCO, str(tmp_path / "poly" / "annotations.json"))
    anns = coco.loadAnns(sorted(coco.getAnnIds()))
    for ann, (_, _, mask) in zip(anns, _source_masks(dataset), strict=True):
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
        assert np.array_equal(coco.annToMask(ann).astype(bool), _filled(mask))  # exact up to the holes
        assert ann["area"] == int(mask.sum())  # the mask's area, not the polygon's
    saved = json.loads((tmp_path / "poly" / "export_report.json").read_text())
    assert saved["polygon_iou_min"] == report.polygon_iou_min


@pytest.mark.parametrize("name, draw, parts", [
    ("square", lambda m: m.__setitem__((slice(3, 9), slice(4, 15)), True), 1),
    ("single pixel", lambda m: m.__setitem__((5, 5), True), 1),
    ("two parts", lambda m: (m.__setitem__((slice(0, 3), slice(0, 3)), True),
                             m.__setitem__((slice(10, 12), slice(10, 19)), True)), 2),
    ("diagonal", lambda m: m.__setitem__((np.arange(12), np.arange(12)), True), 1),
    ("full frame", lambda m: m.__setitem__((slice(None), slice(None)), True), 1),
])
def test_mask_to_polygons_is_exact_without_holes(name, draw, parts):
    mask = np.zeros((12, 20), bool)
    draw(mask)
    polygons = mask_to_polygons(mask)
    assert len(polygons) == parts
    assert polygons_iou(polygons, mask_to_rle(mask), 12, 20) == 1.0


def test_polygon_mode_fills_holes(tmp_path):
    ring = np.zeros((1, 20, 20), bool)
    ring[0, 5:15, 5:15] = True
    ring[0, 8:12, 8:12] = False
    run_dir = _imported_run(tmp_path, ring)
    report = export_coco(open_export_source(run_dir), tmp_path / "poly", mask_format="polygon",
                         polygon_tolerance=0.5)
    assert report.polygon_iou_min == pytest.approx(84 / 100)
    ann = json.loads((tmp_path / "poly" / "annotations.json").read_text())["annotations"][0]
    assert ann["area"] == 84 and ann["score"] == 0.5 and len(ann["segmentation"]) == 1
    rle_report = export_coco(open_export_source(run_dir), tmp_path / "rle")  # RLE keeps the hole
    coco = _quiet(COCO, str(tmp_path / "rle" / "annotations.json"))
    assert rle_report.polygon_iou_min is None
    assert np.array_equal(coco.annToMask(coco.loadAnns([1])[0]).astype(bool), ring[0])


@pytest.mark.parametrize("tolerance", [0.999, 0.9])
def test_polygon_below_tolerance_raises_and_writes_nothing(tmp_path, tolerance):
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 2:6, 2:6] = True  # exact
    masks[1, ::2, ::2] = masks[1, 1::2, 1::2] = True  # checkerboard: 8-connected, full of holes
    run_dir = _imported_run(tmp_path, masks)
    out = tmp_path / "out"
    out.mkdir()
    (out / "annotations.json").write_text("previous")
    with pytest.raises(ExportError, match=r"1 object\(s\).*annotation 2 in m\.png \(IoU 0\.5") as caught:
        export_coco(open_export_source(run_dir), out, mask_format="polygon", polygon_tolerance=tolerance)
    assert caught.value.report.polygons_below_tolerance == 1
    assert sorted(p.name for p in out.iterdir()) == ["annotations.json"]
    assert (out / "annotations.json").read_text() == "previous"


def test_class_agnostic_run_with_failed_images(tmp_path, image_dir):
    recipe = make_recipe("generator.fail_image_ids=[img_00003.png]")
    run(recipe, FolderSource(image_dir), tmp_path / "run")
    source = open_export_source(tmp_path / "run")
    report = export_coco(source, tmp_path / "coco")
    assert report.skipped_failed_images == 1 and report.images == 9
    data = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert data["categories"] == [{"id": 1, "name": "object", "supercategory": ""}]
    assert {a["category_id"] for a in data["annotations"]} == {1}
    assert "img_00003.png" not in [i["file_name"] for i in data["images"]]
    assert set(data["annotations"][0]["attributes"]["instance"]) == {"band"}
    assert export_coco(source, tmp_path / "all", include_failed_images=True).images == 10


def test_cli_import_then_export(coco128, tmp_path, capsys):
    assert cli_main(["import", str(COCO128), "--format", "yolo", "--split", "train2017",
                     "--out", str(tmp_path / "run")]) == 0
    assert cli_main(["export", str(tmp_path / "run"), "--format", "coco", "--out", str(tmp_path / "coco")]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["annotations"] == 929
    ours, earlier = (json.loads((folder / "annotations.json").read_text()) for folder in (tmp_path / "coco", coco128[2]))
    assert ours["annotations"] == earlier["annotations"] and ours["info"]["run_id"] != earlier["info"]["run_id"]
