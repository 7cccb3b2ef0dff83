"""The test-only noisy-oracle generator on coco128: its confidence correlates with correctness, but not
perfectly (AUC of confidence vs matched-at-mask-IoU-0.5, pycocotools), and it is deterministic."""
import contextlib
import io
import json
import sys

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from labelgen.cli import main as cli_main
from labelgen.errors import ConfigError
from labelgen.exports.importers import import_yolo
from labelgen.store.run_store import RunStore
from labelgen.structures.masks import rle_to_pycocotools

from conftest import COCO128, plugin_imported

IMAGES = COCO128 / "images" / "train2017"
LABELS = COCO128 / "labels" / "train2017"
RECIPE = """\
description: noisy-oracle (labelgen.testing.noisy), tests only
generator:
  name: noisy-oracle
  labels_dir: {labels}
  seed: {seed}
images: {{compute_sha256: false}}
store: {{shard_size: {shard_size}}}
execution: {{workers: 1, device: cpu, batch_size: {batch_size}}}
"""


def _cli(*argv):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = cli_main([str(a) for a in argv])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def noisy():
    """``labelgen.testing.noisy`` for this module only; the registry and loaded plugins are restored."""
    with plugin_imported("labelgen.testing.noisy") as module:
        yield module


def _run(folder, name, *, seed=0, shard_size=32, batch_size=1):
    recipe = folder / f"{name}.yaml"
    recipe.write_text(RECIPE.format(labels=json.dumps(str(LABELS)), seed=seed, shard_size=shard_size,
                                    batch_size=batch_size), encoding="utf-8")
    code, _ = _cli("run", recipe, "--plugin", "labelgen.testing.noisy", "--images", IMAGES,
                   "--out", folder / name, "--no-progress")
    assert code == 0
    return {row.image.image_id: row for row in RunStore(folder / name).iter_rows()}


@pytest.fixture(scope="module")
def runs(noisy, tmp_path_factory):
    if not IMAGES.is_dir():
        pytest.skip(f"coco128-seg not found at {COCO128} (set LABELGEN_COCO128)")
    folder = tmp_path_factory.mktemp("noisy")
    return {"a": _run(folder, "a"), "b": _run(folder, "b", shard_size=7, batch_size=3),
            "seed1": _run(folder, "seed1", seed=1)}


@pytest.fixture(scope="module")
def truth():
    return {row.image.image_id: row.instances for row in import_yolo(COCO128, split="train2017", task="segment")}


def _matched(pred, gt):
    """(N,) bool: each prediction overlaps a same-class ground-truth object at mask IoU >= 0.5."""
    if not len(pred) or not len(gt):
        return np.zeros(len(pred), bool)
    iou = np.asarray(coco_mask.iou([rle_to_pycocotools(r) for r in pred.masks_rle],
                                   [rle_to_pycocotools(r) for r in gt.masks_rle], [0] * len(gt)))
    same = np.asarray(pred.class_ids)[:, None] == np.asarray(gt.class_ids)[None]
    return ((iou >= 0.5) & same).any(axis=1)


def _auc(scores, labels):
    """Mann-Whitney AUC: P(score of a correct label > score of a wrong one), ties count half."""
    pos, neg = scores[labels], scores[~labels]
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def _evaluate(run, truth):
    correct, confidence, kinds = [], [], []
    for image_id, row in run.items():
        correct += _matched(row.instances, truth[image_id]).tolist()
        confidence += row.instances.scores["confidence"].tolist()
        kinds += list(row.instances.attributes["noise"])
    return np.array(correct), np.array(confidence), np.array(kinds)


def test_confidence_correlates_with_correctness_imperfectly(runs, truth):
    correct, confidence, kinds = _evaluate(runs["a"], truth)
    gt_objects = sum(len(t) for t in truth.values())
    assert len(runs["a"]) == 128 and len(correct) > 500
    auc = _auc(confidence, correct)
    assert 0.6 < auc < 0.95, auc
    assert 0.35 < correct.mean() < 0.85  # neither all right nor all wrong
    assert correct.sum() < 0.95 * gt_objects  # objects were dropped or spoilt: recall < 1
    assert set(kinds) == {"kept", "poor_mask", "relabelled", "false_positive"}
    # what was done to a label decides its correctness (mostly: a mild perturbation of a tiny object fails)
    assert correct[kinds == "kept"].mean() > 0.8
    for spoilt in ("poor_mask", "relabelled", "false_positive"):
        assert correct[kinds == spoilt].mean() < 0.1, spoilt
    # wrong labels score lower on average, but many wrong ones outscore right ones
    assert confidence[correct].mean() > confidence[~correct].mean() + 0.1
    assert np.mean(confidence[~correct] > np.median(confidence[correct])) > 0.05


def test_score_columns_mimic_a_real_pipeline(runs):
    for row in list(runs["a"].values())[:20]:
        scores = row.instances.scores
        assert set(scores) == {"class_prob", "predicted_iou", "confidence"}
        np.testing.assert_allclose(scores["confidence"], np.sqrt(scores["class_prob"] * scores["predicted_iou"]),
                                   rtol=1e-6)
        assert all(((0 < s) & (s <= 1)).all() for s in scores.values())


def test_deterministic_whatever_the_batching_and_seeded(runs):
    a, b, other = runs["a"], runs["b"], runs["seed1"]
    assert a.keys() == b.keys() == other.keys()
    for image_id in a:
        x, y = a[image_id].instances, b[image_id].instances
        assert x.masks_rle == y.masks_rle and np.array_equal(x.class_ids, y.class_ids)
        assert all(np.array_equal(x.scores[k], y.scores[k]) for k in x.scores)
    differ = sum(a[i].instances.masks_rle != other[i].instances.masks_rle for i in a)
    assert differ > 64  # another seed corrupts most images differently


def test_bad_configs_are_clear_errors(noisy, tmp_path):
    with pytest.raises(ConfigError, match="labels_dir"):
        noisy.NoisyConfig()
    with pytest.raises(ConfigError, match="drop"):
        noisy.NoisyConfig(labels_dir=str(tmp_path), drop=1.5)
    with pytest.raises(ConfigError, match="is not a folder"):
        noisy.NoisyOracleGenerator.preflight(noisy.NoisyConfig(labels_dir=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="no .txt label files"):
        noisy.NoisyOracleGenerator.preflight(noisy.NoisyConfig(labels_dir=str(tmp_path)))
    (tmp_path / "a.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n")
    with pytest.raises(ConfigError, match="classes.txt"):
        noisy.NoisyOracleGenerator.preflight(noisy.NoisyConfig(labels_dir=str(tmp_path)))
    assert noisy.NoisyOracleGenerator.vocabulary(noisy.NoisyConfig(labels_dir=str(tmp_path),
                                                                   class_names=("x",))) == ("x",)


def test_not_registered_unless_imported():
    code = "import labelgen.generators as g, labelgen.testing; print('noisy-oracle' in g.GENERATORS._items)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
