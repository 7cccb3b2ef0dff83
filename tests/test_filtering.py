"""Filtering after the fact: every option, one reason per rejection, summary, sweep, saved copies."""
import dataclasses
import inspect
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO, make_recipe
from labelgen.atomic import read_jsonl_gz
from labelgen.errors import ConfigError, ValidationError
from labelgen.postprocess.filter_store import FilterSummary, filter_run, save_filtered, sweep
from labelgen.postprocess.filtering import REASONS, FilterConfig, count_kept, filter_instances, load_filter_config
from labelgen.structures.instances import ImageRecord, Instances
from labelgen.structures.masks import rle_areas
from labelgen.structures.rows import Row
from labelgen.engine.runner import run
from labelgen.structures.scoring import ScoringConfig
from labelgen.engine.sources import FolderSource
from labelgen.store.run_store import RunStore

H, W = 20, 30  # frame of the hand-built cases: 600 px


def rect(x1, y1, x2, y2):
    mask = np.zeros((H, W), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def make(masks, confidence, class_ids=None, **scores):
    columns = {"confidence": confidence, **scores}
    return Instances.from_masks(np.stack(masks), scores=columns,
                                class_ids=None if class_ids is None else np.asarray(class_ids))


A = rect(5, 5, 10, 10)  # 25 px
DUP = rect(5, 5, 10, 11)  # 30 px, A inside it: IoU 25/30, IoS 1
B = rect(12, 5, 17, 10)  # 25 px, disjoint from A
C = rect(20, 2, 28, 12)  # 80 px
TINY = rect(2, 15, 4, 17)  # 4 px
LARGE = rect(1, 1, 29, 19)  # 504 px = 0.84 of the frame
OUTER = rect(2, 2, 22, 18)  # 320 px
INNER = rect(5, 5, 9, 9)  # 16 px inside OUTER: IoU 0.05, IoS 1 (boxes alike)
EDGE = rect(0, 5, 4, 9)  # touches the left edge
ONE_IN = rect(1, 5, 4, 9)  # 1 px from the left edge
TWO_IN = rect(2, 5, 4, 9)  # 2 px from the left edge
NEAR_BOTTOM = rect(10, 15, 14, 19)  # last row 18: 1 px from the bottom edge
NAMES = ("cat", "dog")

# name: (masks, confidence, class_ids, options, class_names, kept indices, {index: reason})
CASES = {
    "defaults keep everything": ([A, B, TINY], [0.1, 0.9, 0.0], None, {}, None, [0, 1, 2], {}),
    "global minimum": ([A, B], [0.4, 0.6], None, {"min_confidence": 0.5}, None, [1], {0: "low_confidence"}),
    "confidence equal to the minimum stays": ([A], [0.5], None, {"min_confidence": 0.5}, None, [0], {}),
    "per-class minimum by name replaces the global": (
        [A, B, C], [0.4, 0.4, 0.8], [0, 1, 1],
        {"min_confidence": 0.5, "min_confidence_per_class": {"cat": 0.3, "dog": 0.6}}, NAMES,
        [0, 2], {1: "low_confidence_class"}),
    "a class without its own minimum uses the global one": (
        [A, B], [0.4, 0.4], [0, 1], {"min_confidence": 0.5, "min_confidence_per_class": {"dog": 0.1}}, NAMES,
        [1], {0: "low_confidence"}),
    "per-class minimum by id string when the run has no names": (
        [A, B], [0.4, 0.4], [0, 1], {"min_confidence": 0.5, "min_confidence_per_class": {"0": 0.3}}, None,
        [0], {1: "low_confidence"}),
    "class-agnostic: only the global minimum applies": (
        [A, B], [0.4, 0.6], None, {"min_confidence": 0.5, "min_confidence_per_class": {"cat": 0.1}}, NAMES,
        [1], {0: "low_confidence"}),
    "absolute area bounds": (
        [TINY, A, LARGE], [0.9] * 3, None, {"min_area": 5, "max_area": 100}, None,
        [1], {0: "too_small", 2: "too_large"}),
    "areas equal to the bounds stay": ([TINY, A], [0.9] * 2, None, {"min_area": 4, "max_area": 25}, None, [0, 1], {}),
    "relative area bounds": (
        [TINY, A, LARGE], [0.9] * 3, None, {"min_area_fraction": 0.01, "max_area_fraction": 0.5}, None,
        [1], {0: "too_small_fraction", 2: "too_large_fraction"}),
    "absolute area is checked before relative": (
        [TINY], [0.9], None, {"min_area": 5, "min_area_fraction": 0.01}, None, [], {0: "too_small"}),
    "border, margin 0: only masks on the edge": (
        [EDGE, ONE_IN, NEAR_BOTTOM], [0.9] * 3, None, {"drop_border": True}, None, [1, 2], {0: "touches_border"}),
    "border, margin 1": (
        [EDGE, ONE_IN, TWO_IN, NEAR_BOTTOM], [0.9] * 4, None, {"drop_border": True, "border_margin": 1}, None,
        [2], {0: "touches_border", 1: "touches_border", 3: "touches_border"}),
    "a margin alone does not drop anything": ([EDGE], [0.9], None, {"border_margin": 3}, None, [0], {}),
    "nested small mask: IoS suppresses where IoU does not": (
        [OUTER, INNER], [0.9, 0.8], None, {"nms_iou": 0.5, "nms_ios": 0.8}, None, [0], {1: "duplicate_ios"}),
    "nested small mask survives IoU-only NMS": (
        [OUTER, INNER], [0.9, 0.8], None, {"nms_iou": 0.5}, None, [0, 1], {}),
    "near-identical masks: IoU is the reason when it fired": (
        [A, DUP], [0.7, 0.9], None, {"nms_iou": 0.5, "nms_ios": 0.8}, None, [1], {0: "duplicate_iou"}),
    "within-class NMS keeps other classes": (
        [A, DUP], [0.7, 0.9], [0, 1], {"nms_iou": 0.5, "nms_across_classes": False}, None, [0, 1], {}),
    "NMS across classes": ([A, DUP], [0.7, 0.9], [0, 1], {"nms_iou": 0.5}, None, [1], {0: "duplicate_iou"}),
    "a mask rejected earlier suppresses nothing": (
        [LARGE, A], [0.9, 0.5], None, {"max_area": 100, "nms_ios": 0.5}, None, [1], {0: "too_large"}),
    "max instances keeps the top confidences": (
        [A, B, C, TINY], [0.5, 0.9, 0.7, 0.8], None, {"max_instances": 2}, None,
        [1, 3], {0: "over_max_instances", 2: "over_max_instances"}),
    "the first step that rejects gives the reason": (
        [TINY, A, DUP], [0.1, 0.9, 0.95], None, {"min_confidence": 0.5, "min_area": 10, "nms_iou": 0.5,
                                                  "max_instances": 1}, None,
        [2], {0: "low_confidence", 1: "duplicate_iou"}),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_filter_table(case):
    masks, confidence, class_ids, options, class_names, kept, reasons = CASES[case]
    instances = make(masks, confidence, class_ids)
    result = filter_instances(instances, FilterConfig(**options), class_names)
    assert list(result.kept_indices) == kept
    assert {i: reason for i, reason, _ in result.rejected} == reasons
    assert result.kept == instances[np.asarray(kept, dtype=np.int64)]


def test_nested_mask_details_name_the_suppressor_and_both_ratios():
    result = filter_instances(make([INNER, OUTER], [0.8, 0.9]), FilterConfig(nms_iou=0.5, nms_ios=0.8))
    index, reason, detail = result.rejected[0]
    assert (index, reason) == (0, "duplicate_ios")
    assert detail == {"suppressed_by": 1, "iou": 0.05, "ios": 1.0}
    boxes = make([INNER, OUTER], [0.8, 0.9]).boxes_xyxy
    box_areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert box_areas[0] / box_areas[1] == pytest.approx(0.05)  # inner box inside the outer: box IoU is low too


def test_class_minimum_detail_names_the_class():
    config = FilterConfig(min_confidence_per_class={"dog": 0.6})
    result = filter_instances(make([A, B], [0.9, 0.4], [0, 1]), config, NAMES)
    assert result.rejected == ((1, "low_confidence_class", {"confidence": 0.4, "min_confidence": 0.6, "class": "dog"}),)


def test_fill_holes_changes_area_and_box_of_changed_masks_only():
    ring = rect(5, 5, 15, 15) & ~rect(8, 8, 12, 12)  # 84 px around a 16 px hole
    open_c = rect(18, 2, 24, 8) & ~rect(20, 4, 24, 6)  # the gap reaches the box edge: no hole
    loose_boxes = [[0, 0, 25, 20], [16, 0, 28, 10]]
    instances = Instances.from_masks(np.stack([ring, open_c]), boxes_xyxy=loose_boxes,
                                     scores={"confidence": [0.9, 0.8]})
    kept = filter_instances(instances, FilterConfig(fill_holes=True)).kept
    assert rle_areas(kept.masks_rle).tolist() == [100, int(open_c.sum())]
    np.testing.assert_array_equal(kept.masks()[0], rect(5, 5, 15, 15))
    assert kept.boxes_xyxy.tolist() == [[5, 5, 15, 15], loose_boxes[1]]  # the changed mask's tight box
    assert kept.masks_rle[1] == instances.masks_rle[1]


def test_speckles_are_removed_with_8_connectivity():
    blob_and_speckle = A | rect(20, 15, 22, 16)  # 25 px + a 2 px speckle
    diagonal = np.zeros((H, W), dtype=bool)
    diagonal[[2, 3, 4], [20, 21, 22]] = True  # one 8-connected component of 3 px
    instances = make([blob_and_speckle, diagonal], [0.9, 0.8])
    kept = filter_instances(instances, FilterConfig(min_component_area=3)).kept
    np.testing.assert_array_equal(kept.masks()[0], A)
    assert kept.boxes_xyxy.tolist() == [[5, 5, 10, 10], [20, 2, 23, 5]]
    assert kept.masks_rle[1] == instances.masks_rle[1]


@pytest.mark.parametrize("options", [{"min_component_area": 3}, {"min_component_area": 3, "fill_holes": True}])
def test_masks_emptied_by_cleanup_are_rejected_first(options):
    two_pixels = rect(0, 0, 1, 1) | rect(10, 10, 11, 11)  # area 2 < 3: emptied without decoding
    two_pairs = rect(0, 0, 2, 1) | rect(10, 10, 12, 11)  # area 4, parts of 2: emptied after decoding
    result = filter_instances(make([two_pixels, two_pairs, A], [0.9] * 3), FilterConfig(min_area=10, **options))
    assert result.rejected == ((0, "empty_after_cleanup", {"area_before": 2}),
                               (1, "empty_after_cleanup", {"area_before": 4}))
    assert result.kept_indices == (2,)


def test_scoring_recompute_changes_which_survive():
    instances = make([A, B], [0.9, 0.1], a=[0.2, 0.9], b=[0.2, 0.9])
    stored = filter_instances(instances, FilterConfig(min_confidence=0.5))
    rescored = filter_instances(instances, FilterConfig(min_confidence=0.5, scoring=ScoringConfig(components=("a", "b"))))
    assert stored.kept_indices == (0,)
    assert rescored.kept_indices == (1,) and rescored.rejected[0][1] == "low_confidence"
    np.testing.assert_allclose(rescored.kept.scores["confidence"], [0.9], rtol=1e-6)


def test_empty_result_and_missing_column():
    assert len(filter_instances(Instances.empty(H, W), FilterConfig(min_confidence=0.5, nms_iou=0.3)).kept) == 0
    no_confidence = Instances.from_masks(np.stack([A]), scores={"other": [0.5]})
    assert filter_instances(no_confidence, FilterConfig(min_area=3)).kept_indices == (0,)  # not needed: fine
    with pytest.raises(ValidationError, match="'confidence' is not a score column .* \\['other'\\]"):
        filter_instances(no_confidence, FilterConfig(max_instances=1))


@pytest.mark.parametrize("class_names, key, message", [
    (NAMES, "cta", "'cta' is not a class of this run. Did you mean 'cat'"),
    (None, "cat", "keys must be class ids as strings"),
])
def test_unknown_class_keys_are_refused(class_names, key, message):
    config = FilterConfig(min_confidence_per_class={key: 0.5})
    with pytest.raises(ConfigError, match=message):
        filter_instances(make([A], [0.9], [0]), config, class_names)


def random_instances(rng, n=12, height=24, width=32, classes=3):
    """Rectangles with pixel dropout (holes, speckles); every other one nested in its predecessor."""
    masks = np.zeros((n, height, width), dtype=bool)
    for i in range(n):
        if i % 2 and masks[i - 1].any():
            ys, xs = np.nonzero(masks[i - 1])
            masks[i, ys.min():ys.min() + rng.integers(1, 6), xs.min():xs.min() + rng.integers(1, 6)] = True
        else:
            x1, y1 = rng.integers(0, width - 1), rng.integers(0, height - 1)
            masks[i, y1:rng.integers(y1 + 1, height + 1), x1:rng.integers(x1 + 1, width + 1)] = True
        masks[i] &= rng.random((height, width)) < 0.92
    scores = {"confidence": rng.random(n).round(2).astype(np.float32)}  # rounded: ties happen
    ids = rng.integers(0, classes, n) if classes else None
    return Instances.from_masks(masks, scores=scores, class_ids=ids)


ALL_OPTIONS = dict(min_confidence=0.3, min_confidence_per_class={"1": 0.6}, min_area=6, max_area_fraction=0.4,
                   nms_iou=0.5, nms_ios=0.7, max_instances=4, drop_border=True, border_margin=1,
                   fill_holes=True, min_component_area=3)


@pytest.mark.parametrize("seed", range(6))
def test_every_instance_is_kept_or_has_exactly_one_reason(seed):
    instances = random_instances(np.random.default_rng(seed))
    result = filter_instances(instances, FilterConfig(**ALL_OPTIONS))
    rejected = [i for i, _, _ in result.rejected]
    assert len(rejected) == len(set(rejected))
    assert sorted(rejected + list(result.kept_indices)) == list(range(len(instances)))
    assert {reason for _, reason, _ in result.rejected} <= set(REASONS)
    assert len(result.kept) <= 4
    json.dumps([detail for _, _, detail in result.rejected])  # details are JSON-ready


@pytest.mark.parametrize("per_class", [{}, {"1": 0.6}], ids=["one NMS call", "NMS per survivor set"])
@pytest.mark.parametrize("seed", range(4))
def test_count_kept_equals_filtering_once_per_value(seed, per_class):
    instances = random_instances(np.random.default_rng(100 + seed), n=16)
    config = FilterConfig(**{**ALL_OPTIONS, "min_confidence_per_class": per_class, "max_instances": 5})
    values = [0.0, 0.1, 0.25, 0.3, 0.5, 0.55, 0.7, 0.9, 1.0]
    expected = [len(filter_instances(instances, dataclasses.replace(config, min_confidence=v)).kept) for v in values]
    assert count_kept(instances, config, values).tolist() == expected


@pytest.mark.parametrize("options, message", [
    ({"min_area": -1}, "min_area: expected an integer >= 0"),
    ({"max_instances": True}, "max_instances: expected an integer"),
    ({"min_area": 10, "max_area": 5}, "min_area \\(10\\) must be <= max_area \\(5\\)"),
    ({"max_area_fraction": 1.5}, "max_area_fraction: expected 0.0..1.0"),
    ({"min_area_fraction": 0.6, "max_area_fraction": 0.5}, "min_area_fraction \\(0.6\\) must be <="),
    ({"nms_ios": -0.1}, "nms_ios: expected 0.0..inf"),
    ({"min_confidence": float("nan")}, "min_confidence: expected a finite number"),
    ({"min_confidence_per_class": {"cat": "high"}}, "min_confidence_per_class.cat: expected a finite number"),
    ({"confidence_column": ""}, "confidence_column: expected a score column name"),
    ({"scoring": ScoringConfig(output="other")}, "scoring.output \\('other'\\) must equal confidence_column"),
])
def test_config_validation(options, message):
    with pytest.raises(ConfigError, match=message):
        FilterConfig(**options)


def test_load_filter_config(tmp_path):
    assert load_filter_config(None, []) == FilterConfig()
    got = load_filter_config(None, ["min_confidence=0.4", "filter.nms_iou=0.5", "min_confidence_per_class={0: 0.2}"])
    assert (got.min_confidence, got.nms_iou, dict(got.min_confidence_per_class)) == (0.4, 0.5, {"0": 0.2})
    plain = tmp_path / "plain.yaml"
    plain.write_text("min_area: 3\nscoring: {formula: min, components: [a, b]}\n")
    assert load_filter_config(plain, ["max_instances=2"]) == FilterConfig(
        min_area=3, max_instances=2, scoring=ScoringConfig(formula="min", components=("a", "b")))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("generator: {name: fake}\nfilter:\n  min_area: 7\n")
    assert load_filter_config(recipe, []).min_area == 7


@pytest.mark.parametrize("text, message", [
    ("min_aera: 3\n", "unknown key 'filter.min_aera'. Did you mean 'filter.min_area'"),
    ("filter: {min_area: 3}\nmax_area: 9\n", "put every filter option inside it"),
    ("min_area: 2.5\n", "filter.min_area: expected an integer"),
    ("- 1\n", "must be a mapping"),
])
def test_load_filter_config_errors(tmp_path, text, message):
    path = tmp_path / "f.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_filter_config(path, [])


def test_summary_counts_per_class_and_reason():
    summary = FilterSummary()
    summary.add(filter_instances(make([A, B, C], [0.9, 0.2, 0.8], [0, 1, 1]), FilterConfig(min_confidence=0.5)), NAMES)
    summary.add(filter_instances(make([A, DUP, TINY], [0.9, 0.8, 0.7], [0, 0, 1]),
                                 FilterConfig(min_confidence=0.5, nms_iou=0.5, min_area=5)), NAMES)
    assert summary.to_dict() == {
        "images": 2,
        "reasons": ["low_confidence", "too_small", "duplicate_iou"],
        "classes": {"cat": {"kept": 2, "low_confidence": 0, "too_small": 0, "duplicate_iou": 1, "total": 3},
                    "dog": {"kept": 1, "low_confidence": 1, "too_small": 1, "duplicate_iou": 0, "total": 3}},
        "total": {"kept": 3, "low_confidence": 1, "too_small": 1, "duplicate_iou": 1, "total": 6},
    }
    assert summary.table() == textwrap.dedent("""\
        class  kept  low_confidence  too_small  duplicate_iou  total
        cat       2               0          0              1      3
        dog       1               1          1              0      3
        total     3               1          1              1      6""")


# -- runs -------------------------------------------------------------------------------------
def write_run(root, images):
    """A run directory holding the given ``Instances`` (``None`` = a failed image), shards of 4."""
    recipe = make_recipe()
    store = RunStore(root)
    first = next(i for i in images if i is not None)
    records = [ImageRecord(f"img{i:03d}.png", f"/nowhere/img{i:03d}.png", first.width, first.height)
               for i in range(len(images))]
    store.initialize(recipe, {"kind": "synthetic"}, records)
    for shard in store.iter_plan():
        rows = [_row(record, images[int(record.image_id[3:6])]) for record in shard.images]
        store.commit_shard(shard, rows, {"fingerprint": recipe.fingerprint()}, level=1)
    return store


def _row(record, instances):
    if instances is None:
        return Row.failed(record, "generator_error", "x")
    return Row(record, instances)


@pytest.fixture
def synthetic_run(tmp_path):
    rng = np.random.default_rng(7)
    images = [random_instances(rng, n=int(rng.integers(0, 14)), classes=2) for _ in range(10)]
    images[3] = None
    return write_run(tmp_path / "synthetic", images)


@pytest.fixture
def fake_run(tmp_path, image_dir):
    run(make_recipe(instances_per_image=5, class_names=["a", "b"]), FolderSource(image_dir), tmp_path / "fake")
    return RunStore(tmp_path / "fake")


def kept_by_refiltering(store, config, values, class_names):
    return [sum(len(r.kept) for _, r in filter_run(store, dataclasses.replace(config, min_confidence=v), class_names)
                if r is not None) for v in values]


@pytest.mark.parametrize("per_class", [{}, {"b": 0.6}])
def test_sweep_equals_repeated_filtering_on_a_fake_run(fake_run, per_class):
    config = FilterConfig(min_confidence_per_class=per_class, min_area=10, nms_ios=0.5, max_instances=4,
                          fill_holes=True, min_component_area=2)
    values = np.linspace(0.0, 1.0, 11).tolist()
    got = sweep(fake_run, config, "confidence", values, ["a", "b"])
    assert [v for v, _ in got] == values
    assert [k for _, k in got] == kept_by_refiltering(fake_run, config, values, ["a", "b"])


@pytest.mark.parametrize("per_class", [{}, {"1": 0.5}])
def test_sweep_equals_repeated_filtering_with_overlaps(synthetic_run, per_class):
    config = FilterConfig(**{**ALL_OPTIONS, "min_confidence_per_class": per_class})
    values = [0.0, 0.2, 0.4, 0.6, 0.8]
    counts = [k for _, k in sweep(synthetic_run, config, "confidence", values)]
    assert counts == kept_by_refiltering(synthetic_run, config, values, None)
    assert counts[0] > counts[-1] > 0


def test_filter_run_streams_and_passes_failed_rows(synthetic_run):
    stream = filter_run(synthetic_run, FilterConfig(min_confidence=0.5))
    assert inspect.isgenerator(stream)
    pairs = list(stream)
    assert [row["image"]["image_id"] for row, _ in pairs] == [f"img{i:03d}.png" for i in range(10)]
    assert [result is None for _, result in pairs] == [i == 3 for i in range(10)]


def test_save_filtered_layout_rows_and_round_trip(synthetic_run):
    (synthetic_run.shards_dir / "000002.done.json").unlink()  # shard 2 is not done: not exported
    config = FilterConfig(**ALL_OPTIONS)
    path = save_filtered(synthetic_run, config, "strict")
    assert path == synthetic_run.root / "filtered" / "strict"
    assert sorted(p.name for p in path.iterdir()) == ["000000.jsonl.gz", "000001.jsonl.gz", "checksums.json", "filter.yaml",
                                                      "summary.json"]
    assert load_filter_config(path / "filter.yaml", []) == config
    rows = [row for name in ("000000", "000001") for row in read_jsonl_gz(path / f"{name}.jsonl.gz")]
    originals = {row["image"]["image_id"]: row for row in synthetic_run.iter_rows()}
    kept_total = 0
    for row in rows:
        original = originals[row["image"]["image_id"]]
        if row["status"] == "failed":
            assert row == {**original, "rejected": []}
            continue
        result = filter_instances(Instances.from_dict(original["instances"]), config)
        assert Instances.from_dict(row["instances"]) == result.kept
        assert row["rejected"] == [{"index": i, "reason": r, **d} for i, r, d in result.rejected]
        kept_total += len(result.kept)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["total"]["kept"] == kept_total and summary["images"] == 7 and summary["failed_images"] == 1
    assert summary["shards"] == 2 and summary["name"] == "strict"


def test_save_filtered_replaces_an_existing_copy_completely(synthetic_run):
    first = save_filtered(synthetic_run, FilterConfig(), "v1")
    (first / "stale.txt").write_text("from an earlier export")
    again = save_filtered(synthetic_run, FilterConfig(min_confidence=0.9), "v1")
    assert again == first and not (again / "stale.txt").exists()
    assert load_filter_config(again / "filter.yaml", []).min_confidence == 0.9
    assert sorted(p.name for p in again.parent.iterdir()) == ["v1"]  # no temp or old folders left


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", ".hidden", "a\\b", "x/../../y"])
def test_save_filtered_refuses_names_outside_its_folder(synthetic_run, name):
    with pytest.raises(ConfigError, match="plain folder name"):
        save_filtered(synthetic_run, FilterConfig(), name)
    assert not (synthetic_run.root / "x").exists() and not (synthetic_run.root / "filtered").exists()


def test_filter_code_path_imports_no_model_library(fake_run):
    code = textwrap.dedent(f"""
        import sys
        sys.modules['torch'] = None; sys.modules['open_clip'] = None; sys.modules['segment_anything'] = None
        from labelgen.postprocess.filter_store import filter_run, save_filtered, sweep
        from labelgen.postprocess.filtering import load_filter_config
        from labelgen.store.run_store import RunStore
        store = RunStore({str(fake_run.root)!r})
        config = load_filter_config(None, ["min_confidence=0.2", "nms_ios=0.5", "fill_holes=true"])
        results = [result for _, result in filter_run(store, config)]
        path = save_filtered(store, config, "no-model")
        print(len(results), path.name, sweep(store, config, "confidence", [0.1, 0.9]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("10 no-model [(0.1, ")
    assert (fake_run.root / "filtered" / "no-model" / "summary.json").is_file()
