"""The export / import / pull commands, end to end through the CLI on coco128's ground truth."""
import json

import pytest
from pycocotools.coco import COCO

from conftest import COCO128
from labelgen.cli import main


@pytest.fixture(scope="module")
def gt_run(tmp_path_factory):
    if not (COCO128 / "labels").is_dir():
        pytest.skip(f"coco128-seg not found at {COCO128}")
    out = tmp_path_factory.mktemp("gt") / "run"
    assert main(["import", str(COCO128), "--format", "yolo", "--out", str(out), "--split", "train2017"]) == 0
    return out


def test_import_then_status(gt_run, capsys):
    capsys.readouterr()
    assert main(["status", str(gt_run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["images"]["ok"] == 128 and status["instances"] == 929


def test_export_coco_and_yolo_through_the_cli(gt_run, tmp_path, capsys):
    assert main(["export", str(gt_run), "--format", "coco", "--out", str(tmp_path / "coco")]) == 0
    coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    assert len(coco.getImgIds()) == 128 and len(coco.getAnnIds()) == 929
    assert main(["export", str(gt_run), "--format", "yolo", "--out", str(tmp_path / "yolo"), "--multipart",
                 "merge", "--images", "none"]) == 0
    labels = sorted((tmp_path / "yolo" / "labels" / "train").rglob("*.txt"))
    assert len(labels) == 128 and sum(len(p.read_text().splitlines()) for p in labels) == 929
    # filter options apply on the fly at export
    assert main(["export", str(gt_run), "--format", "coco", "--out", str(tmp_path / "big"),
                 "--set", "min_area_fraction=0.05"]) == 0
    big = json.loads((tmp_path / "big" / "annotations.json").read_text())
    assert 0 < len(big["annotations"]) < 929
    assert all(a["area"] >= 0.05 * coco.imgs[a["image_id"]]["width"] * coco.imgs[a["image_id"]]["height"]
               for a in big["annotations"])


def test_export_refuses_a_missing_copy_and_a_missing_out(gt_run, capsys):
    assert main(["export", str(gt_run), "--format", "coco", "--reviewed", "nope", "--out", "x"]) == 2
    assert "no reviewed copy 'nope'" in capsys.readouterr().err
    assert main(["export", str(gt_run), "--format", "yolo"]) == 2
    assert "needs --out" in capsys.readouterr().err


def test_fiftyone_export_and_pull_through_the_cli(gt_run, fiftyone_db, capsys):
    fo = fiftyone_db
    name = "labelgen-cli-test"
    try:
        assert main(["export", str(gt_run), "--format", "fiftyone", "--dataset", name]) == 0
        dataset = fo.load_dataset(name)
        assert len(dataset) == 128 and dataset.count("labelgen.detections") == 929
        sample = dataset.match({"labelgen_image_id": "000000000009.jpg"}).first()
        sample["labelgen"].detections[0].tags.append("rejected")
        sample.save()
        capsys.readouterr()
        assert main(["pull", str(gt_run), "--dataset", name, "--name", "checked"]) == 0
        assert main(["export", str(gt_run), "--format", "coco", "--reviewed", "checked",
                     "--out", str(gt_run.parent / "reviewed-coco")]) == 0
        reviewed = json.loads((gt_run.parent / "reviewed-coco" / "annotations.json").read_text())
        assert len(reviewed["annotations"]) == 928
    finally:
        if name in fo.list_datasets():
            fo.delete_dataset(name)


def test_coco128_yolo_export_reloads_with_fiftyones_own_yolo_importer(gt_run, tmp_path, fiftyone_db):
    fo = fiftyone_db
    out = tmp_path / "yolo"
    assert main(["export", str(gt_run), "--format", "yolo", "--out", str(out), "--multipart", "merge"]) == 0
    dataset = fo.Dataset.from_dir(dataset_dir=str(out), dataset_type=fo.types.YOLOv5Dataset, split="train",
                                  yaml_path="data.yaml", label_type="polylines", label_field="gt")
    try:
        assert len(dataset) == 128
        assert dataset.count("gt.polylines") == 929
        names = (COCO128 / "classes.txt").read_text().split("\n")
        sample = dataset.match(fo.ViewField("filepath").ends_with("000000000009.jpg")).first()
        source = (COCO128 / "labels" / "train2017" / "000000000009.txt").read_text().splitlines()
        assert sorted(p.label for p in sample["gt"].polylines) == sorted(names[int(line.split()[0])] for line in source)
    finally:
        dataset.delete()
