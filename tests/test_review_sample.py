"""Review samples (issue 13, contract A): stratified seeded sampling, the record, the simulated
reviewer through real FiftyOne, and pull writing verdicts.jsonl sealed in the reviewed copy."""
from __future__ import annotations

import json

import numpy as np
import pytest

from labelgen.errors import ConfigError
from labelgen.exports.fiftyone import FIELD
from labelgen.exports.importers import ImportedDataset, write_imported_run
from labelgen.exports.source import open_export_source
from labelgen.review.review import pull_review
from labelgen.review.sample import (SAMPLE_FORMAT, choose_sample, export_sample, read_sample, sample_path,
                                    stratum_of)
from labelgen.review.verdicts import ImageVerdicts, LabelVerdict, read_verdicts
from labelgen.store.run_store import read_verified
from labelgen.structures.instances import ImageRecord, Instances
from labelgen.structures.rows import Row
from labelgen.testing import write_synthetic_run
from labelgen.testing.reviewer import simulate_review

CLASSES = ("cat", "dog", "bird")
W, H = 40, 30


def box_mask(x0, y0, x1, y1):
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def instances(boxes, classes, confidence=None):
    masks = np.stack([box_mask(*b) for b in boxes]) if boxes else np.zeros((0, H, W), dtype=bool)
    conf = np.asarray(confidence if confidence is not None else [0.9] * len(boxes), dtype=np.float32)
    return Instances.from_masks(masks, scores={"confidence": conf}, class_ids=np.asarray(classes, dtype=np.int64))


def make_run(root, items):
    """A run of the given ``{image_id: Instances}`` (written as an import)."""
    records = tuple(ImageRecord(name, f"/synthetic/{name}", W, H) for name in sorted(items))
    dataset = ImportedDataset(CLASSES, {"kind": "list", "import": {"format": "test"}}, records,
                              lambda r: Row(r, items[r.image_id]))
    return write_imported_run(dataset, root, shard_size=2)


# -- sampling -------------------------------------------------------------------------------------
@pytest.fixture
def big_run(tmp_path):
    root = tmp_path / "big"
    write_synthetic_run(root, images=300, per_image=3, width=24, height=16, shard_size=64, class_names=CLASSES, seed=3)
    return root


def test_same_seed_same_sample_and_strata_represented(big_run):
    source = open_export_source(big_run)
    a, b = choose_sample(source, 40, seed=7), choose_sample(source, 40, seed=7)
    other = choose_sample(source, 40, seed=8)
    assert a == b and a["size"] == 40 and len(set(a["image_ids"])) == 40
    assert set(a["image_ids"]) != set(other["image_ids"])
    strata = a["strata"]
    assert sum(s["images"] for s in strata.values()) == 300
    assert sum(s["sampled"] for s in strata.values()) == 40
    assert len(strata) <= 40 and all(s["sampled"] >= 1 for s in strata.values())  # every stratum represented
    # each sampled image is in the stratum it is recorded under; counts match the strata
    rows = {row.image.image_id: row for row in source}
    for image_id, key in zip(a["image_ids"], a["image_strata"]):
        assert stratum_of(rows[image_id], CLASSES) == key
    assert {k: a["image_strata"].count(k) for k in strata} == {k: s["sampled"] for k, s in strata.items()}
    # proportional beyond the one each: the biggest stratum gets the most
    biggest = max(strata, key=lambda k: strata[k]["images"])
    assert strata[biggest]["sampled"] == max(s["sampled"] for s in strata.values())


def test_small_n_and_all_and_bad_input(big_run):
    source = open_export_source(big_run)
    few = choose_sample(source, 3, seed=1)
    assert few["size"] == 3 and len(set(few["image_strata"])) == 3  # one per stratum when N < strata
    everything = choose_sample(source, 1000, seed=1)
    assert everything["size"] == 300
    with pytest.raises(ConfigError, match="sample size"):
        choose_sample(source, 0)
    with pytest.raises(ConfigError, match="band"):
        choose_sample(source, 5, bands=(0.7, 0.2))


def test_stratum_of_bands_and_classes(tmp_path):
    row = Row(ImageRecord("a", "/a", W, H), instances([(0, 0, 5, 5), (5, 5, 9, 9), (1, 1, 3, 3)], [1, 2, 1],
                                                      [0.1, 0.6, 0.3]))
    assert stratum_of(row, CLASSES) == "0.25-0.5|dog"  # median 0.3, majority class dog
    assert stratum_of(Row(ImageRecord("b", "/b", W, H), instances([], [])), CLASSES) == "none|none"


# -- hand-built review through real FiftyOne --------------------------------------------------------
def hand_built(tmp_path):
    """Five images, one case each: correct, wrong class, poor mask, false positive, missed object."""
    run_items = {
        "a_correct.png": instances([(2, 2, 12, 12)], [0], [0.9]),
        "b_wrong.png": instances([(2, 2, 12, 12)], [1], [0.8]),
        "c_poor.png": instances([(2, 2, 12, 12)], [0], [0.4]),
        "d_fp.png": instances([(20, 15, 30, 25), (2, 2, 12, 12)], [0, 2], [0.2, 0.95]),
        "e_missed.png": instances([(2, 2, 12, 12)], [0], [0.7]),
    }
    truth = {
        "a_correct.png": instances([(2, 2, 12, 12)], [0]),
        "b_wrong.png": instances([(2, 2, 12, 12)], [0]),  # a cat labelled dog
        "c_poor.png": instances([(2, 2, 20, 20)], [0]),  # IoU 100/324 = 0.31
        "d_fp.png": instances([(2, 2, 12, 12)], [2]),  # the bird is right, the other label is nothing
        "e_missed.png": instances([(2, 2, 12, 12), (25, 10, 35, 20)], [0, 1]),  # the dog was missed
    }
    return make_run(tmp_path / "run", run_items), truth


EXPECTED = {
    "a_correct.png": ImageVerdicts("a_correct.png", (LabelVerdict(0, 0, "correct"),), 0, False),
    "b_wrong.png": ImageVerdicts("b_wrong.png", (LabelVerdict(0, 1, "wrong_class"),), 1, False),
    "c_poor.png": ImageVerdicts("c_poor.png", (LabelVerdict(0, 0, "poor_mask"),), 1, False),
    "d_fp.png": ImageVerdicts("d_fp.png", (LabelVerdict(0, 0, "false_positive"), LabelVerdict(1, 2, "correct")),
                              0, False),
    "e_missed.png": ImageVerdicts("e_missed.png", (LabelVerdict(0, 0, "correct"),), 1, False),
}


def test_simulated_reviewer_and_pull_verdicts(tmp_path, fiftyone_db, dataset_name):
    fo = fiftyone_db
    root, truth = hand_built(tmp_path)
    done = export_sample(root, 5, seed=0, dataset_name=dataset_name)
    record = read_sample(root, dataset_name)
    assert record["format"] == SAMPLE_FORMAT and record["name"] == dataset_name and record["seed"] == 0
    assert sorted(record["image_ids"]) == sorted(truth) and done.export.images == 5
    counts = simulate_review(fo, dataset_name, truth, accept_tag=True)
    assert counts["correct"] == 3 and counts["wrong_class"] == counts["poor_mask"] == counts["false_positive"] == 1
    assert counts["drawn"] == 3  # the cat under the dog label, the cat under the poor mask, the missed dog
    # real tags on real FiftyOne labels, and a drawn Detection for the missed object
    samples = {s["labelgen_image_id"]: s for s in fo.load_dataset(dataset_name)}
    assert [d.tags for d in samples["d_fp.png"][FIELD].detections] == [["false_positive"], ["accepted"]]
    drawn = [d for d in samples["e_missed.png"][FIELD].detections if getattr(d, "labelgen_position", None) is None]
    assert [d.label for d in drawn] == ["dog"] and drawn[0].mask.sum() == 100

    pull_review(root, dataset_name, name="s0")
    got = read_verdicts(root, "s0")
    assert [v.image_id for v in got] == record["image_ids"]  # sample order
    assert {v.image_id: v for v in got} == EXPECTED
    copy = root / "reviewed" / "s0"
    read_verified(copy, "verdicts.jsonl")  # sealed by checksums.json
    assert "verdicts.jsonl" in json.loads((copy / "checksums.json").read_text())["files"]
    # the reviewed copy itself still reads (drawn labels become added instances)
    reviewed = {row.image.image_id: row.instances for row in open_export_source(root, reviewed="s0")}
    assert len(reviewed["e_missed.png"]) == 2


def test_app_conventions_rejected_deleted_missing_tag_and_edits(tmp_path, fiftyone_db, dataset_name):
    fo = fiftyone_db
    root, _ = hand_built(tmp_path)
    export_sample(root, 5, seed=0, dataset_name=dataset_name)
    samples = {s["labelgen_image_id"]: s for s in fo.load_dataset(dataset_name)}
    samples["a_correct.png"][FIELD].detections[0].tags.append("rejected")
    samples["b_wrong.png"][FIELD].detections[0].label = "cat"  # class changed instead of a tag
    samples["d_fp.png"][FIELD].detections = samples["d_fp.png"][FIELD].detections[1:]  # label 0 deleted
    samples["e_missed.png"].tags.append("missing_object")
    for s in samples.values():
        s.save()
    pull_review(root, dataset_name, name="s1")
    got = {v.image_id: v for v in read_verdicts(root, "s1")}
    assert got["a_correct.png"].labels[0].verdict == "false_positive"
    assert got["b_wrong.png"].labels[0].verdict == "wrong_class"
    assert [v.verdict for v in got["d_fp.png"].labels] == ["false_positive", "correct"]
    assert got["e_missed.png"].missing_object_tag and got["e_missed.png"].missed == 0
    assert got["c_poor.png"].labels[0].verdict == "correct"  # untouched: accepted


def test_plain_dataset_pull_writes_no_verdicts(tmp_path, fiftyone_db, dataset_name):
    from labelgen.exports.fiftyone import export_fiftyone

    root, _ = hand_built(tmp_path)
    export_fiftyone(open_export_source(root), dataset_name)
    pull_review(root, dataset_name, name="plain")
    assert not (root / "reviewed" / "plain" / "verdicts.jsonl").exists()


def test_cli_review_sample_no_app(tmp_path, fiftyone_db, dataset_name, big_run, capsys):
    from labelgen.cli import main

    assert main(["review", str(big_run), "--sample", "12", "--seed", "5", "--dataset", dataset_name, "--no-app"]) == 0
    out = capsys.readouterr().out
    assert "sampled 12 images" in out and f"labelgen pull {big_run} --dataset {dataset_name}" in out
    record = json.loads(sample_path(big_run, dataset_name).read_text())
    assert record["size"] == 12 and record["seed"] == 5
    assert record["image_ids"] == choose_sample(open_export_source(big_run), 12, seed=5)["image_ids"]
    dataset = fiftyone_db.load_dataset(dataset_name)
    assert sorted(dataset.distinct("labelgen_image_id")) == sorted(record["image_ids"])


# -- coco128: ground truth perturbed, reviewed from ground truth ------------------------------------
def test_simulated_review_on_coco128_agrees_with_the_noise(tmp_path, coco128_images, fiftyone_db, dataset_name):
    from collections import Counter

    from conftest import COCO128
    from labelgen.exports.importers import import_yolo
    from conftest import plugin_imported

    with plugin_imported("labelgen.testing.noisy") as noisy:
        NoisyConfig, corrupt, image_rng = noisy.NoisyConfig, noisy.corrupt, noisy.image_rng

    gt_dataset = import_yolo(COCO128, split="train2017")
    gt_root = write_imported_run(gt_dataset, tmp_path / "gt")
    names = gt_dataset.class_names
    config = NoisyConfig(labels_dir=str(COCO128 / "labels" / "train2017"), false_positives=0.5)
    noisy = {row.image.image_id: (row.image, corrupt(row.instances, len(names), config,
                                                     image_rng(1, row.image.image_id)))
             for row in open_export_source(gt_root) if row.instances is not None}
    records = tuple(noisy[k][0] for k in sorted(noisy))
    run_root = write_imported_run(ImportedDataset(names, {"kind": "list", "import": {"format": "test"}}, records,
                                                  lambda r: Row(r, noisy[r.image_id][1])), tmp_path / "noisy")
    record = export_sample(run_root, 24, seed=3, dataset_name=dataset_name).record
    counts = simulate_review(fiftyone_db, dataset_name, gt_root)
    assert counts["no_ground_truth"] == 0 and counts["drawn"] > 0
    pull_review(run_root, dataset_name, name="coco")
    verdicts = read_verdicts(run_root, "coco")
    assert [v.image_id for v in verdicts] == record["image_ids"]
    agree: dict[str, Counter] = {}
    for item in verdicts:
        kinds = noisy[item.image_id][1].attributes["noise"]
        assert len(item.labels) == len(kinds)
        for label in item.labels:
            agree.setdefault(kinds[label.index], Counter())[label.verdict] += 1
    rate = {kind: c.most_common(1)[0] + (sum(c.values()),) for kind, c in agree.items()}
    assert rate["kept"][0] == "correct" and rate["kept"][1] >= 0.85 * rate["kept"][2], agree
    assert rate["false_positive"][0] == "false_positive" and rate["false_positive"][1] >= 0.8 * rate["false_positive"][2]
    assert rate["relabelled"][0] == "wrong_class", agree
    assert agree["poor_mask"]["correct"] <= 0.2 * sum(agree["poor_mask"].values()), agree
    # every ground-truth object of a sampled image is either under a correct label or drawn as missed
    gt_objects = {row.image.image_id: len(row.instances) for row in open_export_source(gt_root) if row.instances}
    for item in verdicts:
        assert item.correct + item.missed == gt_objects.get(item.image_id, 0), item.image_id


def test_cli_review_no_app_exports_everything(big_run, fiftyone_db, dataset_name, capsys):
    from labelgen.cli import main

    assert main(["review", str(big_run), "--dataset", dataset_name, "--no-app"]) == 0
    assert "exported 300 images" in capsys.readouterr().out
    assert len(fiftyone_db.load_dataset(dataset_name)) == 300
