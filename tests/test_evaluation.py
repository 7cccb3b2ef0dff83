"""``labelgen.review.evaluation`` and ``labelgen eval``: COCO AP/AR against ground truth.

Exact figures come from small hand-built COCO JSONs (RLE squares on 64x64 images, so every IoU is
known); coco128-seg ground truth evaluated against itself must give AP 1.0.
"""
import dataclasses
import json

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from labelgen.cli import main as cli_main
from labelgen.errors import ConfigError, ExportError
from labelgen.review.evaluation import evaluate, evaluate_before_after, load_ground_truth, plot_pr_curves
from labelgen.exports.coco import export_coco
from labelgen.exports.source import open_export_source
from labelgen.postprocess.filter_config import FilterConfig
from labelgen.exports.importers import import_coco, import_yolo, write_imported_run
from labelgen.structures.rows import Row

from conftest import COCO128

SIZE = 64
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCOeval's params.recThrs


def _ap_at_recall(recall: float) -> float:
    """AP of a ranking whose detections are all true positives up to ``recall``: precision 1 at every
    recall threshold that COCOeval reaches (rc >= threshold, its searchsorted side='left'), 0 after."""
    return float(np.count_nonzero(np.searchsorted([recall], RECALL_THRESHOLDS, side="left") < 1)) / 101


def _square_rle(x, y, side):
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8, order="F")
    mask[y:y + side, x:x + side] = 1
    rle = coco_mask.encode(mask)
    return {"size": [SIZE, SIZE], "counts": rle["counts"].decode("ascii")}


def _coco_json(path, images, categories=("thing",)):
    """``images``: {file_name: [(class name, x, y, side[, score]), ...]} -> a COCO JSON of RLE squares."""
    data = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(categories)]}
    for number, (file_name, objects) in enumerate(images.items(), 1):
        data["images"].append({"id": number, "file_name": file_name, "width": SIZE, "height": SIZE})
        for name, x, y, side, *score in objects:
            entry = {"id": len(data["annotations"]) + 1, "image_id": number, "category_id": categories.index(name) + 1,
                     "segmentation": _square_rle(x, y, side), "bbox": [x, y, side, side], "area": side * side,
                     "iscrowd": 0}
            data["annotations"].append({**entry, "score": score[0]} if score else entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _prediction_run(tmp_path, images, categories=("thing",)):
    """A run directory holding ``images`` (as in ``_coco_json``; the score becomes ``confidence``)."""
    path = _coco_json(tmp_path / "pred" / "pred.json", images, categories)
    return write_imported_run(import_coco(path), tmp_path / "pred-run")


# -- coco128-seg ground truth against itself ------------------------------------------------------
@pytest.fixture(scope="module")
def coco128_gt(tmp_path_factory):
    if not (COCO128 / "images" / "train2017").is_dir():
        pytest.skip(f"coco128-seg not found at {COCO128} (set LABELGEN_COCO128)")
    folder = tmp_path_factory.mktemp("coco128-eval")
    run = write_imported_run(import_yolo(COCO128, split="train2017"), folder / "gt-run")
    export_coco(open_export_source(run), folder / "coco")
    return run, folder / "coco" / "annotations.json"


@pytest.mark.parametrize("gt_kind", ["yolo", "yolo-no-split", "coco-json"])
@pytest.mark.parametrize("class_agnostic", [None, True])
def test_coco128_ground_truth_against_itself_is_perfect(coco128_gt, gt_kind, class_agnostic):
    run, coco_json = coco128_gt
    gt = {"yolo": COCO128, "yolo-no-split": COCO128, "coco-json": coco_json}[gt_kind]
    split = "train2017" if gt_kind == "yolo" else None  # without it, "train2017/x.jpg" matches "x.jpg" by suffix
    result = evaluate(open_export_source(run), gt, class_agnostic=class_agnostic, gt_split=split)
    assert result.class_aware is (class_agnostic is None)  # default: aware, the class names are the same
    for iou_type in ("segm", "bbox"):
        metrics = result.metrics[iou_type]
        assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == metrics["AR@100"] == 1.0
        assert result.pr_curves[iou_type]["precision_iou50"] == [1.0] * 101
    assert result.images["matched"] == result.images["ground_truth"] == 128
    assert result.instances["evaluated"] == result.instances["ground_truth"] == 929
    assert not result.unmatched_prediction_images and not result.unknown_classes
    if result.class_aware:
        scored = {name: ap for name, ap in result.per_class_ap["segm"].items() if ap is not None}
        assert len(scored) == 71 and set(scored.values()) == {1.0}  # coco128 has 71 of the 80 classes
        assert result.per_class_ap["bbox"] == result.per_class_ap["segm"]
    else:
        assert result.categories == ["object"] and result.per_class_ap == {"segm": {}, "bbox": {}}


def test_coco128_run_directory_as_ground_truth(coco128_gt):
    run, _ = coco128_gt
    result = evaluate(open_export_source(run), run, iou_types=["segm"])
    assert result.ground_truth["kind"] == "run" and result.metrics["segm"]["AP"] == 1.0
    assert list(result.metrics) == ["segm"]


def test_coco128_every_other_person_dropped(coco128_gt, tmp_path):
    """Dropping every other person (per image) leaves recall r = kept / all for that class only."""
    dataset = import_yolo(COCO128, split="train2017")
    person = dataset.class_names.index("person")
    counts = {"all": 0, "kept": 0, "total_kept": 0}

    def load(record):
        item = dataset.load_item(record)
        is_person = item.instances.class_ids == person
        rank = np.cumsum(is_person) - 1  # 0, 1, 2... among the persons of this image
        keep = ~is_person | (rank % 2 == 0)
        counts["all"] += int(is_person.sum())
        counts["kept"] += int((is_person & keep).sum())
        counts["total_kept"] += int(keep.sum())
        return Row(item.image, item.instances[keep])

    run = write_imported_run(dataclasses.replace(dataset, load_item=load), tmp_path / "degraded")
    recall = counts["kept"] / counts["all"]
    assert counts["all"] == 254 and 0.5 < recall < 0.6
    aware = evaluate(open_export_source(run), COCO128, gt_split="train2017")
    scored = {name: ap for name, ap in aware.per_class_ap["segm"].items() if ap is not None}
    # all-TP ranking: precision 1 up to recall r, nothing after; the other 70 classes stay perfect
    assert scored.pop("person") == pytest.approx(_ap_at_recall(recall), abs=1e-12)
    assert set(scored.values()) == {1.0}
    assert aware.metrics["segm"]["AR@100"] == pytest.approx((70 + recall) / 71, abs=1e-12)
    agnostic = evaluate(open_export_source(run), COCO128, gt_split="train2017", class_agnostic=True)
    assert agnostic.metrics["bbox"]["AR@100"] == pytest.approx(counts["total_kept"] / 929, abs=1e-12)


# -- hand-built cases with exact answers ----------------------------------------------------------
GT_FOUR = {"a.png": [("thing", 5, 5, 10), ("thing", 30, 30, 10)],
           "b.png": [("thing", 5, 5, 10), ("thing", 30, 30, 10)]}


def test_three_of_four_objects_found(tmp_path):
    gt = _coco_json(tmp_path / "gt" / "gt.json", GT_FOUR)
    run = _prediction_run(tmp_path, {"a.png": GT_FOUR["a.png"], "b.png": GT_FOUR["b.png"][:1]})
    result = evaluate(open_export_source(run), gt, class_agnostic=True)
    expected_ap = _ap_at_recall(0.75)  # thresholds 0, .01, ..., .75 reached: 76/101
    assert expected_ap == pytest.approx(76 / 101)
    for iou_type in ("segm", "bbox"):
        metrics = result.metrics[iou_type]
        assert metrics["AR@100"] == metrics["AR@10"] == pytest.approx(0.75)  # every IoU is 1: recall 3/4
        assert metrics["AR@1"] == pytest.approx(0.5)  # one detection per image: 2 of 4
        assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == pytest.approx(expected_ap)
        assert metrics["AP_small"] == pytest.approx(expected_ap)  # 100 px < 32^2: all objects are small
        assert metrics["AP_medium"] is None and metrics["AR_large"] is None  # no ground truth there
        curve = result.pr_curves[iou_type]["precision_iou75"]
        assert curve == [1.0] * 76 + [0.0] * 25


def test_shifted_mask_passes_iou_50_not_75(tmp_path):
    gt = _coco_json(tmp_path / "gt" / "gt.json", {"a.png": [("thing", 10, 10, 20)]})
    run = _prediction_run(tmp_path, {"a.png": [("thing", 13, 10, 20)]})  # IoU = 17*20 / (23*20) = 0.739
    result = evaluate(open_export_source(run), gt)
    for iou_type in ("segm", "bbox"):
        metrics = result.metrics[iou_type]
        assert metrics["AP50"] == 1.0 and metrics["AP75"] == 0.0
        assert metrics["AP"] == pytest.approx(0.5)  # matched at IoU .50, .55, .60, .65, .70: 5 of 10
        assert metrics["AR@100"] == pytest.approx(0.5)


def test_filtering_a_low_confidence_false_positive_raises_precision(tmp_path):
    gt = _coco_json(tmp_path / "gt" / "gt.json", {"a.png": [("cat", 5, 5, 10)], "b.png": [("dog", 5, 5, 10)]},
                    ("cat", "dog"))
    run = _prediction_run(tmp_path, {"a.png": [("cat", 5, 5, 10, 0.9), ("cat", 40, 40, 10, 0.5)],  # TP, FP
                                     "b.png": [("dog", 5, 5, 10, 0.3)]}, ("cat", "dog"))
    config = FilterConfig(min_confidence_per_class={"cat": 0.6})  # cats are over-confident: only they need more
    results = evaluate_before_after(run, gt, config, class_agnostic=True)
    # ranked 0.9 TP, 0.5 FP, 0.3 TP: interpolated precision 1 up to recall .5 (51 thresholds), 2/3 after (50)
    assert results["before"].metrics["segm"]["AP"] == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert results["after"].metrics["segm"]["AP"] == 1.0
    assert results["after"].predictions["filtered_on_the_fly"] and results["after"].instances["evaluated"] == 2
    # class-aware, the FP ranks after the only cat TP: COCO AP does not see it (and a global threshold
    # can never raise AP: it only cuts the tail of every ranking)
    aware = evaluate_before_after(run, gt, config)
    assert aware["before"].metrics["segm"]["AP"] == aware["after"].metrics["segm"]["AP"] == 1.0


def test_unmatched_images_and_unknown_classes_are_reported(tmp_path):
    gt = _coco_json(tmp_path / "gt" / "gt.json", {"a.png": [("cat", 5, 5, 10)], "b.png": [("dog", 5, 5, 10)],
                                                  "d.png": [("cat", 5, 5, 10)]}, ("cat", "dog"))
    run = _prediction_run(tmp_path, {"a.png": [("cat", 5, 5, 10), ("zebra", 30, 30, 10)],
                                     "b.png": [("dog", 5, 5, 10)], "c.png": [("cat", 5, 5, 10)]},
                          ("cat", "dog", "zebra"))
    result = evaluate(open_export_source(run), gt, all_gt=True)  # d.png, which the run lacks, counts as missed
    assert result.class_aware and result.categories == ["cat", "dog"]
    assert result.unknown_classes == {"zebra": 1} and result.instances["unknown_class"] == 1
    assert result.unmatched_prediction_images == ["c.png"]
    assert result.images == {"ground_truth": 3, "ground_truth_failed": 0, "predicted": 3, "prediction_failed": 0,
                             "matched": 2, "ground_truth_without_predictions": 1, "unmatched_predictions": 1,
                             "ground_truth_evaluated": 3, "ground_truth_not_in_run": 1}
    assert result.instances["unmatched_image"] == 1 and result.instances["evaluated"] == 2
    assert result.per_class_ap["segm"]["cat"] == pytest.approx(_ap_at_recall(0.5))  # d.png's cat is missed
    assert result.per_class_ap["segm"]["dog"] == 1.0
    table = result.table()
    assert "c.png" in table and "zebra (1)" in table and "class-aware" in table
    assert json.loads(json.dumps(result.to_dict()))["unknown_classes"] == {"zebra": 1}


def _run_with_failed_image(json_path, out, failed_name):
    """``json_path`` imported as a run where ``failed_name`` could not be opened (a failed row)."""
    dataset = import_coco(json_path)

    def load(record):
        if record.image_id == failed_name:
            return Row(record, None, {"reason": "missing", "message": "gone"})
        return dataset.load_item(record)

    return write_imported_run(dataclasses.replace(dataset, load_item=load), out)


def test_failed_images_on_either_side(tmp_path):
    """A failed ground-truth image is left out (its prediction is unmatched); a failed prediction is a miss
    (the run has a row for that image: it is evaluated, not left out as never labelled)."""
    three = {name: [("thing", 5, 5, 10)] for name in ("a.png", "b.png", "c.png")}
    gt = _run_with_failed_image(_coco_json(tmp_path / "gt" / "gt.json", three), tmp_path / "gt-run", "c.png")
    run = _run_with_failed_image(_coco_json(tmp_path / "pred" / "pred.json", three), tmp_path / "run", "b.png")
    result = evaluate(open_export_source(run), gt)
    assert result.images == {"ground_truth": 2, "ground_truth_failed": 1, "predicted": 3, "prediction_failed": 1,
                             "matched": 1, "ground_truth_without_predictions": 1, "unmatched_predictions": 1,
                             "ground_truth_evaluated": 2, "ground_truth_not_in_run": 0}
    assert result.unmatched_prediction_images == ["c.png"]
    assert result.metrics["segm"]["AR@100"] == 0.5


def test_matching_falls_back_to_the_coco_image_id(tmp_path):
    gt = _coco_json(tmp_path / "gt" / "gt.json", {"renamed.png": [("thing", 5, 5, 10)]})
    run = _prediction_run(tmp_path, {"1": [("thing", 5, 5, 10)]})  # the ground truth's numeric id
    assert evaluate(open_export_source(run), gt).metrics["segm"]["AP"] == 1.0


def test_crowd_regions_are_ignored_not_missed(tmp_path):
    gt = _coco_json(tmp_path / "gt" / "gt.json", {"a.png": [("thing", 5, 5, 10), ("thing", 30, 30, 20)]})
    data = json.loads(gt.read_text())
    data["annotations"][1]["iscrowd"] = 1
    gt.write_text(json.dumps(data))
    run = _prediction_run(tmp_path, {"a.png": [("thing", 5, 5, 10, 0.9), ("thing", 32, 32, 10, 0.95)]})
    result = evaluate(open_export_source(run), gt)
    assert result.instances["ground_truth_crowd"] == 1 and result.metrics["segm"]["AP"] == 1.0


def test_no_predictions_at_all(tmp_path):
    gt = _coco_json(tmp_path / "gt" / "gt.json", GT_FOUR)
    run = _prediction_run(tmp_path, {"a.png": [], "b.png": []})
    result = evaluate(open_export_source(run), gt)
    assert result.metrics["segm"]["AP"] == 0.0 and result.metrics["bbox"]["AR@100"] == 0.0


@pytest.mark.parametrize("options, match", [
    ({"iou_types": ["keypoints"]}, "iou_types"),
    ({"iou_types": []}, "iou_types"),
    ({"max_dets": (1, 10)}, "max_dets"),
    ({"max_dets": (10, 1, 100)}, "max_dets"),
])
def test_bad_options(tmp_path, options, match):
    gt = _coco_json(tmp_path / "gt" / "gt.json", GT_FOUR)
    with pytest.raises(ConfigError, match=match):
        evaluate(open_export_source(_prediction_run(tmp_path, GT_FOUR)), gt, **options)


def test_bad_ground_truth(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ExportError, match="neither a COCO JSON"):
        load_ground_truth(tmp_path / "notes.txt")
    with pytest.raises(ExportError, match="cannot read COCO JSON"):
        load_ground_truth(tmp_path / "bad.json")


def test_class_aware_needs_names_on_both_sides(tmp_path):
    gt = dataclasses.replace(load_ground_truth(_coco_json(tmp_path / "gt" / "gt.json", GT_FOUR)), class_names=None)
    run = _prediction_run(tmp_path, GT_FOUR)
    with pytest.raises(ConfigError, match="ground truth has none"):
        evaluate(open_export_source(run), gt, class_agnostic=False)
    assert evaluate(open_export_source(run), gt).class_aware is False


# -- a run that labelled only part of the ground truth (issue 11, item 12) -------------------------
def test_partial_run_is_evaluated_on_the_images_it_labelled(tmp_path):
    gt = _coco_json(tmp_path / "gt" / "gt.json", GT_FOUR)
    run = _prediction_run(tmp_path, {"a.png": GT_FOUR["a.png"]})  # b.png never labelled
    result = evaluate(open_export_source(run), gt)
    assert result.all_gt is False
    assert result.images["ground_truth_evaluated"] == 1 and result.images["ground_truth_not_in_run"] == 1
    assert result.images["ground_truth_without_predictions"] == 0
    assert result.instances["ground_truth"] == 2 and result.instances["ground_truth_not_in_run"] == 2
    for iou_type in ("segm", "bbox"):
        assert result.metrics[iou_type]["AP"] == result.metrics[iou_type]["AR@100"] == 1.0
    assert result.scope.startswith("evaluated on 1 of 2 ground-truth images") and "--all-gt" in result.scope
    assert result.to_dict()["scope"] == result.scope and result.to_dict()["all_gt"] is False
    every = evaluate(open_export_source(run), gt, all_gt=True)
    assert every.all_gt and every.images["ground_truth_evaluated"] == 2 and every.images["ground_truth_not_in_run"] == 1
    assert every.images["ground_truth_without_predictions"] == 1 and every.instances["ground_truth"] == 4
    assert every.metrics["segm"]["AR@100"] == 0.5 and every.metrics["segm"]["AP"] == pytest.approx(_ap_at_recall(0.5))
    assert every.scope.startswith("evaluated on all 2 ground-truth images")


def test_interrupted_fake_run_against_its_complete_twin(tmp_path, image_dir):
    """A real run with a pending shard: its 8 committed images score 1.0 against the complete run."""
    from labelgen.engine.runner import run as run_labels
    from labelgen.engine.sources import FolderSource
    from labelgen.store.run_store import RunStore

    from conftest import make_recipe

    run_labels(make_recipe(), FolderSource(image_dir), tmp_path / "complete")
    run_labels(make_recipe(), FolderSource(image_dir), tmp_path / "partial")
    RunStore(tmp_path / "partial").shard_done(2).unlink()  # shards of 4: images 9 and 10 pending
    result = evaluate(open_export_source(tmp_path / "partial"), tmp_path / "complete")
    assert result.images["ground_truth_evaluated"] == 8 and result.images["ground_truth"] == 10
    assert result.metrics["segm"]["AP"] == result.metrics["bbox"]["AR@100"] == 1.0
    before_after = evaluate_before_after(tmp_path / "partial", tmp_path / "complete", FilterConfig(min_area=1))
    assert before_after["after"].images["ground_truth_evaluated"] == 8
    every = evaluate(open_export_source(tmp_path / "partial"), tmp_path / "complete", all_gt=True)
    assert every.metrics["segm"]["AR@100"] < 1.0 and every.images["ground_truth_without_predictions"] == 2


def test_no_ground_truth_image_in_the_run_is_a_clear_error(tmp_path):
    gt = _coco_json(tmp_path / "gt" / "gt.json", GT_FOUR)
    run = _prediction_run(tmp_path, {"elsewhere.png": GT_FOUR["a.png"]})
    with pytest.raises(ExportError, match="none of the run's 1 images"):
        evaluate(open_export_source(run), gt)
    assert evaluate(open_export_source(run), gt, all_gt=True).metrics["segm"]["AR@100"] == 0.0


def test_cli_says_which_ground_truth_images_were_evaluated(tmp_path, capsys):
    gt = _coco_json(tmp_path / "gt" / "gt.json", GT_FOUR)
    run = _prediction_run(tmp_path, {"a.png": GT_FOUR["a.png"]})
    assert cli_main(["eval", str(run), "--gt", str(gt), "--json"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "ground-truth images" in line]
    assert len(lines) == 1 and lines[0].startswith("evaluated on 1 of 2 ground-truth images") and "--all-gt" in lines[0]
    data = json.loads(captured.out)
    assert data["all_gt"] is False and data["images"]["ground_truth_evaluated"] == 1 and data["scope"] == lines[0]
    assert data["metrics"]["segm"]["AP"] == 1.0
    assert cli_main(["eval", str(run), "--gt", str(gt), "--all-gt", "--json"]) == 0
    captured = capsys.readouterr()
    assert "evaluated on all 2 ground-truth images" in captured.err
    assert json.loads(captured.out)["metrics"]["segm"]["AR@100"] == 0.5


def test_plot_pr_curves_writes_png(tmp_path):
    gt = _coco_json(tmp_path / "gt" / "gt.json", GT_FOUR)
    run = _prediction_run(tmp_path, {"a.png": GT_FOUR["a.png"]})
    result = evaluate(open_export_source(run), gt)
    path = plot_pr_curves({"before": result, "after": result}, tmp_path / "pr.png", "bbox")
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 1000


# -- CLI ------------------------------------------------------------------------------------------
@pytest.fixture
def cli_case(tmp_path):
    gt = _coco_json(tmp_path / "gt" / "gt.json", GT_FOUR)
    run = _prediction_run(tmp_path, {"a.png": GT_FOUR["a.png"] + [("thing", 45, 45, 10, 0.2)],
                                     "b.png": GT_FOUR["b.png"]})
    return str(run), str(gt)


def test_cli_json(cli_case, capsys):
    run, gt = cli_case
    assert cli_main(["eval", run, "--gt", gt, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["metrics"]["segm"]["AR@100"] == 1.0 and set(data["metrics"]) == {"segm", "bbox"}
    assert set(data["metrics"]["bbox"]) >= {"AP", "AP50", "AP75", "AR@1", "AR@10", "AR@100", "AR_small"}


def test_cli_before_after_table_and_out(cli_case, tmp_path, capsys):
    run, gt = cli_case
    out = tmp_path / "eval-out"
    assert cli_main(["eval", run, "--gt", gt, "--set", "min_confidence=0.5", "--class-agnostic",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "before filtering" in text and "after filtering" in text and "class-agnostic" in text
    saved = json.loads((out / "eval.json").read_text())
    assert saved["before"]["instances"]["evaluated"] == 5 and saved["after"]["instances"]["evaluated"] == 4
    for name in ("pr_segm.png", "pr_bbox.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG") and (out / name).stat().st_size > 1000


@pytest.mark.parametrize("extra, message", [
    (["--filtered", "nope", "--set", "min_confidence=0.5"], "choose one of"),
    (["--reviewed", "nope"], "no reviewed copy"),
    (["--set", "min_confidenc=0.5"], "min_confidence"),
])
def test_cli_errors(cli_case, capsys, extra, message):
    run, gt = cli_case
    assert cli_main(["eval", run, "--gt", gt, *extra]) == 2
    assert message in capsys.readouterr().err
