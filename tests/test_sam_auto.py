"""The sam-auto generator (SAM's automatic mask generator) on the tiny SAM with random weights."""
import dataclasses
import inspect
import json
import logging

import numpy as np
import pytest

from conftest import REPO, needs_models
from labelgen.models import weights
from labelgen.config import load_recipe, recipe_from_dict
from labelgen.engine.decode import read_image_rgb
from labelgen.errors import ConfigError, GeneratorError, ValidationError, WeightsNotFoundError
from labelgen.generators import GENERATORS
from labelgen.generators.sam_auto import SamAutoConfig, SamAutoGenerator
from labelgen.structures.instances import ImageRecord, Instances
from labelgen.structures.masks import rles_to_boxes_xyxy
from labelgen.engine.runner import run
from labelgen.engine.sources import ListFileSource
from labelgen.store.run_store import RunStore

TINY = REPO / "recipes" / "sam-auto-tiny-random.yaml"
IMAGE = "000000000009.jpg"  # 640 x 480


def _tiny_config(*overrides):
    return load_recipe(TINY, [f"generator.{o}" for o in overrides]).generator.params


@pytest.fixture(scope="module")
def tiny_generator():
    return SamAutoGenerator.from_config(_tiny_config())


def _image(folder, name=IMAGE):
    image, info = read_image_rgb(str(folder / name))
    return image, ImageRecord(name, str(folder / name), info["width"], info["height"])


def _check_instances(out, height, width):
    assert isinstance(out, Instances) and (out.height, out.width) == (height, width)
    assert set(out.scores) == {"confidence", "sam_predicted_iou", "sam_stability_score"}
    assert set(out.attributes) == {"point_xy", "crop_box_xyxy"}
    assert out.class_ids is None and out.provenance["generator"] == "sam-auto"
    np.testing.assert_array_equal(out.boxes_xyxy, rles_to_boxes_xyxy(list(out.masks_rle)))
    np.testing.assert_array_equal(out.scores["confidence"], np.clip(out.scores["sam_predicted_iou"], 0, 1))
    assert np.all((out.scores["sam_stability_score"] >= 0) & (out.scores["sam_stability_score"] <= 1))
    assert np.all(out.masks().reshape(len(out), -1).any(axis=1)), "empty masks are dropped"
    for (x, y), (x1, y1, x2, y2) in zip(out.attributes["point_xy"], out.attributes["crop_box_xyxy"]):
        assert 0 <= x1 <= x <= x2 <= width and 0 <= y1 <= y <= y2 <= height
    iou = out.scores["sam_predicted_iou"]
    assert np.all(iou[:-1] >= iou[1:]), "sorted by predicted IoU, descending"


@needs_models
def test_instances_are_in_the_frame_of_a_non_square_image(tiny_generator, coco128_images):
    image, record = _image(coco128_images)
    out = tiny_generator.generate(image, record)
    assert (out.height, out.width) == (480, 640)
    assert len(out) > 0
    _check_instances(out, 480, 640)
    assert {tuple(b) for b in out.attributes["crop_box_xyxy"]} == {(0, 0, 640, 480)}  # no crop layers
    facts = tiny_generator.provenance()
    assert facts["random_weights"] is True and facts["sam"] == {"model_type": "tiny", "weights": "RANDOM"}
    assert tiny_generator.class_names() is None


@needs_models
def test_same_image_same_config_identical_outputs(coco128_images):
    config = _tiny_config("box_nms_thresh=1.0")  # no NMS: all 8*8*3 random masks, many ties to order
    image, record = _image(coco128_images)
    generator = SamAutoGenerator.from_config(config)
    first = generator.generate(image, record)
    second = generator.generate(image, record)
    rebuilt = SamAutoGenerator.from_config(config).generate(image, record)
    assert len(first) == 8 * 8 * 3
    assert first.to_dict() == second.to_dict() == rebuilt.to_dict()


def _disk_decoder(predictor, radius=30.0):
    """Fake SAM's mask decoder answers: disks of radius r, 1.5r, 2r around each prompt point.

    Random weights give masks that cover the whole image, so the AMG's crop-edge filter drops
    every crop mask; disks are local, as a trained SAM's masks are. The image encoder, the
    prompt transform and all of the AMG still run for real.
    """
    import torch

    real = predictor.predict_torch

    def predict_torch(point_coords, point_labels, *args, **kwargs):
        _, _, low_res = real(point_coords, point_labels, *args, **kwargs)
        height, width = predictor.original_size  # of the crop being processed
        in_height, in_width = predictor.input_size
        xy = point_coords[:, 0, :].float() * torch.tensor([width / in_width, height / in_height])
        ys = torch.arange(height, dtype=torch.float32)[None, :, None] + 0.5
        xs = torch.arange(width, dtype=torch.float32)[None, None, :] + 0.5
        dist = torch.sqrt((xs - xy[:, 0, None, None]) ** 2 + (ys - xy[:, 1, None, None]) ** 2)
        radii = torch.tensor([1.0, 1.5, 2.0]) * radius
        logits = (radii[None, :, None, None] - dist[:, None]) / 4.0
        iou = torch.tensor([0.9, 0.8, 0.7])[None, :] - 1e-4 * xy.sum(dim=1, keepdim=True) / (height + width)
        return logits, iou, low_res

    predictor.predict_torch = predict_torch


@needs_models
def test_crop_layers_add_crop_boxes_inside_the_image(coco128_images):
    generator = SamAutoGenerator.from_config(_tiny_config("crop_n_layers=1", "points_per_side=4"))
    _disk_decoder(generator.mask_generator.predictor)
    image, record = _image(coco128_images)
    out = generator.generate(image, record)
    _check_instances(out, 480, 640)
    crops = {tuple(b) for b in out.attributes["crop_box_xyxy"]}
    assert (0, 0, 640, 480) in crops and len(crops) > 1, "instances from the whole image and the layer-1 crops"
    for mask, (x1, y1, x2, y2) in zip(out.masks(), out.attributes["crop_box_xyxy"]):
        assert mask[y1:y2, x1:x2].sum() == mask.sum(), "each mask lies inside its crop"


@needs_models
def test_boxes_are_tight_with_exclusive_x2_y2(coco128_images):
    generator = SamAutoGenerator.from_config(_tiny_config("points_per_side=4"))
    _disk_decoder(generator.mask_generator.predictor)
    image, record = _image(coco128_images)
    out = generator.generate(image, record)
    assert len(out) > 1
    for mask, box, (x, y) in zip(out.masks(), out.boxes_xyxy, out.attributes["point_xy"]):
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        assert box.tolist() == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
        assert mask[int(y), int(x)], "the prompt point lies in its disk"


@needs_models
def test_bf16_and_small_region_removal_run(coco128_images):
    generator = SamAutoGenerator.from_config(_tiny_config("precision=bf16", "min_mask_region_area=50"))
    image, record = _image(coco128_images)
    out = generator.generate(image, record)
    _check_instances(out, 480, 640)
    assert len(out) > 0 and generator.provenance()["precision"] == "bf16"


@needs_models
def test_no_mask_gives_empty_columns(tiny_generator, coco128_images, monkeypatch):
    monkeypatch.setattr(tiny_generator.mask_generator, "generate", lambda image: [])
    image, record = _image(coco128_images)
    out = tiny_generator.generate(image, record)
    assert len(out) == 0 and (out.height, out.width) == (480, 640)
    assert set(out.scores) == {"confidence", "sam_predicted_iou", "sam_stability_score"}
    assert set(out.attributes) == {"point_xy", "crop_box_xyxy"}


@needs_models
def test_bad_image_is_a_validation_error(tiny_generator):
    with pytest.raises(ValidationError, match=r"\(H, W, 3\) uint8"):
        tiny_generator.generate(np.zeros((4, 4), np.uint8), ImageRecord("x", "/x", 4, 4))


# -- config ------------------------------------------------------------------------------
@needs_models
def test_recipe_defaults_are_sams_own():
    recipe = recipe_from_dict({"generator": {"name": "sam-auto", "points_per_side": 16}})
    assert isinstance(recipe.generator.params, SamAutoConfig)
    assert recipe.generator.params == dataclasses.replace(SamAutoConfig(), points_per_side=16)
    from segment_anything import SamAutomaticMaskGenerator  # the defaults must stay SAM's own

    sam_defaults = {k: p.default for k, p in inspect.signature(SamAutomaticMaskGenerator).parameters.items()}
    assert {k: sam_defaults[k] for k in SamAutoConfig().amg_kwargs()} == SamAutoConfig().amg_kwargs()
    shipped = load_recipe(REPO / "recipes" / "sam-auto.yaml").generator.params
    assert shipped == SamAutoConfig(crop_overlap_ratio=shipped.crop_overlap_ratio)
    assert shipped.crop_overlap_ratio == pytest.approx(512 / 1500)


@pytest.mark.parametrize("generator, message", [
    ({"points_per_sid": 16}, "unknown key 'generator.points_per_sid'. Did you mean 'generator.points_per_side'?"),
    ({"points_per_side": "many"}, "generator.points_per_side: expected an integer"),
    ({"precision": "fp8"}, r"generator.precision: expected one of \['fp32', 'bf16', 'fp16', 'auto'\]"),
    ({"model_type": "vit_x"}, "generator.model_type: expected one of"),
    ({"points_per_side": 0}, "generator.points_per_side: expected an integer >= 1"),
    ({"crop_n_layers": -1}, "generator.crop_n_layers: expected an integer >= 0"),
    ({"box_nms_thresh": 0.0}, r"generator.box_nms_thresh: expected a box IoU in \(0, 1\]"),
    ({"crop_overlap_ratio": 1.0}, r"generator.crop_overlap_ratio: expected \[0, 1\)"),
    ({"stability_score_offset": 0.0}, "generator.stability_score_offset: expected > 0"),
])
def test_config_is_strict(generator, message):
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict({"generator": {"name": "sam-auto", **generator}})


# -- weights ------------------------------------------------------------------------------
@needs_models
def test_preflight_offline_names_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("LABELGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_resolves", lambda host: False)
    config = SamAutoConfig(model_type="vit_b")
    with pytest.raises(WeightsNotFoundError) as info:
        SamAutoGenerator.preflight(config)
    message = str(info.value)
    assert "sam_vit_b_01ec64.pth" in message and str(tmp_path / "cache" / "sam") in message
    assert "generator.checkpoint=" in message and "generator.sam." not in message
    with pytest.raises(WeightsNotFoundError, match="generator.checkpoint"):
        SamAutoGenerator.preflight(SamAutoConfig(checkpoint=str(tmp_path / "missing.pth")))
    with pytest.raises(WeightsNotFoundError, match="downloads disabled"):
        SamAutoGenerator.from_config(SamAutoConfig(model_type="vit_b", allow_download=False))


@needs_models
def test_random_weights_skip_preflight_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        SamAutoGenerator.preflight(_tiny_config())
    assert "RANDOM WEIGHTS" in caplog.text


def test_missing_cuda_is_a_clear_error(no_cuda):
    with pytest.raises(GeneratorError, match="no CUDA device"):
        SamAutoGenerator.from_config(_tiny_config(), device="cuda:0")


# -- end to end ----------------------------------------------------------------------------
@needs_models
def test_tiny_recipe_through_labelgen_run_gives_a_valid_run_directory(tmp_path, coco128_images):
    names = [IMAGE, "000000000025.jpg"]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(coco128_images / n) for n in names) + "\n")
    assert GENERATORS.get("sam-auto") is SamAutoGenerator
    result = run(load_recipe(TINY), ListFileSource(listing), tmp_path / "run")
    assert result.shards_done == 1 and result.failures == 0
    rows = list(RunStore(tmp_path / "run").iter_rows())
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for row in rows:
        out = Instances.from_dict(row["instances"])
        _check_instances(out, row["image"]["height"], row["image"]["width"])
        assert len(out) > 0
    done = json.loads((tmp_path / "run" / "shards" / "000000.done.json").read_text())
    assert done["provenance"]["generator"] == "sam-auto" and done["provenance"]["random_weights"] is True
    assert done["provenance"]["sam"]["weights"] == "RANDOM"


@pytest.mark.slow
@needs_models
def test_real_vit_b_architecture_with_random_weights(coco128_images):
    """SAM ViT-B (1024 px encoder) with random weights on one real image, 4x4 points, precision auto: bf16
    where the CPU runs it natively, fp32 elsewhere (emulated bf16 on a 1024 px ViT-B is ~10x slower)."""
    config = SamAutoConfig(model_type="vit_b", random_weights=True, allow_download=False, points_per_side=4,
                           pred_iou_thresh=0.0, stability_score_thresh=0.0, stability_score_offset=0.01,
                           precision="auto")
    generator = SamAutoGenerator.from_config(config)
    image, record = _image(coco128_images)
    out = generator.generate(image, record)
    _check_instances(out, 480, 640)
    assert len(out) > 0
    assert generator.provenance()["sam"] == {"model_type": "vit_b", "weights": "RANDOM"}
    assert generator.provenance()["precision"] in ("bf16", "fp32")
