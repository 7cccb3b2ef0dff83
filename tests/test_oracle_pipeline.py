"""Oracle check of the whole zip pipeline on the 128 real coco128-seg images (``docs/oracle-check.md``).

``zip-oracle`` (``labelgen.testing.oracle``) replaces CLIP's two stages and SAM with oracles built from
the ground truth; the class gate, the real k-means, stage 3 discovery, box scaling, scoring, NMS, the
run store, ``filter``, ``export`` and ``eval`` stay real. Run through the CLI: ``run`` -> ``filter
--save oracle`` -> ``export --filtered oracle --format coco``; the export is scored with pycocotools
against the ground truth imported and exported by ``labelgen import`` / ``export``, and ``labelgen eval``
must give the same numbers.

Measured (segm, all 128 images, grid stride 4 px, min_cells 25 scaled to a 2048 reference short side,
mask NMS IoU 0.7 with intersection-over-smaller off):

    AP 0.719   AP50 0.720   AP75 0.720   AP_small 0.330   AP_medium 0.937   AP_large 0.969

Medium and large objects are recovered almost entirely. Small objects (< 32² px) are lost because a
Zip instance is the *interior* of an object: the boundary cells form their own cluster, whose thin
ring fragments fail the box-to-area test. At a 4-px stride the ring is 4 px on every side, so of the
408 small objects 202 have no interior cell at all and 96 more have fewer interior cells than the
minimum (4-39 cells depending on the image size, ~350 px² on a 480-px short side); 105 are found.
The other losses (medium 23, large 8) are objects that occluders cut into pieces whose boxes frame
another object better, and interiors under the minimum.

With the default ``nms_ios`` 0.9 (applied afterwards as a filter here) AP_large drops to 0.890 and
AP_medium to 0.810: COCO masks nest (food in a bowl, a person in a bus), and the
intersection-over-smaller rule cannot tell a contained object from a part.
"""
import contextlib
import io
import json
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the real k-means: the `models` extra
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from labelgen.cli import main as cli_main
from labelgen.store.status import run_status
from labelgen.generators.zip.kmeans import kmeans

from conftest import COCO128, plugin_imported

IMAGES = COCO128 / "images" / "train2017"
METRICS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
RECIPE = """\
description: zip pipeline with ground-truth oracles for CLIP and SAM (tests only)
generator:
  name: zip-oracle
  gt_root: {gt_root}
  split: train2017
  grid_stride: 4          # 160x120 cells on 640x480: the paper's density (2048/16 = 128 cells per short side)
  part_size: 8
  map_size: 128
  map_coverage: visible
  predicted_iou: box_iou
  discovery:
    activation_ratio: 0.7
    min_activated_fraction: 0.3
    max_box_to_area: 3.0
    min_cells: 25                          # a quarter of the release's 100 ...
    min_cells_reference_short_side: 2048   # ... at the paper's resolution: ~350 px2 on a 480-px short side
    cluster_visits: all   # the oracle's k is its region count: the release's most_common(20) cut does not apply
{fixes}  sam:
    nms_iou: 0.7
    nms_ios: {nms_ios}          # COCO masks nest (food in a bowl); see test_nested_masks_are_lost_to_ios_nms
images: {{compute_sha256: false}}
store: {{shard_size: 32}}
execution: {{workers: 1, device: cpu}}
"""


def _cli(*argv):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert cli_main([str(a) for a in argv]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def oracle():
    """``labelgen.testing.oracle``, imported for this module only. Importing it registers "zip-oracle",
    which other tests (the ``labelgen generators`` listing) must not see, so the registry, the loaded
    plugins and the module cache are restored afterwards."""
    with plugin_imported("labelgen.testing.oracle") as module:
        yield module


ALL_FIXES = """\
    box_margin_cells: 1
    fragment_connectivity: 8
    recover_small: true
    nms_containment: same_class
    duplicate_class: evidence
"""


@pytest.fixture(scope="module")
def oracle_run(oracle, tmp_path_factory):
    return _oracle_run(tmp_path_factory, "oracle", fixes="", nms_ios=1.0)


@pytest.fixture(scope="module")
def oracle_run_fixed(oracle, tmp_path_factory):
    """The same run with every method fix of docs/oracle-check.md on (and IoS NMS 0.9, within classes)."""
    return _oracle_run(tmp_path_factory, "oracle-fixed", fixes=ALL_FIXES, nms_ios=0.9)


@pytest.fixture(scope="module")
def oracle_run_fixed_16(oracle, tmp_path_factory):
    """All fixes with the smallest instance lowered from 25 to 16 cells at the 2048 reference (bench/bench_oracle.py)."""
    return _oracle_run(tmp_path_factory, "oracle-fixed-16", fixes=ALL_FIXES, nms_ios=0.9, min_cells=16)


def _oracle_run(tmp_path_factory, name, *, fixes, nms_ios, min_cells=25):
    if not IMAGES.is_dir():
        pytest.skip(f"coco128-seg not found at {COCO128} (set LABELGEN_COCO128)")
    folder = tmp_path_factory.mktemp(name)
    recipe = folder / "zip-oracle.yaml"
    text = RECIPE.format(gt_root=json.dumps(str(COCO128)), fixes=fixes, nms_ios=nms_ios)
    assert text.count("    min_cells: 25 ") == 1
    recipe.write_text(text.replace("    min_cells: 25 ", f"    min_cells: {min_cells} "), encoding="utf-8")
    run_dir = folder / "run"
    start = time.perf_counter()
    _cli("run", recipe, "--plugin", "labelgen.testing.oracle", "--images", IMAGES, "--out", run_dir, "--no-progress")
    seconds = time.perf_counter() - start
    _cli("filter", run_dir, "--min-confidence", "0.05", "--save", "oracle")
    _cli("export", run_dir, "--filtered", "oracle", "--format", "coco", "--out", folder / "pred")
    _cli("import", COCO128, "--format", "yolo", "--split", "train2017", "--out", folder / "gt-run")
    _cli("export", folder / "gt-run", "--format", "coco", "--out", folder / "gt")
    return {"run_dir": run_dir, "pred": folder / "pred" / "annotations.json",
            "gt": folder / "gt" / "annotations.json", "run_seconds": seconds}


def _cocoeval_segm(gt_json, pred_json):
    """pycocotools segm stats of an exported prediction COCO file against an exported ground truth."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        pred = json.loads(pred_json.read_text(encoding="utf-8"))
        assert [c["name"] for c in pred["categories"]] == [c["name"] for c in gt.dataset["categories"]]
        gt_id = {image["file_name"]: image["id"] for image in gt.dataset["images"]}
        pred_id = {image["id"]: gt_id[image["file_name"]] for image in pred["images"]}
        results = [{"image_id": pred_id[a["image_id"]], "category_id": a["category_id"],
                    "segmentation": a["segmentation"], "score": a["score"]} for a in pred["annotations"]]
        run = COCOeval(gt, gt.loadRes(results), "segm")
        run.evaluate()
        run.accumulate()
        run.summarize()
    return dict(zip(METRICS, (float(v) for v in run.stats[:6])))


def test_every_image_runs_and_kmeans_returns_the_oracle_partition(oracle_run):
    status = run_status(oracle_run["run_dir"])
    assert status["images"] == {"planned": 128, "done": 128, "ok": 128, "failed": 0}, status
    assert status["shards"]["failed"] == 0 and status["instances"] > 0
    assert oracle_run["run_seconds"] < 60


def test_oracle_recovers_medium_and_large_objects(oracle_run):
    stats = _cocoeval_segm(oracle_run["gt"], oracle_run["pred"])
    print({name: round(value, 4) for name, value in stats.items()})
    assert stats["AP_medium"] >= 0.9 and stats["AP_large"] >= 0.9, stats
    assert stats["AP_small"] < 0.5, stats  # lost at this stride and minimum size: module docstring
    assert stats["AP"] == pytest.approx(0.719, abs=0.01), stats  # the documented figures


def test_labelgen_eval_agrees_with_the_exported_coco(oracle_run):
    stats = _cocoeval_segm(oracle_run["gt"], oracle_run["pred"])
    payload = json.loads(_cli("eval", oracle_run["run_dir"], "--filtered", "oracle", "--gt", COCO128,
                              "--gt-split", "train2017", "--json"))
    assert payload["class_aware"] and payload["images"]["matched"] == 128
    for name, value in stats.items():
        assert payload["metrics"]["segm"][name] == pytest.approx(value, abs=1e-9), name


def test_the_method_fixes_recover_small_objects_and_keep_medium_and_large(oracle_run, oracle_run_fixed):
    """docs/oracle-check.md, "The fixes, measured": all five together (measured 0.529 / 0.955 / 0.972
    against 0.330 / 0.937 / 0.969 without them). The issue's AP_small target 0.6 is not reached."""
    before = _cocoeval_segm(oracle_run["gt"], oracle_run["pred"])
    after = _cocoeval_segm(oracle_run_fixed["gt"], oracle_run_fixed["pred"])
    print({name: (round(before[name], 4), round(after[name], 4)) for name in METRICS})
    assert after["AP_small"] > before["AP_small"] + 0.15, (before, after)
    assert after["AP_medium"] >= 0.95 and after["AP_large"] >= 0.95, after
    assert after["AP"] == pytest.approx(0.789, abs=0.01), after  # the documented figure


def test_a_lower_minimum_size_with_the_fixes_reaches_the_small_object_target(oracle_run_fixed, oracle_run_fixed_16):
    """docs/oracle-check.md, "What decides AP_small": the discovery rules are not what is left; the minimum
    instance size is. At 16 cells @2048 (instead of 25) the fixes give AP_small >= 0.6 (measured 0.620) with
    AP_medium and AP_large >= 0.95, and the lower minimum costs nothing on medium and large objects."""
    at_25 = _cocoeval_segm(oracle_run_fixed["gt"], oracle_run_fixed["pred"])
    at_16 = _cocoeval_segm(oracle_run_fixed_16["gt"], oracle_run_fixed_16["pred"])
    assert at_16["AP_small"] >= 0.6 > at_25["AP_small"], (at_16, at_25)
    assert at_16["AP_medium"] >= at_25["AP_medium"] - 0.005 and at_16["AP_large"] >= at_25["AP_large"] - 0.005
    assert at_16["AP_medium"] >= 0.95 and at_16["AP_large"] >= 0.95, at_16


def test_nested_masks_are_lost_to_ios_nms(oracle_run):
    payload = json.loads(_cli("eval", oracle_run["run_dir"], "--gt", COCO128, "--gt-split", "train2017",
                              "--set", "nms_ios=0.9", "--set", "nms_iou=0.7", "--json"))
    before, after = payload["before"]["metrics"]["segm"], payload["after"]["metrics"]["segm"]
    print({name: (round(before[name], 4), round(after[name], 4)) for name in METRICS})
    assert after["AP_large"] < before["AP_large"] - 0.03


# -- the oracle's own pieces ------------------------------------------------------------------------
def test_edge_cells_are_a_4_connected_ring_around_the_interior(oracle):
    owner = np.zeros((9, 9), np.int64)
    for row in range(1, 8):  # a staircase-bordered triangle
        owner[row, 1:row + 1] = 1
    edges = oracle.edge_cells(owner)
    interior = (owner == 1) & ~edges
    from scipy import ndimage

    assert ndimage.label(edges)[1] == 1  # default structure: 4-connected
    grown = ndimage.binary_dilation(interior)  # 4-neighbours of the interior
    assert not (grown & (owner != 1)).any()


def test_real_kmeans_returns_the_oracle_partition_with_the_oracles_seeds(oracle):
    owner = np.zeros((40, 48), np.int64)
    owner[5:30, 4:20] = 1
    owner[8:36, 20:44] = 2  # touches instance 1
    owner[2:4, 40:46] = 3  # two cells high: all edge, no region of its own
    features, seeds, expected = oracle.oracle_features(owner, part_size=8)
    labels, _, _ = kmeans(torch.from_numpy(features), len(seeds), 100, 1e-5, torch.from_numpy(seeds))
    assert np.array_equal(labels.numpy().reshape(owner.shape), expected)
    assert len(np.unique(expected)) == 1 + 2 + 2 + 1  # background, 2 colours x 2 instances, edges


def test_sam_oracle_returns_the_ground_truth_mask_with_the_best_box(oracle):
    masks = np.zeros((2, 20, 20), bool)
    masks[0, 2:10, 2:10] = True
    masks[1, 8:18, 5:15] = True
    truth = oracle.OracleImage(masks, np.array([0, 1]), np.array([[2, 2, 10, 10], [5, 8, 15, 18]], float),
                               oracle.paint_owners(masks))
    binding = oracle._Binding()
    binding.image = truth
    result = oracle.OracleRefiner("box_iou", binding).refine(
        np.zeros((20, 20, 3), np.uint8), np.array([[5, 9, 15, 18], [2, 2, 9, 10], [0, 18, 2, 20]], np.float32))
    assert np.array_equal(result.masks[0], masks[1]) and np.array_equal(result.masks[1], masks[0])
    assert not result.masks[2].any() and result.predicted_iou[2] == 0
    assert result.predicted_iou[0] == pytest.approx(90 / 100) and result.stability_score[0] == 1
