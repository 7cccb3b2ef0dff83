"""``labelgen diff``: exact counts on two hand-built runs with known differences, class-aware and
class-agnostic, different image sets, thresholds, FiftyOne tags (real MongoDB), the report, the CLI."""
import json

import numpy as np
import pytest

from labelgen.cli import main
from labelgen.errors import ValidationError
from labelgen.exports.importers import ImportedDataset, write_imported_run
from labelgen.exports.source import open_export_source
from labelgen.postprocess.filter_config import FilterConfig
from labelgen.review.diff import (CLASS_CHANGED, MATCHED, ONLY_A, ONLY_B, _assign, diff_sources, match_image,
                                  paired_rows, read_diffs, save_diff, tag_fiftyone)
from labelgen.review.report import build_report
from labelgen.structures.instances import ImageRecord, Instances
from labelgen.structures.rows import Row

CLASSES = ("cat", "dog")
SIZE = 40
SQ1, SQ2, SQ3, SQ4 = (2, 2, 12, 12), (20, 2, 30, 12), (2, 20, 12, 30), (20, 20, 30, 30)
SQ1_NEAR = (3, 2, 13, 12)  # IoU with SQ1: 90/110 = 0.82
SQ1_FAR = (7, 2, 17, 12)  # IoU with SQ1: 50/150 = 0.33


def _instances(labels):
    masks = np.zeros((len(labels), SIZE, SIZE), bool)
    for k, (_, (x0, y0, x1, y1), _) in enumerate(labels):
        masks[k, y0:y1, x0:x1] = True
    return Instances.from_masks(masks, class_ids=np.array([CLASSES.index(c) for c, _, _ in labels], np.int32),
                                scores={"confidence": np.array([p for _, _, p in labels], np.float32)})


def make_run(root, images, class_names=CLASSES):
    """A run directory with ``images`` = {image_id: [(class, box, confidence), ...]}."""
    records = tuple(ImageRecord(i, f"/nowhere/{i}", SIZE, SIZE) for i in sorted(images))
    spec = {"kind": "hand-built", "import": {"format": "test"}}
    dataset = ImportedDataset(tuple(class_names), spec, records,
                              lambda r: Row(r, _instances(images[r.image_id])))
    return write_imported_run(dataset, root, shard_size=2)


A_IMAGES = {
    "img1": [("cat", SQ1, 0.9), ("dog", SQ2, 0.8), ("cat", SQ3, 0.3)],
    "img2": [("cat", SQ1, 0.7)],
    "img3": [("cat", SQ1, 0.6), ("dog", SQ4, 0.2)],
    "img5": [("cat", SQ1, 0.4)],
}
B_IMAGES = {
    "img1": [("cat", SQ1, 0.9), ("cat", SQ2, 0.8), ("dog", SQ4, 0.5)],
    "img2": [("cat", SQ1_NEAR, 0.7)],
    "img4": [("dog", SQ2, 0.9)],
    "img5": [("cat", SQ1_FAR, 0.4)],
}


@pytest.fixture
def runs(tmp_path):
    return make_run(tmp_path / "a", A_IMAGES), make_run(tmp_path / "b", B_IMAGES)


def _diff(a, b, **kwargs):
    return diff_sources(open_export_source(a), open_export_source(b), **kwargs).to_dict()


def test_class_aware_counts(runs):
    data = _diff(*runs)
    assert data["total"] == {MATCHED: 2, ONLY_A: 4, ONLY_B: 3, CLASS_CHANGED: 1}
    assert data["per_class"] == {"cat": {MATCHED: 2, ONLY_A: 3, ONLY_B: 1, CLASS_CHANGED: 0},
                                 "dog": {MATCHED: 0, ONLY_A: 1, ONLY_B: 2, CLASS_CHANGED: 1}}
    assert data["class_changes"] == {"dog -> cat": 1}
    assert data["images"] == {"both": 3, "only_a": 1, "only_b": 1, "failed_a": 0, "failed_b": 0,
                              "with_changes": 4}


def test_class_agnostic_counts_class_changes_as_matched(runs):
    data = _diff(*runs, class_agnostic=True)
    assert data["total"] == {MATCHED: 3, ONLY_A: 4, ONLY_B: 3, CLASS_CHANGED: 0}
    assert data["class_changes"] == {}


def test_iou_threshold_moves_pairs(runs):
    loose = _diff(*runs, iou=0.3)  # img5's shifted square (IoU 0.33) now matches
    assert loose["total"] == {MATCHED: 3, ONLY_A: 3, ONLY_B: 2, CLASS_CHANGED: 1}
    strict = _diff(*runs, iou=0.9)  # img2's near square (IoU 0.82) no longer matches
    assert strict["total"] == {MATCHED: 1, ONLY_A: 5, ONLY_B: 4, CLASS_CHANGED: 1}
    with pytest.raises(ValidationError, match="iou"):
        _diff(*runs, iou=0)


def test_a_run_against_itself_and_a_threshold_of_itself(runs):
    a, _ = runs
    assert _diff(a, a)["total"] == {MATCHED: 7, ONLY_A: 0, ONLY_B: 0, CLASS_CHANGED: 0}
    source = open_export_source(a)
    confident = open_export_source(a, filter_config=FilterConfig(min_confidence=0.5))
    data = diff_sources(source, confident).to_dict()  # 0.3, 0.2, 0.4 are below the threshold
    assert data["total"] == {MATCHED: 4, ONLY_A: 3, ONLY_B: 0, CLASS_CHANGED: 0}


def test_vocabularies_are_compared_by_name(tmp_path):
    a = make_run(tmp_path / "a", {"x": [("cat", SQ1, 0.9), ("dog", SQ2, 0.9)]})
    # the same class ids, in a vocabulary with the names swapped: B says dog at SQ1, cat at SQ2
    b = make_run(tmp_path / "b", {"x": [("cat", SQ1, 0.9), ("dog", SQ2, 0.9)]}, class_names=("dog", "cat"))
    data = _diff(a, b)
    assert data["total"][CLASS_CHANGED] == 2 and data["class_changes"] == {"cat -> dog": 1, "dog -> cat": 1}
    # other ids, the same names: matched
    c = make_run(tmp_path / "c", {"x": [("dog", SQ1, 0.9), ("cat", SQ2, 0.9)]}, class_names=("dog", "cat"))
    assert _diff(a, c)["total"][MATCHED] == 2


def test_assignment_is_optimal_not_greedy():
    ious = np.array([[0.6, 0.7], [0.0, 0.55]])  # greedy by IoU pairs (0,1) and leaves row 1 unmatched
    assert sorted(_assign(ious, np.ones_like(ious, bool), 0.5)) == [(0, 0), (1, 1)]
    assert _assign(ious, np.ones_like(ious, bool), 0.8) == []


def test_match_image_statuses():
    a = _instances([("cat", SQ1, 1.0), ("dog", SQ2, 1.0)])
    b = _instances([("cat", SQ2, 1.0)])
    item = match_image("x", a, b, CLASSES, CLASSES)
    assert item.status_a == (ONLY_A, CLASS_CHANGED) and item.status_b == (CLASS_CHANGED,)
    assert item.partner_a == (None, 0) and item.changes == 2
    none = match_image("x", a, None, CLASSES, CLASSES, in_b=False)
    assert none.status_a == (ONLY_A, ONLY_A) and none.status_b == ()


def test_pairing_streams_both_orders_and_keeps_one_sided_images():
    rec = lambda i: Row(ImageRecord(i, f"/x/{i}", 4, 4), Instances.empty(4, 4))  # noqa: E731
    a = [rec(i) for i in ("p", "q", "r", "s")]
    b = [rec(i) for i in ("q", "p", "t", "s")]
    pairs = [(i, ra is not None, rb is not None) for i, ra, rb in paired_rows(a, b)]
    assert sorted(pairs) == [("p", True, True), ("q", True, True), ("r", True, False), ("s", True, True),
                             ("t", False, True)]
    assert pairs[-2:] == [("r", True, False), ("t", False, True)]  # one-sided images come last


def test_fiftyone_tags_and_views(runs, fiftyone_db, dataset_name):
    fo = fiftyone_db
    a, b = runs
    summary = tag_fiftyone(open_export_source(a), open_export_source(b), dataset_name)
    assert summary.to_dict()["total"] == {MATCHED: 2, ONLY_A: 4, ONLY_B: 3, CLASS_CHANGED: 1}
    dataset = fo.load_dataset(dataset_name)
    by_id = {s["labelgen_image_id"]: s for s in dataset}
    assert set(by_id) == {"img1", "img2", "img3", "img5"}  # A's images
    tags = lambda s: [[t for t in d.tags if t.startswith("diff:")] for d in s["labelgen"].detections]  # noqa: E731
    assert tags(by_id["img1"]) == [["diff:matched"], ["diff:class_changed"], ["diff:only_a"]]
    assert tags(by_id["img3"]) == [["diff:only_a"], ["diff:only_a"]]
    assert [(d.label, d.tags) for d in by_id["img1"]["labelgen_diff_b"].detections] == [
        ("cat", ["diff:class_changed"]), ("dog", ["diff:only_b"])]
    assert by_id["img1"]["diff_changes"] == 3 and by_id["img2"]["diff_changes"] == 0
    assert {"diff_changes", "diff_only_a", "diff_only_b", "diff_class_changed"} <= set(dataset.list_saved_views())
    assert dataset.load_saved_view("diff_only_a").count_label_tags()["diff:only_a"] == 4
    assert [s["labelgen_image_id"] for s in dataset.load_saved_view("diff_changes")][0] == "img1"
    # a second diff (against A itself) replaces the old tags
    tag_fiftyone(open_export_source(a), open_export_source(a), dataset_name)
    dataset.reload()
    assert dataset.count_label_tags("labelgen") == {"diff:matched": 7}


def test_saved_diff_in_the_report(runs):
    a, b = runs
    source_a, source_b = open_export_source(a), open_export_source(b)
    path = save_diff(source_a, source_b, diff_sources(source_a, source_b))
    assert path.parent == a / "diffs" and path.stem == source_b.run_id
    [(name, data)] = read_diffs(a)
    assert data["b"]["run_id"] == source_b.run_id and data["total"][ONLY_B] == 3
    html = build_report(a).read_text(encoding="utf-8")
    assert "Run diffs" in html and source_b.run_id in html and "dog -&gt; cat" in html


def test_cli_diff_table_json_and_saved_file(runs, capsys):
    a, b = runs
    assert main(["diff", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "class changed" in out and "total" in out
    total = [line for line in out.splitlines() if line.startswith("total")][0].split()
    assert total[1:] == ["2", "4", "3", "1"]
    assert main(["diff", str(a), str(b), "--class-agnostic", "--json", "--b-set", "min_confidence=0.5"]) == 0
    data = json.loads(capsys.readouterr().out)
    # B with min_confidence 0.5 drops img5's 0.4 square (A's img5 square was only in A already)
    assert data["total"] == {MATCHED: 3, ONLY_A: 4, ONLY_B: 2, CLASS_CHANGED: 0}
    assert {name for name, _ in read_diffs(a)} == {json.loads((b / "run.json").read_text())["run_id"],
                                                   json.loads((b / "run.json").read_text())["run_id"] + "--filter"}
    assert main(["diff", str(a), str(b), "--iou", "1.5"]) == 2


def test_cli_diff_against_a_saved_filtered_copy_of_the_same_run(runs, capsys):
    from labelgen.postprocess.filter_store import save_filtered
    from labelgen.store.run_store import RunStore

    a, _ = runs
    store = RunStore(a)
    save_filtered(store, FilterConfig(min_confidence=0.5), "confident", list(CLASSES))
    assert main(["diff", str(a), str(a), "--b-filtered", "confident", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == {MATCHED: 4, ONLY_A: 3, ONLY_B: 0, CLASS_CHANGED: 0}
    assert data["per_class"]["dog"][ONLY_A] == 1  # img3's 0.2 dog
    names = {name for name, _ in read_diffs(a)}
    assert any(name.endswith("--filtered-confident") for name in names)


def test_a_run_against_its_reviewed_copy(runs, fiftyone_db, dataset_name):
    from labelgen.exports.fiftyone import FIELD, export_fiftyone
    from labelgen.review.review import pull_review

    a, _ = runs
    export_fiftyone(open_export_source(a), dataset_name)
    samples = {s["labelgen_image_id"]: s for s in fiftyone_db.load_dataset(dataset_name)}
    samples["img1"][FIELD].detections[2].tags.append("rejected")  # the 0.3 cat: only in A
    samples["img3"][FIELD].detections[1].label = "cat"  # the dog relabelled: class changed
    samples["img2"][FIELD].detections.append(  # a drawn label: only in the review
        fiftyone_db.Detection(label="dog", bounding_box=[0.5, 0.5, 0.25, 0.25]))
    for sample in samples.values():
        sample.save()
    pull_review(a, dataset_name, name="checked")
    data = diff_sources(open_export_source(a), open_export_source(a, reviewed="checked")).to_dict()
    assert data["total"] == {MATCHED: 5, ONLY_A: 1, ONLY_B: 1, CLASS_CHANGED: 1}
    assert data["class_changes"] == {"dog -> cat": 1}


# -- comparing generators ---------------------------------------------------------------------------------------
def _agnostic_run(root, images):
    records = tuple(ImageRecord(i, f"/nowhere/{i}", SIZE, SIZE) for i in sorted(images))

    def row(record):
        labelled = _instances(images[record.image_id])
        return Row(record, Instances(height=SIZE, width=SIZE, masks_rle=labelled.masks_rle,
                                     boxes_xyxy=labelled.boxes_xyxy, scores=labelled.scores))

    dataset = ImportedDataset((), {"kind": "hand-built", "import": {"format": "test"}}, records, row)
    return write_imported_run(dataset, root, shard_size=2)


def test_mean_iou_of_the_paired_labels(runs):
    # pairs: img1 SQ1/SQ1 (1.0) and SQ2 dog/cat (1.0, class changed), img2 SQ1/SQ1_NEAR (90/110)
    assert _diff(*runs)["mean_pair_iou"] == pytest.approx((1.0 + 1.0 + 90 / 110) / 3, abs=1e-4)
    assert _diff(runs[0], runs[0])["mean_pair_iou"] == pytest.approx(1.0)


def test_a_class_agnostic_side_makes_the_cli_match_ignoring_classes(runs, tmp_path, capsys):
    agnostic = _agnostic_run(tmp_path / "agnostic", B_IMAGES)
    assert main(["diff", str(runs[0]), str(agnostic), "--json", "--no-save"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert "matching ignores classes (B class-agnostic)" in captured.err
    assert data["class_agnostic"] is True and data["total"][CLASS_CHANGED] == 0
    # the same counts as asking for class-agnostic matching between the two classed runs
    expected = _diff(*runs, class_agnostic=True)["total"]
    assert data["total"] == expected
    assert data["b"]["class_names"] is None and data["a"]["class_names"] == list(CLASSES)


def test_sides_name_their_generator_models_and_speed(runs, capsys):
    assert main(["diff", str(runs[0]), str(runs[1]), "--no-save"]) == 0
    out = capsys.readouterr().out
    assert "A: import (run " in out and "B: import (run " in out
    # A: 7 labels (img1 3, img2 1, img3 2, img5 1) in 4 images; B: 6 labels (3 + 1 + 1 + 1) in 4 images
    assert "A: import (run " in out and "1.75 labels per image" in out.split("B: ")[0]
    assert "1.50 labels per image" in out.split("B: ")[1]


def test_model_names_from_provenance():
    from labelgen.review.diff import model_names

    provenance = {"generator": "zip", "random_weights": False,
                  "semantic": {"model": "ViT-B-16", "pretrained": "openai"},
                  "sam": {"model_type": "vit_h", "checkpoint": "/c/sam_vit_h_4b8939.pth", "sha256": "a7bf"},
                  "labeler": {"model": "ViT-L-14"}, "timings": [1, 2]}
    assert model_names(provenance) == ["labeler: ViT-L-14", "sam: vit_h/sam_vit_h_4b8939.pth",
                                       "semantic: ViT-B-16/openai"]
    assert model_names({"generator": "sam3", "model": "sam3", "weights": "/w/sam3.pt"}) == ["sam3: sam3"]
