"""Stage 4: SAM refinement on a tiny SAM of the real classes, checkpoint loading, Zip confidence."""
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

from segment_anything import SamPredictor  # noqa: E402

from labelgen.errors import GeneratorError, ValidationError, WeightsNotFoundError  # noqa: E402
from labelgen.generators.zip.config import SamConfig  # noqa: E402
from labelgen.models.loading import resolve_precision  # noqa: E402
from labelgen.generators.zip.refine import SamRefiner, _stability_score, zip_confidence  # noqa: E402
from labelgen.models.sam import SAM_MODEL_TYPES, build_sam  # noqa: E402

HEIGHT, WIDTH = 50, 80  # non-square on purpose
BOXES = np.array([[0, 0, 40, 30], [10, 5, 79, 49], [30, 20, 35, 26], [60, 0, 80, 50]], dtype=np.float32)
REAL_IMAGE = Path(__file__).resolve().parents[2] / "shared/assets/data/coco128-seg/images/train2017/000000000009.jpg"


class NotATensor:
    """Pickled into a checkpoint to check that weights_only loading refuses it."""


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(0)
    return build_sam("tiny", None, "cpu")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("multimask", [False, True])
def test_one_encoder_and_one_decoder_call_per_refine(tiny_sam, image, multimask, monkeypatch):
    refiner = SamRefiner(tiny_sam, SamConfig(multimask_output=multimask))
    encoder_calls, h1 = count_calls(tiny_sam.image_encoder)
    decoder_calls, h2 = count_calls(tiny_sam.mask_decoder)
    predict_calls = []
    original = refiner.predictor.predict_torch
    monkeypatch.setattr(refiner.predictor, "predict_torch",
                        lambda *a, **k: predict_calls.append(1) or original(*a, **k))
    try:
        result = refiner.refine(image, BOXES)
    finally:
        h1.remove()
        h2.remove()
    assert (len(encoder_calls), len(decoder_calls), len(predict_calls)) == (1, 1, 1)
    assert len(result) == len(BOXES)


def test_outputs_are_in_the_image_frame(tiny_sam, image):
    result = SamRefiner(tiny_sam, SamConfig(multimask_output=True)).refine(image, BOXES)
    assert result.masks.shape == (len(BOXES), HEIGHT, WIDTH) and result.masks.dtype == bool
    assert result.predicted_iou.shape == (len(BOXES),) and result.predicted_iou.dtype == np.float32
    assert result.stability_score.dtype == np.float32
    assert result.mask_choice.dtype == np.int64 and set(result.mask_choice.tolist()) <= {0, 1, 2}
    assert np.all((result.stability_score >= 0) & (result.stability_score <= 1))


@pytest.mark.parametrize("multimask", [False, True])
def test_matches_a_direct_predict_torch_call(tiny_sam, image, multimask):
    result = SamRefiner(tiny_sam, SamConfig(multimask_output=multimask)).refine(image, BOXES)
    predictor = SamPredictor(tiny_sam)
    with torch.inference_mode():
        predictor.set_image(image)
        boxes = predictor.transform.apply_boxes_torch(torch.as_tensor(BOXES), (HEIGHT, WIDTH))
        logits, ious, _ = predictor.predict_torch(None, None, boxes=boxes, multimask_output=multimask,
                                                  return_logits=True)
    assert logits.shape == (len(BOXES), 3 if multimask else 1, HEIGHT, WIDTH)
    best = ious.argmax(dim=1).numpy()
    rows = np.arange(len(BOXES))
    np.testing.assert_array_equal(result.mask_choice, best)
    np.testing.assert_array_equal(result.predicted_iou, ious.numpy()[rows, best])
    np.testing.assert_array_equal(result.masks, logits.numpy()[rows, best] > tiny_sam.mask_threshold)
    if multimask:
        assert np.all(result.predicted_iou == ious.numpy().max(axis=1))


def test_refine_is_deterministic(tiny_sam, image):
    refiner = SamRefiner(tiny_sam, SamConfig(multimask_output=True))
    first, second = refiner.refine(image, BOXES), refiner.refine(image, BOXES)
    for name in ("masks", "predicted_iou", "stability_score", "mask_choice"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))


def test_no_boxes_runs_no_model(tiny_sam, image):
    encoder_calls, handle = count_calls(tiny_sam.image_encoder)
    try:
        result = SamRefiner(tiny_sam, SamConfig()).refine(image, np.zeros((0, 4), dtype=np.float32))
    finally:
        handle.remove()
    assert encoder_calls == [] and result.masks.shape == (0, HEIGHT, WIDTH) and len(result) == 0


def test_embed_then_decode_in_separate_steps(tiny_sam, image):
    refiner = SamRefiner(tiny_sam, SamConfig())
    with pytest.raises(GeneratorError, match="call embed_image"):
        refiner.decode_boxes(BOXES)
    refiner.embed_image(image)
    split = refiner.decode_boxes(BOXES)
    np.testing.assert_array_equal(split.masks, refiner.refine(image, BOXES).masks)


def test_bf16_gives_float32_outputs(tiny_sam, image):
    result = SamRefiner(tiny_sam, SamConfig(multimask_output=True), precision="bf16").refine(image, BOXES)
    assert result.masks.shape == (len(BOXES), HEIGHT, WIDTH)
    assert result.predicted_iou.dtype == np.float32 and result.stability_score.dtype == np.float32


@pytest.mark.parametrize(
    "image_shape, dtype, boxes, error, message",
    [
        ((HEIGHT, WIDTH), np.uint8, BOXES, ValidationError, "image_rgb must be \\(H, W, 3\\) uint8"),
        ((HEIGHT, WIDTH, 3), np.float32, BOXES, ValidationError, "image_rgb must be"),
        ((HEIGHT, WIDTH, 3), np.uint8, BOXES[:, :3], ValidationError, "boxes_xyxy must be \\(N, 4\\)"),
        ((HEIGHT, WIDTH, 3), np.uint8, np.array([[0, 0, np.nan, 4]]), ValidationError, "finite"),
    ],
)
def test_refine_rejects_bad_inputs(tiny_sam, image_shape, dtype, boxes, error, message):
    with pytest.raises(error, match=message):
        SamRefiner(tiny_sam, SamConfig()).refine(np.zeros(image_shape, dtype=dtype), boxes)


def test_unknown_precision_is_refused(tiny_sam):
    with pytest.raises(GeneratorError, match="precision must be one of"):
        SamRefiner(tiny_sam, SamConfig(), precision="fp8")


def test_stability_score_of_known_logits():
    logits = torch.full((3, 4, 5), -5.0)
    logits[0, :2] = 5.0  # 10 px above +1, 10 px above -1 -> 1.0
    logits[1, :2] = 5.0
    logits[1, 2] = 0.5  # 10 px above +1, 15 px above -1 -> 2/3
    # logits[2]: empty at both thresholds -> 0
    np.testing.assert_allclose(_stability_score(logits, 0.0).numpy(), [1.0, 2 / 3, 0.0], rtol=1e-6)


def test_unknown_model_type_lists_the_choices():
    with pytest.raises(GeneratorError) as info:
        build_sam("vit_xxl", None)
    for name in SAM_MODEL_TYPES:
        assert name in str(info.value)


def test_checkpoint_round_trip_gives_identical_weights(tiny_sam, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    torch.manual_seed(123)  # a fresh build would differ without the checkpoint
    loaded = build_sam("tiny", path, "cpu")
    assert not loaded.training
    reference = tiny_sam.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key


def _pickled_object(sam):
    return {"x": NotATensor()}


def _missing_key(sam):
    state = dict(sam.state_dict())
    state.pop(next(iter(state)))
    return state


def _wrong_shape(sam):
    state = dict(sam.state_dict())
    key = "mask_decoder.iou_token.weight"
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    return state


@pytest.mark.parametrize(
    "make_payload, message",
    [
        (_pickled_object, "refusing SAM tiny checkpoint"),
        (lambda sam: [1, 2, 3], "must hold a state dict"),
        (_missing_key, "1 missing keys"),
        (_wrong_shape, "does not fit the tiny architecture"),
    ],
    ids=["arbitrary-object", "not-a-dict", "missing-key", "wrong-shape"],
)
def test_bad_checkpoints_are_refused(tiny_sam, tmp_path, make_payload, message):
    path = tmp_path / "bad.pth"
    torch.save(make_payload(tiny_sam), path)
    with pytest.raises(GeneratorError, match=message):
        build_sam("tiny", path)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        build_sam("tiny", tmp_path / "nope.pth")


@pytest.mark.parametrize(
    "prob, iou, expected",
    [
        ([0.25, 1.0, 0.0], [1.0, 0.49, 0.9], [0.5, 0.7, 0.0]),
        ([-0.1, np.nan, 0.5], [0.5, 0.5, np.nan], [0.0, 0.0, 0.0]),
        ([1.0], [1.3], [1.0]),  # SAM's IoU head can exceed 1: clipped
    ],
)
def test_zip_confidence(prob, iou, expected):
    got = zip_confidence(np.asarray(prob), np.asarray(iou))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.slow
def test_vit_b_architecture_refines_boxes_on_a_real_image():
    if not REAL_IMAGE.is_file():
        pytest.skip(f"{REAL_IMAGE} not found")
    from PIL import Image

    image = np.asarray(Image.open(REAL_IMAGE).convert("RGB"))
    height, width = image.shape[:2]
    torch.manual_seed(0)
    sam = build_sam("vit_b", None, "cpu")
    boxes = np.array([[10, 20, 200, 220], [150, 100, 400, 380], [0, 0, width, height]], dtype=np.float32)
    precision = resolve_precision("auto", "cpu")  # bf16 only where this CPU runs it natively (else 10x slower)
    result = SamRefiner(sam, SamConfig(model_type="vit_b", multimask_output=True), precision=precision).refine(
        image, boxes)
    assert result.masks.shape == (3, height, width)
    assert np.all((result.stability_score >= 0) & (result.stability_score <= 1))
