"""The zip generator end to end on tiny models of the real classes, and stage 3 glue."""
import json

import numpy as np
import pytest

pytest.importorskip("torch")  # the Zip generator: the `models` extra
pytest.importorskip("open_clip")
pytest.importorskip("segment_anything")

from conftest import REPO  # noqa: E402
from labelgen.config import apply_overrides, load_recipe, recipe_from_dict
from labelgen.engine.decode import read_image_rgb
from labelgen.errors import GeneratorError
from labelgen.generators import GENERATORS
from labelgen.structures.instances import ImageRecord
from labelgen.engine.runner import run
from labelgen.engine.sources import ListFileSource
from labelgen.store.run_store import RunStore
from labelgen.generators.zip.semantic import SemanticResult

TINY = REPO / "recipes" / "zip-tiny-random.yaml"
IMAGES = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg"]


def _tiny(*overrides):
    return load_recipe(TINY, list(overrides))


@pytest.fixture(scope="module")
def tiny_generator():
    recipe = _tiny()
    return GENERATORS.get("zip").from_config(recipe.generator.params)


def _image(coco128_images, name="000000000009.jpg"):
    image, info = read_image_rgb(str(coco128_images / name))
    return image, ImageRecord(name, str(coco128_images / name), info["width"], info["height"])


def test_tiny_zip_through_labelgen_run_gives_a_valid_run_directory(tmp_path, coco128_images):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(coco128_images / n) for n in IMAGES) + "\n")
    result = run(_tiny(), ListFileSource(listing), tmp_path / "run")
    assert result.shards_done == 1 and result.failures == 0
    store = RunStore(tmp_path / "run")
    rows = list(store.iter_rows())
    assert [r["status"] for r in rows] == ["ok"] * 3
    for row in rows:
        inst = row["instances"]
        assert (inst["height"], inst["width"]) == (row["image"]["height"], row["image"]["width"])
        assert set(inst["scores"]) >= {"confidence", "clip_class_prob", "sam_predicted_iou", "sam_stability_score",
                                       "activated_fraction", "extent"}
        assert set(inst["attributes"]) >= {"prompt_box_xyxy", "cluster_ids", "sam_mask_choice"}
        conf = np.array(inst["scores"]["confidence"])
        expected = np.sqrt(np.clip(inst["scores"]["clip_class_prob"], 0, 1) * np.clip(inst["scores"]["sam_predicted_iou"], 0, 1))
        np.testing.assert_allclose(conf, expected, rtol=1e-6)
        assert inst["class_ids"] is not None and all(0 <= c < 3 for c in inst["class_ids"])
    done = json.loads((tmp_path / "run" / "shards" / "000000.done.json").read_text())
    assert done["provenance"]["random_weights"] is True and done["provenance"]["sam"]["weights"] == "RANDOM"


def test_same_image_same_config_identical_outputs(tiny_generator, coco128_images):
    image, record = _image(coco128_images)
    first = tiny_generator.generate(image, record)
    second = tiny_generator.generate(image, record)
    rebuilt = GENERATORS.get("zip").from_config(_tiny().generator.params).generate(image, record)
    assert first.to_dict() == second.to_dict() == rebuilt.to_dict()
    assert set(tiny_generator.last_timings) == {"semantic", "boundary", "discovery", "refine"}


def test_class_agnostic_mode_has_no_class_ids(coco128_images):
    recipe = _tiny("generator.semantic.class_agnostic=true", "generator.semantic.vocabulary=[]")
    generator = GENERATORS.get("zip").from_config(recipe.generator.params)
    image, record = _image(coco128_images)
    out = generator.generate(image, record)
    assert out.class_ids is None and generator.class_names() is None
    assert generator.semantic.class_names == ("object",)


def test_bf16_runs(coco128_images):
    generator = GENERATORS.get("zip").from_config(_tiny("generator.precision=bf16").generator.params)
    image, record = _image(coco128_images)
    out = generator.generate(image, record)
    assert out.height == record.height and generator.provenance()["precision"] == "bf16"


class _Boundary:
    def __init__(self, labels):
        self.labels = labels
        self.grid_height, self.grid_width = labels.shape
        self.num_clusters = int(labels.max()) + 1


def test_propose_scales_grid_boxes_to_a_non_square_image(tiny_generator):
    labels = np.zeros((12, 16), np.int32)
    labels[2:6, 4:10] = 1  # one object of 24 cells: grid box (4, 2, 10, 6)
    maps = np.zeros((3, 8, 8), np.float32)
    maps[1] = 0.0
    maps[1, 1:4, 2:5] = 1.0  # class 1 activated over the object's area (map grid covers the image)
    semantic = SemanticResult(class_probs=np.array([0.1, 0.8, 0.1], np.float32), maps=maps, kept=np.array([1]))
    proposals = tiny_generator.propose(semantic, _Boundary(labels), height=300, width=800)
    assert proposals.class_ids.tolist() == [1]
    np.testing.assert_allclose(proposals.boxes_xyxy, [[4 * 50, 2 * 25, 10 * 50, 6 * 25]])  # x*W/w, y*H/h
    assert proposals.cluster_ids == ((1,),) and proposals.area_cells == (24,)


def test_cross_class_duplicates_are_removed_by_mask_nms(tiny_generator, coco128_images, monkeypatch):
    image, record = _image(coco128_images)
    stage = tiny_generator.semantic
    real_from_tokens = stage.from_tokens

    def two_identical_classes(tokens):
        result = real_from_tokens(tokens)
        maps = result.maps.copy()
        maps[1] = maps[0]
        return SemanticResult(class_probs=np.array([0.5, 0.4, 0.1], np.float32), maps=maps, kept=np.array([0, 1]))

    monkeypatch.setattr(stage, "from_tokens", two_identical_classes)
    semantic = two_identical_classes(stage.encode(image))
    proposals = tiny_generator.propose(semantic, tiny_generator.boundary(image), record.height, record.width)
    assert len(proposals.boxes_xyxy) >= 2 and len(proposals.boxes_xyxy) % 2 == 0  # each instance twice
    out = tiny_generator.generate(image, record)
    assert 0 < len(out) <= len(proposals.boxes_xyxy) // 2
    assert set(out.class_ids.tolist()) <= {0, 1}


def test_missing_cuda_is_a_clear_error(no_cuda):
    with pytest.raises(GeneratorError, match="no CUDA device"):
        GENERATORS.get("zip").from_config(_tiny().generator.params, device="cuda:0")


@pytest.mark.parametrize("field, value, message", [
    ("generator.semantic.model", "No-Such-Model", "unknown open_clip model"),
])
def test_bad_model_names_are_clear_errors(field, value, message):
    recipe = recipe_from_dict(apply_overrides(load_recipe(TINY).to_dict(), [f"{field}={value}"]))
    with pytest.raises(GeneratorError, match=message):
        GENERATORS.get("zip").from_config(recipe.generator.params)


def test_unknown_sam_model_type_is_refused_when_the_recipe_loads():
    from labelgen.errors import ConfigError

    with pytest.raises(ConfigError, match=r"generator.sam.model_type: expected one of .*; got 'vit_x'"):
        recipe_from_dict(apply_overrides(load_recipe(TINY).to_dict(), ["generator.sam.model_type=vit_x"]))


@pytest.mark.slow
def test_real_architectures_random_weights_through_the_cli(tmp_path, coco128_images):
    """The documented offline smoke recipe: ViT-B/16 + RN50x64 + SAM ViT-B, random weights, `labelgen run`."""
    import os
    import subprocess
    import sys

    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(coco128_images / n) for n in IMAGES[:2]) + "\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "labelgen.cli", "run", "recipes/zip-smoke-random.yaml", "--images", str(listing),
           "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RANDOM WEIGHTS" in done.stderr
    assert "RANDOM WEIGHTS" in done.stdout  # the status summary says it too
    rows = list(RunStore(out).iter_rows())
    assert [r["status"] for r in rows] == ["ok", "ok"]
    record = json.loads((out / "shards" / "000000.done.json").read_text())
    # OpenAI-format weights (pretrained: openai) are built with QuickGELU, random or not (issue 17)
    assert record["provenance"]["semantic"] == {"model": "ViT-B-16", "weights": "RANDOM", "activation": "quick_gelu"}
    assert record["provenance"]["boundary"]["model"] == "RN50x64" and record["provenance"]["sam"]["model_type"] == "vit_b"


def test_clustering_then_discovery_on_a_synthetic_feature_grid_finds_the_known_objects():
    """Stage 2 + 3 together: features with two objects -> K-means -> activated fragments -> exact boxes."""
    import torch

    from labelgen.generators.zip.config import DiscoveryConfig
    from labelgen.generators.zip.kmeans import even_init_indices, kmeans

    h, w, d = 24, 32, 8
    rng = np.random.default_rng(0)
    feats = np.zeros((h, w, d), np.float32)
    feats[..., 0] = 10.0  # background
    feats[3:9, 4:14, 1] = 10.0  # object A: rows 3..8, cols 4..13 (60 cells)
    feats[3:9, 4:14, 0] = 0.0
    feats[12:22, 18:28, 2] = 10.0  # object B: rows 12..21, cols 18..27 (100 cells)
    feats[12:22, 18:28, 0] = 0.0
    feats += rng.normal(0, 0.01, feats.shape).astype(np.float32)
    vectors = torch.from_numpy(feats.reshape(-1, d))
    labels, _, _ = kmeans(vectors, 20, 100, 1e-5, torch.from_numpy(even_init_indices(h * w, 20)))
    labels = labels.reshape(h, w).numpy()
    for rows, cols in ((slice(3, 9), slice(4, 14)), (slice(12, 22), slice(18, 28))):
        assert not set(np.unique(labels[rows, cols])) & set(np.unique(labels[feats[..., 0] > 5]))  # own clusters
    activated = np.zeros((h, w), bool)
    activated[3:9, 4:12] = True  # the class map covers most of A ...
    activated[12:20, 18:28] = True  # ... and of B, none of the background
    from labelgen.generators.zip.discovery import discover_instances, grid_boxes_to_image

    found = discover_instances(labels, activated, DiscoveryConfig(min_cells=50))
    boxes = sorted(inst.box_xyxy_grid for inst in found)
    assert boxes == [(4, 3, 14, 9), (18, 12, 28, 22)]  # whole objects, background fragments rejected
    pixels = grid_boxes_to_image(np.array(boxes), h, w, image_height=480, image_width=960)
    np.testing.assert_allclose(pixels, [[120, 60, 420, 180], [540, 240, 840, 440]])
