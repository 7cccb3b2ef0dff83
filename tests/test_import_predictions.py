"""Predictions of other tools imported as a run: COCO (full dataset file with score, or a results list plus
the dataset file), YOLO txt with a trailing confidence column; round trips through labelgen's exports."""
import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from labelgen.cli import main as cli_main
from labelgen.errors import ExportError
from labelgen.exports.coco import export_coco
from labelgen.exports.importers import import_yolo, write_imported_run
from labelgen.exports.predictions import import_coco_predictions, import_yolo_predictions
from labelgen.exports.source import open_export_source
from labelgen.store.run_store import RunStore
from labelgen.structures.masks import rle_to_pycocotools
from labelgen.testing import write_synthetic_run
from labelgen.testing.images import make_image_folder

NAMES = ("cat", "dog", "bird")


def _cli(*argv):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        code = cli_main([str(a) for a in argv])
    return code, out.getvalue() + err.getvalue()


def _rows(run_dir):
    return {row.image.image_id: row for row in RunStore(run_dir).iter_rows()}


@pytest.fixture(scope="module")
def coco_export(tmp_path_factory):
    """A synthetic run (three score columns, classes) exported to COCO with RLE masks."""
    folder = tmp_path_factory.mktemp("pred")
    write_synthetic_run(folder / "run", images=10, per_image=4, width=48, height=40, shard_size=4,
                        class_names=NAMES, seed=3)
    export_coco(open_export_source(folder / "run"), folder / "coco", images_root="/synthetic")
    return folder, folder / "run", folder / "coco" / "annotations.json"


def _same_instances(a, b, columns):
    assert a.image.image_id == b.image.image_id
    x, y = a.instances, b.instances
    assert len(x) == len(y)
    assert np.array_equal(x.masks(), y.masks())
    assert np.array_equal(x.class_ids, y.class_ids)
    assert set(columns) <= set(y.scores)
    for column in columns:
        assert np.array_equal(x.scores[column], y.scores[column]), column


def test_coco_dataset_file_with_scores_round_trip(coco_export):
    folder, run, pred = coco_export
    code, out = _cli("import", pred, "--format", "coco", "--predictions", "--images-root", "/synthetic",
                     "--out", folder / "imported")
    assert code == 0, out
    original, imported = _rows(run), _rows(folder / "imported")
    assert original.keys() == imported.keys() and len(original) == 10
    for image_id in original:
        _same_instances(original[image_id], imported[image_id], ("confidence", "clip_class_prob", "sam_predicted_iou"))
        assert imported[image_id].image.uri == f"/synthetic/{image_id}"
    manifest = RunStore(folder / "imported").manifest()
    assert manifest["generator"] == "import" and manifest["class_names"] == list(NAMES)
    assert manifest["source"]["import"]["labels"] == "predictions"
    assert manifest["source"]["import"]["predictions"] == str(pred)
    assert manifest["source"]["import"]["layout"] == "dataset"
    row = next(iter(imported.values()))
    assert row.instances.provenance["labels"] == "predictions"


def test_coco_results_list_plus_dataset_file(coco_export):
    folder, run, pred = coco_export
    data = json.loads(pred.read_text())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
                "score": a["score"]} for a in data["annotations"]]
    results[0] = {k: v for k, v in results[0].items() if k != "segmentation"} | {"bbox": [2, 3, 10, 8]}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "gt.json").write_text(json.dumps({"images": data["images"], "annotations": [],
                                                "categories": data["categories"]}))
    code, out = _cli("import", folder / "results.json", "--format", "coco", "--predictions", "--dataset-json",
                     folder / "gt.json", "--images-root", "/synthetic", "--out", folder / "from-results")
    assert code == 0, out
    original, imported = _rows(run), _rows(folder / "from-results")
    assert original.keys() == imported.keys()
    first = data["images"][0]["file_name"]
    for image_id in original:
        if image_id == first:  # its first result is a box now
            boxed = imported[image_id].instances
            assert np.array_equal(boxed.boxes_xyxy[0], [2, 3, 12, 11]) and boxed.masks()[0].sum() == 80
            rest, source = boxed[np.arange(1, len(boxed))], original[image_id].instances
            source = source[np.arange(1, len(source))]
            assert np.array_equal(rest.masks(), source.masks())
            assert np.array_equal(rest.scores["confidence"], source.scores["confidence"])
            continue
        _same_instances(original[image_id], imported[image_id], ("confidence",))
        assert set(imported[image_id].instances.scores) == {"confidence"}
    source = RunStore(folder / "from-results").manifest()["source"]
    assert source["path"] == str(folder / "gt.json") and source["import"]["layout"] == "results"
    assert source["import"]["predictions"] == str(folder / "results.json")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][1].pop("score"), "expected a 'score' in \\[0, 1\\]"),
    (lambda d: d["annotations"][1].update(score=1.5), "got 1.5"),
    (lambda d: d["annotations"][1].update(score="0.5"), "expected a 'score'"),
    (lambda d: d["annotations"][1].update(image_id=999), "image_id 999"),
    (lambda d: d["annotations"][1].update(category_id=77), "category_id 77"),
    (lambda d: d["annotations"][1].update(segmentation=None, bbox=None), "neither a segmentation nor"),
    (lambda d: d.update(categories=[]), "categories"),
])
def test_bad_coco_predictions_are_clear_errors(coco_export, tmp_path, edit, message):
    _, _, pred = coco_export
    data = json.loads(pred.read_text())
    edit(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ExportError, match=message):
        write_imported_run(import_coco_predictions(bad, images_root="/synthetic"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    code, out = _cli("import", bad, "--format", "coco", "--predictions", "--images-root", "/synthetic",
                     "--out", tmp_path / "run")
    assert code == 2 and "labelgen: error:" in out and not (tmp_path / "run").exists()


def test_results_list_needs_its_dataset_file_and_a_dataset_file_refuses_one(coco_export, tmp_path):
    _, _, pred = coco_export
    (tmp_path / "results.json").write_text(json.dumps([]))
    with pytest.raises(ExportError, match="--dataset-json"):
        import_coco_predictions(tmp_path / "results.json")
    with pytest.raises(ExportError, match="drop --dataset-json"):
        import_coco_predictions(pred, dataset_json=pred)
    (tmp_path / "odd.json").write_text(json.dumps({"predictions": []}))
    with pytest.raises(ExportError, match="expected a COCO dataset object"):
        import_coco_predictions(tmp_path / "odd.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ExportError, match="cannot read COCO predictions JSON"):
        import_coco_predictions(tmp_path / "broken.json")
    code, out = _cli("import", pred, "--format", "yolo", "--dataset-json", pred, "--out", tmp_path / "r")
    assert code == 2 and "--dataset-json is for a COCO results list" in out


# -- YOLO -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def yolo_export(tmp_path_factory):
    """A fake-generator run over 6 images, exported to YOLO-seg (labels + aligned confidence files), then
    merged into Ultralytics' save_conf layout: each label line ends with its confidence."""
    folder = tmp_path_factory.mktemp("yolo")
    make_image_folder(folder / "images", 6, size=(64, 48))
    recipe = folder / "fake.yaml"
    recipe.write_text("generator: {name: fake, instances_per_image: 3, class_names: [cat, dog, bird]}\n"
                      "store: {shard_size: 4}\n")
    assert _cli("run", recipe, "--plugin", "labelgen.testing", "--images", folder / "images", "--out",
                folder / "run", "--no-progress")[0] == 0
    assert _cli("export", folder / "run", "--format", "yolo", "--out", folder / "y")[0] == 0
    labels = sorted((folder / "y" / "labels").rglob("*.txt"))
    assert labels
    merged = 0
    for label in labels:
        conf = folder / "y" / "confidence" / label.relative_to(folder / "y" / "labels")
        lines, scores = label.read_text().splitlines(), conf.read_text().splitlines()
        assert len(lines) == len(scores)
        label.write_text("".join(f"{line} {score}\n" for line, score in zip(lines, scores)))
        merged += len(lines)
    assert merged > 6
    return folder


def test_yolo_with_a_confidence_column_round_trip(yolo_export, tmp_path):
    folder = yolo_export
    code, out = _cli("import", folder / "y", "--format", "yolo", "--predictions", "--out", tmp_path / "run")
    assert code == 0, out
    imported, original = _rows(tmp_path / "run"), _rows(folder / "run")
    assert imported.keys() == original.keys()
    exported_lines = 0
    for image_id, row in imported.items():
        label = next((folder / "y" / "labels").rglob(image_id.rsplit(".", 1)[0] + ".txt"))
        lines = label.read_text().splitlines()
        exported_lines += len(lines)
        assert len(row.instances) == len(lines)
        assert np.allclose(row.instances.scores["confidence"], [float(line.split()[-1]) for line in lines])
        # the same objects as the run: class and confidence of the best-overlapping original mask
        source = original[image_id].instances
        if not len(lines):
            continue
        iou = np.asarray(coco_mask.iou([rle_to_pycocotools(r) for r in row.instances.masks_rle],
                                       [rle_to_pycocotools(r) for r in source.masks_rle], [0] * len(source)))
        best = iou.argmax(axis=1)
        assert np.array_equal(source.class_ids[best], row.instances.class_ids)
        np.testing.assert_allclose(source.scores["confidence"][best], row.instances.scores["confidence"], atol=1e-6)
    assert exported_lines > 6
    manifest = RunStore(tmp_path / "run").manifest()
    assert manifest["source"]["import"]["labels"] == "predictions"
    assert manifest["source"]["import"]["layout"] == "confidence column"
    # the same geometry as the ground-truth reader of the same lines without the column
    for label in (folder / "y" / "labels").rglob("*.txt"):
        label.write_text("".join(" ".join(line.split()[:-1]) + "\n" for line in label.read_text().splitlines()))
    try:
        truth = {row.image.image_id: row.instances for row in import_yolo(folder / "y")}
        for image_id, row in imported.items():
            assert row.instances.masks_rle == truth[image_id].masks_rle
        with pytest.raises(ExportError, match="trailing confidence column"):
            list(import_yolo_predictions(folder / "y"))
    finally:  # put the column back for other tests of the module
        for label in (folder / "y" / "labels").rglob("*.txt"):
            conf = folder / "y" / "confidence" / label.relative_to(folder / "y" / "labels")
            label.write_text("".join(f"{line} {score}\n" for line, score in
                                     zip(label.read_text().splitlines(), conf.read_text().splitlines())))


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5 0.2 0.2", "trailing confidence column"),
    ("0 0.5 0.5 0.2 0.2 1.7", "must be in \\[0, 1\\]"),
    ("0 0.5 0.5 0.2 0.2 high", "must be a number"),
    ("5 0.5 0.5 0.2 0.2 0.9", "class id must be an integer in \\[0, 3\\)"),
    ("0 0.1 0.1 0.5 0.1 0.5 0.5 nan", "must be in \\[0, 1\\]"),
])
def test_bad_yolo_prediction_lines_name_file_and_line(tmp_path, line, message):
    make_image_folder(tmp_path / "images" / "val", 1)
    (tmp_path / "labels" / "val").mkdir(parents=True)
    (tmp_path / "labels" / "val" / "img_00000.txt").write_text(f"0 0.5 0.5 0.2 0.2 0.5\n{line}\n")
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(ExportError, match=message) as info:
        write_imported_run(import_yolo_predictions(tmp_path, split="val"), tmp_path / "run")
    assert "img_00000.txt:2" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_yolo_box_and_polygon_predictions(tmp_path):
    make_image_folder(tmp_path / "images" / "val", 2, size=(40, 20))
    (tmp_path / "labels" / "val").mkdir(parents=True)
    (tmp_path / "labels" / "val" / "img_00000.txt").write_text(
        "1 0.5 0.5 0.5 0.5 0.25\n2 0.1 0.1 0.6 0.1 0.6 0.8 0.1 0.8 0.75\n")
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    rows = list(import_yolo_predictions(tmp_path, split="val"))
    first, second = rows[0].instances, rows[1].instances
    assert first.class_ids.tolist() == [1, 2] and first.scores["confidence"].tolist() == [0.25, 0.75]
    assert np.array_equal(first.boxes_xyxy[0], [10, 5, 30, 15]) and first.masks()[0].sum() == 200
    assert first.masks()[1].sum() > 100
    assert len(second) == 0 and "confidence" in second.scores  # no label file: no predictions
