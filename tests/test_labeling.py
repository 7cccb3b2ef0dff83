"""The CLIP region labeler: pure helpers and config (no torch), then the labeler on tiny models."""
import dataclasses
import logging
import pickle
import subprocess
import sys

import numpy as np
import pytest

from labelgen.config import config_to_dict, from_mapping
from labelgen.errors import ConfigError, ValidationError
from labelgen.structures.instances import Instances
from labelgen.labelers.config import (
    LABEL_MARGIN,
    LABEL_NAME,
    LABEL_PROB,
    LabelerConfig,
    class_names,
    class_prompts,
    crop_boxes_xyxy,
    fill_outside_mask,
    instance_crops,
    top_two,
    with_labels,
)

TINY = "labelgen-tiny-vit"
SAMPLE_IMAGE = "000000000009.jpg"
CLASSES = {"cat": [], "dog": ["dog", "puppy"], "person": ["person", "pedestrian", "man"]}


def tiny_config(**changes):
    base = {"classes": CLASSES, "model": TINY, "random_weights": True, "allow_download": False}
    return from_mapping(LabelerConfig, {**base, **changes}, "labeler")


def three_instances(height, width):
    """A rectangle, an ellipse (smaller than its box) and a triangle, with a score and an attribute."""
    yy, xx = np.mgrid[:height, :width]
    rect = (yy >= 20) & (yy < 200) & (xx >= 30) & (xx < 300)
    ellipse = ((yy - 300) / 120.0) ** 2 + ((xx - 400) / 150.0) ** 2 <= 1.0
    triangle = (yy >= 250) & (yy < 460) & (xx >= 20) & (xx - 20 < (yy - 250))
    return Instances.from_masks(
        np.stack([rect, ellipse, triangle]),
        scores={"confidence": [0.9, 0.5, 0.25]},
        attributes={"source": ["a", "b", "c"]},
        provenance={"generator": "handmade"},
    )


# --------------------------------------------------------------------------- crop boxes
@pytest.mark.parametrize(
    "box, padding, expected",
    [
        ((10, 20, 30, 60), 0.0, (10, 20, 30, 60)),
        ((10, 20, 30, 60), 0.1, (8, 16, 32, 64)),  # 0.1 x width 20 / height 40 on each side
        ((10, 20, 30, 60), 0.5, (0, 0, 40, 80)),
        ((0, 0, 10, 10), 0.5, (0, 0, 15, 15)),  # clipped at the top-left border
        ((90, 80, 100, 100), 0.5, (85, 70, 100, 100)),  # clipped at the bottom-right border
        ((10.5, 20.2, 30.7, 40.9), 0.0, (10, 20, 31, 41)),  # rounded outwards
        ((0, 0, 0, 0), 0.2, (0, 0, 1, 1)),  # empty-mask box: one pixel
        ((100, 100, 100, 100), 0.0, (99, 99, 100, 100)),  # degenerate on the far border
        ((120, 130, 140, 150), 0.0, (99, 99, 100, 100)),  # outside the frame: nearest pixel
        ((-5, -5, 3, 3), 0.0, (0, 0, 3, 3)),
    ],
)
def test_crop_boxes_xyxy(box, padding, expected):
    out = crop_boxes_xyxy(np.array([box], np.float32), 100, 100, padding)
    assert out.dtype == np.int64 and out.shape == (1, 4)
    assert tuple(out[0]) == expected


def test_crop_boxes_xyxy_non_square_frame_and_empty():
    out = crop_boxes_xyxy(np.array([[0, 0, 200, 50]], np.float32), height=50, width=200, padding=0.25)
    assert out.tolist() == [[0, 0, 200, 50]]
    assert crop_boxes_xyxy(np.zeros((0, 4), np.float32), 10, 10, 0.1).shape == (0, 4)


# ----------------------------------------------------------------------------- masked fill
@pytest.mark.parametrize(
    "mask_rows, expected_filled",
    [
        ([[1, 1], [1, 1]], 0),  # whole crop inside: unchanged
        ([[1, 0], [0, 0]], 3),
        ([[0, 0], [0, 0]], 4),  # empty mask: every pixel is the mean
    ],
)
def test_fill_outside_mask_changes_only_outside(mask_rows, expected_filled):
    crop = np.array([[[0, 0, 0], [10, 20, 30]], [[20, 40, 60], [30, 60, 91]]], np.uint8)
    mask = np.array(mask_rows, bool)
    filled = fill_outside_mask(crop, mask)
    mean = np.rint(crop.reshape(-1, 3).mean(axis=0)).astype(np.uint8)  # [15, 30, 45]
    assert np.array_equal(filled[mask], crop[mask])
    assert np.all(filled[~mask] == mean)
    assert int((~mask).sum()) == expected_filled
    assert filled.dtype == np.uint8 and crop[0, 0].tolist() == [0, 0, 0]  # input untouched


def test_fill_outside_mask_rejects_mismatched_shapes():
    with pytest.raises(ValidationError, match=r"\(h, w\) mask"):
        fill_outside_mask(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), bool))


def test_instance_crops_box_vs_masked():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    mask = np.zeros((120, 160), bool)
    mask[30:60, 40:100] = True
    mask[30:40, 40:50] = False  # a notch: the box stays, the mask is smaller
    instances = Instances.from_masks(mask[None])
    box = instance_crops(image, instances, "box", padding=0.0)[0]
    masked = instance_crops(image, instances, "masked", padding=0.0)[0]
    assert box.shape == masked.shape == (30, 60, 3)
    assert np.array_equal(box, image[30:60, 40:100])
    inside = mask[30:60, 40:100]
    assert np.array_equal(masked[inside], box[inside])
    assert not np.array_equal(masked[~inside], box[~inside])
    padded = instance_crops(image, instances, "masked", padding=0.5)[0]
    assert padded.shape == (60, 120, 3)  # the padding is outside the mask: filled too


def test_instance_crops_checks_the_frame():
    instances = Instances.from_masks(np.ones((1, 10, 12), bool))
    with pytest.raises(ValidationError, match=r"\(10, 12, 3\)"):
        instance_crops(np.zeros((12, 10, 3), np.uint8), instances, "box", 0.1)
    with pytest.raises(ValidationError, match="uint8"):
        instance_crops(np.zeros((10, 12, 3), np.float32), instances, "box", 0.1)


# ------------------------------------------------------------------------------ top two
@pytest.mark.parametrize(
    "probs, ids, best, margin",
    [
        ([[0.7, 0.2, 0.1]], [0], [0.7], [0.5]),
        ([[0.1, 0.3, 0.6], [0.5, 0.5, 0.0]], [2, 0], [0.6, 0.5], [0.3, 0.0]),  # a tie: lowest id, margin 0
        ([[1.0], [1.0]], [0, 0], [1.0, 1.0], [0.0, 0.0]),  # one class: margin 0
        (np.zeros((0, 3)), [], [], []),
    ],
)
def test_top_two(probs, ids, best, margin):
    got_ids, got_best, got_margin = top_two(np.array(probs, np.float32))
    assert got_ids.dtype == np.int32 and got_ids.tolist() == ids
    np.testing.assert_allclose(got_best, best, atol=1e-6)
    np.testing.assert_allclose(got_margin, margin, atol=1e-6)


def test_with_labels_keeps_columns_and_empty_input():
    inst = three_instances(480, 640)
    out = with_labels(inst, np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]), ("cat", "dog"))
    assert out.class_ids.tolist() == [1, 0, 0]
    assert out.attributes[LABEL_NAME] == ("dog", "cat", "cat")
    assert out.attributes["source"] == ("a", "b", "c")
    np.testing.assert_array_equal(out.scores["confidence"], inst.scores["confidence"])
    np.testing.assert_allclose(out.scores[LABEL_MARGIN], [0.6, 0.2, 0.0], atol=1e-6)
    assert out.masks_rle == inst.masks_rle and out.provenance["generator"] == "handmade"
    empty = with_labels(inst[[]], np.zeros((0, 2)), ("cat", "dog"))
    assert len(empty) == 0 and empty.class_ids.shape == (0,)
    assert empty.scores[LABEL_PROB].shape == (0,) and empty.attributes[LABEL_NAME] == ()


# ------------------------------------------------------------------------------- config
def test_config_defaults_names_and_prompts():
    config = from_mapping(LabelerConfig, {"classes": {"cat": None, "dog": ["dog", "puppy"]}}, "labeler")
    assert (config.model, config.pretrained, config.crop, config.padding) == ("ViT-B-16", "openai", "box", 0.1)
    assert (config.input_size, config.batch_size, config.use_templates, config.precision) == (224, 32, True, "fp32")
    assert class_names(config) == ("cat", "dog")
    assert class_prompts(config) == (("cat",), ("dog", "puppy"))
    assert config.classes["cat"] == ()
    with pytest.raises(TypeError):
        config.classes["cow"] = ()  # read-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.padding = 0.3


def test_config_round_trips_pickles_and_hashes():
    config = tiny_config(crop="masked", padding=0.25)
    assert from_mapping(LabelerConfig, config_to_dict(config), "labeler") == config
    assert config_to_dict(config)["classes"] == {"cat": [], "dog": ["dog", "puppy"],
                                                 "person": ["person", "pedestrian", "man"]}
    clone = pickle.loads(pickle.dumps(config))
    assert clone == config and hash(clone) == hash(config)
    assert list(clone.classes) == ["cat", "dog", "person"]  # order = class ids
    with pytest.raises(TypeError):
        clone.classes["cow"] = ()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"paddding": 0.2}, "unknown key 'labeler.paddding'. Did you mean 'labeler.padding'?"),
        ({"batchsize": 2}, "Did you mean 'labeler.batch_size'?"),
        ({"classes": ["cat", "dog"]}, "labeler.classes: expected a mapping; got list"),
        ({"classes": {}}, "labeler.classes: expected at least one class"),
        ({"classes": {"dog": "puppy"}}, "labeler.classes.dog: expected a list"),
        ({"classes": {"dog": [""]}}, "prompts must be non-empty strings"),
        ({"classes": {"cat": [], "kitty": ["cat"]}}, "prompt 'cat' is listed under both 'cat' and 'kitty'"),
        ({"classes": {"dog": ["dog", "dog"]}}, "prompt 'dog' is listed twice"),
        ({"crop": "mask"}, "labeler.crop: expected one of ['box', 'masked']"),
        ({"precision": "fp8"}, "labeler.precision: expected one of"),
        ({"padding": -0.1}, "labeler.padding: expected a number in [0, 5.0]"),
        ({"padding": "big"}, "labeler.padding: expected a number"),
        ({"input_size": 8}, "labeler.input_size: expected an integer in [16, 4096]"),
        ({"batch_size": 0}, "labeler.batch_size: expected an integer in [1, 4096]"),
        ({"batch_size": True}, "labeler.batch_size: expected an integer"),
        ({"use_templates": "yes"}, "labeler.use_templates: expected true/false"),
        ({"model": ""}, "labeler.model: expected a non-empty string"),
    ],
)
def test_config_is_strict(changes, message):
    with pytest.raises(ConfigError) as info:
        from_mapping(LabelerConfig, {"classes": {"cat": [], "dog": []}, **changes}, "labeler")
    assert message in str(info.value)


def test_config_requires_classes_and_checks_direct_construction():
    with pytest.raises(ConfigError, match="classes"):
        from_mapping(LabelerConfig, {}, "labeler")
    with pytest.raises(ConfigError, match="expected a mapping of class name -> list of prompts"):
        LabelerConfig(classes=["cat", "dog"])
    assert LabelerConfig(classes={"cat": ["cat", "kitten"]}).classes["cat"] == ("cat", "kitten")


def test_labeling_imports_no_torch():
    code = "import sys, labelgen.labelers.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ===================================================================== the labeler (torch)
@pytest.fixture(scope="module")
def tiny_labeler():
    pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    from labelgen.labelers.clip import ClipLabeler

    return ClipLabeler.from_config(tiny_config())


@pytest.fixture
def sample(coco128_images):
    from PIL import Image

    path = coco128_images / SAMPLE_IMAGE
    if not path.is_file():
        pytest.skip(f"{path} not found")
    image = np.asarray(Image.open(path).convert("RGB"))
    return image, three_instances(*image.shape[:2])


def fresh(labeler, config=None, **kwargs):
    """A new labeler on the same model (no cached text embeddings)."""
    from labelgen.labelers.clip import ClipLabeler

    return ClipLabeler(labeler.model, labeler.tokenizer, config or labeler.config, **kwargs)


def test_label_writes_columns_and_keeps_the_rest(tiny_labeler, sample):
    image, inst = sample
    out = tiny_labeler.label(image, inst)
    assert len(out) == 3 and out.class_ids.dtype == np.int32
    assert np.all((out.class_ids >= 0) & (out.class_ids < 3))
    assert np.all((out.scores[LABEL_PROB] >= 1 / 3 - 1e-6) & (out.scores[LABEL_PROB] <= 1))
    assert np.all(out.scores[LABEL_MARGIN] >= 0)
    assert out.attributes[LABEL_NAME] == tuple(("cat", "dog", "person")[i] for i in out.class_ids)
    np.testing.assert_array_equal(out.scores["confidence"], inst.scores["confidence"])
    assert out.attributes["source"] == inst.attributes["source"]
    assert out.masks_rle == inst.masks_rle and np.array_equal(out.boxes_xyxy, inst.boxes_xyxy)
    assert dict(out.provenance) == {"generator": "handmade", "labeler": "clip"}
    assert Instances.from_dict(out.to_dict()) == out


def test_label_is_deterministic_and_encodes_text_once(tiny_labeler, sample, monkeypatch):
    image, inst = sample
    labeler = fresh(tiny_labeler)
    calls = []
    original = labeler.model.encode_text
    monkeypatch.setattr(labeler.model, "encode_text", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = labeler.label(image, inst)
    after_first = len(calls)
    second = labeler.label(image, inst)
    assert after_first > 0 and len(calls) == after_first
    assert first == second
    assert fresh(tiny_labeler).label(image, inst) == first  # a new labeler on the same model agrees


def test_text_embedding_is_the_mean_of_its_prompts(tiny_labeler):
    import torch

    from labelgen.generators.zip.semantic import text_embeddings

    several = fresh(tiny_labeler).text_embeddings()
    alone = fresh(tiny_labeler, tiny_config(classes={"cat": [], "dog": [], "person": []})).text_embeddings()
    assert several.shape == alone.shape == (3, 32)
    torch.testing.assert_close(several[0], alone[0])  # "cat" has no synonyms: same prompt
    assert not torch.allclose(several[1], alone[1], atol=1e-3)  # dog + puppy != dog
    per_prompt = text_embeddings(tiny_labeler.model, tiny_labeler.tokenizer, ["person", "pedestrian", "man"], "cpu")
    expected = torch.nn.functional.normalize(per_prompt.mean(dim=0), dim=-1)
    torch.testing.assert_close(several[2], expected)
    torch.testing.assert_close(several.norm(dim=-1), torch.ones(3))
    raw = fresh(tiny_labeler, tiny_config(use_templates=False)).text_embeddings()
    assert not torch.allclose(raw, several, atol=1e-3)  # no template ensemble


def test_known_answer(tiny_labeler, sample):
    image, inst = sample
    crop_embeddings = tiny_labeler.encode_crops(tiny_labeler.crops(image, inst))  # (3, D)
    order = [2, 0, 1]  # class k's text embedding = the embedding of crop order[k]
    labeler = fresh(tiny_labeler, text_embeddings=crop_embeddings[order])
    out = labeler.label(image, inst)
    assert out.class_ids.tolist() == [1, 2, 0]
    assert np.all(out.scores[LABEL_MARGIN] > 0)


def test_batch_size_does_not_change_the_result(tiny_labeler, sample):
    image, inst = sample
    one = fresh(tiny_labeler, tiny_config(batch_size=1)).label(image, inst)
    many = tiny_labeler.label(image, inst)
    assert one.class_ids.tolist() == many.class_ids.tolist()
    for name in (LABEL_PROB, LABEL_MARGIN):
        np.testing.assert_allclose(one.scores[name], many.scores[name], atol=1e-5)


def test_masked_and_box_crops_differ(tiny_labeler, sample):
    image, inst = sample
    masked = fresh(tiny_labeler, tiny_config(crop="masked"))
    box_features = tiny_labeler.encode_crops(tiny_labeler.crops(image, inst))
    masked_features = masked.encode_crops(masked.crops(image, inst))
    diff = (box_features - masked_features).abs().amax(dim=1)
    assert diff[1] > 1e-4 and diff[2] > 1e-4  # ellipse and triangle are smaller than their boxes
    assert not np.allclose(masked.label(image, inst).scores[LABEL_PROB], tiny_labeler.label(image, inst).scores[LABEL_PROB])


def test_zero_instances(tiny_labeler):
    empty = Instances.empty(48, 64, scores={"confidence": np.zeros((0,), np.float32)})
    out = tiny_labeler.label(np.zeros((48, 64, 3), np.uint8), empty)
    assert len(out) == 0 and out.class_ids.shape == (0,) and out.class_ids.dtype == np.int32
    assert set(out.scores) == {"confidence", LABEL_PROB, LABEL_MARGIN} and out.attributes[LABEL_NAME] == ()


def test_label_rejects_a_wrong_image(tiny_labeler, sample):
    image, inst = sample
    with pytest.raises(ValidationError, match="the instances' frame"):
        tiny_labeler.label(image[:100], inst)


def test_given_text_embeddings_are_checked(tiny_labeler):
    import torch

    with pytest.raises(ValidationError, match="C = 3 classes"):
        fresh(tiny_labeler, text_embeddings=torch.ones(2, 32))


def test_input_size_other_than_native(tiny_labeler, sample):
    image, inst = sample
    out = fresh(tiny_labeler, tiny_config(input_size=256)).label(image, inst)  # interpolated positions
    assert out.class_ids.shape == (3,)
    with pytest.raises(ConfigError, match="multiple of labelgen-tiny-vit's patch size 16"):
        fresh(tiny_labeler, tiny_config(input_size=200))


def test_from_config_warns_and_reports_random_weights(caplog):
    pytest.importorskip("open_clip")
    from labelgen.labelers.clip import ClipLabeler

    with caplog.at_level(logging.WARNING, logger="labelgen.labelers.clip"):
        labeler = ClipLabeler.from_config(tiny_config(), device="cpu")
    assert "RANDOM WEIGHTS" in caplog.text
    facts = labeler.provenance()
    assert facts["weights"] == "RANDOM" and facts["model"] == TINY and facts["random_weights"] is True
    assert facts["classes"] == ["cat", "dog", "person"] and facts["labeler"] == "clip"


@pytest.mark.slow
def test_vit_b16_random_weights_labels_two_instances(sample):
    pytest.importorskip("open_clip")
    from labelgen.labelers.clip import ClipLabeler

    image, inst = sample
    config = from_mapping(LabelerConfig, {"classes": {"dog": ["dog", "puppy"], "person": []},
                                          "random_weights": True, "allow_download": False}, "labeler")
    labeler = ClipLabeler.from_config(config)
    out = labeler.label(image, inst[[0, 1]])
    assert labeler.text_embeddings().shape == (2, 512)
    assert out.class_ids.shape == (2,) and np.all(out.class_ids < 2)
    assert np.all(out.scores[LABEL_MARGIN] >= 0) and labeler.provenance()["weights"] == "RANDOM"
